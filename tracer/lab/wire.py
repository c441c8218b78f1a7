"""The wire as the oracle: capture every lab interface during a scenario and check that
each RST on the wire is covered by exactly one verdict, and each retransmitted SYN by a
SNAT clash verdict."""
from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass

SYN, RST, ACK = 0x02, 0x04, 0x10


@dataclass(frozen=True)
class WirePacket:
    ns: str
    iface: str
    ts: float
    src: str
    sport: int
    dst: str
    dport: int
    seq: int
    ack: int
    flags: int


class Capture:
    """tcpdump on each (namespace, interface) for SYN and RST segments; read back with tshark."""

    FILTER = "tcp[tcpflags] & (tcp-rst|tcp-syn) != 0"

    def __init__(self, points: list):
        self.points = points
        self.dir = tempfile.mkdtemp(prefix="rst-wire-")
        self.procs = []

    def __enter__(self) -> "Capture":
        for ns, iface in self.points:
            path = os.path.join(self.dir, f"{ns}-{iface}.pcap")
            p = subprocess.Popen(["ip", "netns", "exec", ns, "tcpdump", "-i", iface, "-U", "--immediate-mode", "-n",
                                  "-s", "96", "-w", path, self.FILTER],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            self.procs.append((p, ns, iface, path))
        # tcpdump says "listening on" once its filter is attached
        for p, *_ in self.procs:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                line = p.stderr.readline()
                if "listening on" in line or not line:
                    break
        time.sleep(0.2)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        time.sleep(0.2)
        for p, *_ in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p, *_ in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()

    def packets(self) -> list:
        out = []
        for _, ns, iface, path in self.procs:
            if not os.path.exists(path):
                continue
            r = subprocess.run(["tshark", "-r", path, "-T", "fields", "-E", "separator=,",
                                "-e", "frame.time_epoch", "-e", "ip.src", "-e", "ipv6.src",
                                "-e", "tcp.srcport", "-e", "ip.dst", "-e", "ipv6.dst", "-e", "tcp.dstport",
                                "-e", "tcp.seq_raw", "-e", "tcp.ack_raw", "-e", "tcp.flags"],
                               capture_output=True, text=True, timeout=60)
            for line in r.stdout.splitlines():
                f = line.split(",")
                if len(f) < 10:
                    continue
                out.append(WirePacket(ns, iface, float(f[0]), f[1] or f[2], int(f[3]), f[4] or f[5],
                                      int(f[6]), int(f[7] or 0), int(f[8] or 0), int(f[9], 16)))
        return sorted(out, key=lambda p: p.ts)


def _tuples(v: dict) -> list:
    """The RST's possible (src, sport, dst, dport) on the wire for a `sent` verdict: the
    verdict's flow reversed (the RST goes from us to the peer), or its NAT translations."""
    f = v["flow"]
    out = [(f["dst"], f["dport"], f["src"], f["sport"])]
    for t in (v.get("nat") or {}).values():
        out += [(t["src"], t["sport"], t["dst"], t["dport"]), (t["dst"], t["dport"], t["src"], t["sport"])]
    return out


def _same_rst(pkt: WirePacket, v: dict) -> bool:
    if (pkt.src, pkt.sport, pkt.dst, pkt.dport) not in _tuples(v):
        return False
    p = v.get("packet") or {}
    if not p:                 # an active reset (no segment drew it): tuple match only
        return True
    if "ACK" in p["flags"]:   # RFC 793: the RST takes its seq from the segment's ack
        return pkt.seq == p["ack"]
    span = p["len"] + ("SYN" in p["flags"]) + ("FIN" in p["flags"])
    return pkt.ack == (p["seq"] + span) & 0xFFFFFFFF


def distinct_rsts(packets: list, window: float = 0.2) -> list:
    """RSTs grouped by identity: one RST crossing a router is captured at several hops, with
    its addresses translated on one side but seq/ack unchanged."""
    groups: list = []
    for pkt in (p for p in packets if p.flags & RST):
        for g in groups:
            first = g[0]
            if (first.seq, first.ack, first.flags) == (pkt.seq, pkt.ack, pkt.flags) and \
                    pkt.ts - first.ts <= window and ({first.sport, first.dport} & {pkt.sport, pkt.dport}):
                g.append(pkt)
                break
        else:
            groups.append([pkt])
    return groups


def rst_coverage(packets: list, verdicts: list) -> dict:
    """Every distinct RST on the wire must match exactly one `sent` verdict (through any of
    the hops where it was captured)."""
    sent = [v for v in verdicts if v.get("direction") == "sent" and v.get("flow")]
    groups = distinct_rsts(packets)
    unmatched, ambiguous, matched = [], [], 0
    for group in groups:
        hits = {v["id"] for pkt in group for v in sent if _same_rst(pkt, v)}
        if not hits:
            unmatched.append(group[0])
        elif len(hits) > 1:
            ambiguous.append((group[0], sorted(hits)))
        else:
            matched += 1
    return {"rsts": len(groups), "captures": sum(map(len, groups)), "matched": matched,
            "coverage": matched / len(groups) if groups else 1.0,
            "unmatched": unmatched, "ambiguous": ambiguous}


def retransmitted_syns(packets: list, ns: str) -> list:
    """SYNs (no ACK) seen more than once with the same tuple and seq at a namespace."""
    seen, again = set(), []
    for p in packets:
        if p.ns != ns or not (p.flags & SYN) or p.flags & ACK:
            continue
        key = (p.src, p.sport, p.dst, p.dport, p.seq)
        if key in seen and key not in again:
            again.append(key)
        seen.add(key)
    return again
