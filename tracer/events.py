"""Typed kernel events: what the probes saw, plus the context gathered at event time.

This is the input of the attribution core and the unit of record/replay, so it is plain
data (dataclasses of str/int/bool/dict) with a dict round trip.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Optional

# from the probes
RST_SENT, RST_RECEIVED, SKB_DROPPED = "rst_sent", "rst_received", "skb_dropped"
MASQ_NOTIFIER = "masq_notifier"          # a masquerade address/device notifier ran
# kprobe backend only: richer evidence
CT_INVALID = "ct_invalid"                # conntrack logged a segment INVALID/IGNORED, with why
NAT_BINDING = "nat_binding"              # NAT chose a tuple for a new connection
# from netlink monitors in each namespace (and from nf_ct_delete on the kprobe backend)
CT_DESTROY = "ct_destroy"                # a conntrack entry went away
ADDR_REMOVED = "addr_removed"            # an address was removed from an interface
LINK_DOWN = "link_down"                  # an interface went down
# not an attribution event: the kernel saw a task in a network namespace new to it
NETNS_BORN = "netns_born"
EVENT_KINDS = (RST_SENT, RST_RECEIVED, SKB_DROPPED, MASQ_NOTIFIER, CT_DESTROY, ADDR_REMOVED, LINK_DOWN,
               CT_INVALID, NAT_BINDING)
TRIGGER_KINDS = (MASQ_NOTIFIER, ADDR_REMOVED, LINK_DOWN)

TCP_FLAG_NAMES = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR")
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10

# include/uapi/linux/netfilter/nf_conntrack_common.h: enum ip_conntrack_status bits
IPS_SRC_NAT, IPS_DST_NAT, IPS_CONFIRMED, IPS_ASSURED, IPS_SEEN_REPLY = 1 << 4, 1 << 5, 1 << 3, 1 << 2, 1 << 1
CT_STATUS_BITS = ("EXPECTED", "SEEN_REPLY", "ASSURED", "CONFIRMED", "SRC_NAT", "DST_NAT",
                  "SEQ_ADJUST", "SRC_NAT_DONE", "DST_NAT_DONE", "DYING", "FIXED_TIMEOUT",
                  "TEMPLATE", "UNTRACKED", "HELPER", "OFFLOAD", "HW_OFFLOAD")


def flag_names(flags: int) -> list:
    return [n for i, n in enumerate(TCP_FLAG_NAMES) if flags >> i & 1]


def ct_status_names(status: int) -> list:
    return [n for i, n in enumerate(CT_STATUS_BITS) if status >> i & 1]


def format_endpoint(addr: str, port) -> str:
    """addr:port, with an IPv6 address in brackets: the one way endpoints are written."""
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


@dataclass(frozen=True)
class Endpoint:
    addr: str
    port: int

    def __str__(self) -> str:
        return format_endpoint(self.addr, self.port)


@dataclass(frozen=True)
class Tuple:
    """A TCP 4-tuple oriented as a packet travelled: src -> dst."""
    src: Endpoint
    dst: Endpoint

    def reversed(self) -> "Tuple":
        return Tuple(self.dst, self.src)

    def endpoints(self) -> frozenset:
        """Orientation-free key: both directions of a connection map to the same key."""
        return frozenset((self.src, self.dst))

    def __str__(self) -> str:
        return f"{self.src} > {self.dst}"

    def to_dict(self) -> dict:
        return {"src": self.src.addr, "sport": self.src.port,
                "dst": self.dst.addr, "dport": self.dst.port}

    @classmethod
    def from_dict(cls, d: dict) -> "Tuple":
        return cls(Endpoint(d["src"], int(d["sport"])), Endpoint(d["dst"], int(d["dport"])))


@dataclass
class ConntrackEntry:
    """A conntrack entry as read over ctnetlink: original and reply tuples, status bits."""
    orig: Tuple
    reply: Tuple
    status: int
    tcp_state: str = ""
    timeout: int = 0

    @property
    def nat(self) -> bool:
        return bool(self.status & (IPS_SRC_NAT | IPS_DST_NAT))

    def to_dict(self) -> dict:
        return {"orig": self.orig.to_dict(), "reply": self.reply.to_dict(), "status": self.status,
                "status_names": ct_status_names(self.status), "tcp_state": self.tcp_state,
                "timeout": self.timeout}

    @classmethod
    def from_dict(cls, d: dict) -> "ConntrackEntry":
        return cls(Tuple.from_dict(d["orig"]), Tuple.from_dict(d["reply"]), int(d["status"]),
                   d.get("tcp_state", ""), int(d.get("timeout", 0)))


@dataclass
class Context:
    """Facts gathered from the kernel right after the event, in the event's netns."""
    netns_name: str = ""
    ifname: str = ""
    conntrack: Optional[ConntrackEntry] = None   # entry whose reply tuple matched the segment
    conntrack_looked_up: bool = False
    # conntrack statistics of the namespace: rise since the previous look (invalid,
    # insert_failed, drop, early_drop), and the table's fill
    ct_stats_delta: dict = field(default_factory=dict)
    ct_count: Optional[int] = None
    ct_max: Optional[int] = None
    # NAT entries for this segment found in *other* namespaces (the router of a container):
    # [{"netns", "netns_name", "entry", "match": "reply" | "reply_reversed"}]
    nat_elsewhere: list = field(default_factory=list)
    nat_rule: dict = field(default_factory=dict)  # {"random_fully": bool, "rules": [...]}
    sysctls: dict = field(default_factory=dict)    # conntrack sysctls of the namespace
    requester: dict = field(default_factory=dict)  # ct_destroy over ctnetlink: {pid, comm} of its port
    # what lives in the namespaces and behind the addresses this event names (tracer/workloads.py):
    # [{"netns", "netns_name", "addrs", "containers": [...], "pod"}], only those with a container or pod
    workloads: list = field(default_factory=list)
    # the process of the event's socket: the kernel side's (KernelEvent.owner) or, for a
    # socket older than the tracer, who held it at start (tracer/owners.py); {} when unknown
    socket_owner: dict = field(default_factory=dict)
    # the firewall of the namespaces a remedy may address: {netns: {"docker", "kube_proxy", "nft",
    # "rules", "random_fully", "fixes"}} (enrich.read_firewall)
    firewall: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["conntrack"] = self.conntrack.to_dict() if self.conntrack else None
        d["nat_elsewhere"] = [dict(x, entry=x["entry"].to_dict()) for x in self.nat_elsewhere]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Context":
        d = dict(d)
        ct = d.pop("conntrack", None)
        elsewhere = d.pop("nat_elsewhere", None) or []
        known = {f.name for f in fields(cls)}
        ctx = cls(**{k: v for k, v in d.items() if k in known})
        ctx.conntrack = ConntrackEntry.from_dict(ct) if ct else None
        ctx.nat_elsewhere = [dict(x, entry=ConntrackEntry.from_dict(x["entry"])) for x in elsewhere]
        return ctx


_ENTRY_FIELDS = ("skb_ct", "entry")


@dataclass
class KernelEvent:
    kind: str                    # rst_sent | rst_received | skb_dropped | ...
    ts: float                    # wall clock, seconds since the epoch: for display
    ts_ns: int                   # CLOCK_MONOTONIC (bpf_ktime_get_ns): what events are correlated on
    netns: int                   # network namespace inode
    ifindex: int
    flow: Optional[Tuple]        # sent: peer > us (the segment that drew the RST); received:
                                 # peer > us (the RST); dropped: as the packet travelled
    family: int = 4
    tcp_flags: int = 0
    seq: int = 0
    ack: int = 0
    payload_len: int = 0
    window: int = 0
    has_skb: bool = False
    has_ct: bool = False
    ctinfo: int = 0
    ct_status: int = 0
    has_sock: bool = False
    sk_state: str = ""
    probes_out: int = 0          # socket-only resets: keepalive probes unanswered
    accept_queue: int = 0        # a listener's sk_ack_backlog / sk_max_ack_backlog
    accept_queue_max: int = 0
    reason: str = ""             # kernel reason name without prefix, e.g. NO_SOCKET
    reason_code: int = 0
    location: str = ""           # kfree_skb call site symbol
    probe: str = ""              # e.g. tcp:tcp_send_reset
    pid: int = 0                 # the task current when the probe ran (often softirq: anyone)
    comm: str = ""
    # the process of the event's socket as the kernel side learnt it: {pid, comm, how}
    # (how: "connect" | "listen"), {} when it could not tell
    owner: dict = field(default_factory=dict)
    skb_ct: Optional[ConntrackEntry] = None   # the packet's own conntrack entry (from the skb)
    notifier: str = ""           # masq_notifier: which notifier ran (masq_inet_event, ...)
    entry: Optional[ConntrackEntry] = None    # ct_destroy: the entry that went away
    address: str = ""            # addr_removed: the address
    # kprobe backend
    invalid_reason: str = ""     # ct_invalid: conntrack's message, e.g. "SEQ is over upper bound ..."
    ct_window: dict = field(default_factory=dict)  # ct_invalid: td_end/td_maxend/td_maxwin/td_scale
                                                   # per direction: {"orig": {...}, "reply": {...}}
    nat_range_flags: int = 0     # nat_binding: NF_NAT_RANGE_* of the rule (RANDOM=4, RANDOM_FULLY=16)
    delete_reason: str = ""      # ct_destroy: masquerade | device | timeout | ctnetlink | early_drop | ...
    delete_detail: dict = field(default_factory=dict)  # e.g. {"address": ..., "ifname": ...}
    # netlink monitors: read at ts_ns, queued after not_before_ns (the socket was empty then)
    not_before_ns: int = 0
    portid: int = 0              # ct_destroy over netlink: netlink port that asked for it (0: the kernel)
    context: Context = field(default_factory=Context)

    @property
    def mono(self) -> float:
        """Seconds on the correlation clock."""
        return self.ts_ns / 1e9

    @property
    def is_syn(self) -> bool:
        return bool(self.tcp_flags & SYN) and not self.tcp_flags & ACK

    @property
    def is_unknown_segment(self) -> bool:
        """A stack RST for a non-SYN segment with no connection socket (none, or a listener)."""
        return (self.kind == RST_SENT and self.has_skb and not self.is_syn and self.flow is not None
                and (not self.has_sock or self.sk_state == "LISTEN"))

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["flow"] = self.flow.to_dict() if self.flow else None
        for name in _ENTRY_FIELDS:
            d[name] = d[name].to_dict() if d[name] else None
        d["context"] = self.context.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "KernelEvent":
        d = dict(d)
        if d.get("kind") not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {d.get('kind')!r}")
        flow = d.pop("flow", None)
        ctx = d.pop("context", None) or {}
        known = {f.name for f in fields(cls)}
        entries = {k: d.pop(k, None) for k in _ENTRY_FIELDS}
        entries = {k: ConntrackEntry.from_dict(v) if v else None for k, v in entries.items()}
        ev = cls(flow=Tuple.from_dict(flow) if flow else None, **entries,
                 **{k: v for k, v in d.items() if k in known and k != "flow"})
        ev.context = Context.from_dict(ctx)
        return ev
