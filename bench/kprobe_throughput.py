#!/usr/bin/env python3
"""Throughput cost of the kprobe backend: bulk TCP (iperf3) cli -> nat (MASQUERADE) -> srv in
the lab, no resets, without the tracer and then with `watch --backend kprobe` attached (all
probes, the netfilter ones included: the modules are loaded first).

What runs per packet of that bulk flow: nothing of ours. The probes fire on resets
(tcp_v4/v6_send_reset, tcp_send_active_reset, tcp_receive_reset), on conntrack's INVALID
slow path (nf_ct_l4proto_log_invalid), once per new connection (nf_nat_setup_info,
__nf_conntrack_confirm), on clashes (nf_ct_resolve_clash), once per deleted entry
(nf_ct_delete), on address/device events (masquerade notifiers, iterate_cleanup_work) and
on table-full evictions (early_drop). The one tracepoint that can see ordinary traffic is
skb:kfree_skb, and only freed (dropped) packets: it returns after one array lookup (the drop
reason, >= 5.17) or an address comparison (nf_hook_slow, older kernels).

Run as root inside the VM (our own kernel has no kprobes):
  scripts/vm/run-in-vm.sh bookworm -- python3 bench/kprobe_throughput.py [--seconds 10] [--rounds 1]
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


def iperf(lab: NatLab, seconds: float) -> float:
    srv = subprocess.Popen(["ip", "netns", "exec", lab.srv, "iperf3", "-s", "-1", "-B", SRV_ADDR],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    out = lab.exec(lab.cli, ["iperf3", "-c", SRV_ADDR, "-t", str(seconds), "-J"]).stdout
    srv.wait(timeout=30)
    return json.loads(out)["end"]["sum_received"]["bits_per_second"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=1, help="alternating without/with pairs")
    a = ap.parse_args()
    subprocess.run(["modprobe", "-a", "nf_conntrack", "nf_nat"], check=False)
    base, traced, verdicts = [], [], 0
    with NatLab() as lab:
        iperf(lab, 1)   # warm-up: ARP, first connection, page cache
        for _ in range(a.rounds):
            base.append(iperf(lab, a.seconds))
            t = TracerProcess("--backend", "kprobe")
            attached = t.start(timeout=240)
            assert attached["backend"] == "kprobe", attached
            traced.append(iperf(lab, a.seconds))
            t.stop()
            mine = {lab.netns_inode(ns) for ns in lab.namespaces}
            verdicts += len([v for v in t.verdicts() if v["netns"] in mine])
    b, w = statistics.mean(base), statistics.mean(traced)
    print(f"kernel {os.uname().release}: probes attached: {len(attached['probes'])} "
          f"({', '.join(attached['probes'])})")
    print(f"throughput: without tracer {[round(x / 1e6, 1) for x in base]} Mbit/s, with kprobe tracer "
          f"{[round(x / 1e6, 1) for x in traced]} Mbit/s, ratio {w / b:.4f}; "
          f"lab verdicts during the traced runs: {verdicts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
