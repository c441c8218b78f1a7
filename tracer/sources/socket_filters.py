"""Classic BPF filters attached to the netlink monitors (SO_ATTACH_FILTER), so that only the
messages that can explain a reset ever reach user space — the kernel drops the rest before
they are queued, at the cost of a few instructions per message (conntrack-tools filters its
event sockets the same way).

Conntrack (one socket, groups NEW and DESTROY), NATed TCP entries only:
- DESTROY of an entry in any state but TIME_WAIT and CLOSE: a connection that ended
  normally (FIN: TIME_WAIT; RST: CLOSE) cannot explain a later reset; every NATed connection
  ends with one of those, so this is where the volume goes;
- NEW of an entry created mid-stream (any state but SYN_SENT): conntrack picking up a
  segment it has no entry for — the client of a flushed or expired entry, re-NATed. Every
  ordinary connection starts in SYN_SENT and is dropped here.
Routing (groups LINK, IPV4_IFADDR, IPV6_IFADDR): address removals, and links that went down.

Attributes are found with the kernel's netlink helpers for classic BPF (SKF_AD_NLATTR,
SKF_AD_NLATTR_NEST), which walk attributes the way nla_find() does.
"""
from __future__ import annotations

import ctypes
import socket
import struct
import sys

# linux/filter.h
LD, LDX, ST, ALU, JMP, RET, MISC = 0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x07
W, H, B = 0x00, 0x08, 0x10
IMM, ABS, IND, MEM = 0x00, 0x20, 0x40, 0x60
JEQ, JSET = 0x10, 0x40
K = 0x00
TAX = 0x00
SKF_AD_OFF = -0x1000
SKF_AD_NLATTR, SKF_AD_NLATTR_NEST = 12, 16
SO_ATTACH_FILTER = 26
ACCEPT, DROP = 0xFFFFFFFF, 0

# netlink and conntrack numbers (uapi)
NLMSG_HDRLEN, NFGENMSG_LEN = 16, 4
ATTRS = NLMSG_HDRLEN + NFGENMSG_LEN
CTA_TUPLE_ORIG, CTA_STATUS, CTA_PROTOINFO = 1, 3, 4
CTA_TUPLE_PROTO, CTA_PROTO_NUM = 2, 1
CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE = 1, 1
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_DELETE = 0, 2
IPS_NAT_MASK = (1 << 4) | (1 << 5)
TCP_CONNTRACK_SYN_SENT, TCP_CONNTRACK_TIME_WAIT, TCP_CONNTRACK_CLOSE = 1, 7, 8
RTM_NEWLINK, RTM_DELADDR = 16, 21
IFF_UP = 0x1
# the low byte of a host-order u16/u32 at offset o (classic BPF loads are big-endian)
LOW = 0 if sys.byteorder == "little" else 1
LOW32 = 0 if sys.byteorder == "little" else 3


class Program:
    """A tiny classic-BPF assembler: instructions with symbolic jump targets."""

    def __init__(self):
        self.code: list = []     # [code, jt, jf, k]: jt/jf a label or None
        self.labels: dict = {}

    def op(self, code: int, k: int = 0, jt=None, jf=None) -> "Program":
        self.code.append([code, jt, jf, k & 0xFFFFFFFF])
        return self

    def label(self, name: str) -> "Program":
        self.labels[name] = len(self.code)
        return self

    def assemble(self) -> bytes:
        out = []
        for i, (code, jt, jf, k) in enumerate(self.code):
            rel = lambda target: 0 if target is None else self.labels[target] - i - 1  # noqa: E731
            out.append(struct.pack("=HBBI", code, rel(jt), rel(jf), k))
        return b"".join(out)

    # -- the few idioms the filters need --------------------------------------------------
    def find(self, attr: int, nested: bool, missing: str) -> "Program":
        """A = offset of attribute `attr` (top level from A, or inside the nest at A); jump
        to `missing` when it is not there."""
        self.op(LDX | IMM, attr)
        self.op(LD | W | ABS, SKF_AD_OFF + (SKF_AD_NLATTR_NEST if nested else SKF_AD_NLATTR))
        return self.op(JMP | JEQ | K, 0, jt=missing, jf=None)

    def payload_byte(self) -> "Program":
        """A = first payload byte of the attribute at offset A."""
        return self.op(MISC | TAX).op(LD | B | IND, 4)


def conntrack_filter() -> bytes:
    p = Program()
    # NATed?
    p.op(LD | IMM, ATTRS).find(CTA_STATUS, False, "drop")
    p.op(MISC | TAX).op(LD | W | IND, 4)                          # the status word (big-endian)
    p.op(JMP | JSET | K, IPS_NAT_MASK, jf="drop")
    # TCP?
    p.op(LD | IMM, ATTRS).find(CTA_TUPLE_ORIG, False, "drop")
    p.find(CTA_TUPLE_PROTO, True, "drop").find(CTA_PROTO_NUM, True, "drop").payload_byte()
    p.op(JMP | JEQ | K, socket.IPPROTO_TCP, jf="drop")
    # its TCP state; M[0] = the message type
    p.op(LD | B | ABS, 4 + LOW).op(ST, 0)
    p.op(LD | IMM, ATTRS).find(CTA_PROTOINFO, False, "drop")
    p.find(CTA_PROTOINFO_TCP, True, "drop").find(CTA_PROTOINFO_TCP_STATE, True, "drop").payload_byte()
    p.op(MISC | TAX).op(LD | MEM, 0)                              # X = state, A = type
    p.op(JMP | JEQ | K, IPCTNL_MSG_CT_DELETE, jt="deleted")
    p.op(JMP | JEQ | K, IPCTNL_MSG_CT_NEW, jf="drop")
    p.op(MISC | 0x80)                                             # TXA: A = state
    p.op(JMP | JEQ | K, TCP_CONNTRACK_SYN_SENT, jt="drop", jf="keep")
    p.label("deleted").op(MISC | 0x80)
    p.op(JMP | JEQ | K, TCP_CONNTRACK_TIME_WAIT, jt="drop")
    p.op(JMP | JEQ | K, TCP_CONNTRACK_CLOSE, jt="drop", jf="keep")
    p.label("keep").op(RET | K, ACCEPT)
    p.label("drop").op(RET | K, DROP)
    return p.assemble()


def route_filter() -> bytes:
    p = Program()
    p.op(LD | B | ABS, 4 + LOW)                                   # nlmsg_type (all < 256)
    p.op(JMP | JEQ | K, RTM_DELADDR, jt="keep")
    p.op(JMP | JEQ | K, RTM_NEWLINK, jf="drop")
    # struct ifinfomsg after the header: family, pad, type (2), index (4), flags (4), change (4)
    p.op(LD | W | ABS, NLMSG_HDRLEN + 12)                         # ifi_change
    p.op(JMP | JEQ | K, 0xFFFFFFFF, jt="drop")                    # a new device: never was up
    p.op(LD | B | ABS, NLMSG_HDRLEN + 12 + LOW32)
    p.op(JMP | JSET | K, IFF_UP, jf="drop")                       # IFF_UP did not change
    p.op(LD | B | ABS, NLMSG_HDRLEN + 8 + LOW32)                  # ifi_flags
    p.op(JMP | JSET | K, IFF_UP, jt="drop", jf="keep")            # still up
    p.label("keep").op(RET | K, ACCEPT)
    p.label("drop").op(RET | K, DROP)
    return p.assemble()


def attach(sock: socket.socket, program: bytes) -> None:
    """SO_ATTACH_FILTER: struct sock_fprog {unsigned short len; struct sock_filter *filter;}"""
    buf = ctypes.create_string_buffer(program)
    fprog = struct.pack("HL", len(program) // 8, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
