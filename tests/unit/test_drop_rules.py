"""Drops with no conntrack reference: a full table and an INVALID segment each need
conntrack's own evidence; without it the drop is netfilter policy (firewall_drop), and no
summary says more than its evidence. Hand-built events for the edge cases; the recorded
lab runs (table-full, raw-drop) are replayed below."""
import json

from tracer.attribution import Attributor
from tracer.events import ACK, CT_INVALID, PSH, SKB_DROPPED, SYN, Context, Endpoint, KernelEvent, Tuple
from tracer.replay import replay_verdicts

FLOW = Tuple(Endpoint("10.0.0.2", 40000), Endpoint("192.0.2.1", 443))
QUIET = {"invalid": 0, "insert_failed": 0, "drop": 0, "early_drop": 0}
CONNTRACK_DROP_CAUSES = {"conntrack_table_full", "conntrack_invalid_dropped"}


def dropped(flags=SYN, ctinfo=0, delta=None, count=12, ct_max=262144, ts_ns=2_000_000_000) -> KernelEvent:
    return KernelEvent(kind=SKB_DROPPED, ts=1.0, ts_ns=ts_ns, netns=7, ifindex=2, flow=FLOW, tcp_flags=flags,
                       has_skb=True, ctinfo=ctinfo, reason="NETFILTER_DROP", location="nf_hook_slow",
                       context=Context(ct_stats_delta=QUIET if delta is None else delta, ct_count=count,
                                       ct_max=ct_max if flags == SYN else None))


def verdict(*events) -> dict:
    attributor = Attributor("tracepoint", "h")
    return [v for ev in events for v in attributor.feed(ev)][-1].to_dict()


def evidence(v) -> dict:
    return {e["key"]: e["value"] for e in v["evidence"]}


def test_a_syn_dropped_in_an_empty_table_with_no_conntrack_drop_is_not_table_full():
    v = verdict(dropped(count=12, ct_max=262144))
    assert v["cause"] == "firewall_drop"
    assert "before conntrack tracked it" in v["summary"] and "no drop and no INVALID" in v["summary"]
    assert evidence(v)["conntrack_counters"] == {"count": 12, "max": 262144, "rise": QUIET}
    assert any("raw" in c for c in v["remedy"]["commands"])


def test_drops_counted_by_snat_clashes_do_not_make_a_table_full():
    # a clash at confirm counts `drop` and `insert_failed` together
    clashes = dict(QUIET, drop=3, insert_failed=3)
    assert verdict(dropped(delta=clashes, count=262144))["cause"] == "firewall_drop"


def test_a_full_table_without_a_conntrack_drop_did_not_drop_this_syn():
    v = verdict(dropped(count=262144))
    assert v["cause"] == "firewall_drop" and "no drop and no INVALID" in v["summary"]


def test_a_conntrack_drop_in_a_table_far_from_full_is_not_table_full():
    v = verdict(dropped(delta=dict(QUIET, drop=2), count=12))
    assert v["cause"] == "firewall_drop"
    assert "no drop" not in v["summary"]            # conntrack did drop something: not claimed otherwise
    assert v["confidence"] == "low"


def test_table_full_needs_the_drop_and_the_table_and_says_what_they_show():
    v = verdict(dropped(delta=dict(QUIET, drop=2, early_drop=1), count=262140))
    assert v["cause"] == "conntrack_table_full" and v["confidence"] == "high"
    ev = evidence(v)
    assert ev["table"] == {"count": 262140, "max": 262144}
    assert ev["drop_counters"]["drop"] == 2
    assert "(262140/262144 entries; conntrack's own drops: 2)" in v["summary"]


def test_an_untracked_syn_is_never_table_full():
    v = verdict(dropped(ctinfo=7, delta=dict(QUIET, drop=2), count=262144))
    assert v["cause"] == "firewall_drop" and "NOTRACK" in v["summary"]
    assert evidence(v)["drop"]["ctinfo"] == 7


def test_a_segment_dropped_with_no_invalid_count_is_not_an_invalid_drop():
    v = verdict(dropped(flags=ACK | PSH))
    assert v["cause"] == "firewall_drop"
    assert v["summary"].startswith(f"segment {FLOW} dropped by netfilter before conntrack tracked it")
    assert evidence(v)["conntrack_counters"]["max"] is None   # read for SYNs only
    assert "of None" not in v["evidence"][-1]["text"]


def test_an_invalid_count_makes_a_dropped_segment_an_invalid_drop():
    v = verdict(dropped(flags=ACK | PSH, delta=dict(QUIET, invalid=1)))
    assert v["cause"] == "conntrack_invalid_dropped" and v["confidence"] == "medium"
    assert evidence(v)["ct_invalid_delta"] == 1


def test_conntracks_own_invalid_message_for_the_segment_is_enough():
    """kprobe backend: conntrack's INVALID message for this very segment, just before the drop."""
    invalid = KernelEvent(kind=CT_INVALID, ts=1.0, ts_ns=1_900_000_000, netns=7, ifindex=2, flow=FLOW,
                          tcp_flags=ACK | PSH, invalid_reason="SEQ is over upper bound (over the window)")
    v = verdict(invalid, dropped(flags=ACK | PSH, delta={}))
    assert v["cause"] == "conntrack_invalid_dropped" and v["confidence"] == "high"
    assert "SEQ is over upper bound" in v["summary"]
    assert evidence(v)["invalid_reason"]["reason"] == invalid.invalid_reason
    elsewhere = KernelEvent(kind=CT_INVALID, ts=1.0, ts_ns=1_900_000_000, netns=8, ifindex=2, flow=FLOW)
    assert verdict(elsewhere, dropped(flags=ACK | PSH, delta={}))["cause"] == "firewall_drop"


def test_without_counters_a_drop_says_only_what_is_known():
    v = verdict(dropped(delta={}, count=None))
    assert v["cause"] == "firewall_drop" and v["confidence"] == "low"
    assert v["summary"] == f"SYN {FLOW} dropped by netfilter before conntrack tracked it (no conntrack entry)"
    assert "conntrack_counters" not in evidence(v)


# -- recorded lab runs -----------------------------------------------------------------------
def scenario(fixtures, name):
    facts = json.loads((fixtures / f"{name}.facts.json").read_text())
    return list(replay_verdicts(str(fixtures / f"{name}.rec"))), facts


def test_table_full_recording_names_each_dropped_syn(fixtures):
    verdicts, facts = scenario(fixtures, "table-full")
    full = [v for v in verdicts if v["cause"] == "conntrack_table_full"]
    failed = {(c["inside"]["src"], c["inside"]["sport"]) for c in facts["failed"]}
    assert failed and failed == {(v["flow"]["src"], v["flow"]["sport"]) for v in full}
    assert len(full) == facts["dropped_syns"]
    assert all(v["netns"] == facts["netns"]["nat"] and v["direction"] == "dropped" for v in full)
    for v in full:
        ev = evidence(v)
        assert ev["table"]["max"] == facts["max_during"] and ev["table"]["count"] >= 0.9 * ev["table"]["max"]
        assert ev["drop_counters"]["drop"] - ev["drop_counters"]["insert_failed"] >= 1
        assert f"({ev['table']['count']}/{ev['table']['max']} entries" in v["summary"]
    assert not [v for v in verdicts if v["cause"] in ("unexplained", "conntrack_invalid_dropped")]


def test_raw_table_drops_are_firewall_drops_not_conntrack(fixtures):
    verdicts, facts = scenario(fixtures, "raw-drop")
    drops = [v for v in verdicts if v["direction"] == "dropped"]
    assert drops and not [v for v in verdicts if v["cause"] in CONNTRACK_DROP_CAUSES | {"unexplained"}]
    assert all(v["cause"] == "firewall_drop" and v["netns"] == facts["netns"]["nat"] for v in drops)
    by_case = {}
    for v in drops:
        by_case.setdefault(v["flow"]["dport"], []).append(v)
    for case in facts["cases"]:
        hits = by_case[case["inside"]["dport"]]
        assert {(v["flow"]["src"], v["flow"]["sport"]) for v in hits} == \
            {(case["inside"]["src"], case["inside"]["sport"])}
        assert len(hits) >= case["dropped"] >= 1
        first = hits[0]
        assert ("SYN" in first["packet"]["flags"]) == (case["kind"] != "data")
        if case["kind"] == "notrack":
            assert "NOTRACK" in first["summary"] and evidence(first)["drop"]["ctinfo"] == 7
        else:
            assert "before conntrack tracked it" in first["summary"]
            counters = evidence(first)["conntrack_counters"]["rise"]
            assert counters["drop"] == counters["invalid"] == 0 == facts["conntrack_rise"]["drop"]


def test_the_drop_invalid_remedy_rests_on_the_invalid_count(fixtures):
    v = next(replay_verdicts(str(fixtures / "invalid-window-drop-invalid.rec")))
    assert v["cause"] == "conntrack_invalid_dropped" and evidence(v)["ct_invalid_delta"] >= 1
