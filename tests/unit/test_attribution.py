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
    v = Attributor("tracepoint", "h").feed(ev)[0].to_dict()
    assert v["cause"] == "unexplained" and v["confidence"] == "low"
    raw = v["evidence"][0]["value"]
    assert raw["reason"] == "TCP_INVALID_ACK_SEQUENCE" and raw["flow"]["src"] == "192.0.2.1"


def test_flow_memory_is_bounded():
    from tracer.attribution.state import BoundedMap
    m = BoundedMap(ttl=10, budget=300, entry_bytes=100)
    for i in range(10):
        m.put(frozenset({i}), {"id": str(i)}, now=0)
    assert len(m) == 3
    assert m.get(frozenset({9}), now=5)[1]["id"] == "9"
    assert m.get(frozenset({9}), now=11) is None


# -- every other scenario, recorded with its ground truth (tests/fixtures/NAME.facts.json) --
import json  # noqa: E402


def scenario(fixtures, name):
    return replay(fixtures / f"{name}.rec"), json.loads((fixtures / f"{name}.facts.json").read_text())


def only(verdicts, cause):
    hits = [v for v in verdicts if v["cause"] == cause]
    assert len(hits) == 1, [v["cause"] for v in verdicts]
    return hits[0]


def keys(v):
    return {e["key"] for e in v["evidence"]}


def test_invalid_dnat_names_the_service_flow(fixtures):
    verdicts, facts = scenario(fixtures, "invalid-dnat")
    v = only(verdicts, "conntrack_invalid_unnat")
    assert v["direction"] == "sent" and v["netns"] == facts["netns"]["cli"]   # the client reset it
    assert v["nat"]["inside"] == facts["inside"] and v["nat"]["outside"] == facts["outside"]
    assert {"unnated_reply", "ct_invalid_delta"} <= keys(v)
    others = [x for x in verdicts if x is not v]
    assert others and all(x["related"]["id"] == v["id"] for x in others)


def test_every_clashed_syn_is_a_snat_port_clash(fixtures):
    verdicts, facts = scenario(fixtures, "snat-race")
    clashes = [v for v in verdicts if v["cause"] == "snat_port_clash"]
    assert len(clashes) == len(verdicts) == facts["insert_failed"]
    assert {tuple(sorted(c["inside"].items())) for c in facts["retransmitted"]} == \
        {tuple(sorted(v["nat"]["inside"].items())) for v in clashes}
    v = clashes[0]
    assert v["direction"] == "dropped" and v["kernel"]["reason"] == "NETFILTER_DROP"
    assert {"unconfirmed_nat_drop", "nated_source", "insert_failed_delta", "masquerade_rules"} <= keys(v)
    assert any("--random-fully" in c for c in v["remedy"]["commands"])


def test_a_clash_after_an_nfqueue_verdict_is_a_snat_port_clash_too(fixtures):
    """The lab's certain clash (both SYNs held after NAT, the winner let go first): the
    loser's SYN is freed by nf_reinject with no drop reason, its entry SNATed, unconfirmed."""
    verdicts, facts = scenario(fixtures, "snat-race-held")
    [v] = verdicts
    assert v["cause"] == "snat_port_clash" and facts["insert_failed"] == 1
    assert v["nat"]["inside"] == facts["retransmitted"][0]["inside"]
    assert v["kernel"]["reason"] == "NOT_SPECIFIED" and "reinject" in v["kernel"]["location"]
    assert {"unconfirmed_nat_drop", "nated_source", "insert_failed_delta", "masquerade_rules"} <= keys(v)


def test_vip_move_names_the_address_removal_and_the_new_port(fixtures):
    verdicts, facts = scenario(fixtures, "vip-move")
    first = next(v for v in verdicts if v["cause"] == "conntrack_flushed")
    assert first["netns"] == facts["netns"]["srv"]            # the server's listener reset it
    assert first["nat"]["inside"] == facts["inside"] and first["nat"]["outside"] == facts["outside"]
    assert first["nat"]["outside_after"] == facts["new_outside"]
    ev = {e["key"]: e["value"] for e in first["evidence"]}
    assert ev["flush_trigger"]["address"] == facts["address_removed"] and ev["flush_trigger"]["ifname"] == "n2"
    assert ev["new_nat_port"]["new"]["sport"] == facts["new_port"]


def test_device_down_is_a_flush_by_the_link_not_by_its_ipv6_addresses(fixtures):
    """A link going down also drops its IPv6 addresses (netlink reports those removals at
    the same instant): they cannot flush an IPv4 entry, the device event did."""
    verdicts, facts = scenario(fixtures, "device-down")
    first = next(v for v in verdicts if v["cause"] == "conntrack_flushed")
    assert first["netns"] == facts["netns"]["srv"]
    assert first["nat"]["inside"] == facts["inside"] and first["nat"]["outside_after"] == facts["new_outside"]
    ev = {e["key"]: e["value"] for e in first["evidence"]}
    assert ev["flush_trigger"]["kind"] == "link_down" and ev["flush_trigger"]["ifname"] == facts["device"]
    assert ev["masquerade_notifier"]["notifier"] == "masq_device_event"
    assert "going down" in first["summary"] and "SNAT --to-source" in " ".join(first["remedy"]["commands"])


def test_vip_move_renat_is_found_from_the_binding_when_the_entry_is_already_gone(fixtures):
    """Kprobe backend, ring-buffer order: the new entry is bound (confirm), the server resets,
    and only then the RST kills that entry on its way back through the router; by the time
    user space looks it up over ctnetlink it may be gone. The binding seen before the reset
    is what links the reset to the flushed entry. Without it (tracepoint backend), the
    deletion of the new entry, read after the reset, corrects the verdict."""
    import dataclasses
    from tracer.events import CT_DESTROY, NAT_BINDING
    from tracer.recording import read_recording
    events = list(read_recording(str(fixtures / "vip-move.rec"))[1])
    facts = json.loads((fixtures / "vip-move.facts.json").read_text())
    reset = next(e for e in events if e.kind == RST_SENT and e.netns == facts["netns"]["srv"])
    new_entry = next(e for e in events if e.kind == CT_DESTROY and e.entry.reply.dst.port == facts["new_port"])
    # what the kernel order looks like: the new entry's deletion after the reset
    raced = [e for e in events if e is not new_entry]
    raced.insert(raced.index(reset) + 1, dataclasses.replace(new_entry, ts=reset.ts + 0.001,
                                                             ts_ns=reset.ts_ns + 1_000_000))
    binding = dataclasses.replace(new_entry, kind=NAT_BINDING, ts=reset.ts - 0.001, ts_ns=reset.ts_ns - 1_000_000)

    def records(stream):
        attributor = Attributor("kprobe", "h")
        return {id(e): [v.to_dict() for v in attributor.feed(e)] for e in stream}

    raced_records = records(raced)
    first = raced_records[id(reset)][0]
    assert first["cause"] == "no_connection"
    correction = next(r for rs in raced_records.values() for r in rs if r.get("supersedes") == first["id"])
    assert correction["type"] == "correction" and correction["cause"] == "conntrack_flushed"
    assert correction["superseded_cause"] == "no_connection" and "conntrack deletion" in correction["correction"]
    assert correction["nat"]["outside_after"] == facts["new_outside"]

    with_binding = list(raced)
    with_binding.insert(with_binding.index(reset), binding)
    v = records(with_binding)[id(reset)][0]
    assert v["cause"] == "conntrack_flushed"
    assert v["netns"] == facts["netns"]["srv"] and v["nat"]["inside"] == facts["inside"]
    assert v["nat"]["outside_after"] == facts["new_outside"]


def test_dhcp_renew_is_a_flush_seen_from_the_server_side(fixtures):
    verdicts, facts = scenario(fixtures, "dhcp-renew")
    v = only(verdicts, "conntrack_flushed")
    assert v["netns"] == facts["netns"]["nat"] and v["direction"] == "sent"   # the router's stack
    assert v["nat"]["inside"] == facts["inside"]
    assert {"flush_trigger", "deleted_entry", "unnated_segment"} <= keys(v)
    assert {x["cause"] for x in verdicts if x is not v} == {"peer_reset", "no_connection"}


def test_idle_past_the_timeout_is_expired_not_flushed(fixtures):
    verdicts, facts = scenario(fixtures, "ct-expire")
    v = only(verdicts, "conntrack_expired")
    ev = {e["key"]: e["value"] for e in v["evidence"]}
    assert ev["expired"]["tcp_timeout_established_s"] == facts["timeout"]
    assert v["nat"]["inside"] == facts["inside"]
    assert not [x for x in verdicts if x["cause"] == "conntrack_flushed"]


def test_ordinary_resets_are_named_and_never_conntrack(fixtures):
    expected = {"app-abort": {"app_abort", "peer_reset"},
                "keepalive-timeout": {"keepalive_timeout", "firewall_drop"},
                "listen-overflow": {"listen_overflow", "peer_reset", "app_abort"},
                "timewait": {"timewait", "peer_reset"}}
    for name, causes in expected.items():
        verdicts, facts = scenario(fixtures, name)
        assert {v["cause"] for v in verdicts} == causes, name
        assert not [v for v in verdicts if v["cause"] in CONNTRACK_CAUSES]


def test_listen_overflow_reset_shows_the_full_accept_queue(fixtures):
    verdicts, facts = scenario(fixtures, "listen-overflow")
    sent = [v for v in verdicts if v["cause"] == "listen_overflow" and v["direction"] == "sent"]
    assert {v["flow"]["sport"] for v in sent} == {t["sport"] for t in facts["reset"]} != set()
    q = next(e["value"] for e in sent[0]["evidence"] if e["key"] == "accept_queue")
    assert q["depth"] > q["backlog"] == facts["backlog"]


def test_the_drop_after_a_listener_reset_points_at_it(fixtures):
    verdicts, _ = scenario(fixtures, "listen-overflow")
    sent = {v["flow"]["sport"]: v for v in verdicts if v["cause"] == "listen_overflow" and v["direction"] == "sent"}
    dropped = [v for v in verdicts if v["cause"] == "listen_overflow" and v["direction"] == "dropped"]
    assert dropped and all(v["related"]["id"] == sent[v["flow"]["sport"]]["id"] for v in dropped)


def test_keepalive_timeout_without_the_kernels_reason():
    # before 6.10 a keepalive reset has no reason: outstanding probes tell it from an abort
    flow = Tuple(Endpoint("192.0.2.2", 80), Endpoint("192.0.2.1", 40000))
    common = dict(kind=RST_SENT, ts=1.0, ts_ns=1, netns=1, ifindex=0, flow=flow, has_sock=True,
                  sk_state="ESTABLISHED")
    keepalive = Attributor("kprobe", "h").feed(KernelEvent(probes_out=2, **common))[0].to_dict()
    abort = Attributor("kprobe", "h").feed(KernelEvent(**common))[0].to_dict()
    assert keepalive["cause"] == "keepalive_timeout" and keepalive["confidence"] == "medium"
    assert abort["cause"] == "app_abort"


def test_a_reason_not_specified_is_no_reason():
    flow = Tuple(Endpoint("192.0.2.2", 80), Endpoint("192.0.2.1", 40000))
    common = dict(kind=RST_SENT, ts=1.0, ts_ns=1, netns=1, ifindex=0, flow=flow, has_sock=True,
                  sk_state="CLOSE", reason="NOT_SPECIFIED")
    assert Attributor("kprobe", "h").feed(KernelEvent(**common))[0].to_dict()["cause"] == "app_abort"
    assert Attributor("kprobe", "h").feed(KernelEvent(probes_out=2, **common))[0].to_dict()["cause"] == \
        "keepalive_timeout"


def test_a_link_event_read_late_still_finds_the_notifier_that_answered_it(fixtures):
    """Under load the loop reads a netlink event long after it happened (a stress run read a
    link-down 1.5 s late, and the masquerade notifier run, stamped by the kernel, was no
    longer within a fixed second of it). The event happened between its monitor's last
    empty read and its read: the notifier inside that interval is the one that answered it."""
    import dataclasses
    from tracer.events import LINK_DOWN
    from tracer.recording import read_recording
    events = list(read_recording(str(fixtures / "device-down.rec"))[1])
    facts = json.loads((fixtures / "device-down.facts.json").read_text())
    down = next(e for e in events if e.kind == LINK_DOWN and e.netns == facts["netns"]["nat"])
    late = dataclasses.replace(down, ts_ns=down.ts_ns + 1_500_000_000, ts=down.ts + 1.5,
                               not_before_ns=down.ts_ns - 200_000_000)
    attributor = Attributor("tracepoint", "h")
    verdicts = [v.to_dict() for e in events for v in attributor.feed(late if e is down else e)]
    v = next(v for v in verdicts if v["cause"] == "conntrack_flushed")
    ev = {e["key"]: e["value"] for e in v["evidence"]}
    assert ev["flush_trigger"]["kind"] == "link_down"
    assert ev["masquerade_notifier"]["notifier"] == "masq_device_event"
