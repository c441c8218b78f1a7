"""struct rst_event — the record every probe writes to the ring buffer — and the numbers it
carries (event kinds, probe ids, deletion reasons), defined once, here.

The numbers the kernel counts shed ordinary events by (Class) are here too.
The C side gets the struct as a generated header (`#include "record.h"` in bpf/, expanded by
the loader) and the numbers as -D defines; the decoder unpacks with the struct format made
from the same table. tests/integration/test_record_layout.py compares every field's offset and size
with what the BPF compiler laid out.
"""
from __future__ import annotations

import struct
from collections import namedtuple
from ctypes import sizeof as ctypes_sizeof
from enum import IntEnum


class Kind(IntEnum):
    RST_SENT = 1
    RST_RECEIVED = 2
    SKB_DROPPED = 3
    MASQ_NOTIFIER = 4
    CT_INVALID = 5       # kprobe: conntrack logged a TCP segment INVALID (or IGNORED), with why
    NAT_BINDING = 6      # kprobe: SNAT chose a tuple for a new TCP connection
    CT_DELETE = 7        # kprobe: nf_ct_delete of a NATed TCP entry, with the reason
    NETNS_BORN = 8       # a task in a network namespace the kernel side had not seen


class Probe(IntEnum):
    """Which probe of the kprobe backend wrote a record (0: the kind's tracepoint)."""
    TCP_V4_SEND_RESET = 1
    TCP_V6_SEND_RESET = 2
    TCP_SEND_ACTIVE_RESET = 3
    TCP_RECEIVE_RESET = 4
    TCP_RESET = 5
    KFREE_SKB = 6
    KFREE_SKB_NF_HOOK = 7   # kernels < 5.17: no drop reason, drops at nf_hook_slow
    LOG_INVALID = 8
    NAT_CONFIRM = 9         # binding seen at __nf_conntrack_confirm
    CLASH_WINNER = 10       # the entry a clashing SYN lost to (nf_ct_resolve_clash)
    CT_DELETE = 11
    MASQ_INET = 12
    MASQ_INET6 = 13
    MASQ_DEVICE = 14


PROBE_NAMES = {
    Probe.TCP_V4_SEND_RESET: "kprobe:tcp_v4_send_reset", Probe.TCP_V6_SEND_RESET: "kprobe:tcp_v6_send_reset",
    Probe.TCP_SEND_ACTIVE_RESET: "kprobe:tcp_send_active_reset", Probe.TCP_RECEIVE_RESET: "tcp:tcp_receive_reset",
    Probe.TCP_RESET: "kprobe:tcp_reset", Probe.KFREE_SKB: "skb:kfree_skb", Probe.KFREE_SKB_NF_HOOK: "skb:kfree_skb",
    Probe.LOG_INVALID: "kprobe:nf_ct_l4proto_log_invalid", Probe.NAT_CONFIRM: "kprobe:__nf_conntrack_confirm",
    Probe.CLASH_WINNER: "kprobe:nf_ct_resolve_clash", Probe.CT_DELETE: "kprobe:nf_ct_delete",
    Probe.MASQ_INET: "kprobe:masq_inet_event", Probe.MASQ_INET6: "kprobe:masq_inet6_event",
    Probe.MASQ_DEVICE: "kprobe:masq_device_event",
}


class DeleteReason(IntEnum):
    """Why nf_ct_delete ran (struct rst_event.delete_reason), as the kprobe backend tells."""
    CTNETLINK = 1
    TIMEOUT = 2
    MASQUERADE = 3
    DEVICE = 4
    EARLY_DROP = 5
    OTHER = 6


class Class(IntEnum):
    """What the kernel counts an ordinary event as when it sheds it (struct shed_key.klass),
    and the cause an aggregate of them reports."""
    NO_LISTENER = 1      # a SYN to a port nobody listens on
    TIMEWAIT = 2         # a segment that hit a TIME_WAIT socket
    SOCKET_RESET = 3     # a socket reset its own connection (abort, keepalive timeout, ...)
    PEER_RESET = 4       # a RST received on a local socket
    LISTEN_OVERFLOW = 5  # a handshake dropped: the accept queue was full


class DropFilter(IntEnum):
    """What the kernel side does with a kfree_skb of a wanted drop reason
    (wanted_drop_reasons[reason])."""
    ROOT_CAUSE = 1         # report it in the root-cause lane
    ORDINARY = 2           # report it in the ordinary lane
    # only a TCP SYN whose conntrack entry is SNATed and not confirmed, in the root-cause lane:
    # a clash at confirm after an NFQUEUE verdict ends in nf_reinject's kfree_skb, no reason
    UNCONFIRMED_NAT_SYN = 3


class Owner(IntEnum):
    """How the kernel side knows the process of an event's socket (struct rst_event.owner_how)."""
    CONNECT = 1   # the process that called connect() on it
    LISTEN = 2    # the process that listens on its port (accepted sockets; the listener itself)


CLASS_CAUSES = {Class.NO_LISTENER: "no_listener", Class.TIMEWAIT: "timewait", Class.SOCKET_RESET: "socket_reset",
                Class.PEER_RESET: "peer_reset", Class.LISTEN_OVERFLOW: "listen_overflow"}


# (name, C type, array length or 0, what it holds). Every member sits at its natural
# alignment (checked below): the compiler adds no padding that the decoder would not know.
FIELDS = (
    ("ts_ns", "u64", 0, "bpf_ktime_get_ns()"),
    ("skb", "u64", 0, ""),
    ("sk", "u64", 0, ""),
    ("location", "u64", 0, "kfree_skb call site"),
    ("kind", "u32", 0, "KIND_*"),
    ("reason", "u32", 0, "sk_rst_reason or skb_drop_reason, kernel numbering"),
    ("netns", "u32", 0, "inode of the network namespace"),
    ("ifindex", "u32", 0, ""),
    ("ct_status", "u32", 0, "nf_conn->status when the skb carried a conntrack reference"),
    ("pid", "u32", 0, "current task's tgid; netns_born: the task in the namespace"),
    ("seq", "u32", 0, ""),
    ("ack", "u32", 0, ""),
    ("sport", "u16", 0, ""),
    ("dport", "u16", 0, ""),
    ("payload_len", "u16", 0, ""),
    ("window", "u16", 0, ""),
    ("family", "u8", 0, "4 or 6, 0 when unknown"),
    ("tcp_flags", "u8", 0, ""),
    ("has_ct", "u8", 0, "skb->_nfct pointed at a conntrack entry"),
    ("ctinfo", "u8", 0, "low bits of skb->_nfct (enum ip_conntrack_info)"),
    ("sk_state", "u8", 0, "0xff when no socket"),
    ("has_skb", "u8", 0, ""),
    ("ct_tcp_state", "u8", 0, "kprobe: nf_conn.proto.tcp.state (enum tcp_conntrack)"),
    ("delete_reason", "u8", 0, "ct_delete: DEL_*"),
    ("saddr", "u8", 16, ""),
    ("daddr", "u8", 16, ""),
    ("comm", "char", 16, ""),
    ("notifier_cb", "u64", 0, "masquerade notifier that ran"),
    # the skb's conntrack entry, or the entry itself (binding, deletion): ports in host order
    ("ct_orig_saddr", "u8", 16, ""),
    ("ct_orig_daddr", "u8", 16, ""),
    ("ct_reply_saddr", "u8", 16, ""),
    ("ct_reply_daddr", "u8", 16, ""),
    ("ct_orig_sport", "u16", 0, ""),
    ("ct_orig_dport", "u16", 0, ""),
    ("ct_reply_sport", "u16", 0, ""),
    ("ct_reply_dport", "u16", 0, ""),
    ("probe_id", "u16", 0, "PROBE_*: which probe; 0 = the kind's tracepoint"),
    ("ct_family", "u8", 0, "4 or 6: family of the ct_* tuples"),
    ("detail_family", "u8", 0, "4 or 6 when detail_addr holds the removed address"),
    ("nat_range_flags", "u32", 0, "nat_binding: nf_nat_range2.flags of the rule"),
    ("ct_timeout_left", "u32", 0, "ct_delete, nat_binding: seconds left before the entry expires"),
    ("detail_ifindex", "u32", 0, "ct_delete in a masquerade walk: the device"),
    ("portid", "u32", 0, "ct_delete over ctnetlink: netlink port of the request"),
    ("accept_queue", "u16", 0, "listener: sk_ack_backlog (capped at 65535)"),
    ("accept_queue_max", "u16", 0, "listener: sk_max_ack_backlog"),
    ("inv_flags", "u8", 0, "ct_invalid: bit 0 = inv_str holds the first argument as a string"),
    ("probes_out", "u8", 0, "socket-only resets: icsk_probes_out (unanswered keepalive probes)"),
    ("owner_how", "u8", 0, "OWNER_*: how owner_pid/owner_comm are known; 0: not known"),
    ("reserved", "u8", 5, ""),
    ("inv_value", "u64", 2, "ct_invalid: the message's first two arguments (%u values)"),
    ("ct_window", "u32", 8, "ct_invalid: td_end, td_maxend, td_maxwin, td_scale; orig then reply"),
    ("detail_addr", "u8", 16, ""),
    ("detail_ifname", "char", 16, ""),
    ("inv_str", "char", 16, ""),
    ("inv_msg", "char", 80, "ct_invalid: the message (template) conntrack logged"),
    ("owner_pid", "u32", 0, "the socket's process (tgid): see owner_how"),
    ("owner_comm", "char", 16, ""),
    ("reserved_tail", "u8", 4, ""),
)

_SIZES = {"u64": 8, "u32": 4, "u16": 2, "u8": 1, "char": 1}
_CODES = {"u64": "Q", "u32": "I", "u16": "H", "u8": "B"}


def _layout():
    """(name, offset, size) of every member, checking natural alignment."""
    out, off = [], 0
    for name, ctype, count, _ in FIELDS:
        size = _SIZES[ctype]
        if off % size:
            raise AssertionError(f"struct rst_event.{name} at {off} is not {size}-aligned")
        total = size * (count or 1)
        out.append((name, off, total))
        off += total
    if off % 8:
        raise AssertionError(f"struct rst_event is {off} bytes, not a multiple of 8")
    return out


LAYOUT = _layout()
SIZE = LAYOUT[-1][1] + LAYOUT[-1][2]


def _format():
    """struct format and the flat names it unpacks to (int arrays become name_0..name_n)."""
    codes, names = ["<"], []
    for name, ctype, count, _ in FIELDS:
        if ctype in ("u8", "char") and count:
            codes.append(f"{count}s")
            names.append(name)
        elif count:
            codes.append(f"{count}{_CODES[ctype]}")
            names += [f"{name}_{i}" for i in range(count)]
        else:
            codes.append(_CODES[ctype])
            names.append(name)
    return struct.Struct("".join(codes)), names


FORMAT, _NAMES = _format()
Record = namedtuple("Record", _NAMES)


def unpack(raw: bytes) -> Record:
    return Record._make(FORMAT.unpack_from(raw))


_BYTES = {name for name, ctype, count, _ in FIELDS if ctype in ("u8", "char") and count}


def pack(**values) -> bytes:
    """A record with these fields set (the rest zero), as a probe would write it."""
    flat = {n: (b"" if n in _BYTES else 0) for n in _NAMES}
    for k, v in values.items():
        if k not in flat:
            raise KeyError(f"struct rst_event has no field {k!r}")
        flat[k] = v
    return FORMAT.pack(*(flat[n] for n in _NAMES))


def layout_mismatches(compiled) -> list:
    """Where a ctypes Structure of struct rst_event as a compiler laid it out (BCC builds one
    for a map's value type) differs from LAYOUT: [] when they agree member by member."""
    got = [(name, getattr(compiled, name).offset, getattr(compiled, name).size)
           for name, *_ in compiled._fields_]
    out = [f"{w[0]}: here at {w[1]} ({w[2]} bytes), compiled {g[0]} at {g[1]} ({g[2]} bytes)"
           for w, g in zip(LAYOUT, got) if w != g]
    if len(got) != len(LAYOUT):
        out.append(f"{len(LAYOUT)} members here, {len(got)} compiled")
    if ctypes_sizeof(compiled) != SIZE:
        out.append(f"size {SIZE} here, {ctypes_sizeof(compiled)} compiled")
    return out


def c_header() -> str:
    """The generated bpf/record.h: struct rst_event as the C side sees it."""
    lines = ["// Generated by tracer/record.py: do not edit. The numbers (KIND_*, PROBE_*, DEL_*)",
             "// come as -D defines from the same file.", "struct rst_event {"]
    for name, ctype, count, what in FIELDS:
        member = f"    {ctype} {name}{f'[{count}]' if count else ''};"
        lines.append(f"{member:<32}// {what}" if what else member)
    lines.append("};")
    return "\n".join(lines) + "\n"


def c_defines() -> dict:
    """KIND_*, PROBE_*, DEL_*, CLASS_*, DROP_* and OWNER_* for the compiler."""
    out = {f"KIND_{k.name}": int(k) for k in Kind}
    out.update({f"PROBE_{p.name}": int(p) for p in Probe})
    out.update({f"DEL_{d.name}": int(d) for d in DeleteReason})
    out.update({f"CLASS_{c.name}": int(c) for c in Class})
    out.update({f"DROP_{d.name}": int(d) for d in DropFilter})
    out.update({f"OWNER_{o.name}": int(o) for o in Owner})
    out["CLASS_COUNT"] = max(Class) + 1
    out["RST_EVENT_SIZE"] = SIZE
    return out
