"""Raw ring-buffer records (struct rst_event in bpf/common.h) -> KernelEvent.

No BCC here: the backend hands over bytes, and the kernel's own numbering of reasons
(read from BTF at start) turns codes into names.
"""
from __future__ import annotations

import bisect
import socket
import struct
import time
from dataclasses import dataclass, field

from .events import (MASQ_NOTIFIER, RST_RECEIVED, RST_SENT, SKB_DROPPED, ConntrackEntry, Endpoint,
                     KernelEvent, Tuple)

# mirrors struct rst_event; keep in step with bpf/common.h
RAW_EVENT = struct.Struct("<QQQQIIIIIIIIHHHHBBBBBB2x16s16s16sQ16s16s16s16sHHHH")
KINDS = {1: RST_SENT, 2: RST_RECEIVED, 3: SKB_DROPPED, 4: MASQ_NOTIFIER}
PROBES = {RST_SENT: "tcp:tcp_send_reset", RST_RECEIVED: "tcp:tcp_receive_reset",
          SKB_DROPPED: "skb:kfree_skb", MASQ_NOTIFIER: "notifier:notifier_run"}
# include/net/tcp_states.h: stable since 2.6
TCP_STATES = ("", "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT",
              "CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING", "NEW_SYN_RECV",
              "BOUND_INACTIVE")


class DecodeError(ValueError):
    pass


def _names(enum: dict, prefix: str) -> dict:
    return {v: k[len(prefix):] if k.startswith(prefix) else k for k, v in enum.items()}


class Kallsyms:
    """Address -> symbol for kfree_skb call sites."""

    def __init__(self, path: str = "/proc/kallsyms"):
        pairs = []
        try:
            with open(path) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 3 and parts[1] in "tTwW":
                        pairs.append((int(parts[0], 16), parts[2]))
        except OSError:
            pass
        pairs.sort()
        self._addrs = [a for a, _ in pairs]
        self._names = [n for _, n in pairs]

    def resolve(self, addr: int) -> str:
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i < 0 or not addr or not self._addrs[i]:
            return hex(addr) if addr else ""
        return self._names[i]

    def address(self, name: str) -> int:
        if not hasattr(self, "_by_name"):
            self._by_name = dict(zip(self._names, self._addrs))
        return self._by_name.get(name, 0)


@dataclass
class KernelNames:
    """Per-kernel numbering needed to decode: from BTF, kallsyms and the clocks."""
    rst_reasons: dict = field(default_factory=dict)    # code -> name
    drop_reasons: dict = field(default_factory=dict)   # code -> name
    resolve_symbol: object = None                      # callable(addr) -> str
    mono_to_wall: float = 0.0                          # add to monotonic seconds

    @classmethod
    def from_kernel(cls, btf) -> "KernelNames":
        rst = _names(btf.enum("sk_rst_reason"), "SK_RST_REASON_") if btf.has_enum("sk_rst_reason") else {}
        drop = _names(btf.enum("skb_drop_reason"), "SKB_DROP_REASON_") if btf.has_enum("skb_drop_reason") else {}
        ksyms = Kallsyms()
        return cls(rst, drop, ksyms.resolve, time.time() - time.monotonic())


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
     r_sport, r_dport) = RAW_EVENT.unpack_from(raw)
    kind_name = KINDS.get(kind)
    if kind_name is None:
        raise DecodeError(f"unknown event kind {kind}")
    flow = None
    if family in (4, 6):
        flow = Tuple(Endpoint(_addr(saddr, family), sport), Endpoint(_addr(daddr, family), dport))
    table = names.drop_reasons if kind_name == SKB_DROPPED else names.rst_reasons
    # the skb's own conntrack entry as the kernel had it (also unconfirmed ones, which
    # ctnetlink cannot show)
    skb_ct = None
    if has_ct and family in (4, 6):
        skb_ct = ConntrackEntry(
            orig=Tuple(Endpoint(_addr(o_saddr, family), o_sport), Endpoint(_addr(o_daddr, family), o_dport)),
            reply=Tuple(Endpoint(_addr(r_saddr, family), r_sport), Endpoint(_addr(r_daddr, family), r_dport)),
            status=ct_status)
    return KernelEvent(
        kind=kind_name,
        ts=ts_ns / 1e9 + names.mono_to_wall,
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
        sk_state=TCP_STATES[sk_state] if sk_state < len(TCP_STATES) else "",
        # tcp_receive_reset carries no reason
        reason="" if kind_name == RST_RECEIVED else table.get(reason, str(reason)),
        reason_code=reason,
        location=names.resolve_symbol(location) if (location and names.resolve_symbol) else "",
        probe=PROBES[kind_name],
        skb_ct=skb_ct,
        notifier=names.resolve_symbol(notifier_cb) if (notifier_cb and names.resolve_symbol) else "",
        pid=pid,
        comm=comm.split(b"\0", 1)[0].decode(errors="replace"),
    )
