"""The hand-written ctnetlink DESTROY parser against pyroute2's own encoder."""
import struct

from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg

from tracer.conntrack import parse_ct_entry

IPS_SRC_NAT, IPS_CONFIRMED = 1 << 4, 1 << 3


def destroy_message(status: int, proto: int = 6, v6: bool = False) -> bytes:
    def tup(src, dst, sport, dport):
        ip = [("CTA_IP_V6_SRC", src), ("CTA_IP_V6_DST", dst)] if v6 else \
             [("CTA_IP_V4_SRC", src), ("CTA_IP_V4_DST", dst)]
        return {"attrs": [("CTA_TUPLE_IP", {"attrs": ip}),
                          ("CTA_TUPLE_PROTO", {"attrs": [("CTA_PROTO_NUM", proto),
                                                         ("CTA_PROTO_SRC_PORT", sport),
                                                         ("CTA_PROTO_DST_PORT", dport)]})]}
    a, b, c = ("fd00::2", "fd00::9", "fd00::1") if v6 else ("10.0.0.2", "192.0.2.9", "192.0.2.1")
    msg = nfct_msg()
    msg["nfgen_family"] = 10 if v6 else 2
    msg["attrs"] = [("CTA_TUPLE_ORIG", tup(a, b, 40000, 443)),
                    ("CTA_TUPLE_REPLY", tup(b, c, 443, 61000)),
                    ("CTA_STATUS", status),
                    ("CTA_TIMEOUT", 431999),
                    ("CTA_PROTOINFO", {"attrs": [("CTA_PROTOINFO_TCP", {"attrs": [("CTA_PROTOINFO_TCP_STATE", 3)]})]})]
    msg["header"]["type"] = (1 << 8) | 2
    msg.encode()
    return msg.data[:struct.unpack_from("=I", msg.data, 0)[0]]


def test_nat_tcp_entry_is_parsed():
    e = parse_ct_entry(destroy_message(IPS_SRC_NAT | IPS_CONFIRMED))
    assert str(e.orig) == "10.0.0.2:40000 > 192.0.2.9:443"
    assert str(e.reply) == "192.0.2.9:443 > 192.0.2.1:61000"
    assert e.tcp_state == "ESTABLISHED" and e.timeout == 431999 and e.nat


def test_ipv6_entry_is_parsed():
    e = parse_ct_entry(destroy_message(IPS_SRC_NAT, v6=True))
    assert e.orig.src.addr == "fd00::2" and e.reply.dst.port == 61000


def test_entries_that_cannot_explain_a_reset_are_skipped():
    assert parse_ct_entry(destroy_message(IPS_CONFIRMED)) is None          # not NATed
    assert parse_ct_entry(destroy_message(IPS_SRC_NAT, proto=17)) is None  # UDP


def test_garbage_does_not_raise():
    for raw in (b"", b"\x00" * 19, b"\xff" * 64, destroy_message(IPS_SRC_NAT)[:40]):
        parse_ct_entry(raw)
