"""Context gathered right after a kernel event, in the event's own network namespace:
netns and interface names, the conntrack entry a segment belonged to, conntrack counters.

This is the only stage besides the probes that talks to the kernel. What it finds is
stored on the event (KernelEvent.context), so recording the events keeps everything the
attribution needs and replay reproduces live verdicts exactly.
"""
from __future__ import annotations

import glob
import os
import socket
import time

import structlog
from pyroute2 import Conntrack, NetNS
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

from .events import RST_SENT, ConntrackEntry, Endpoint, KernelEvent, Tuple

log = structlog.get_logger("rst-tracer.context")

# enum tcp_conntrack (include/uapi/linux/netfilter/nf_conntrack_tcp.h)
CT_TCP_STATES = ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT",
                 "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2")
RESCAN_INTERVAL = 1.0


class NetnsDirectory:
    """Network namespace inode -> a path that opens it, and a name for humans."""

    def __init__(self):
        self._paths: dict = {}
        self._names: dict = {}
        self._last_scan = 0.0
        self.root_inode = self._inode("/proc/1/ns/net")
        self.scan()

    @staticmethod
    def _inode(path: str) -> int:
        try:
            return os.stat(path).st_ino
        except OSError:
            return 0

    def scan(self) -> None:
        self._last_scan = time.monotonic()
        for path in glob.glob("/run/netns/*"):
            ino = self._inode(path)
            if ino:
                self._paths[ino] = path
                self._names[ino] = os.path.basename(path)
        for path in glob.glob("/proc/[0-9]*/ns/net"):
            ino = self._inode(path)
            if ino and ino not in self._paths:
                self._paths[ino] = path
        if self.root_inode:
            self._paths[self.root_inode] = "/proc/1/ns/net"
            self._names[self.root_inode] = "host"

    def _ensure(self, inode: int) -> None:
        if inode not in self._paths and time.monotonic() - self._last_scan > 0.05:
            self.scan()

    def path(self, inode: int) -> str:
        self._ensure(inode)
        return self._paths.get(inode, "")

    def name(self, inode: int) -> str:
        self._ensure(inode)
        return self._names.get(inode, "")

    def known(self) -> list:
        return list(self._paths)


def _tuple_from_nl(msg) -> Tuple:
    ip = msg.get_attr("CTA_TUPLE_IP")
    proto = msg.get_attr("CTA_TUPLE_PROTO")
    src = ip.get_attr("CTA_IP_V4_SRC") or ip.get_attr("CTA_IP_V6_SRC")
    dst = ip.get_attr("CTA_IP_V4_DST") or ip.get_attr("CTA_IP_V6_DST")
    return Tuple(Endpoint(src, proto.get_attr("CTA_PROTO_SRC_PORT")),
                 Endpoint(dst, proto.get_attr("CTA_PROTO_DST_PORT")))


def entry_from_netlink(msg) -> ConntrackEntry:
    state = ""
    info = msg.get_attr("CTA_PROTOINFO")
    tcp = info.get_attr("CTA_PROTOINFO_TCP") if info else None
    if tcp is not None:
        n = tcp.get_attr("CTA_PROTOINFO_TCP_STATE")
        state = CT_TCP_STATES[n] if n is not None and n < len(CT_TCP_STATES) else str(n)
    return ConntrackEntry(orig=_tuple_from_nl(msg.get_attr("CTA_TUPLE_ORIG")),
                          reply=_tuple_from_nl(msg.get_attr("CTA_TUPLE_REPLY")),
                          status=msg.get_attr("CTA_STATUS") or 0, tcp_state=state,
                          timeout=msg.get_attr("CTA_TIMEOUT") or 0)


class NetnsHandles:
    """Per-namespace netlink sockets (conntrack, rtnetlink), opened once and kept."""

    def __init__(self, directory: NetnsDirectory):
        self.dir = directory
        self._ct: dict = {}
        self._links: dict = {}
        self._invalid_seen: dict = {}   # netns -> conntrack `invalid` at the last look

    def conntrack(self, inode: int):
        if inode not in self._ct:
            path = self.dir.path(inode)
            if not path:
                return None
            family_sockets = {}
            for fam in (socket.AF_INET, socket.AF_INET6):
                family_sockets[fam] = Conntrack(nfgen_family=fam, netns=path, flags=0)
            self._ct[inode] = family_sockets
        return self._ct[inode]

    def ifname(self, inode: int, ifindex: int) -> str:
        key = (inode, ifindex)
        if key not in self._links and ifindex:
            path = self.dir.path(inode)
            name = ""
            if path:
                try:
                    with NetNS(path, flags=0) as ipr:
                        links = ipr.get_links(ifindex)
                        name = links[0].get_attr("IFLA_IFNAME") if links else ""
                except (OSError, NetlinkError):
                    name = ""
            self._links[key] = name
        return self._links.get(key, "")

    def lookup_by_reply(self, inode: int, seg: Tuple, family: int):
        """The entry whose reply tuple is exactly this segment's tuple, if any."""
        socks = self.conntrack(inode)
        if not socks:
            return None
        fam = socket.AF_INET6 if family == 6 else socket.AF_INET
        want = NFCTAttrTuple(family=fam, saddr=seg.src.addr, daddr=seg.dst.addr, proto=6,
                             sport=seg.src.port, dport=seg.dst.port)
        try:
            msg = socks[fam].entry("get", tuple_reply=want)
        except NetlinkError as e:
            if e.code != 2:  # ENOENT: no such entry, the common answer
                log.warning("conntrack lookup failed", netns=inode, error=str(e))
            return None
        return entry_from_netlink(msg) if msg else None

    def invalid_counter(self, inode: int):
        socks = self.conntrack(inode)
        if not socks:
            return None
        try:
            return sum(cpu.get("invalid", 0) for cpu in socks[socket.AF_INET].stat())
        except NetlinkError:
            return None

    def invalid_delta(self, inode: int):
        """Rise of the conntrack `invalid` counter since the previous look (or since the
        namespace was first seen: its counters started at zero when it was created)."""
        now = self.invalid_counter(inode)
        if now is None:
            return None
        before = self._invalid_seen.get(inode, 0)
        self._invalid_seen[inode] = now
        return now - before

    def baseline(self) -> None:
        """Counters of every namespace that exists at start: deltas are from now on."""
        for inode in self.dir.known():
            value = self.invalid_counter(inode)
            if value is not None:
                self._invalid_seen[inode] = value

    def close(self) -> None:
        for socks in self._ct.values():
            for s in socks.values():
                s.close()
        self._ct.clear()


def needs_conntrack(ev: KernelEvent) -> bool:
    """A stack-generated RST for a segment that carried no conntrack reference: it may be a
    NATed flow's segment that conntrack refused (INVALID) and so was not de-NATed."""
    return (ev.kind == RST_SENT and ev.has_skb and not ev.has_ct and not ev.has_sock
            and not ev.is_syn and ev.flow is not None)


class ContextGatherer:
    def __init__(self):
        self.dir = NetnsDirectory()
        self.handles = NetnsHandles(self.dir)

    def start(self) -> None:
        self.handles.baseline()

    def enrich(self, ev: KernelEvent) -> KernelEvent:
        ctx = ev.context
        ctx.netns_name = self.dir.name(ev.netns)
        ctx.ifname = self.handles.ifname(ev.netns, ev.ifindex)
        if needs_conntrack(ev):
            ctx.conntrack_looked_up = True
            ctx.conntrack = self.handles.lookup_by_reply(ev.netns, ev.flow, ev.family)
            ctx.ct_invalid_delta = self.handles.invalid_delta(ev.netns)
        return ev

    def close(self) -> None:
        self.handles.close()
