"""Raw ring-buffer records (struct rst_event in bpf/common.h) -> KernelEvent.

No BCC here: the backend hands over bytes, and the kernel's own numbering of reasons
(read from BTF at start) turns codes into names.
"""
from __future__ import annotations

import re
import socket
import struct
from dataclasses import dataclass, field
from typing import Optional

from .clock import Clock
from .conntrack import tcp_state_name
from .events import (CT_DESTROY, CT_INVALID, MASQ_NOTIFIER, NAT_BINDING, NETNS_BORN, RST_RECEIVED,
                     RST_SENT, SKB_DROPPED, ConntrackEntry, Endpoint, KernelEvent, Tuple)
from .kallsyms import KALLSYMS, MODULES, Kallsyms

# mirrors struct rst_event; keep in step with bpf/common.h
RAW_EVENT = struct.Struct("<QQQQIIIIIIIIHHHHBBBBBB2x16s16s16sQ16s16s16s16sHHHH"
                          # appended for the kprobe backend (zero from the tracepoint one)
                          "HBBIIIBBBBHH2Q8I16s16s16s80s")
KINDS = {1: RST_SENT, 2: RST_RECEIVED, 3: SKB_DROPPED, 4: MASQ_NOTIFIER,
         5: CT_INVALID, 6: NAT_BINDING, 7: CT_DESTROY, 8: NETNS_BORN}
PROBES = {RST_SENT: "tcp:tcp_send_reset", RST_RECEIVED: "tcp:tcp_receive_reset",
          SKB_DROPPED: "skb:kfree_skb", MASQ_NOTIFIER: "notifier:notifier_run"}
# struct rst_event.probe_id (bpf/kprobes.c PROBE_*): which probe of the kprobe backend
PROBE_NAMES = {1: "kprobe:tcp_v4_send_reset", 2: "kprobe:tcp_v6_send_reset",
               3: "kprobe:tcp_send_active_reset", 4: "tcp:tcp_receive_reset", 5: "kprobe:tcp_reset",
               6: "skb:kfree_skb", 7: "skb:kfree_skb", 8: "kprobe:nf_ct_l4proto_log_invalid",
               9: "kprobe:__nf_conntrack_confirm", 10: "kprobe:nf_ct_resolve_clash",
               11: "kprobe:nf_ct_delete", 12: "kprobe:masq_inet_event", 13: "kprobe:masq_inet6_event",
               14: "kprobe:masq_device_event"}
# kfree_skb on kernels without drop reasons: only packets freed in nf_hook_slow pass the
# kernel's filter, i.e. netfilter drops
PROBE_KFREE_SKB_NF_HOOK = 7
MASQ_NOTIFIER_PROBES = {12: "masq_inet_event", 13: "masq_inet6_event", 14: "masq_device_event"}
# struct rst_event.delete_reason (bpf/kprobes.c DEL_*)
DELETE_REASONS = {1: "ctnetlink", 2: "timeout", 3: "masquerade", 4: "device", 5: "early_drop", 6: "other"}
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
        names = cls(rst, drop, clock or Clock())
        names.refresh()
        return names

    def refresh(self) -> None:
        """Symbols again if modules came or went (a call site in nf_conntrack loaded after
        start must not be shown as a bare address)."""
        self.symbols = Kallsyms.current(self.kallsyms_path, self.modules_path)

    def resolve_symbol(self, addr: int) -> str:
        return self.symbols.resolve(addr) if (self.symbols is not None and addr) else ""


def _addr(raw: bytes, family: int) -> str:
    if family == 6:
        return socket.inet_ntop(socket.AF_INET6, raw)
    return socket.inet_ntop(socket.AF_INET, raw[:4])


def decode(raw: bytes, names: KernelNames) -> KernelEvent:
    if len(raw) < RAW_EVENT.size:
        raise DecodeError(f"short event: {len(raw)} bytes, want {RAW_EVENT.size}")
    (ts_ns, skb, sk, location, kind, reason, netns, ifindex, ct_status, pid, seq, ack,
     sport, dport, payload_len, window, family, flags, has_ct, ctinfo, sk_state, has_skb,
     saddr, daddr, comm, notifier_cb, o_saddr, o_daddr, r_saddr, r_daddr, o_sport, o_dport,
     r_sport, r_dport,
     probe_id, ct_tcp_state, delete_reason, nat_range_flags, ct_timeout_left, detail_ifindex,
     detail_family, ct_family, inv_flags, probes_out, accept_queue, accept_queue_max, inv_v0, inv_v1,
     *rest) = RAW_EVENT.unpack_from(raw)
    ct_window, (detail_addr, detail_ifname, inv_str, inv_msg) = rest[:8], rest[8:]
    kind_name = KINDS.get(kind)
    if kind_name is None:
        raise DecodeError(f"unknown event kind {kind}")
    flow = None
    if family in (4, 6):
        flow = Tuple(Endpoint(_addr(saddr, family), sport), Endpoint(_addr(daddr, family), dport))
    table = names.drop_reasons if kind_name == SKB_DROPPED else names.rst_reasons
    ct_fam = ct_family or family
    # the skb's own conntrack entry as the kernel had it (also unconfirmed ones, which
    # ctnetlink cannot show); for entry events (binding, deletion) the entry itself
    skb_ct = entry = None
    if has_ct and ct_fam in (4, 6):
        ct = ConntrackEntry(
            orig=Tuple(Endpoint(_addr(o_saddr, ct_fam), o_sport), Endpoint(_addr(o_daddr, ct_fam), o_dport)),
            reply=Tuple(Endpoint(_addr(r_saddr, ct_fam), r_sport), Endpoint(_addr(r_daddr, ct_fam), r_dport)),
            status=ct_status)
        if probe_id:   # kprobe backend: conntrack's TCP state and the time left
            ct.tcp_state = tcp_state_name(ct_tcp_state)
            ct.timeout = ct_timeout_left
        if kind_name in (NAT_BINDING, CT_DESTROY):
            entry = ct
        else:
            skb_ct = ct
    # tcp_receive_reset carries no reason, nor do kprobes on kernels without the enum
    reason_name = "" if kind_name == RST_RECEIVED else \
        table.get(reason, str(reason) if (table or reason) else "")
    if probe_id == PROBE_KFREE_SKB_NF_HOOK:
        reason_name = "NETFILTER_DROP"   # freed in nf_hook_slow: a netfilter verdict
    elif kind_name in (CT_INVALID, NAT_BINDING, CT_DESTROY, MASQ_NOTIFIER) and probe_id:
        reason_name = ""
    extra = {}
    if kind_name == CT_INVALID:
        extra["invalid_reason"] = format_invalid(_cstr(inv_msg), (inv_v0, inv_v1),
                                                 _cstr(inv_str) if inv_flags & 1 else None)
        extra["ct_window"] = {d: dict(zip(("td_end", "td_maxend", "td_maxwin", "td_scale"), ct_window[i * 4:i * 4 + 4]))
                              for i, d in enumerate(("orig", "reply"))}
    elif kind_name == NAT_BINDING:
        extra["nat_range_flags"] = nat_range_flags
        family = ct_fam
    elif kind_name == CT_DESTROY:
        extra["delete_reason"] = DELETE_REASONS.get(delete_reason, str(delete_reason))
        extra["delete_detail"] = _detail(detail_family, detail_addr, detail_ifname, detail_ifindex)
        family = ct_fam
    elif kind_name == MASQ_NOTIFIER and probe_id:
        extra["address"] = _detail(detail_family, detail_addr, "", 0).get("address", "")
    notifier = ""
    if kind_name == MASQ_NOTIFIER:
        notifier = MASQ_NOTIFIER_PROBES.get(probe_id) or (
            names.resolve_symbol(notifier_cb))
    return KernelEvent(
        kind=kind_name,
        ts=names.clock.wall(ts_ns),
        ts_ns=ts_ns,
        netns=netns,
        ifindex=ifindex,
        flow=flow,
        family=family,
        tcp_flags=flags,
        seq=seq,
        ack=ack,
        payload_len=payload_len,
        window=window,
        has_skb=bool(has_skb),
        has_ct=bool(has_ct),
        ctinfo=ctinfo,
        ct_status=ct_status,
        has_sock=bool(sk),
        probes_out=probes_out,
        accept_queue=accept_queue,
        accept_queue_max=accept_queue_max,
        sk_state=TCP_STATES[sk_state] if sk_state < len(TCP_STATES) else "",
        reason=reason_name,
        reason_code=reason,
        location=names.resolve_symbol(location),
        probe=PROBE_NAMES.get(probe_id) or PROBES.get(kind_name, ""),
        skb_ct=skb_ct,
        entry=entry,
        notifier=notifier,
        pid=pid,
        comm=comm.split(b"\0", 1)[0].decode(errors="replace"),
        **extra,
    )


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
