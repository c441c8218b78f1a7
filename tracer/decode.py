"""Raw ring-buffer records (struct rst_event, tracer/record.py) -> KernelEvent.

No BCC here: the backend hands over bytes, and the kernel's own numbering of reasons
(read from BTF at start) turns codes into names.
"""
from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from typing import Optional

from .clock import Clock
from .conntrack import tcp_state_name
from .events import (CT_DESTROY, CT_INVALID, MASQ_NOTIFIER, NAT_BINDING, NETNS_BORN, RST_RECEIVED,
                     RST_SENT, SKB_DROPPED, ConntrackEntry, Endpoint, KernelEvent, Tuple)
from .kallsyms import KALLSYMS, MODULES, Kallsyms
from . import record
from .record import PROBE_NAMES, DeleteReason, Kind, Owner, Probe

KINDS = {Kind.RST_SENT: RST_SENT, Kind.RST_RECEIVED: RST_RECEIVED, Kind.SKB_DROPPED: SKB_DROPPED,
         Kind.MASQ_NOTIFIER: MASQ_NOTIFIER, Kind.CT_INVALID: CT_INVALID, Kind.NAT_BINDING: NAT_BINDING,
         Kind.CT_DELETE: CT_DESTROY, Kind.NETNS_BORN: NETNS_BORN}
# the tracepoint a record of probe_id 0 comes from
PROBES = {RST_SENT: "tcp:tcp_send_reset", RST_RECEIVED: "tcp:tcp_receive_reset",
          SKB_DROPPED: "skb:kfree_skb", MASQ_NOTIFIER: "notifier:notifier_run"}
MASQ_NOTIFIER_PROBES = {Probe.MASQ_INET: "masq_inet_event", Probe.MASQ_INET6: "masq_inet6_event",
                        Probe.MASQ_DEVICE: "masq_device_event"}
DELETE_REASONS = {int(d): d.name.lower() for d in DeleteReason}
OWNER_HOWS = {int(o): o.name.lower() for o in Owner}
_CONVERSION = re.compile(r"%[-+ #0]*\d*(?:\.\d+)?(?:hh|h|ll|l|z)?([a-zA-Z%])")
# include/net/tcp_states.h: stable since 2.6
TCP_STATES = ("", "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT",
              "CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING", "NEW_SYN_RECV",
              "BOUND_INACTIVE")


class DecodeError(ValueError):
    pass


def _names(enum: dict, prefix: str) -> dict:
    return {v: k[len(prefix):] if k.startswith(prefix) else k for k, v in enum.items()}


@dataclass
class KernelNames:
    """Per-kernel numbering needed to decode: reasons from BTF, call sites from kallsyms
    (followed as modules load: refresh()), and the clock that maps kernel time to wall time."""
    rst_reasons: dict = field(default_factory=dict)    # code -> name
    drop_reasons: dict = field(default_factory=dict)   # code -> name
    clock: Clock = field(default_factory=Clock)
    symbols: Optional[Kallsyms] = None
    kallsyms_path: str = KALLSYMS
    modules_path: str = MODULES

    @classmethod
    def from_kernel(cls, btf, clock: Optional[Clock] = None) -> "KernelNames":
        rst = _names(btf.enum("sk_rst_reason"), "SK_RST_REASON_") if btf.has_enum("sk_rst_reason") else {}
        drop = _names(btf.enum("skb_drop_reason"), "SKB_DROP_REASON_") if btf.has_enum("skb_drop_reason") else {}
        return cls(rst, drop, clock or Clock())

    def refresh(self) -> None:
        """Symbols again if modules came or went (a call site in nf_conntrack loaded after
        start must not be shown as a bare address). Until a symbol is needed, nothing is
        read: kallsyms costs ~0.15 s, and most runs resolve no address."""
        if self.symbols is not None:
            self.symbols = Kallsyms.current(self.kallsyms_path, self.modules_path)

    def resolve_symbol(self, addr: int) -> str:
        if not addr:
            return ""
        if self.symbols is None:
            self.symbols = Kallsyms.current(self.kallsyms_path, self.modules_path)
        return self.symbols.resolve(addr)


def _addr(raw: bytes, family: int) -> str:
    if family == 6:
        return socket.inet_ntop(socket.AF_INET6, raw)
    return socket.inet_ntop(socket.AF_INET, raw[:4])


def decode(raw: bytes, names: KernelNames) -> KernelEvent:
    if len(raw) < record.SIZE:
        raise DecodeError(f"short event: {len(raw)} bytes, want {record.SIZE}")
    r = record.unpack(raw)
    kind_name = KINDS.get(r.kind)
    if kind_name is None:
        raise DecodeError(f"unknown event kind {r.kind}")
    family = r.family
    flow = None
    if family in (4, 6):
        flow = Tuple(Endpoint(_addr(r.saddr, family), r.sport), Endpoint(_addr(r.daddr, family), r.dport))
    table = names.drop_reasons if kind_name == SKB_DROPPED else names.rst_reasons
    ct_fam = r.ct_family or family
    # the skb's own conntrack entry as the kernel had it (also unconfirmed ones, which
    # ctnetlink cannot show); for entry events (binding, deletion) the entry itself
    skb_ct = entry = None
    if r.has_ct and ct_fam in (4, 6):
        ct = ConntrackEntry(
            orig=Tuple(Endpoint(_addr(r.ct_orig_saddr, ct_fam), r.ct_orig_sport),
                       Endpoint(_addr(r.ct_orig_daddr, ct_fam), r.ct_orig_dport)),
            reply=Tuple(Endpoint(_addr(r.ct_reply_saddr, ct_fam), r.ct_reply_sport),
                        Endpoint(_addr(r.ct_reply_daddr, ct_fam), r.ct_reply_dport)),
            status=r.ct_status)
        if r.probe_id:   # kprobe backend: conntrack's TCP state and the time left
            ct.tcp_state = tcp_state_name(r.ct_tcp_state)
            ct.timeout = r.ct_timeout_left
        if kind_name in (NAT_BINDING, CT_DESTROY):
            entry = ct
        else:
            skb_ct = ct
    # tcp_receive_reset carries no reason, nor do kprobes on kernels without the enum
    reason_name = "" if kind_name == RST_RECEIVED else \
        table.get(r.reason, str(r.reason) if (table or r.reason) else "")
    if r.probe_id == Probe.KFREE_SKB_NF_HOOK:
        reason_name = "NETFILTER_DROP"   # freed in nf_hook_slow: a netfilter verdict
    elif kind_name in (CT_INVALID, NAT_BINDING, CT_DESTROY, MASQ_NOTIFIER) and r.probe_id:
        reason_name = ""
    extra = {}
    if kind_name == CT_INVALID:
        extra["invalid_reason"] = format_invalid(_cstr(r.inv_msg), (r.inv_value_0, r.inv_value_1),
                                                 _cstr(r.inv_str) if r.inv_flags & 1 else None)
        window = r[_WINDOW:_WINDOW + 8]
        extra["ct_window"] = {d: dict(zip(("td_end", "td_maxend", "td_maxwin", "td_scale"), window[i * 4:i * 4 + 4]))
                              for i, d in enumerate(("orig", "reply"))}
    elif kind_name == NAT_BINDING:
        extra["nat_range_flags"] = r.nat_range_flags
        family = ct_fam
    elif kind_name == CT_DESTROY:
        extra["delete_reason"] = DELETE_REASONS.get(r.delete_reason, str(r.delete_reason))
        extra["delete_detail"] = _detail(r.detail_family, r.detail_addr, r.detail_ifname, r.detail_ifindex)
        extra["portid"] = r.portid
        family = ct_fam
    elif kind_name == MASQ_NOTIFIER and r.probe_id:
        extra["address"] = _detail(r.detail_family, r.detail_addr, "", 0).get("address", "")
    notifier = ""
    if kind_name == MASQ_NOTIFIER:
        notifier = MASQ_NOTIFIER_PROBES.get(r.probe_id) or names.resolve_symbol(r.notifier_cb)
    return KernelEvent(
        kind=kind_name,
        ts=names.clock.wall(r.ts_ns),
        ts_ns=r.ts_ns,
        netns=r.netns,
        ifindex=r.ifindex,
        flow=flow,
        family=family,
        tcp_flags=r.tcp_flags,
        seq=r.seq,
        ack=r.ack,
        payload_len=r.payload_len,
        window=r.window,
        has_skb=bool(r.has_skb),
        has_ct=bool(r.has_ct),
        ctinfo=r.ctinfo,
        ct_status=r.ct_status,
        has_sock=bool(r.sk),
        probes_out=r.probes_out,
        accept_queue=r.accept_queue,
        accept_queue_max=r.accept_queue_max,
        sk_state=TCP_STATES[r.sk_state] if r.sk_state < len(TCP_STATES) else "",
        reason=reason_name,
        reason_code=r.reason,
        location=names.resolve_symbol(r.location),
        probe=PROBE_NAMES.get(r.probe_id) or PROBES.get(kind_name, ""),
        skb_ct=skb_ct,
        entry=entry,
        notifier=notifier,
        pid=r.pid,
        comm=_cstr(r.comm),
        owner=({"pid": r.owner_pid, "comm": _cstr(r.owner_comm), "how": OWNER_HOWS[r.owner_how]}
               if r.owner_how in OWNER_HOWS else {}),
        **extra,
    )


_WINDOW = record.Record._fields.index("ct_window_0")


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def _detail(family: int, addr: bytes, ifname: bytes, ifindex: int) -> dict:
    """Where a masquerade flush came from: the removed address and/or the device."""
    d = {}
    if family in (4, 6):
        d["address"] = _addr(addr, family)
    name = _cstr(ifname) if ifname else ""
    if name:
        d["ifname"] = name
    if ifindex:
        d["ifindex"] = ifindex
    return d


def format_invalid(template: str, values: tuple, first_str=None) -> str:
    """conntrack's log message with its values filled in, e.g. "SEQ is over upper bound
    2907150890 (over the window of the receiver)". Unknown conversions keep their text."""
    out, pos, i = [], 0, 0
    for m in _CONVERSION.finditer(template):
        out.append(template[pos:m.start()])
        pos = m.end()
        conv = m.group(1)
        if conv == "%":
            out.append("%")
            continue
        if i >= len(values):
            out.append(m.group(0))
            continue
        v = values[i]
        if conv == "s":
            out.append(first_str if (i == 0 and first_str is not None) else "?")
        elif conv in "ud":
            v &= 0xFFFFFFFF if "l" not in m.group(0) else 0xFFFFFFFFFFFFFFFF
            if conv == "d" and v >= 1 << 31 and "l" not in m.group(0):
                v -= 1 << 32
            out.append(str(v))
        elif conv in "xX":
            out.append(format(v & 0xFFFFFFFF, conv))
        else:
            out.append(m.group(0))
        i += 1
    out.append(template[pos:])
    return "".join(out).strip()
