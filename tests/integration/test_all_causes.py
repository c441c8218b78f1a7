"""Every incident and every ordinary reset, reproduced in the lab, named by the tracer, and
checked against the wire: each RST captured on any lab interface must be covered by
exactly one verdict."""
import json
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest

from tracer.lab import scenarios
from tracer.lab.harness import TracerProcess, effective_verdicts
from tracer.lab.topology import NAT_OUT_ADDR, NatLab
from tracer.lab.wire import Capture, retransmitted_syns, rst_coverage

pytestmark = pytest.mark.root
CONNTRACK_CAUSES = {"conntrack_invalid_unnat", "snat_port_clash", "conntrack_flushed",
                    "conntrack_expired", "conntrack_table_full"}


class Run:
    def __init__(self, outcome, records, packets, lab_inodes, names, tracer_stderr=""):
        self.outcome = outcome
        self.tracer_stderr = tracer_stderr
        self.facts = outcome.facts
        self.names = names                  # {"cli": netns name, "nat": ..., "srv": ...}
        self.records = records
        self.verdicts, self.corrections = effective_verdicts(records, lab_inodes)
        self.packets = packets

    def causes(self, cause):
        return [v for v in self.verdicts if v["cause"] == cause]

    def only(self, cause):
        hits = self.causes(cause)
        assert len(hits) == 1, [(v["cause"], v["direction"]) for v in self.verdicts]
        return hits[0]

    @staticmethod
    def evidence(v):
        return {e["key"]: e["value"] for e in v["evidence"]}

    def assert_wire_covered(self):
        cov = rst_coverage(self.packets, self.verdicts)
        assert cov["coverage"] == 1.0, (cov["unmatched"], cov["ambiguous"], self.explain())
        return cov

    def explain(self) -> str:
        """What the tracer said, for a failure: the lab's verdicts, every record that is not a
        verdict (status, loss, aggregate), the end of its stderr."""
        lines = [f"{v['type']} {v['cause']} {v['direction']} {v.get('flow')} ns={v['netns']}" for v in self.verdicts]
        lines += [json.dumps(r) for r in self.records if r.get("type") not in ("verdict", "correction")]
        return "\n".join(lines + ["stderr: " + self.tracer_stderr[-3000:]])


@contextmanager
def traced(scenario, wire=True, lab_opts=None, **opts):
    tracer = TracerProcess()
    tracer.start()
    try:
        with NatLab(**(lab_opts or {})) as lab:
            inodes = {lab.netns_inode(ns) for ns in lab.namespaces}
            if wire:
                with Capture(lab.capture_points()) as cap:
                    outcome = scenarios.SCENARIOS[scenario](lab, **opts)
                packets = cap.packets()
            else:
                outcome, packets = scenarios.SCENARIOS[scenario](lab, **opts), []
            names = {"cli": lab.cli, "nat": lab.nat, "srv": lab.srv}
            records = tracer.stop()
    finally:
        tracer.stop()
    yield Run(outcome, records, packets, inodes, names, tracer.stderr)


def needs(name):
    return pytest.mark.skipif(name not in scenarios.SCENARIOS, reason=f"scenario {name} not in this lab")


def test_invalid_window_on_the_wire():
    with traced("invalid-window") as run:
        cov = run.assert_wire_covered()
        assert cov["rsts"] == 2      # the router's RST, then the server's answer to the client
        assert len(run.causes("conntrack_invalid_unnat")) == 1


def test_closed_port_on_the_wire():
    with traced("closed-port", count=50) as run:
        cov = run.assert_wire_covered()
        assert cov["rsts"] == 50 and len(run.causes("no_listener")) == 50


def test_ten_thousand_ordinary_resets_are_counted_exactly_and_raise_no_conntrack_alarm():
    """10 000 refused connects, as fast as one client makes them: past the storm threshold the
    kernel counts the resets instead of sending each; verdicts and aggregates add up to every
    reset the server sent, exactly."""
    with traced("closed-port", wire=False, count=10000) as run:
        srv = run.facts["netns"]["srv"]
        aggregated = sum(r["count"] for r in run.records if r.get("type") == "aggregate"
                         and r["netns"] == srv and r["cause"] == "no_listener")
        per_event = [v for v in run.causes("no_listener") if v["netns"] == srv]
        assert run.facts["outcomes"] == {"ECONNREFUSED": 10000}     # one RST each, no more
        assert len(per_event) + aggregated == 10000
        assert aggregated and [r for r in run.records if r.get("state") == "storm"]
        assert not [r for r in run.records if r.get("type") == "loss" and r["source"] == "kernel_ringbuf"]
        assert not [v for v in run.verdicts if v["cause"] in CONNTRACK_CAUSES]
        assert not run.causes("unexplained")


@pytest.mark.storm
def test_a_storm_in_one_namespace_leaves_another_explained_one_by_one():
    """A flood of refused connections in one lab (past the storm threshold: its ordinary
    resets are counted in the kernel) while another lab's applications abort: the second
    lab's resets still get one verdict each."""
    with TracerProcess() as tracer, NatLab() as flooded, NatLab() as quiet:
        flood = scenarios.follow(flooded, flooded.cli, ["connect-many", "--addr", scenarios.SRV_ADDR, "--port",
                                                        str(scenarios.CLOSED_PORT), "--count", "100000000"])
        try:
            storming = flooded.netns_inode(flooded.srv)
            tracer.wait_for(lambda r: r.get("state") == "storm" and r["netns"] == storming, 30)
            with Capture(quiet.capture_points()) as cap:
                outcome = scenarios.app_abort(quiet)
            after = tracer.mark()   # the flood is still being shed once the other lab is done
            still = tracer.wait_for(lambda r: r.get("type") == "aggregate" and r["netns"] == storming, 5, after)
        finally:
            flood.stop()
        inodes = {quiet.netns_inode(ns) for ns in quiet.namespaces}
        flooded_inodes = {flooded.netns_inode(ns) for ns in flooded.namespaces}
        records = tracer.stop()
    assert still["why"] == "storm"
    run = Run(outcome, records, cap.packets(), inodes, {}, tracer.stderr)
    run.assert_wire_covered()
    assert {v["cause"] for v in run.verdicts} == {"app_abort", "peer_reset"} and len(run.verdicts) == 4
    assert not [r for r in records if r.get("type") == "aggregate" and r["netns"] in inodes]
    # the server refusing, the client receiving the refusals: both storm; nothing else does
    assert storming in {r["netns"] for r in records if r.get("state") == "storm"} <= flooded_inodes


def test_summary_agrees_with_the_verdicts(tmp_path):
    with traced("invalid-window", wire=False) as run:
        out = tmp_path / "run.jsonl"
        out.write_text("".join(json.dumps(v) + "\n" for v in run.verdicts))
        p = subprocess.run([sys.executable, "-m", "tracer", "summary", "--json", str(out)],
                           capture_output=True, text=True, cwd=os.getcwd())
        summary = json.loads(p.stdout)
        assert summary["verdicts"] == len(run.verdicts)
        assert summary["by_cause"]["conntrack_invalid_unnat"] == 1
        detached = [r for r in run.records if r.get("state") == "detached"][-1]
        assert detached["summary"]["by_cause"]["conntrack_invalid_unnat"] >= 1


def test_ipv6_resets_are_named_too():
    from tracer.lab.topology import SRV6_ADDR
    tracer = TracerProcess()
    tracer.start()
    with NatLab() as lab:
        p = scenarios.follow(lab, lab.cli, ["connect-many", "--addr", SRV6_ADDR, "--port", "9", "--count", "5"])
        assert p.wait("done")["outcomes"] == {"ECONNREFUSED": 5}
        srv = lab.netns_inode(lab.srv)
        verdicts = [v for v in tracer.stop() if v.get("type") == "verdict" and v["netns"] == srv]
    assert len(verdicts) == 5
    assert all(v["cause"] == "no_listener" and v["flow"]["family"] == 6 and v["flow"]["dst"] == SRV6_ADDR
               for v in verdicts)


# -- one test per scenario: the cause, on the flow, with its evidence; the wire covered ----
def test_invalid_dnat_is_named_on_the_client_with_the_service_tuple():
    with traced("invalid-dnat") as run:
        run.assert_wire_covered()
        v = run.only("conntrack_invalid_unnat")
        assert v["direction"] == "sent" and v["netns"] == run.facts["netns"]["cli"]
        assert v["nat"]["inside"] == run.facts["inside"] and v["nat"]["outside"] == run.facts["outside"]
        assert {"unnated_reply", "segment", "ct_invalid_delta"} <= run.evidence(v).keys()
        assert run.evidence(v)["ct_invalid_delta"] >= 1


@pytest.mark.race
def test_snat_race_every_retransmitted_syn_is_a_port_clash():
    with traced("snat-race", random_fully=False) as run:
        clashes = run.causes("snat_port_clash")
        wire = retransmitted_syns(run.packets, run.names["cli"])
        assert wire and clashes
        inside = {(v["nat"]["inside"]["src"], v["nat"]["inside"]["sport"], v["nat"]["inside"]["dst"],
                   v["nat"]["inside"]["dport"]) for v in clashes}
        assert [syn for syn in wire if syn[:4] not in inside] == []     # every retransmitted SYN
        assert len(clashes) == run.facts["insert_failed"]                # and nothing more
        v = clashes[0]
        ev = run.evidence(v)
        assert v["direction"] == "dropped" and v["netns"] == run.facts["netns"]["nat"]
        assert v["nat"]["outside"]["src"] == NAT_OUT_ADDR
        assert ev["insert_failed_delta"] >= 1 and ev["masquerade_rules"]["random_fully"] is False
        assert any("--random-fully" in c for c in v["remedy"]["commands"])
        run.assert_wire_covered()


@pytest.mark.race
def test_snat_race_with_random_fully_says_so():
    with traced("snat-race", wire=False, random_fully=True) as run:
        clashes = run.causes("snat_port_clash")
        assert len(clashes) == run.facts["insert_failed"] <= 2
        for v in clashes:
            assert run.evidence(v)["masquerade_rules"]["random_fully"] is True


def _renated_flush(run) -> dict:
    """The server's listener reset the client's re-NATed segment: a conntrack_flushed verdict
    on the client's flow, old and new NAT tuples as the lab saw them; its evidence."""
    run.assert_wire_covered()
    v = next(v for v in run.causes("conntrack_flushed") if v["netns"] == run.facts["netns"]["srv"])
    assert v["nat"]["inside"] == run.facts["inside"] and v["nat"]["outside"] == run.facts["outside"]
    assert v["nat"]["outside_after"] == run.facts["new_outside"]
    assert not run.causes("unexplained")
    return run.evidence(v)


@pytest.mark.flush
def test_vip_move_blames_the_address_removal_and_shows_the_new_port():
    with traced("vip-move") as run:
        ev = _renated_flush(run)
        assert ev["flush_trigger"]["kind"] == "addr_removed"
        assert ev["flush_trigger"]["address"] == run.facts["address_removed"]
        assert ev["masquerade_notifier"]["notifier"] == "masq_inet_event"
        assert ev["new_nat_port"]["new"]["sport"] == run.facts["new_port"]
        assert abs(ev["deleted_entry"]["deleted_ts"] - run.facts["timestamps"]["removed"]) < 1.0


@pytest.mark.flush
def test_device_down_blames_the_link_and_shows_the_new_port():
    with traced("device-down") as run:
        ev = _renated_flush(run)
        assert ev["flush_trigger"]["kind"] == "link_down" and ev["flush_trigger"]["ifname"] == "n2"
        assert ev["masquerade_notifier"]["notifier"] == "masq_device_event"
        assert abs(ev["deleted_entry"]["deleted_ts"] - run.facts["timestamps"]["down"]) < 1.0


@pytest.mark.flush
@pytest.mark.parametrize("how", ["flush", "delete"])
def test_ctnetlink_deletion_names_who_asked_for_it(how):
    """`conntrack -F` / `conntrack -D` in the router: the deletion is its own trigger, with the
    process that asked where the kernel tells (the netlink port of the request; the process
    itself has exited by the time the deletion is read)."""
    with traced("ct-flush", how=how) as run:
        ev = _renated_flush(run)
        trigger = ev["flush_trigger"]
        assert trigger["kind"] == "ctnetlink_delete" and trigger["netns"] == run.facts["netns"]["nat"]
        requester = trigger["requester"]
        assert requester["portid"]
        if how == "flush":   # its first netlink socket: the port is the pid
            assert requester["portid"] == run.facts["deleter_pid"]
        assert "masquerade_notifier" not in ev
        v = next(v for v in run.causes("conntrack_flushed") if v["netns"] == run.facts["netns"]["srv"])
        assert "ctnetlink" in v["summary"] and any("conntrack -E" in c for c in v["remedy"]["commands"])


@pytest.mark.flush
@pytest.mark.parametrize("probe", ["keepalive", "data"])
def test_dhcp_renew_blames_the_renewal_on_the_routers_reset(probe):
    with traced("dhcp-renew", probe=probe) as run:
        run.assert_wire_covered()
        v = run.only("conntrack_flushed")
        ev = run.evidence(v)
        assert v["direction"] == "sent" and v["netns"] == run.facts["netns"]["nat"]
        assert v["nat"]["inside"] == run.facts["inside"]
        assert ev["flush_trigger"]["address"] == run.facts["address_removed"]
        assert "unnated_segment" in ev
        later = [x for x in run.verdicts if x is not v]
        assert later and all(x["related"]["id"] == v["id"] for x in later)


@pytest.mark.flush
@pytest.mark.parametrize("evict", ["listing", "lookup"])
def test_ct_expire_is_expired_with_the_timeout(evict):
    with traced("ct-expire", evict=evict) as run:
        run.assert_wire_covered()
        v = run.only("conntrack_expired")
        ev = run.evidence(v)
        assert v["netns"] == run.facts["netns"]["nat"] and v["nat"]["inside"] == run.facts["inside"]
        assert ev["expired"]["tcp_timeout_established_s"] == run.facts["timeout"]
        assert ev["expired"]["timeout_left_s"] <= 1
        assert not run.causes("conntrack_flushed")


def test_table_full_names_each_dropped_syn():
    if os.environ.get(scenarios.ALLOW_GLOBAL_SYSCTL) != "1":
        pytest.skip(f"lowers the host-wide nf_conntrack_max: set {scenarios.ALLOW_GLOBAL_SYSCTL}=1")
    with traced("table-full") as run:
        full = run.causes("conntrack_table_full")
        assert len(full) >= run.facts["dropped_syns"] >= 1
        failed = {(c["inside"]["src"], c["inside"]["sport"]) for c in run.facts["failed"]}
        assert failed <= {(v["flow"]["src"], v["flow"]["sport"]) for v in full}
        assert {"no_conntrack", "table", "drop_counters"} <= run.evidence(full[0]).keys()
        # read while the max was lowered: the tracer kept up with the scenario
        assert {run.evidence(v)["table"]["max"] for v in full} == {run.facts["max_during"]}


def test_raw_table_drops_are_firewall_drops_never_conntrack():
    """SYNs and data the router's firewall drops before conntrack tracks them (raw-table
    DROP, NOTRACK then UNTRACKED DROP): conntrack counts nothing, so neither a full table
    nor an INVALID segment; every SYN the router took in on the wire is one such drop."""
    with traced("raw-drop") as run:
        assert run.assert_wire_covered()["rsts"] == 0
        assert not [v for v in run.verdicts if v["cause"] != "firewall_drop"]
        assert run.facts["conntrack_rise"]["drop"] == run.facts["conntrack_rise"]["invalid"] == 0
        by_port = {}
        for v in run.verdicts:
            assert v["direction"] == "dropped" and v["netns"] == run.facts["netns"]["nat"]
            by_port.setdefault(v["flow"]["dport"], []).append(v)
        for case in run.facts["cases"]:
            inside = case["inside"]
            hits = by_port[inside["dport"]]
            assert {(v["flow"]["src"], v["flow"]["sport"]) for v in hits} == {(inside["src"], inside["sport"])}
            assert len(hits) >= case["dropped"] >= 1
            if case["kind"] == "notrack":
                assert all("NOTRACK" in v["summary"] and run.evidence(v)["drop"]["ctinfo"] == 7 for v in hits)
            else:
                assert all("before conntrack tracked it" in v["summary"] for v in hits)
                assert all(run.evidence(v)["conntrack_counters"]["rise"]["drop"] == 0 for v in hits)
        syn_ports = {c["inside"]["dport"] for c in run.facts["cases"] if c["kind"] != "data"}
        wire = sorted((p.sport, p.seq) for p in run.packets
                      if (p.ns, p.iface) == (run.names["nat"], "n1") and p.dport in syn_ports)
        assert wire and wire == sorted((v["flow"]["sport"], v["packet"]["seq"]) for port in syn_ports
                                       for v in by_port[port])
        assert not [p for p in run.packets if p.iface == "n2" and p.dport in syn_ports]


def test_app_abort_each_side_named_with_its_reason():
    with traced("app-abort") as run:
        run.assert_wire_covered()
        aborts = run.causes("app_abort")
        assert {v["netns"] for v in aborts} == {run.facts["netns"]["cli"], run.facts["netns"]["srv"]}
        assert {v["kernel"]["reason"] for v in aborts} <= {"TCP_ABORT_ON_CLOSE", "TCP_STATE",
                                                            "TCP_ABORT_ON_LINGER", ""}
        assert len(run.causes("peer_reset")) == 2


def test_each_reset_socket_is_named_by_its_process():
    """The kernel side learns a socket's process where it is certain — connect() in the
    caller, a handshake's child from its listener — not from whoever softirq interrupted."""
    with traced("app-abort", wire=False) as run:
        for case in run.facts["cases"]:
            port = case["inside"]["dport"]
            sender = case["expected_sender"]
            mine = [v for v in run.verdicts if port in (v["flow"]["sport"], v["flow"]["dport"])
                    and v["cause"] in ("app_abort", "peer_reset")]
            owners = {(v["cause"], v["netns"]): v["socket_owner"] for v in mine}
            how = {"cli": "connect", "srv": "listen"}
            comm = {"cli": "lab-client", "srv": "lab-server"}
            for cause, side in (("app_abort", sender), ("peer_reset", case["peer"])):
                assert owners[(cause, run.facts["netns"][side])] == \
                    {"pid": case["pids"][side], "comm": comm[side], "how": how[side]}, (case["kind"], owners)


def test_sockets_older_than_the_tracer_are_named_by_who_held_them():
    """A connection made before the tracer started (incident 4's idle Redis connection): no
    connect() for the kernel side to see; the look at /proc right after attaching names it."""
    with NatLab() as lab:
        port = scenarios.APP_ABORT_PORTS[0]
        client, server, _, _ = scenarios.idle_connection(lab, port)
        pids = scenarios._pids(client, server)
        inodes = {lab.netns_inode(ns) for ns in lab.namespaces}
        with TracerProcess() as tracer:
            since = server.mark()
            client.cmd("abort", "closed")
            server.wait("error", 3, since)
            records = tracer.stop()
    verdicts, _ = effective_verdicts(records, inodes)
    owners = {v["cause"]: v["socket_owner"] for v in verdicts
              if port in (v["flow"]["sport"], v["flow"]["dport"])}
    assert owners == {"app_abort": {"pid": pids["cli"], "comm": "lab-client", "how": "open_at_start"},
                      "peer_reset": {"pid": pids["srv"], "comm": "lab-server", "how": "open_at_start"}}


def test_keepalive_timeout_is_named_on_the_client():
    with traced("keepalive-timeout") as run:
        run.assert_wire_covered()
        v = run.only("keepalive_timeout")
        assert v["netns"] == run.facts["netns"]["cli"] and v["direction"] == "sent"
        assert {v["flow"]["dst"], v["flow"]["dport"]} == {run.facts["inside"]["src"], run.facts["inside"]["sport"]}
        assert run.facts["client_after"] == "ETIMEDOUT"


@pytest.mark.parametrize("abort", [True, False])
def test_listen_overflow_is_named_reset_or_dropped(abort):
    with traced("listen-overflow", abort=abort) as run:
        cov = run.assert_wire_covered()
        hits = run.causes("listen_overflow")
        assert hits and not run.causes("no_connection") and not run.causes("unexplained")
        if abort:
            sent = [v for v in hits if v["direction"] == "sent"]
            assert cov["rsts"] == len(sent) == len(run.facts["reset"]) >= 1
            q = run.evidence(sent[0])["accept_queue"]
            assert q["depth"] > q["backlog"] == run.facts["backlog"]
        else:
            assert cov["rsts"] == 0 and all(v["direction"] == "dropped" for v in hits)


def test_timewait_is_named_on_the_server():
    with traced("timewait") as run:
        run.assert_wire_covered()
        v = run.only("timewait")
        assert v["netns"] == run.facts["netns"]["srv"] and run.facts["server_timewait"]
        assert run.facts["client_after"] in ("ECONNRESET", "EPIPE")
