#!/usr/bin/env python3
"""Start -> attached and resident memory of `watch --json` on this host as it is (issue 11's
targets: attached <= 1 s, RSS <= 150 MiB steady), N runs in a row: the `attached` status
record's `since_process_start_s` (interpreter start included) and `attach_s` (compile and
attach), and VmRSS 3 s and 10 s after attaching. bench/compare.py measures the same under
its workloads; this one is for a quiet machine.
Run as root: .venv/bin/python bench/startup.py [--runs 5]
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def one_run() -> dict:
    proc = subprocess.Popen([sys.executable, "-m", "tracer", "watch", "--json"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        attached = next((r for r in map(json.loads, proc.stdout) if r.get("state") == "attached"), None)
        if attached is None:
            sys.exit(f"startup: the tracer exited without attaching (exit {proc.wait()})")
        time.sleep(3)
        rss3 = rss_mib(proc.pid)
        time.sleep(7)
        return {"since_process_start_s": attached["since_process_start_s"], "attach_s": attached["attach_s"],
                "rss_3s_mib": round(rss3, 1), "rss_10s_mib": round(rss_mib(proc.pid), 1)}
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("startup: run as root (the tracer loads BPF programs)")
    runs = []
    for i in range(args.runs):
        runs.append(one_run())
        print(f"run {i + 1}: " + "  ".join(f"{k} {v}" for k, v in runs[-1].items()), flush=True)
    for key in runs[0]:
        values = [r[key] for r in runs]
        print(f"{key:22} median {statistics.median(values)}  min {min(values)}  max {max(values)}")
    with open("/proc/loadavg") as f:
        print("load average at the end:", " ".join(f.read().split()[:3]))


if __name__ == "__main__":
    main()
