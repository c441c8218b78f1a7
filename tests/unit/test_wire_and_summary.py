import dataclasses
import json

from tracer.attribution import Attributor
from tracer.events import CT_DESTROY, RST_SENT
from tracer.lab.harness import effective_verdicts
from tracer.lab.wire import RST, SYN, ACK, WirePacket, distinct_rsts, retransmitted_syns, rst_coverage
from tracer.recording import read_recording
from tracer.summary import Summary


def vip_move_with_a_late_deletion(fixtures) -> tuple:
    """(records, facts): the vip-move recording attributed with the router's deletion of the
    new entry read just after the server's reset, as live when the lookup loses the race
    with the RST that kills that entry: the server's reset is first judged no_connection,
    then a correction makes it conntrack_flushed (schema v1 correction records)."""
    events = list(read_recording(str(fixtures / "vip-move.rec"))[1])
    facts = json.loads((fixtures / "vip-move.facts.json").read_text())
    reset = next(ev for ev in events if ev.kind == RST_SENT and ev.netns == facts["netns"]["srv"])
    new_entry = next(ev for ev in events if ev.kind == CT_DESTROY and ev.entry.reply.dst.port == facts["new_port"])
    events.remove(new_entry)
    events.insert(events.index(reset) + 1, dataclasses.replace(
        new_entry, ts_ns=reset.ts_ns + 2_000_000, not_before_ns=reset.ts_ns + 1_000_000))
    reset.context.nat_elsewhere = []
    attributor = Attributor("tracepoint", "h", id_prefix="h-1")
    return [v.to_dict() for ev in events for v in attributor.feed(ev)], facts


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


def record(kind, rid, cause, ns, direction="sent", **extra):
    return {"type": kind, "schema_version": 1, "id": rid, "cause": cause, "netns": 100, "netns_name": ns,
            "direction": direction, **extra}


def correction(rid, supersedes, was, cause, ns):
    return record("correction", rid, cause, ns, supersedes=supersedes, superseded_cause=was,
                  correction="a deletion read 0.2s after the event explains it better")


def test_summary_counts_each_event_once_at_its_corrected_cause():
    s = Summary()
    for r in [record("verdict", "h-1", "no_connection", "srv"),
              record("verdict", "h-2", "peer_reset", "cli", "received"),
              record("verdict", "h-3", "no_connection", "srv"),
              correction("h-4", "h-1", "no_connection", "conntrack_flushed", "srv"),
              correction("h-5", "h-4", "conntrack_flushed", "conntrack_flushed", "srv"),   # a chain
              # a correction of a verdict this input does not hold (filtered out, or before it began)
              correction("h-6", "h-0", "no_connection", "conntrack_expired", "nat"),
              {"type": "loss", "schema_version": 1, "source": "kernel_ringbuf", "lost": 2}]:
        s.add(r)
    d = s.to_dict()
    assert d["verdicts"] == 4
    assert d["by_cause"] == {"conntrack_expired": 1, "conntrack_flushed": 1, "no_connection": 1, "peer_reset": 1}
    assert d["by_cause_netns"]["no_connection"] == {"srv": 1} and d["by_cause_netns"]["conntrack_flushed"] == {"srv": 1}
    assert d["by_direction"] == {"received": 1, "sent": 3}
    assert d["corrections"] == 3
    assert d["corrections_by_cause"] == {"conntrack_flushed": {"conntrack_flushed": 1},
                                         "no_connection": {"conntrack_expired": 1, "conntrack_flushed": 1}}
    text = s.format()
    assert text.splitlines()[0] == "4 verdicts (3 corrections applied)"
    assert "no_connection -> conntrack_flushed 1" in text


def test_summary_of_a_recorded_run_with_a_correction_counts_the_effective_verdicts(fixtures):
    records, facts = vip_move_with_a_late_deletion(fixtures)
    effective, corrections = effective_verdicts(records)
    assert [(c["superseded_cause"], c["cause"]) for c in corrections] == [("no_connection", "conntrack_flushed")]
    s = Summary()
    for r in records:
        s.add(r)
    d = s.to_dict()
    assert d["verdicts"] == len(effective) < len(records) and d["corrections"] == 1
    causes = {}
    for v in effective:
        causes[v["cause"]] = causes.get(v["cause"], 0) + 1
    assert d["by_cause"] == causes and "no_connection" not in causes
    assert d["corrections_by_cause"] == {"no_connection": {"conntrack_flushed": 1}}


# -- the --netns/--port/--host filter on corrections ------------------------------------------

def shown(vfilter, records) -> list:
    return [r["id"] for r in records if vfilter.matches(r)]


def test_filters_judge_a_correction_like_a_verdict(fixtures):
    import ipaddress

    from tracer.filters import VerdictFilter
    records, facts = vip_move_with_a_late_deletion(fixtures)
    by_ns = {}
    for r in records:
        by_ns.setdefault(r["netns"], []).append(r["id"])
    # the server's reset and its correction are in srv: neither is shown for cli, both for srv
    assert shown(VerdictFilter(netns={facts["netns"]["cli"]}), records) == by_ns[facts["netns"]["cli"]]
    assert shown(VerdictFilter(netns={facts["netns"]["srv"]}), records) == by_ns[facts["netns"]["srv"]]
    name = next(r["netns_name"] for r in records if r["netns"] == facts["netns"]["srv"])
    assert shown(VerdictFilter(netns={name}), records) == by_ns[facts["netns"]["srv"]]
    # the first verdict knew only the NATed tuple; the correction found the client's inside
    # tuple: it is shown (its consumer has not seen what it supersedes: a verdict of its own)
    client = ipaddress.ip_address(facts["inside"]["src"])
    ids = shown(VerdictFilter(hosts={client}), records)
    first, fixed = records[0], records[1]
    assert fixed["type"] == "correction" and fixed["supersedes"] == first["id"]
    assert first["id"] not in ids and fixed["id"] in ids
    assert shown(VerdictFilter(ports={facts["inside"]["sport"]}), records) == \
        shown(VerdictFilter(hosts={client}), records)


def test_a_correction_of_a_shown_verdict_is_shown_even_if_it_no_longer_matches():
    from tracer.filters import VerdictFilter
    flow = {"proto": "tcp", "family": 4, "src": "10.0.0.1", "sport": 40000, "dst": "10.0.0.2", "dport": 6379}
    verdict = {"type": "verdict", "id": "h-1", "netns": 7, "netns_name": "a", "flow": flow, "nat": None}
    other = dict(flow, dport=6380)
    fixed = {"type": "correction", "id": "h-2", "supersedes": "h-1", "netns": 7, "netns_name": "a",
             "flow": other, "nat": None}
    unrelated = {"type": "correction", "id": "h-4", "supersedes": "h-3", "netns": 7, "netns_name": "a",
                 "flow": other, "nat": None}
    vf = VerdictFilter(ports={6379})
    assert shown(vf, [verdict, fixed, unrelated]) == ["h-1", "h-2"]
    # loss and status records are never filtered
    assert vf.matches({"type": "loss", "source": "kernel_ringbuf", "lost": 1})


def test_chains_remember_a_bounded_number_of_records():
    from tracer.corrections import Chains
    chains = Chains(limit=2)
    for n in (1, 2, 3):
        chains.remember({"type": "verdict", "id": f"h-{n}"}, n)
    assert chains.superseded({"type": "correction", "id": "h-4", "supersedes": "h-1"}) is None   # forgotten
    assert chains.superseded({"type": "correction", "id": "h-5", "supersedes": "h-3"}) == 3
    assert chains.superseded({"type": "correction", "id": "h-6", "supersedes": "h-3"}) is None   # replaced once
    assert chains.superseded({"type": "verdict", "id": "h-7", "supersedes": "h-2"}) is None
