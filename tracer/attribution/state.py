"""What the attribution remembers between events, bounded in size and age: root-cause
verdicts per flow, recent conntrack deletions, and the address/device events that flush
entries."""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Optional

from ..events import ADDR_REMOVED, LINK_DOWN, MASQ_NOTIFIER, ConntrackEntry, KernelEvent, Tuple

# Every time here is on the correlation clock (monotonic seconds, KernelEvent.mono).
# a deletion is blamed on an address/device event this close to it (the masquerade
# cleanup runs from a work queue since 5.15, so the deletions may trail the event)
TRIGGER_WINDOW_S = 5.0
# A netlink event happened between the last time its monitor was found empty and the time it
# was read; where a recording did not keep the first, up to READ_LAG_S before it was read.
# Two kernel facts of one system call (an address event and its notifier) are EPS_S apart.
READ_LAG_S = 1.0
EPS_S = 0.05


def gap(a: tuple, b: tuple) -> float:
    """Distance in time between two intervals (lo, hi): 0 when they overlap."""
    return max(0.0, a[0] - b[1], b[0] - a[1])
# an entry deleted with at most this much of its timeout left expired
EXPIRED_TIMEOUT_LEFT_S = 1
MEMORY_TTL_S = 3600.0

# What the attribution remembers is bounded by bytes: a budget per kind, divided by what one
# entry retains (CPython 3.11, measured with tracemalloc by tests/unit/test_state_memory.py,
# which fails if an entry outgrows its figure; tests/unit/test_workloads.py for "workload").
# 70 MiB in all; the oldest entries go first.
# The verdicts kept open to correction (engine.py) are budgeted here too.
ENTRY_BYTES = {"deletion": 1800, "binding": 1400, "verdict": 800, "invalid": 4000, "judged": 3600,
               "workload": 1200}
BUDGET_BYTES = {"deletion": 32 << 20, "binding": 16 << 20, "verdict": 8 << 20, "invalid": 2 << 20,
                "judged": 8 << 20, "workload": 4 << 20}


class BoundedMap:
    """An LRU map, bounded in bytes (`budget` / `entry_bytes` entries), whose entries also
    expire after `ttl` seconds of event time."""

    def __init__(self, ttl: float, budget: int, entry_bytes: int):
        self.ttl, self.max_entries = ttl, max(1, budget // entry_bytes)
        self._items: OrderedDict = OrderedDict()

    def put(self, key, value, now: float) -> None:
        self._items[key] = (now, value)
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def get(self, key, now: float):
        hit = self._items.get(key)
        if hit is None or now - hit[0] > self.ttl:
            return None
        return hit

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class Deletion:
    netns: int
    ts: float               # correlation clock (monotonic seconds)
    entry: ConntrackEntry
    sysctls: dict = field(default_factory=dict)
    reason: str = ""        # kprobe backend: why the kernel deleted it
    detail: dict = field(default_factory=dict)
    wall: float = 0.0       # for display
    # the earliest it can have happened: exact from a probe; from netlink, when the monitor
    # was last found empty (0: unknown, as in recordings made before this was kept)
    not_before: float = 0.0
    requester: dict = field(default_factory=dict)   # ctnetlink deletions: {pid, comm, portid}
    netns_name: str = ""

    @property
    def when(self) -> tuple:
        """When it happened, as an interval (exact for a probe's deletion)."""
        return (self.not_before or self.ts - READ_LAG_S, self.ts)

    @property
    def by_ctnetlink(self) -> bool:
        """Someone asked for it over ctnetlink: conntrack -D/-F, kube-proxy, a CNI."""
        return self.reason == "ctnetlink" or bool(self.requester.get("portid"))

    @property
    def expired(self) -> bool:
        if self.by_ctnetlink:
            return False
        if self.reason:
            return self.reason == "timeout"
        return self.entry.timeout <= EXPIRED_TIMEOUT_LEFT_S

    def preceded(self, ts: float) -> bool:
        """Can this deletion have happened before time ts?"""
        return self.not_before <= ts

    @classmethod
    def of(cls, ev: KernelEvent) -> "Deletion":
        if ev.not_before_ns:
            not_before = ev.not_before_ns / 1e9
        else:   # a probe's time is exact; an old netlink record's is only an upper bound
            not_before = 0.0 if ev.probe == "netlink" else ev.mono
        requester = {}
        if ev.delete_reason == "ctnetlink":   # the probe ran in the requesting process
            requester = {"pid": ev.pid, "comm": ev.comm, "portid": ev.portid}
        elif ev.portid:
            requester = dict(ev.context.requester, portid=ev.portid)
        return cls(ev.netns, ev.mono, ev.entry, ev.context.sysctls, ev.delete_reason, ev.delete_detail,
                   ev.ts, not_before, requester, ev.context.netns_name)

    def merge(self, other: "Deletion") -> None:
        """The same deletion reported twice (kprobe, then netlink): keep the richer facts."""
        if other.reason and not self.reason:
            self.reason, self.detail = other.reason, other.detail
            self.ts, self.wall, self.not_before = other.ts, other.wall, other.not_before
        self.requester = {**other.requester, **self.requester}
        self.sysctls = self.sysctls or other.sysctls
        self.netns_name = self.netns_name or other.netns_name


CTNETLINK_DELETE = "ctnetlink_delete"   # a trigger kind: the deletion was asked for over ctnetlink


@dataclass
class Trigger:
    kind: str
    netns: int
    netns_name: str
    ts: float               # correlation clock (monotonic seconds)
    ifname: str = ""
    address: str = ""
    notifier: str = ""
    wall: float = 0.0       # for display
    requester: dict = field(default_factory=dict)
    not_before: float = 0.0  # netlink: when its monitor was last found empty (0: unknown)

    @property
    def when(self) -> tuple:
        """When it happened, as an interval: a netlink event between its monitor's last empty
        read and its own read; a probe's, exactly."""
        if self.notifier:     # a masquerade notifier run: a probe's time
            return (self.ts, self.ts)
        return (self.not_before or self.ts - READ_LAG_S, self.ts)

    @classmethod
    def of_deletion(cls, gone: "Deletion") -> "Trigger":
        return cls(CTNETLINK_DELETE, gone.netns, gone.netns_name, gone.ts, wall=gone.wall,
                   requester=gone.requester)

    def describe(self) -> str:
        if self.kind == ADDR_REMOVED:
            return f"removal of address {self.address} from {self.ifname or 'an interface'}"
        if self.kind == CTNETLINK_DELETE:
            r = self.requester
            who = f"{r['comm']} (pid {r['pid']})" if r.get("comm") else \
                f"netlink port {r['portid']} (process not found)" if r.get("portid") else "a process"
            return f"a deletion over ctnetlink by {who}"
        return f"interface {self.ifname or '?'} going down"

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "netns": self.netns, "ifname": self.ifname,
             "address": self.address, "notifier": self.notifier, "ts": self.wall}
        if self.requester:
            d["requester"] = self.requester
        return d


@dataclass
class Binding:
    """A NAT binding (the tuple NAT chose for a new entry), as much of it as rules need."""
    netns: int
    ts: float
    entry: ConntrackEntry
    nat_range_flags: int = 0


class WorkloadBook:
    """What lives in which namespace and behind which address, and the firewall of each
    router, as the events' contexts told it (enrichment: tracer/workloads.py, enrich.py).
    A verdict names the workloads of its endpoints from here — a flushed entry's client is
    named by the deletion's context, read before the reset — so a replay names them as the
    live run did. The records are the contexts' own dicts: an entry retains only its keys."""

    def __init__(self, ttl: float, budget: int, entry_bytes: int):
        # entry_bytes is what one workload costs in both maps (measured together)
        self._netns = BoundedMap(ttl, budget, entry_bytes)
        self._addr = BoundedMap(ttl, budget, entry_bytes)
        # routers are few (a node, its bridges); their facts cost a few workloads each
        self._firewall = BoundedMap(ttl, budget // 16, entry_bytes)

    def learn(self, ctx, now: float) -> None:
        for w in ctx.workloads:
            self._netns.put(w["netns"], w, now)
            for addr in w.get("addrs") or ():
                self._addr.put(addr, w, now)
        for inode, facts in ctx.firewall.items():
            self._firewall.put(int(inode), facts, now)

    def netns(self, inode: int, now: float) -> Optional[dict]:
        hit = self._netns.get(inode, now)
        return hit[1] if hit else None

    def addr(self, addr: str, now: float) -> Optional[dict]:
        hit = self._addr.get(addr, now)
        return hit[1] if hit else None

    def firewall(self, inode: int, now: float) -> dict:
        hit = self._firewall.get(inode, now)
        return hit[1] if hit else {}


class AttributionState:
    def __init__(self, budget: Optional[dict] = None):
        budget = dict(BUDGET_BYTES, **(budget or {}))

        def bounded(kind, ttl=MEMORY_TTL_S):
            return BoundedMap(ttl, budget[kind], ENTRY_BYTES[kind])
        self._verdicts = bounded("verdict")
        self._by_reply = bounded("deletion")       # (netns, reply) -> Deletion
        self._by_reply_any = bounded("deletion")   # reply -> Deletion  (the same objects)
        self._by_orig = bounded("deletion")        # (netns, orig) -> [Deletion]
        self._triggers: dict = {}                  # netns -> deque of Trigger (256 each)
        self._invalid = bounded("invalid", ttl=60)  # (netns, segment) -> ct_invalid event
        self._bindings = bounded("binding")        # (netns, reply) -> Binding
        self._bindings_any = bounded("binding")    # reply -> Binding  (the same objects)
        self.workloads = WorkloadBook(MEMORY_TTL_S, budget["workload"], ENTRY_BYTES["workload"])
        self.now = 0.0

    def firewall(self, netns: int) -> dict:
        """The firewall facts of a namespace (docker, kube_proxy, nft, ...; {} unknown)."""
        return self.workloads.firewall(netns, self.now)

    # -- root-cause verdicts ---------------------------------------------------------
    def remember(self, keys: list, record: dict, now: float) -> None:
        for key in keys:
            self._verdicts.put(key, record, now)

    def related(self, ev: KernelEvent) -> Optional[dict]:
        hit = self._verdicts.get(ev.flow.endpoints(), ev.mono) if ev.flow else None
        if hit is None:
            return None
        return dict(hit[1], age_s=round(ev.mono - hit[0], 6))

    # -- conntrack deletions -----------------------------------------------------------
    def add_deletion(self, ev: KernelEvent) -> Deletion:
        d = Deletion.of(ev)
        # the kprobe backend and the netlink monitor both report a deletion, in either order:
        # one Deletion, with the kernel's reason from the probe
        known = self.deletion_by_reply(ev.netns, ev.entry.reply)
        if known is not None and known.entry.orig == d.entry.orig and abs(known.ts - d.ts) < 2:
            known.merge(d)
            return known
        self._by_reply.put((ev.netns, ev.entry.reply), d, d.ts)
        self._by_reply_any.put(ev.entry.reply, d, d.ts)
        # several entries of one inside flow: the flushed one, then its re-NATed successor
        earlier = self._by_orig.get((ev.netns, ev.entry.orig), d.ts)
        self._by_orig.put((ev.netns, ev.entry.orig), ((earlier[1] if earlier else []) + [d])[-4:], d.ts)
        return d

    def deletion_by_reply(self, netns: int, reply: Tuple) -> Optional[Deletion]:
        hit = self._by_reply.get((netns, reply), self.now)
        return hit[1] if hit else None

    def deletion_by_reply_anywhere(self, reply: Tuple) -> Optional[Deletion]:
        hit = self._by_reply_any.get(reply, self.now)
        return hit[1] if hit else None

    def deletions_by_orig(self, netns: int, orig: Tuple) -> list:
        hit = self._by_orig.get((netns, orig), self.now)
        return hit[1] if hit else []

    # -- kprobe backend: INVALID verdicts and NAT bindings ----------------------------------
    def add_invalid(self, ev: KernelEvent) -> None:
        self._invalid.put((ev.netns, ev.flow), ev, ev.mono)

    def invalid_for(self, netns: int, seg: Tuple, within: float = 2.0) -> Optional[KernelEvent]:
        hit = self._invalid.get((netns, seg), self.now)
        return hit[1] if hit and self.now - hit[0] <= within else None

    def add_binding(self, ev: KernelEvent) -> None:
        b = Binding(ev.netns, ev.mono, ev.entry, ev.nat_range_flags)
        self._bindings.put((ev.netns, ev.entry.reply), b, ev.mono)
        self._bindings_any.put(ev.entry.reply, b, ev.mono)

    def binding_for(self, netns: int, reply: Tuple) -> Optional[Binding]:
        hit = self._bindings.get((netns, reply), self.now)
        return hit[1] if hit else None

    def binding_anywhere(self, reply: Tuple) -> Optional[Binding]:
        hit = self._bindings_any.get(reply, self.now)
        return hit[1] if hit else None

    # -- what flushes entries ------------------------------------------------------------
    def add_trigger(self, ev: KernelEvent) -> None:
        t = Trigger(ev.kind, ev.netns, ev.context.netns_name, ev.mono, ev.context.ifname, ev.address,
                    ev.notifier, ev.ts, not_before=ev.not_before_ns / 1e9)
        self._triggers.setdefault(ev.netns, deque(maxlen=256)).append(t)

    def trigger_near(self, netns: int, when: tuple, gone: Optional[Deletion] = None) -> Optional[Trigger]:
        """The address removal or device-down event in that namespace, within
        TRIGGER_WINDOW_S of a deletion, that best explains it: the removal of the entry's own
        NAT address, a device going down (first when the kernel said so), the removal of
        another address of the same family (5.10 flushes the whole device on any IPv4
        removal), then anything else; the closest in time among equals. A link going down
        also removes its IPv6 addresses: those removals do not explain an IPv4 entry.
        A masquerade notifier run alone is no trigger: it runs for every address and device
        event (additions, new veths), not only the ones that flush."""
        near = [t for t in self._triggers.get(netns, ())
                if t.kind in (ADDR_REMOVED, LINK_DOWN) and gap(when, t.when) <= TRIGGER_WINDOW_S]
        if not near:
            return None
        nat_addr = gone.entry.reply.dst.addr if gone is not None else ""
        by_device = gone is not None and gone.reason == "device"

        def rank(t: Trigger) -> int:
            if t.kind == LINK_DOWN:
                return 0 if by_device else 1
            if t.address.split("/")[0] == nat_addr:
                return 1 if by_device else 0
            return 2 if (":" in t.address) == (":" in nat_addr) else 3
        return min(near, key=lambda t: (rank(t), gap(when, t.when), abs(when[1] - t.ts)))

    def notifier_for(self, trigger: Trigger) -> Optional[Trigger]:
        """The masquerade notifier run that answered an address removal or device-down
        event (corroboration that the MASQUERADE cleanup ran). Looked for in every
        namespace: the tracepoint knows only the namespace of the task that made the change,
        which need not be the namespace of the address (netlink sockets opened elsewhere)."""
        if trigger.kind == CTNETLINK_DELETE:
            return None
        if trigger.kind == LINK_DOWN:
            name = "masq_device_event"
        else:
            name = "masq_inet6_event" if ":" in trigger.address else "masq_inet_event"
        near = [t for runs in self._triggers.values() for t in runs
                if t.kind == MASQ_NOTIFIER and t.notifier == name
                and gap(trigger.when, t.when) <= EPS_S]
        return min(near, key=lambda t: gap(trigger.when, t.when)) if near else None
