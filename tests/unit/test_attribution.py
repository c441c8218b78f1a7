"""Attribution on event streams recorded from real runs of the lab (tests/fixtures/*.rec,
made with `scripts/lab.py run SCENARIO --record FILE`)."""
from tracer.attribution import Attributor
from tracer.events import RST_SENT, Endpoint, KernelEvent, Tuple
from tracer.replay import replay_verdicts

CONNTRACK_CAUSES = {"conntrack_invalid_unnat", "snat_port_clash", "conntrack_flushed",
                    "conntrack_expired", "conntrack_table_full"}


def replay(path):
    return list(replay_verdicts(str(path)))


def test_invalid_window_names_the_inside_flow(fixtures):
    verdicts = replay(fixtures / "invalid-window.rec")
    hits = [v for v in verdicts if v["cause"] == "conntrack_invalid_unnat"]
    assert len(hits) == 1
    v = hits[0]
    assert v["direction"] == "sent" and v["netns_name"].endswith("-nat") and v["interface"] == "n2"
    assert v["nat"]["inside"]["src"] == "10.200.1.2"
    assert v["nat"]["outside"]["src"] == "10.200.2.1"
    assert v["nat"]["inside"]["sport"] == v["flow"]["dport"] or v["nat"]["outside"]["sport"] == v["flow"]["dport"]
    keys = {e["key"] for e in v["evidence"]}
    assert {"segment_conntrack", "nat_entry", "ct_invalid_delta"} <= keys
    assert any("INVALID -j DROP" in c for c in v["remedy"]["commands"])
    assert any("be_liberal" in c for c in v["remedy"]["commands"])


def test_later_resets_on_that_flow_point_at_the_root_cause(fixtures):
    verdicts = replay(fixtures / "invalid-window.rec")
    root = next(v for v in verdicts if v["cause"] == "conntrack_invalid_unnat")
    rest = [v for v in verdicts if v is not root]
    assert {v["cause"] for v in rest} == {"peer_reset", "no_connection"}
    assert all(v["related"] == {"id": root["id"], "cause": root["cause"]} for v in rest)
    # the container itself got the reset on its real (inside) tuple
    cli = [v for v in rest if v["netns_name"].endswith("-cli")]
    assert cli and cli[0]["flow"]["dst"] == root["nat"]["inside"]["src"]


def test_drop_invalid_remedy_means_no_reset(fixtures):
    verdicts = replay(fixtures / "invalid-window-drop-invalid.rec")
    assert [v["cause"] for v in verdicts] == ["conntrack_invalid_dropped"]
    assert verdicts[0]["direction"] == "dropped"
    assert verdicts[0]["kernel"]["reason"] == "NETFILTER_DROP"


def test_closed_port_is_ordinary(fixtures):
    verdicts = replay(fixtures / "closed-port.rec")
    sent = [v for v in verdicts if v["direction"] == "sent"]
    assert len(sent) == 50 and all(v["cause"] == "no_listener" for v in sent)
    assert all(v["flow"]["dport"] == 9 for v in sent)
    assert not [v for v in verdicts if v["cause"] in CONNTRACK_CAUSES]


def test_anything_unknown_is_unexplained_with_raw_facts():
    ev = KernelEvent(kind=RST_SENT, ts=1.0, ts_ns=1, netns=1, ifindex=0,
                     flow=Tuple(Endpoint("192.0.2.1", 1), Endpoint("192.0.2.2", 2)),
                     has_skb=True, has_sock=True, sk_state="SYN_RECV", reason="TCP_INVALID_ACK_SEQUENCE")
    v = Attributor("tracepoint", "h").feed(ev).to_dict()
    assert v["cause"] == "unexplained" and v["confidence"] == "low"
    raw = v["evidence"][0]["value"]
    assert raw["reason"] == "TCP_INVALID_ACK_SEQUENCE" and raw["flow"]["src"] == "192.0.2.1"


def test_flow_memory_is_bounded():
    from tracer.attribution.state import BoundedMap
    m = BoundedMap(ttl=10, max_entries=3)
    for i in range(10):
        m.put(frozenset({i}), {"id": str(i)}, now=0)
    assert len(m) == 3
    assert m.get(frozenset({9}), now=5)[1]["id"] == "9"
    assert m.get(frozenset({9}), now=11) is None
