"""Conntrack entries as the kernel reports them over ctnetlink: the TCP state names, the
pyroute2 decoding of lookups and the hand parser of DESTROY events. One reader of these
kernel facts for the whole tracer."""
from __future__ import annotations

import socket
import struct

from .events import IPS_DST_NAT, IPS_SRC_NAT, ConntrackEntry, Endpoint, Tuple

# enum tcp_conntrack (include/uapi/linux/netfilter/nf_conntrack_tcp.h)
CT_TCP_STATES = ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT",
                 "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2")


def tcp_state_name(n) -> str:
    return CT_TCP_STATES[n] if n is not None and 0 <= n < len(CT_TCP_STATES) else str(n)


def _tuple_from_nl(msg) -> Tuple:
    ip = msg.get_attr("CTA_TUPLE_IP")
    proto = msg.get_attr("CTA_TUPLE_PROTO")
    src = ip.get_attr("CTA_IP_V4_SRC") or ip.get_attr("CTA_IP_V6_SRC")
    dst = ip.get_attr("CTA_IP_V4_DST") or ip.get_attr("CTA_IP_V6_DST")
    return Tuple(Endpoint(src, proto.get_attr("CTA_PROTO_SRC_PORT") or 0),
                 Endpoint(dst, proto.get_attr("CTA_PROTO_DST_PORT") or 0))


def entry_from_netlink(msg) -> ConntrackEntry:
    """A pyroute2 conntrack message (a lookup's answer) -> ConntrackEntry."""
    state = ""
    info = msg.get_attr("CTA_PROTOINFO")
    tcp = info.get_attr("CTA_PROTOINFO_TCP") if info else None
    if tcp is not None:
        state = tcp_state_name(tcp.get_attr("CTA_PROTOINFO_TCP_STATE"))
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


def parse_ct_entry(raw: bytes):
    """A ctnetlink event (NEW or DESTROY) -> ConntrackEntry, or None unless it is a
    well-formed NATed TCP entry. Hand-parsed: a generic netlink decoder costs ~100 µs per
    message."""
    try:
        return _parse_ct_entry(raw)
    except (ValueError, struct.error, IndexError):
        return None


def _parse_ct_entry(raw: bytes):
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
