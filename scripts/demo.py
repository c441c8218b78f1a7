#!/usr/bin/env python3
"""Live demo: every lab scenario in turn, each in fresh network namespaces with the tracer
attached; what the lab's programs saw, then the verdicts the tracer printed for the lab.

    scripts/demo.py [-v] [SCENARIO ...]

table-full lowers the host-wide nf_conntrack_max for a few seconds: it runs only with
RST_TRACER_ALLOW_GLOBAL_SYSCTL=1 (restored in any case).
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tracer.lab import scenarios  # noqa: E402
from tracer.lab.harness import TracerProcess  # noqa: E402
from tracer.lab.topology import NatLab  # noqa: E402
from tracer.sinks.console import format_human  # noqa: E402


def _retransmitted(f):
    n = len(f["retransmitted"])
    return f"{n} client{'s' if n != 1 else ''} retransmitted {'their' if n != 1 else 'its'} SYN " \
           f"(insert_failed +{f['insert_failed']})"


SHOW_PER_CAUSE = 4
# (title, scenario, scenario options, lab options, what the lab saw)
PLAN = [
    ("Incident 1: a segment above the window is INVALID at the router, which answers RST",
     "invalid-window", {}, {}, lambda f: f"client's next request: {f['client_after']}"),
    ("Incident 1 with the fix (DROP INVALID in the router): no RST",
     "invalid-window", {}, {"drop_invalid": True}, lambda f: f"client's next request: {f['client_after']}"),
    ("Incident 1, service side: a backend reply INVALID at the router reaches the client un-DNATed",
     "invalid-dnat", {}, {}, lambda f: f"client: {f['client_after']}, backend: {f['backend_after']}"),
    ("Incident 2: SNATed SYNs race for one port; the loser is dropped (no RST, a 1 s stall)",
     "snat-race", {"random_fully": False}, {}, _retransmitted),
    ("Incident 2 with the fix (MASQUERADE --random-fully)",
     "snat-race", {"random_fully": True}, {}, _retransmitted),
    ("Incident 3: an address removal on the masquerading interface flushes conntrack; new port",
     "vip-move", {}, {}, lambda f: f"NAT port {f['old_port']} -> {f['new_port']}, client: {f['client_after']}"),
    ("Incidents 3/4 by the device: the masquerading interface flaps; the same flush, a new port",
     "device-down", {}, {}, lambda f: f"NAT port {f['old_port']} -> {f['new_port']}, client: {f['client_after']}"),
    ("Someone deletes conntrack entries over ctnetlink (conntrack -F): the same flush, and who did it",
     "ct-flush", {}, {}, lambda f: f"{f['command']} (pid {f['deleter_pid']}), NAT port {f['old_port']} -> "
                                   f"{f['new_port']}, client: {f['client_after']}"),
    ("Incident 4: a DHCP renewal flushes conntrack; the server's keepalive meets the router's RST",
     "dhcp-renew", {}, {}, lambda f: f"server: {f['server_after']}, client: {f['client_after']}"),
    ("An idle connection outlives its conntrack entry (timeout lowered to 3 s)",
     "ct-expire", {}, {}, lambda f: f"idle {f['idle_seconds']:.1f}s, server: {f['server_after']}"),
    ("Conntrack table full: new flows dropped (opt-in)",
     "table-full", {}, {}, lambda f: f"{f['failed_connects']} connects failed, {f['dropped_syns']} SYNs dropped"),
    ("Not conntrack: the router's raw table drops packets it never tracked (and a NOTRACK'd SYN)",
     "raw-drop", {}, {}, lambda f: ", ".join(f"{c['kind']}: {c['dropped']} dropped" for c in f["cases"])),
    ("Ordinary: SYNs to a closed port", "closed-port", {"count": 3}, {}, lambda f: f"{f['outcomes']}"),
    ("Ordinary: applications abort (unread data on close; SO_LINGER 0)",
     "app-abort", {}, {}, lambda f: ", ".join(f"{c['kind']}: peer {c['peer_after']}" for c in f["cases"])),
    ("Ordinary: keepalive gives up on a broken path",
     "keepalive-timeout", {}, {}, lambda f: f"client: {f['client_after']} after {f['gave_up_after']:.1f}s"),
    ("Ordinary: accept queue overflow with tcp_abort_on_overflow=1",
     "listen-overflow", {}, {}, lambda f: f"clients: {f['outcomes']}"),
    ("Ordinary: data into a TIME_WAIT socket", "timewait", {}, {}, lambda f: f"client: {f['client_after']}"),
]


def run(title, name, opts, lab_opts, saw, verbose) -> None:
    print(f"\n=== {title}  [{name}]", flush=True)
    with TracerProcess() as tracer:
        with NatLab(**lab_opts) as lab:
            mine = {lab.netns_inode(ns) for ns in lab.namespaces}
            try:
                outcome = scenarios.SCENARIOS[name](lab, **opts)
            except scenarios.ScenarioSkipped as e:
                print(f"    skipped: {e}", flush=True)
                return
            print(f"    lab: {saw(outcome.facts)}", flush=True)
            tracer.stop()
    verdicts = [v for v in tracer.verdicts() if v["netns"] in mine]
    shown: dict = {}
    for rec in verdicts:   # a race makes dozens of the same verdict: show a few of each
        shown[rec["cause"]] = shown.get(rec["cause"], 0) + 1
        if verbose or shown[rec["cause"]] <= SHOW_PER_CAUSE:
            print(format_human(rec, verbose), flush=True)
    for cause, n in shown.items():
        if not verbose and n > SHOW_PER_CAUSE:
            print(f"    ... and {n - SHOW_PER_CAUSE} more {cause} verdicts ({n} in all; -v shows every one)")
    if not verdicts:
        print("    (no verdicts: nothing was reset or dropped)", flush=True)


def main() -> int:
    verbose = "-v" in sys.argv
    wanted = [a for a in sys.argv[1:] if not a.startswith("-")]
    unknown = set(wanted) - set(scenarios.SCENARIOS)
    if unknown:
        print(f"demo: unknown scenario(s) {', '.join(sorted(unknown))}; "
              f"choose from {', '.join(scenarios.SCENARIOS)}", file=sys.stderr)
        return 2
    for step in PLAN:
        if not wanted or step[1] in wanted:
            run(*step, verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
