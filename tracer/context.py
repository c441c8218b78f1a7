"""Context gathered right after a kernel event, in the event's own network namespace and
in the namespaces around it: netns and interface names, the conntrack entry a segment
belonged to, conntrack counters, NAT rules; and the netlink monitors that report conntrack
deletions and address/link changes in every namespace.

This is the only stage besides the probes that talks to the kernel. What it finds is
stored on the events, so a recording keeps everything the attribution needs and replay
reproduces live verdicts exactly.
"""
from __future__ import annotations

import glob
import os
import select
import socket
import struct
import time

import structlog
from pyroute2 import Conntrack
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from .netns import in_netns, read_conntrack_sysctls
from .nfrules import SOURCE_NAT, read_rules
from .events import (ADDR_REMOVED, CT_DESTROY, IPS_DST_NAT, IPS_SRC_NAT, LINK_DOWN, RST_SENT,
                     SKB_DROPPED, ConntrackEntry, Endpoint, KernelEvent, Tuple)

log = structlog.get_logger("rst-tracer.context")

# enum tcp_conntrack (include/uapi/linux/netfilter/nf_conntrack_tcp.h)
CT_TCP_STATES = ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT",
                 "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2")
SCAN_INTERVAL = 1.0
STATS_KEYS = ("invalid", "insert_failed", "drop", "early_drop")
SYSCTLS = ("nf_conntrack_tcp_timeout_established", "nf_conntrack_tcp_be_liberal",
           "nf_conntrack_tcp_loose", "nf_conntrack_max")
# cross-namespace NAT lookups cost one ctnetlink GET per namespace: cap them per second
ELSEWHERE_LOOKUPS_PER_S = 50

NETLINK_ROUTE, NETLINK_NETFILTER = 0, 12
NFNLGRP_CONNTRACK_DESTROY = 3
RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x1, 0x10, 0x100
RTM_NEWLINK, RTM_DELLINK, RTM_DELADDR = 16, 17, 21
IPCTNL_MSG_CT_DELETE = 2
IFF_UP = 0x1
SO_RCVBUFFORCE = 33


class NetnsDirectory:
    """Network namespace inode -> a path that opens it, and a name for humans."""

    def __init__(self):
        self._paths: dict = {}
        self._names: dict = {}    # kept after a namespace goes: late events still get names
        self._last_scan = 0.0
        # our own namespace through a descriptor we hold: /proc/1 may not be openable
        self._own_fd = os.open("/proc/self/ns/net", os.O_RDONLY)
        self.own_inode = os.fstat(self._own_fd).st_ino
        self.root_inode = self._inode("/proc/1/ns/net") or self.own_inode
        self.scan()

    @staticmethod
    def _inode(path: str) -> int:
        try:
            return os.stat(path).st_ino
        except OSError:
            return 0

    def scan(self) -> None:
        """Rebuild the map: namespaces that vanished are forgotten (so that their sockets
        are closed and the kernel can free them)."""
        self._last_scan = time.monotonic()
        paths = {self.own_inode: f"/proc/self/fd/{self._own_fd}"}
        for path in glob.glob("/run/netns/*"):
            ino = self._inode(path)
            if ino:
                paths[ino] = path
                self._names[ino] = os.path.basename(path)
        for path in glob.glob("/proc/[0-9]*/ns/net"):
            ino = self._inode(path)
            if ino and ino not in paths:
                paths[ino] = path
        self._names[self.root_inode] = "host"
        if len(self._names) > 4096:   # forget names of long-gone namespaces
            self._names = {i: n for i, n in self._names.items() if i in paths}
        self._paths = paths

    def _ensure(self, inode: int) -> None:
        if inode not in self._paths and time.monotonic() - self._last_scan > 0.05:
            self.scan()

    def path(self, inode: int) -> str:
        self._ensure(inode)
        return self._paths.get(inode, "")

    def name(self, inode: int) -> str:
        if inode not in self._names:
            self._ensure(inode)
        return self._names.get(inode, "")

    def known(self) -> list:
        return list(self._paths)


def _tuple_from_nl(msg) -> Tuple:
    ip = msg.get_attr("CTA_TUPLE_IP")
    proto = msg.get_attr("CTA_TUPLE_PROTO")
    src = ip.get_attr("CTA_IP_V4_SRC") or ip.get_attr("CTA_IP_V6_SRC")
    dst = ip.get_attr("CTA_IP_V4_DST") or ip.get_attr("CTA_IP_V6_DST")
    return Tuple(Endpoint(src, proto.get_attr("CTA_PROTO_SRC_PORT") or 0),
                 Endpoint(dst, proto.get_attr("CTA_PROTO_DST_PORT") or 0))


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


def _nla(data: bytes, off: int, end: int):
    """Netlink attributes in data[off:end] as (type without flags, payload offset, end)."""
    while off + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, off)
        if length < 4:
            return
        yield kind & 0x3FFF, off + 4, off + length
        off += (length + 3) & ~3


def _tuple_from_raw(data: bytes, off: int, end: int):
    src = dst = None
    proto = sport = dport = 0
    for kind, a, b in _nla(data, off, end):
        if kind == 1:    # CTA_TUPLE_IP
            for k, x, y in _nla(data, a, b):
                if k in (1, 3):      # CTA_IP_V4_SRC / CTA_IP_V6_SRC
                    src = socket.inet_ntop(socket.AF_INET if k == 1 else socket.AF_INET6, data[x:y])
                elif k in (2, 4):
                    dst = socket.inet_ntop(socket.AF_INET if k == 2 else socket.AF_INET6, data[x:y])
        elif kind == 2:  # CTA_TUPLE_PROTO
            for k, x, _ in _nla(data, a, b):
                if k == 1:
                    proto = data[x]
                elif k == 2:
                    sport = struct.unpack_from("!H", data, x)[0]
                elif k == 3:
                    dport = struct.unpack_from("!H", data, x)[0]
    return proto, src, sport, dst, dport


def parse_ct_destroy(raw: bytes):
    """A ctnetlink DESTROY message -> ConntrackEntry, or None unless it is a well-formed
    NATed TCP entry. Hand-parsed: on a NAT box every connection ends with one of these, and
    a generic netlink decoder costs ~100 µs per message."""
    try:
        return _parse_ct_destroy(raw)
    except (ValueError, struct.error, IndexError):
        return None


def _parse_ct_destroy(raw: bytes):
    status = timeout = None
    orig = reply = None
    state = ""
    for kind, a, b in _nla(raw, 20, len(raw)):    # nlmsghdr (16) + nfgenmsg (4)
        if kind == 3:      # CTA_STATUS
            status = struct.unpack_from("!I", raw, a)[0]
            if not status & (IPS_SRC_NAT | IPS_DST_NAT):
                return None
        elif kind == 1:    # CTA_TUPLE_ORIG
            orig = _tuple_from_raw(raw, a, b)
            if orig[0] != 6:
                return None
        elif kind == 2:    # CTA_TUPLE_REPLY
            reply = _tuple_from_raw(raw, a, b)
        elif kind == 7:    # CTA_TIMEOUT
            timeout = struct.unpack_from("!I", raw, a)[0]
        elif kind == 4:    # CTA_PROTOINFO / CTA_PROTOINFO_TCP / CTA_PROTOINFO_TCP_STATE
            for k, x, y in _nla(raw, a, b):
                for k2, x2, _ in (_nla(raw, x, y) if k == 1 else ()):
                    if k2 == 1 and raw[x2] < len(CT_TCP_STATES):
                        state = CT_TCP_STATES[raw[x2]]
    if status is None or orig is None or reply is None or None in orig[1:] or None in reply[1:]:
        return None
    return ConntrackEntry(orig=Tuple(Endpoint(orig[1], orig[2]), Endpoint(orig[3], orig[4])),
                          reply=Tuple(Endpoint(reply[1], reply[2]), Endpoint(reply[3], reply[4])),
                          status=status, tcp_state=state, timeout=timeout or 0)


def read_sysctls(path: str) -> dict:
    return in_netns(path, lambda: read_conntrack_sysctls(SYSCTLS)) or {}


def read_nat_rules(path: str) -> dict:
    """Source-NAT rules of the namespace (iptables legacy/nft and nft, as doctor reads them)
    and whether they all randomise fully."""
    rules = [r for r in in_netns(path, lambda: read_rules(handles=False)).nat if r.kind in SOURCE_NAT]
    return {"rules": [r.text for r in rules], "random_fully": bool(rules) and all(r.random_fully for r in rules)}


class TimedCache:
    """Per-namespace values read from the kernel, re-read after `ttl` seconds."""

    def __init__(self, ttl: float = 10.0):
        self.ttl = ttl
        self._items: dict = {}

    def get(self, key, read):
        hit = self._items.get(key)
        if hit is None or time.monotonic() - hit[0] >= self.ttl:
            hit = (time.monotonic(), read())
            self._items[key] = hit
        return hit[1]

    def pop(self, key, default=None):
        return self._items.pop(key, default)


class NetnsHandles:
    """Per-namespace ctnetlink query sockets, opened once, closed when the namespace goes."""

    def __init__(self, directory: NetnsDirectory):
        self.dir = directory
        self._ct: dict = {}
        self._links: dict = {}
        self._stats_seen: dict = {}   # netns -> {stat: value at the last look}
        self._rules = TimedCache()    # netns -> nat rules

    def conntrack(self, inode: int):
        if inode not in self._ct:
            path = self.dir.path(inode)
            if not path:
                return None
            def open_sockets():
                socks = {fam: Conntrack(nfgen_family=fam) for fam in (socket.AF_INET, socket.AF_INET6)}
                for sock in socks.values():
                    sock.count()   # pyroute2 opens lazily: make it open here, in the namespace
                return socks
            try:
                self._ct[inode] = in_netns(path, open_sockets)
            except OSError as e:  # the process whose /proc path named the namespace exited
                log.debug("namespace not reachable", netns=inode, path=path, error=str(e))
                self.dir.scan()
                return None
        return self._ct[inode]

    def prune(self, alive: set) -> None:
        for inode in [i for i in self._ct if i not in alive]:
            for s in self._ct.pop(inode).values():
                s.close()
            self._stats_seen.pop(inode, None)
            self._rules.pop(inode, None)

    def opened(self) -> list:
        return list(self._ct)

    def ifname(self, inode: int, ifindex: int) -> str:
        key = (inode, ifindex)
        if key not in self._links and ifindex:
            path = self.dir.path(inode)
            name = ""
            if path:
                try:
                    name = in_netns(path, lambda: socket.if_indextoname(ifindex))
                except OSError:
                    name = ""
            self._links[key] = name
        return self._links.get(key, "")

    def lookup_by_reply(self, inode: int, seg: Tuple, family: int):
        """The entry whose reply tuple is exactly `seg`, if any."""
        socks = self.conntrack(inode)
        if not socks:
            return None
        fam = socket.AF_INET6 if family == 6 else socket.AF_INET
        want = NFCTAttrTuple(family=fam, saddr=seg.src.addr, daddr=seg.dst.addr, proto=6,
                             sport=seg.src.port, dport=seg.dst.port)
        try:
            msg = socks[fam].entry("get", tuple_reply=want)
        except NetlinkError as e:
            if e.code not in (2, 22):  # ENOENT: no such entry, the common answer
                log.warning("conntrack lookup failed", netns=inode, error=str(e))
            return None
        return entry_from_netlink(msg) if msg else None

    def stats(self, inode: int):
        socks = self.conntrack(inode)
        if not socks:
            return None
        try:
            per_cpu = socks[socket.AF_INET].stat()
            count = socks[socket.AF_INET].count()
        except NetlinkError:
            return None
        totals = {k: sum(cpu.get(k, 0) for cpu in per_cpu) for k in STATS_KEYS}
        totals["count"] = count
        return totals

    def stats_delta(self, inode: int):
        """(rise of each counter since the tracer started watching the namespace — for one
        created later, since its creation: its counters started at zero — , entries now).
        Not consumed by reading: every verdict of a run sees the same baseline."""
        now = self.stats(inode)
        if now is None:
            return {}, None
        before = self._stats_seen.get(inode, {})
        return {k: now[k] - before.get(k, 0) for k in STATS_KEYS}, now["count"]

    def baseline(self) -> None:
        """Counters of every namespace that exists at start: deltas are from now on."""
        for inode in self.dir.known():
            now = self.stats(inode)
            if now is not None:
                self._stats_seen[inode] = now

    def nat_rules(self, inode: int) -> dict:
        path = self.dir.path(inode)
        return self._rules.get(inode, lambda: read_nat_rules(path) if path else {})

    def close(self) -> None:
        self.prune(set())


class NetlinkMonitor:
    """Subscribes, in every namespace, to conntrack DESTROY events and to address and
    link changes: the deletions that later explain a reset, and what triggered them.
    Only deletions of NATed TCP entries are kept (others cannot cause our resets)."""

    def __init__(self, directory: NetnsDirectory):
        self.dir = directory
        self._socks: dict = {}       # fileno -> (inode, kind, socket)
        self._by_ns: dict = {}       # inode -> [socket, ...]
        self._link_up: dict = {}     # (inode, ifindex) -> bool
        self.overruns = 0            # times the kernel dropped messages for us (ENOBUFS)

    def sync(self) -> None:
        alive = set(self.dir.known())
        for inode in [i for i in self._by_ns if i not in alive]:
            for s in self._by_ns.pop(inode):
                self._socks.pop(s.fileno(), None)
                s.close()
        for inode in alive - set(self._by_ns):
            path = self.dir.path(inode)
            try:
                ct, rt = in_netns(path, lambda: (
                    socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER),
                    socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)))
                ct.bind((0, 1 << (NFNLGRP_CONNTRACK_DESTROY - 1)))
                rt.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
            except OSError as e:
                log.debug("cannot monitor namespace", netns=inode, error=str(e))
                self._by_ns[inode] = []
                continue
            for s, kind in ((ct, "ct"), (rt, "rt")):
                try:   # root may exceed net.core.rmem_max
                    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
                except OSError:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
                s.setblocking(False)
                self._socks[s.fileno()] = (inode, kind, s)
            self._by_ns[inode] = [ct, rt]

    def poll(self) -> list:
        if not self._socks:
            return []
        ready, _, _ = select.select(list(self._socks), [], [], 0)
        events = []
        for fd in ready:
            inode, kind, s = self._socks[fd]
            while True:
                try:
                    data = s.recv(1 << 16)
                except BlockingIOError:
                    break
                except OSError as e:  # ENOBUFS: the kernel dropped events for us
                    self.overruns += 1
                    log.debug("netlink monitor overrun", netns=inode, error=str(e))
                    continue
                events += self._parse(inode, kind, data)
        return events

    def _parse(self, inode: int, kind: str, data: bytes) -> list:
        out = []
        off = 0
        now, mono = time.time(), time.monotonic_ns()
        while off + 16 <= len(data):
            length, mtype = struct.unpack_from("=IH", data, off)
            if length < 16:
                break
            raw = data[off:off + length]
            off += (length + 3) & ~3
            base = dict(ts=now, ts_ns=mono, netns=inode, flow=None, probe="netlink")
            if kind == "ct" and mtype & 0xFF == IPCTNL_MSG_CT_DELETE:
                entry = parse_ct_destroy(raw)
                if entry is not None:
                    out.append(KernelEvent(kind=CT_DESTROY, ifindex=0, entry=entry,
                                           family=6 if ":" in entry.orig.src.addr else 4, **base))
            elif kind == "rt" and mtype == RTM_DELADDR:
                msg = ifaddrmsg(raw)
                msg.decode()
                out.append(KernelEvent(kind=ADDR_REMOVED, ifindex=msg["index"],
                                       address=f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}",
                                       **base))
            elif kind == "rt" and mtype in (RTM_NEWLINK, RTM_DELLINK):
                msg = ifinfmsg(raw)
                msg.decode()
                key = (inode, msg["index"])
                up = mtype == RTM_NEWLINK and bool(msg["flags"] & IFF_UP)
                if self._link_up.get(key, True) and not up:
                    out.append(KernelEvent(kind=LINK_DOWN, ifindex=msg["index"], **base))
                self._link_up[key] = up
        return out

    def close(self) -> None:
        for socks in self._by_ns.values():
            for s in socks:
                s.close()
        self._socks.clear()
        self._by_ns.clear()


def is_unknown_segment(ev: KernelEvent) -> bool:
    """A stack RST for a non-SYN segment with no connection socket (none, or a listener)."""
    return (ev.kind == RST_SENT and ev.has_skb and not ev.is_syn and ev.flow is not None
            and (not ev.has_sock or ev.sk_state == "LISTEN"))


class ContextGatherer:
    def __init__(self):
        self.dir = NetnsDirectory()
        self.handles = NetnsHandles(self.dir)
        self.monitor = NetlinkMonitor(self.dir)
        self._last_sync = 0.0
        self._elsewhere_budget = (0, 0)   # (second, lookups done in it)
        self._sysctls = TimedCache()

    def start(self) -> None:
        self.monitor.sync()
        self.handles.baseline()

    def tick(self) -> list:
        """Periodic work: follow namespaces coming and going; the monitors' events."""
        if time.monotonic() - self._last_sync > SCAN_INTERVAL:
            self._last_sync = time.monotonic()
            self.dir.scan()
            self.monitor.sync()
            self.handles.prune(set(self.dir.known()))
        return [self.enrich(ev) for ev in self.monitor.poll()]

    def _elsewhere_allowed(self) -> bool:
        second = int(time.monotonic())
        sec, used = self._elsewhere_budget
        if sec != second:
            sec, used = second, 0
        self._elsewhere_budget = (sec, used + 1)
        return used < ELSEWHERE_LOOKUPS_PER_S

    def _nat_elsewhere(self, ev: KernelEvent) -> list:
        """A segment this namespace cannot place may belong to a flow NATed by a router
        namespace on the same host: its reply tuple is the segment (a reply that was not
        un-DNATed) or the segment reversed (a client re-SNATed to a new port)."""
        found = []
        for inode in self.dir.known():
            if inode == ev.netns:
                continue
            for match, seg in (("reply", ev.flow), ("reply_reversed", ev.flow.reversed())):
                entry = self.handles.lookup_by_reply(inode, seg, ev.family)
                if entry is not None and entry.nat:
                    found.append({"netns": inode, "netns_name": self.dir.name(inode),
                                  "entry": entry, "match": match})
        return found

    def enrich(self, ev: KernelEvent) -> KernelEvent:
        ctx = ev.context
        ctx.netns_name = self.dir.name(ev.netns)
        ctx.ifname = self.handles.ifname(ev.netns, ev.ifindex)
        if is_unknown_segment(ev):
            if not ev.has_sock and not ev.has_ct:
                ctx.conntrack_looked_up = True
                ctx.conntrack = self.handles.lookup_by_reply(ev.netns, ev.flow, ev.family)
            if ctx.conntrack is None and self._elsewhere_allowed():
                ctx.nat_elsewhere = self._nat_elsewhere(ev)
                for hit in ctx.nat_elsewhere:   # counters of the router, where INVALID happened
                    hit["ct_stats_delta"], _ = self.handles.stats_delta(hit["netns"])
        # counters only where a conntrack cause is possible: never for ordinary resets
        if ev.kind == SKB_DROPPED or (is_unknown_segment(ev) and not ev.has_sock):
            ctx.ct_stats_delta, ctx.ct_count = self.handles.stats_delta(ev.netns)
        if ev.kind == SKB_DROPPED and ev.is_syn:
            ctx.sysctls = self.sysctls(ev.netns)
            ctx.ct_max = ctx.sysctls.get("nf_conntrack_max")
            if ev.skb_ct is not None:
                ctx.nat_rule = self.handles.nat_rules(ev.netns)
        if ev.kind == CT_DESTROY:
            ctx.sysctls = self.sysctls(ev.netns)
        return ev

    def sysctls(self, inode: int) -> dict:
        path = self.dir.path(inode)
        return self._sysctls.get(inode, lambda: read_sysctls(path) if path else {})

    def close(self) -> None:
        self.monitor.close()
        self.handles.close()
