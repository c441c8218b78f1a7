"""Enrichment: facts read from the kernel right after an event, in the event's own network
namespace and in the namespaces around it — namespace and interface names, the conntrack
entry a segment belonged to, conntrack counters, NAT rules, sysctls.

What it finds is stored on the events, so a recording keeps everything the attribution needs
and replay reproduces live verdicts exactly. The event sources themselves (ring buffer,
netlink monitors, namespace discovery) live in tracer/sources/.
"""
from __future__ import annotations

import socket
import time

import structlog
from pyroute2 import Conntrack
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

from .conntrack import entry_from_netlink
from .events import CT_DESTROY, SKB_DROPPED, KernelEvent, Tuple
from .netns import in_netns, read_conntrack_sysctls
from .nfrules import SOURCE_NAT, read_rules
from .sources.namespaces import Namespaces

log = structlog.get_logger("rst-tracer.enrich")

STATS_KEYS = ("invalid", "insert_failed", "drop", "early_drop")
SYSCTLS = ("nf_conntrack_tcp_timeout_established", "nf_conntrack_tcp_be_liberal",
           "nf_conntrack_tcp_loose", "nf_conntrack_max")
# cross-namespace NAT lookups cost one ctnetlink GET per namespace: cap them per second
ELSEWHERE_LOOKUPS_PER_S = 50
# a netlink port below this is a pid: the kernel binds a process's first netlink socket
# to its pid, further ones to values counted down from -4096 (PID_MAX_LIMIT is 4194304)
PID_PORT_LIMIT = 1 << 22


def process_of_port(portid: int, proc: str = "/proc") -> dict:
    """{pid, comm} of the process a netlink port number names, if it still runs."""
    if not 0 < portid < PID_PORT_LIMIT:
        return {}
    try:
        with open(f"{proc}/{portid}/comm") as f:
            return {"pid": portid, "comm": f.read().strip()}
    except OSError:
        return {}


def read_sysctls(ns) -> dict:
    return in_netns(ns, lambda: read_conntrack_sysctls(SYSCTLS)) or {}


def firewall_facts(rs) -> dict:
    """What a remedy must fit, from a namespace's rule sets: its source-NAT rules (and
    whether they all randomise fully, and the commands that would make them), whether Docker
    or kube-proxy manage its rules (their chains exist: they rewrite rules of their own), and
    whether its NAT is native nftables (no iptables NAT rule to edit)."""
    rules = [r for r in rs.nat if r.kind in SOURCE_NAT]
    names = {c[3] for c in rs.chains}
    return {"rules": [r.text for r in rules], "random_fully": bool(rules) and all(r.random_fully for r in rules),
            "fixes": [r.fix for r in rules if r.fix],
            "docker": bool(names & {"DOCKER-USER", "DOCKER"}),
            "kube_proxy": any(n.startswith("KUBE-") for n in names),
            "nft": bool(rs.nat) and all(r.source == "nft" for r in rs.nat)}


def read_firewall(ns) -> dict:
    """firewall_facts of a namespace, read as doctor reads it (iptables legacy/nft and nft)."""
    return firewall_facts(in_netns(ns, lambda: read_rules(handles=False)))


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
    """Per-namespace ctnetlink query sockets, opened on first use, closed when the namespace
    goes; interface names; conntrack counters and NAT rules."""

    def __init__(self, namespaces: Namespaces):
        self.ns = namespaces
        self._ct: dict = {}
        self._links: dict = {}
        self._stats_seen: dict = {}   # netns -> {stat: value at the last look}
        # netns -> firewall facts: rule sets change rarely and a big one (kube-proxy's) takes
        # a second to dump, now read for every router with deletions: once a minute at most
        self._rules = TimedCache(ttl=60.0)
        self._sysctls = TimedCache()

    def conntrack(self, inode: int):
        if inode not in self._ct:
            fd = self.ns.fd(inode)
            if fd is None:
                return None

            def open_sockets():
                socks = {fam: Conntrack(nfgen_family=fam) for fam in (socket.AF_INET, socket.AF_INET6)}
                for sock in socks.values():
                    sock.count()   # pyroute2 opens lazily: make it open here, in the namespace
                return socks
            try:
                self._ct[inode] = in_netns(fd, open_sockets)
            except OSError as e:
                log.debug("namespace not reachable", netns=inode, error=str(e))
                return None
        return self._ct[inode]

    def forget(self, inode: int) -> None:
        for s in self._ct.pop(inode, {}).values():
            s.close()
        self._stats_seen.pop(inode, None)
        self._rules.pop(inode, None)
        self._sysctls.pop(inode, None)
        for key in [k for k in self._links if k[0] == inode]:
            del self._links[key]

    def ifname(self, inode: int, ifindex: int) -> str:
        key = (inode, ifindex)
        if key not in self._links and ifindex:
            fd = self.ns.fd(inode)
            name = ""
            if fd is not None:
                try:
                    name = in_netns(fd, lambda: socket.if_indextoname(ifindex))
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
        found later, since it was found: a namespace is found at birth, when its counters
        are zero — , entries now). Not consumed by reading: every verdict of a run sees the
        same baseline."""
        now = self.stats(inode)
        if now is None:
            return {}, None
        before = self._stats_seen.get(inode, {})
        return {k: now[k] - before.get(k, 0) for k in STATS_KEYS}, now["count"]

    def baseline(self, inodes) -> None:
        """Counters of namespaces that existed before the tracer: deltas are from now on."""
        for inode in inodes:
            now = self.stats(inode)
            if now is not None:
                self._stats_seen[inode] = now

    def firewall(self, inode: int) -> dict:
        fd = self.ns.fd(inode)
        return self._rules.get(inode, lambda: read_firewall(fd) if fd is not None else {})

    def sysctls(self, inode: int) -> dict:
        fd = self.ns.fd(inode)
        return self._sysctls.get(inode, lambda: read_sysctls(fd) if fd is not None else {})

    def close(self) -> None:
        for inode in list(self._ct):
            self.forget(inode)


class Enricher:
    """Adds the context each event needs to its KernelEvent.context, nothing more: counters
    only where a conntrack cause is possible, cross-namespace lookups rate-limited."""

    def __init__(self, namespaces: Namespaces, workloads=None, owners=None):
        self.ns = namespaces
        self.handles = NetnsHandles(namespaces)
        self.workloads = workloads        # tracer.workloads.Resolver, or None: names nothing
        self.owners = owners              # tracer.owners.SocketSnapshot: sockets older than the tracer
        self._elsewhere_budget = (0, 0)   # (second, lookups done in it)
        self._ports = TimedCache(ttl=1.0)  # a flush deletes thousands of entries for one port

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
        for inode in self.ns.known():
            if inode == ev.netns:
                continue
            for match, seg in (("reply", ev.flow), ("reply_reversed", ev.flow.reversed())):
                entry = self.handles.lookup_by_reply(inode, seg, ev.family)
                if entry is not None and entry.nat:
                    found.append({"netns": inode, "netns_name": self.ns.name(inode),
                                  "entry": entry, "match": match})
        return found

    def enrich(self, ev: KernelEvent) -> KernelEvent:
        ctx = ev.context
        ctx.netns_name = self.ns.name(ev.netns)
        ctx.ifname = self.handles.ifname(ev.netns, ev.ifindex)
        unknown = ev.is_unknown_segment
        if unknown:
            if not ev.has_sock and not ev.has_ct:
                ctx.conntrack_looked_up = True
                ctx.conntrack = self.handles.lookup_by_reply(ev.netns, ev.flow, ev.family)
            if ctx.conntrack is None and self._elsewhere_allowed():
                ctx.nat_elsewhere = self._nat_elsewhere(ev)
                for hit in ctx.nat_elsewhere:   # counters of the router, where INVALID happened
                    hit["ct_stats_delta"], _ = self.handles.stats_delta(hit["netns"])
        # counters only where a conntrack cause is possible: never for ordinary resets
        if ev.kind == SKB_DROPPED or (unknown and not ev.has_sock):
            ctx.ct_stats_delta, ctx.ct_count = self.handles.stats_delta(ev.netns)
        if ev.kind == SKB_DROPPED and ev.is_syn:
            ctx.sysctls = self.handles.sysctls(ev.netns)
            ctx.ct_max = ctx.sysctls.get("nf_conntrack_max")
            if ev.skb_ct is not None:
                ctx.nat_rule = self.handles.firewall(ev.netns)
                ctx.firewall[ev.netns] = ctx.nat_rule
        if ev.kind == CT_DESTROY:
            ctx.sysctls = self.handles.sysctls(ev.netns)
            if ev.portid:
                ctx.requester = self._ports.get(ev.portid, lambda: process_of_port(ev.portid))
        # the router of a flow a remedy will address: where its NAT entry was found or deleted
        routers = [hit["netns"] for hit in ctx.nat_elsewhere]
        if ev.kind == CT_DESTROY or (ctx.conntrack is not None and ctx.conntrack.nat):
            routers.append(ev.netns)
        for inode in routers:
            ctx.firewall[inode] = self.handles.firewall(inode)
        if self.workloads is not None:
            ctx.workloads = self._workloads(ev)
        if ev.has_sock and ev.flow is not None:
            ctx.socket_owner = ev.owner or self._owner_at_start(ev)
        return ev

    def probes_attached(self) -> None:
        """From now on the kernel side names the process of every new socket: look at the
        ones that already exist, in every namespace known by now."""
        if self.owners is not None:
            self.owners.take({inode: self.ns.fd(inode) for inode in self.ns.known()})

    def _owner_at_start(self, ev: KernelEvent) -> dict:
        """A socket the kernel side saw no connect() or listen() of: older than the tracer.
        Its flow is oriented peer > us (KernelEvent.flow)."""
        if self.owners is None:
            return {}
        local, remote = ev.flow.dst, ev.flow.src
        return self.owners.owner(ev.netns, (local.addr, local.port), (remote.addr, remote.port)) or {}

    def _workloads(self, ev: KernelEvent) -> list:
        """What lives in the event's namespace, in the routers it names, and behind every
        address of its tuples and entries (the inside client of a NATed flow): dictionary
        reads of the resolver's tables."""
        ctx, r = ev.context, self.workloads
        found = [r.by_netns(ev.netns)] + [r.by_netns(hit["netns"]) for hit in ctx.nat_elsewhere]
        tuples = [ev.flow] + [t for e in (ev.skb_ct, ev.entry, ctx.conntrack) if e is not None
                              for t in (e.orig, e.reply)]
        tuples += [t for hit in ctx.nat_elsewhere for t in (hit["entry"].orig, hit["entry"].reply)]
        found += [r.by_addr(a) for a in {ep.addr for t in tuples if t is not None for ep in (t.src, t.dst)}]
        out: dict = {}
        for w in found:
            if w is not None and w.netns not in out:
                out[w.netns] = dict(w.record, netns_name=self.ns.name(w.netns))
        return list(out.values())

    def namespaces_changed(self, added, removed) -> None:
        """Namespace discovery's news, for the resolver (it looks in its background thread)."""
        if self.workloads is not None and (added or removed):
            self.workloads.namespaces_added(added)
            self.workloads.namespaces_removed(removed)

    def close(self) -> None:
        self.handles.close()
        if self.workloads is not None:
            self.workloads.close()
