#!/usr/bin/env python3
"""Spine budgets (issue: the spine):
  1. process start -> probes attached: <= 3 s   (median of N starts of `rst-tracer watch`)
  2. bulk TCP through the lab's NAT with the tracer attached and no resets: <= 2 % throughput loss
     (iperf3 from Debian, cli -> nat (MASQUERADE) -> srv, offloads off, alternating runs)
Run as root: .venv/bin/python bench/spine.py [--starts 5] [--seconds 5] [--rounds 4]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tracer.lab.harness import TracerProcess  # noqa: E402
from tracer.lab.topology import SRV_ADDR, NatLab  # noqa: E402


def startup(n: int) -> list:
    figures = []
    for _ in range(n):
        with TracerProcess() as t:
            figures.append(t.attached["since_process_start_s"])
    return figures


def iperf(lab: NatLab, seconds: float) -> float:
    srv = subprocess.Popen(["ip", "netns", "exec", lab.srv, "iperf3", "-s", "-1", "-B", SRV_ADDR],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    out = lab.exec(lab.cli, ["iperf3", "-c", SRV_ADDR, "-t", str(seconds), "-J"]).stdout
    srv.wait(timeout=10)
    return json.loads(out)["end"]["sum_received"]["bits_per_second"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--starts", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=4)
    a = ap.parse_args()

    s = startup(a.starts)
    print(f"startup: process start -> probes attached: median {statistics.median(s):.2f} s, "
          f"max {max(s):.2f} s over {len(s)} starts (budget 3 s)")

    base, traced = [], []
    with NatLab() as lab:
        for _ in range(a.rounds):  # alternate to spread machine noise over both sides
            base.append(iperf(lab, a.seconds))
            with TracerProcess() as t:
                traced.append(iperf(lab, a.seconds))
                t.stop()
                mine = {lab.netns_inode(ns) for ns in lab.namespaces}
                rsts = len([v for v in t.verdicts() if v["netns"] in mine])
    print("  runs without: " + " ".join(f"{x / 1e9:.3f}" for x in base) +
          " | with: " + " ".join(f"{x / 1e9:.3f}" for x in traced) + " Gbit/s")
    b, w = statistics.mean(base), statistics.mean(traced)
    print(f"throughput: without tracer {b / 1e9:.3f} Gbit/s, with tracer {w / 1e9:.3f} Gbit/s, "
          f"ratio {w / b:.4f} (loss {max(0.0, 1 - w / b) * 100:.2f} %, budget 2 %); "
          f"lab verdicts during the traced runs: {rsts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
