#!/usr/bin/env python3
"""Budgets of the all-causes issue:
  1. kernel event -> verdict line on stdout: p99 <= 50 ms (closed-port resets at a modest rate)
  2. RST storm, 20 000 closed-port resets/s for 10 s: no crash, memory bounded, every reset
     either gets a verdict or is counted in an in-band loss record
Run as root: .venv/bin/python bench/storm.py [--rate 20000] [--seconds 10]
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tracer.lab.topology import CLI_ADDR, SRV_ADDR, NatLab  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


class Tracer:
    """The tracer with stdout read by a thread that stamps each line's arrival."""

    def __init__(self):
        self.p = subprocess.Popen([sys.executable, "-m", "tracer", "watch", "--json"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  cwd=os.path.dirname(HERE))
        self.lines = []   # (arrival wall time, record)
        self.attached = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.attached.wait(60):
            raise SystemExit("tracer did not attach: " + self.p.stderr.read())

    def _read(self):
        for line in self.p.stdout:
            rec = json.loads(line)
            self.lines.append((time.time(), rec))
            if rec.get("state") == "attached":
                self.attached.set()

    def stop(self):
        time.sleep(1.0)
        self.p.send_signal(2)
        self.p.wait(timeout=60)
        time.sleep(0.2)


def flood(lab, rate, seconds):
    r = lab.exec(lab.cli, [sys.executable, os.path.join(HERE, "synflood.py"), CLI_ADDR, SRV_ADDR, "9",
                           str(rate), str(seconds)])
    return json.loads(r.stdout)["sent"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=20000)
    ap.add_argument("--seconds", type=float, default=10)
    a = ap.parse_args()
    with NatLab() as lab:
        srv_ns = lab.netns_inode(lab.srv)
        # 1. latency at a modest rate
        t = Tracer()
        sent = flood(lab, 200, 5)
        t.stop()
        lat = sorted((arr - rec["ts_unix"]) * 1000 for arr, rec in t.lines
                     if rec.get("type") == "verdict" and rec["netns"] == srv_ns)
        p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]  # noqa: E731
        print(f"latency kernel event -> verdict on stdout: {len(lat)} verdicts for {sent} SYNs, "
              f"p50 {p(0.5):.2f} ms, p99 {p(0.99):.2f} ms, max {lat[-1]:.2f} ms (budget p99 50 ms)")

        # 2. storm
        t = Tracer()
        rss = [rss_kib(t.p.pid)]
        stop = threading.Event()

        def sample():
            while not stop.wait(0.5):
                try:
                    rss.append(rss_kib(t.p.pid))
                except (OSError, StopIteration):
                    return
        threading.Thread(target=sample, daemon=True).start()
        t0 = time.time()
        sent = flood(lab, a.rate, a.seconds)
        flood_s = time.time() - t0
        t.stop()
        stop.set()
        verdicts = sum(1 for _, r in t.lines if r.get("type") == "verdict" and r["netns"] == srv_ns
                       and r["cause"] == "no_listener")
        lost = sum(r["lost"] for _, r in t.lines if r.get("type") == "loss" and r["source"] == "kernel_ringbuf")
        overruns = sum(r["lost"] for _, r in t.lines if r.get("type") == "loss" and r["source"] == "netlink_monitor")
        detached = [r for _, r in t.lines if r.get("state") == "detached"]
        print(f"storm: {sent} SYNs in {flood_s:.1f} s ({sent / flood_s:.0f}/s) -> {verdicts} no_listener "
              f"verdicts + {lost} reported lost = {verdicts + lost} ({(verdicts + lost) / sent * 100:.1f} % "
              f"accounted); netlink monitor overruns reported: {overruns}; tracer exit {t.p.returncode}, detached record: {bool(detached)}; "
              f"RSS start {rss[0] / 1024:.1f} MiB, max {max(rss) / 1024:.1f} MiB, end {rss[-1] / 1024:.1f} MiB")
        print("RSS every 5 s (MiB): " + " ".join(f"{kib / 1024:.0f}" for kib in rss[::10]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
