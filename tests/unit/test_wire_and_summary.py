from tracer.lab.wire import RST, SYN, ACK, WirePacket, distinct_rsts, retransmitted_syns, rst_coverage
from tracer.summary import Summary


def pkt(ns, iface, ts, src, sport, dst, dport, seq, ack, flags):
    return WirePacket(ns, iface, ts, src, sport, dst, dport, seq, ack, flags)


def verdict(vid, flow, packet, nat=None, direction="sent", cause="no_listener"):
    return {"type": "verdict", "id": vid, "direction": direction, "cause": cause, "netns": 1,
            "netns_name": "srv", "flow": dict(flow, proto="tcp", family=4), "packet": packet, "nat": nat}


SYN_FLOW = {"src": "10.200.2.1", "sport": 5000, "dst": "10.200.2.2", "dport": 9}


def test_one_rst_seen_at_four_hops_across_nat_is_one_covered_rst():
    v = verdict("a", SYN_FLOW, {"flags": ["SYN"], "seq": 100, "ack": 0, "len": 0})
    hops = [pkt("srv", "s0", 1.0, "10.200.2.2", 9, "10.200.2.1", 5000, 0, 101, RST | ACK),
            pkt("nat", "n2", 1.0, "10.200.2.2", 9, "10.200.2.1", 5000, 0, 101, RST | ACK),
            pkt("nat", "n1", 1.0, "10.200.2.2", 9, "10.200.1.2", 5000, 0, 101, RST | ACK),
            pkt("cli", "c0", 1.0, "10.200.2.2", 9, "10.200.1.2", 5000, 0, 101, RST | ACK)]
    assert len(distinct_rsts(hops)) == 1
    r = rst_coverage(hops, [v])
    assert (r["rsts"], r["matched"], r["coverage"]) == (1, 1, 1.0)


def test_an_rst_without_verdict_or_with_two_is_reported():
    rst = pkt("srv", "s0", 1.0, "10.200.2.2", 9, "10.200.2.1", 5000, 0, 101, RST | ACK)
    assert rst_coverage([rst], [])["unmatched"] == [rst]
    v = verdict("a", SYN_FLOW, {"flags": ["SYN"], "seq": 100, "ack": 0, "len": 0})
    twin = dict(v, id="b")
    assert rst_coverage([rst], [v, twin])["ambiguous"][0][1] == ["a", "b"]


def test_rst_for_an_ack_segment_takes_its_seq_from_the_ack():
    v = verdict("a", {"src": "10.200.2.2", "sport": 8080, "dst": "10.200.2.1", "dport": 40000},
                {"flags": ["PSH", "ACK"], "seq": 7, "ack": 5555, "len": 1})
    good = pkt("nat", "n2", 1.0, "10.200.2.1", 40000, "10.200.2.2", 8080, 5555, 0, RST)
    bad = pkt("nat", "n2", 1.0, "10.200.2.1", 40000, "10.200.2.2", 8080, 5556, 0, RST)
    assert rst_coverage([good], [v])["matched"] == 1
    assert rst_coverage([bad], [v])["matched"] == 0


def test_retransmitted_syns():
    s = pkt("cli", "c0", 1.0, "10.200.1.10", 40000, "10.200.2.2", 8080, 9, 0, SYN)
    again = pkt("cli", "c0", 2.0, "10.200.1.10", 40000, "10.200.2.2", 8080, 9, 0, SYN)
    other = pkt("cli", "c0", 2.0, "10.200.1.11", 40000, "10.200.2.2", 8080, 9, 0, SYN)
    assert retransmitted_syns([s, again, other], "cli") == [("10.200.1.10", 40000, "10.200.2.2", 8080, 9)]


def test_summary_counts_by_cause_and_namespace():
    s = Summary()
    for cause, ns in [("no_listener", "a"), ("no_listener", "a"), ("peer_reset", "b")]:
        s.add({"type": "verdict", "cause": cause, "netns_name": ns, "direction": "sent"})
    s.add({"type": "loss", "source": "kernel_ringbuf", "lost": 7})
    d = s.to_dict()
    assert d["verdicts"] == 3 and d["by_cause"] == {"no_listener": 2, "peer_reset": 1}
    assert d["by_cause_netns"]["no_listener"] == {"a": 2} and d["lost"] == {"kernel_ringbuf": 7}
