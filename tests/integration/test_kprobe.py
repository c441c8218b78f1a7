"""Kprobe backend end to end: real kprobes, real namespaces, real packets, on stock kernels
(run in the VM: scripts/test-vm.sh bullseye|bookworm|trixie). Each test runs a lab scenario
under its own tracer (`watch --backend kprobe --record`) and checks the verdict carries the
evidence only kprobes give (conntrack's INVALID reason and window, the clash winner, the
kernel's reason for a deletion), and, from the recording, the raw kernel events behind it.
Skipped where kprobes are unusable (our 6.18 CI kernel)."""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from tracer.lab import scenarios
from tracer.lab.harness import TracerProcess, effective_verdicts
from tracer.lab.topology import CLI6_ADDR, SRV6_ADDR, SRV_ADDR, NatLab
from tracer.kallsyms import loaded_modules
from tracer.probes import capabilities
from tracer.recording import RecordingError, read_recording

CAPS = capabilities.detect()
KPROBE_OK = capabilities.choose_backend(CAPS, "kprobe")[0] == "kprobe"
KERNEL = CAPS.kernel_version
NAT_MODULES = ("nf_conntrack", "nf_nat")
NAT_ONLY_PROBES = ("kprobe:nf_nat_setup_info", "kprobe:masq_inet_event")   # in nf_nat

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(not KPROBE_OK, reason="not run here: "
                                 + capabilities.choose_backend(CAPS, "kprobe")[1])]


def modules_loaded() -> set:
    return (loaded_modules() or frozenset()) & set(NAT_MODULES)


class KprobeTracer(TracerProcess):
    """The real tracer on the kprobe backend, recording (TracerProcess drains its output as
    it comes: a scenario can yield more verdicts than a pipe holds)."""
    detach_timeout = 120.0   # detaching dozens of kprobes under emulation takes a while

    def __init__(self, tmp_path, *extra: str):
        self.record_path = str(tmp_path / "run.rec")
        super().__init__("--backend", "kprobe", *extra, record=self.record_path)

    def start(self, timeout: float = 240.0) -> dict:
        return super().start(timeout)

    def stop(self, settle: float = 1.0) -> list:
        # the last events cross the ring buffer and the netlink monitors (the VM is slow)
        return super().stop(settle)

    def events(self) -> list:
        """The kernel events of the run, from the recording (context included)."""
        out = []
        try:
            _, events = read_recording(self.record_path)
            for ev in events:
                out.append(ev)
        except RecordingError:
            pass
        return out


@pytest.fixture
def nat_modules():
    """Load the netfilter modules first, so that the scenario does not race the backend
    attaching their probes (that path has its own test)."""
    subprocess.run(["modprobe", "-a", *NAT_MODULES], check=False)


@pytest.fixture
def tracer(tmp_path, nat_modules):
    t = KprobeTracer(tmp_path)
    t.start()
    yield t
    t.stop()


def lab_verdicts(tracer, lab, cause: str = "") -> list:
    """The lab's verdicts as they stand after any corrections."""
    mine = {lab.netns_inode(ns) for ns in lab.namespaces}
    return [v for v in effective_verdicts(tracer.stop(), mine)[0] if not cause or v["cause"] == cause]


def evidence(v: dict) -> dict:
    return {e["key"]: e["value"] for e in v["evidence"]}


def run_scenario(name: str, lab: NatLab, **kw):
    try:
        return scenarios.SCENARIOS[name](lab, **kw)
    except scenarios.ScenarioSkipped as e:
        pytest.skip(str(e))


def check_window(window: dict) -> None:
    assert set(window) == {"orig", "reply"}
    for side in window.values():
        assert set(side) == {"td_end", "td_maxend", "td_maxwin", "td_scale"}
        assert side["td_maxend"] and side["td_maxwin"] > 0


# -- attachment ------------------------------------------------------------------------
def test_probes_of_netfilter_modules_attach_when_the_modules_load(tmp_path):
    """Stock kernels load nf_nat on first use (the first NAT rule): started before, the
    tracer attaches its probes from refresh() once it appears (this test must run before any
    other loads it: a fresh VM). nf_conntrack is loaded by the tracer's own conntrack
    monitor, as `conntrack -E` would: a namespace's deletions are reported only to listeners
    subscribed before its entries were made, so the tracer subscribes first."""
    if "nf_nat" in modules_loaded():
        pytest.skip("nf_nat already loaded: the lazy path is not exercised")
    t = KprobeTracer(tmp_path)
    attached = t.start()
    assert "kprobe:tcp_v4_send_reset" in attached["probes"] and "kprobe:nf_ct_delete" in attached["probes"]
    assert not set(NAT_ONLY_PROBES) & set(attached["probes"])      # nothing to attach to yet
    with NatLab() as lab:
        time.sleep(3)   # refresh() runs every 0.5 s; reading kallsyms and loading takes a moment
        scenarios.start_server(lab)
        client = scenarios.follow(lab, lab.cli, ["client", "--addr", SRV_ADDR, "--port", str(scenarios.SERVER_PORT)])
        conn = client.wait("connected")
        client.wait("response")
        lab.exec(lab.nat, ["conntrack", "-D", "-p", "tcp", "--orig-port-src", str(conn["lport"])])
        client.cmd("send", "response")   # picked up mid-stream: a new binding of the same flow
        nat = lab.netns_inode(lab.nat)
        t.stop()
    events = t.events()
    bindings = [e for e in events if e.kind == "nat_binding" and e.netns == nat
                and e.probe == "kprobe:__nf_conntrack_confirm"]   # (the netlink monitor reports it too)
    deletions = [e for e in events if e.kind == "ct_destroy" and e.probe == "kprobe:nf_ct_delete"
                 and e.netns == nat]
    assert [b.entry.orig.src.port for b in bindings] == [conn["lport"]]   # the SYN's own binding is not news
    assert bindings[0].nat_range_flags & 1           # MASQUERADE maps addresses (MAP_IPS)
    assert bindings[0].entry.tcp_state == "ESTABLISHED"
    assert [(d.entry.orig.src.port, d.delete_reason) for d in deletions] == [(conn["lport"], "ctnetlink")]


def test_probe_report_names_every_probe_and_why(nat_modules):
    """In-process: every probe considered on this kernel, attached or not, with the reason
    (the per-kernel resolution of signatures shows in the reasons)."""
    from tracer.probes.btf import BTF
    from tracer.probes.kprobe import KprobeBackend
    backend = KprobeBackend(CAPS, BTF())
    backend.attach()
    try:
        report = {r["probe"]: r for r in backend.probe_report()}
    finally:
        backend.detach()
    print(json.dumps({"kernel": CAPS.kernel_release, "probes": list(report.values())}, indent=1))
    assert all(r["why"] for r in report.values())
    missing = [p for p, r in report.items() if not r["attached"]]
    assert not missing, {p: report[p]["why"] for p in missing}   # all present on 5.10, 6.1, 6.12
    inv = report["kprobe:nf_ct_l4proto_log_invalid"]["why"]
    assert f"format is argument {4 if KERNEL >= (5, 14, 0) else 3}" in inv
    reason = KERNEL >= (6, 10, 0)
    assert ("reason argument: argument 3" if reason else "reason argument: none") in \
        report["kprobe:tcp_v4_send_reset"]["why"]
    # the argument is found by name: 6.12's tcp_send_active_reset is (sk, reason)
    assert ("reason argument: none" in report["kprobe:tcp_send_active_reset"]["why"]) != reason
    kfree = report["skb:kfree_skb"]["why"]
    assert ("NETFILTER_DROP" in kfree) == (KERNEL >= (5, 17, 0))
    # doctor's view (capabilities, no BCC): the same functions, present now
    points = capabilities.detect().kprobe_points
    assert points["nf_ct_delete"]["present"] and points["masq_inet_event"]["present"]


# -- incident 1 ---------------------------------------------------------------------------
def test_invalid_window_verdict_carries_conntracks_reason_and_window(tracer):
    with NatLab() as lab:
        outcome = scenarios.invalid_window(lab)
        verdicts = lab_verdicts(tracer, lab)
    assert outcome.facts["client_after"] == "ECONNRESET"
    hits = [v for v in verdicts if v["cause"] == "conntrack_invalid_unnat"]
    assert len(hits) == 1, [v["cause"] for v in verdicts]
    v = hits[0]
    assert v["backend"] == "kprobe" and v["kernel"]["probe"] == "kprobe:tcp_v4_send_reset"
    assert v["confidence"] == "high"
    assert v["nat"]["outside"] == outcome.facts["outside"]
    assert v["nat"]["inside"]["sport"] == outcome.facts["inside"]["sport"]
    assert v["netns"] == outcome.facts["netns"]["nat"] and v["interface"] == "n2"
    if KERNEL >= (6, 10, 0):
        assert v["kernel"]["reason"] == "NO_SOCKET"
    ev = evidence(v)
    reason = ev["invalid_reason"]["reason"]
    assert "upper bound" in reason and "over the window" in reason, reason
    assert ev["invalid_reason"]["seq"] == outcome.facts["injected_seq"]
    check_window(ev["tcp_window"])
    assert ev["segment"]["seq"] == outcome.facts["injected_seq"]


def test_segment_far_below_the_window_per_kernel(tracer):
    """<= 5.x: INVALID, not de-NATed, the router answers RST (incident 1). >= 6.1 ("ignore
    overly delayed tcp packets"): IGNORED, forwarded with NAT, no RST; conntrack still logs
    it, and the backend reports it (no verdict: nothing was reset)."""
    with NatLab() as lab:
        got = scenarios.invalid_window(lab, offset=-(1 << 30)).facts
        nat = lab.netns_inode(lab.nat)
        verdicts = lab_verdicts(tracer, lab)
    logged = [e for e in tracer.events() if e.kind == "ct_invalid" and e.netns == nat and e.seq == got["injected_seq"]]
    assert len(logged) == 1
    assert "lower bound" in logged[0].invalid_reason, logged[0].invalid_reason
    check_window(logged[0].ct_window)
    unnat = [v for v in verdicts if v["cause"] == "conntrack_invalid_unnat"]
    if KERNEL < (6, 1, 0):
        assert got["client_after"] == "ECONNRESET"
        assert len(unnat) == 1
        assert "lower bound" in evidence(unnat[0])["invalid_reason"]["reason"]
    else:
        assert got["client_after"] == "response"      # the connection survived
        assert not unnat
        assert not [v for v in verdicts if v["direction"] == "sent" and v["netns"] == nat]


def test_invalid_dnat_verdict_carries_conntracks_reason(tracer):
    with NatLab() as lab:
        outcome = run_scenario("invalid-dnat", lab)
        verdicts = lab_verdicts(tracer, lab)
    hits = [v for v in verdicts if v["cause"] == "conntrack_invalid_unnat"]
    assert len(hits) == 1, [v["cause"] for v in verdicts]
    ev = evidence(hits[0])
    assert "upper bound" in ev["invalid_reason"]["reason"]
    assert ev["invalid_reason"]["seq"] == outcome.facts["injected_seq"]
    check_window(ev["tcp_window"])


# -- ordinary resets ----------------------------------------------------------------------
def test_fifty_syns_to_a_closed_port_and_ipv6(tracer):
    with NatLab() as lab:
        outcome = scenarios.closed_port(lab, count=50)
        # IPv6: the same through tcp_v6_send_reset, and a v6 flow through ip6 MASQUERADE
        v6 = scenarios.follow(lab, lab.cli, ["connect-many", "--addr", SRV6_ADDR,
                                             "--port", str(scenarios.CLOSED_PORT), "--count", "5"])
        done6 = v6.wait("done", timeout=30)
        scenarios.start_server(lab, addr=SRV6_ADDR)
        c6 = scenarios.follow(lab, lab.cli, ["client", "--addr", SRV6_ADDR, "--port", str(scenarios.SERVER_PORT)])
        conn6 = c6.wait("connected")
        c6.wait("response")
        lab.exec(lab.nat, ["conntrack", "-D", "-f", "ipv6", "-p", "tcp", "--orig-port-src", str(conn6["lport"])])
        c6.cmd("send", "response")       # picked up mid-stream through ip6 MASQUERADE: a binding
        nat = lab.netns_inode(lab.nat)
        verdicts = lab_verdicts(tracer, lab)
    assert outcome.facts["outcomes"] == {"ECONNREFUSED": 50} and done6["outcomes"] == {"ECONNREFUSED": 5}
    no_listener = [v for v in verdicts if v["cause"] == "no_listener"]
    v4 = [v for v in no_listener if v["flow"]["family"] == 4]
    v6s = [v for v in no_listener if v["flow"]["family"] == 6]
    assert len(v4) == 50 and len(v6s) == 5
    assert {v["kernel"]["probe"] for v in v4} == {"kprobe:tcp_v4_send_reset"}
    assert {v["kernel"]["probe"] for v in v6s} == {"kprobe:tcp_v6_send_reset"}
    assert all(v["netns"] == outcome.facts["netns"]["srv"] and v["flow"]["dport"] == 9 for v in no_listener)
    assert not [v for v in verdicts if v["cause"] in ("unexplained", "conntrack_invalid_unnat")]
    bindings = [e for e in tracer.events() if e.kind == "nat_binding" and e.netns == nat and e.family == 6
                and e.probe == "kprobe:__nf_conntrack_confirm"]
    # connections that start with a SYN are not reported (the 5 refused ones, the served one)
    assert [(b.entry.orig.src.addr, b.entry.orig.src.port) for b in bindings] == [(CLI6_ADDR, conn6["lport"])]


def test_app_abort_resets_come_from_tcp_send_active_reset(tracer):
    with NatLab() as lab:
        outcome = run_scenario("app-abort", lab)
        verdicts = lab_verdicts(tracer, lab)
        sides = {lab.netns_inode(ns): side for side, ns in (("cli", lab.cli), ("srv", lab.srv))}
    aborts = [v for v in verdicts if v["cause"] == "app_abort"]
    assert len(aborts) >= len(outcome.facts["cases"]), [v["cause"] for v in verdicts]
    assert {v["kernel"]["probe"] for v in aborts} == {"kprobe:tcp_send_active_reset"}
    assert not [v for v in verdicts if v["cause"] == "unexplained"]
    # each aborting socket named by its process, as on the tracepoint backend
    for case in outcome.facts["cases"]:
        port, side = case["inside"]["dport"], case["expected_sender"]
        mine = [v for v in aborts if port in (v["flow"]["sport"], v["flow"]["dport"])]
        assert mine and {sides[v["netns"]] for v in mine} == {side}
        assert {(v["socket_owner"]["pid"], v["socket_owner"]["how"]) for v in mine} == \
            {(case["pids"][side], {"cli": "connect", "srv": "listen"}[side])}


@pytest.mark.parametrize("name,cause,probe", [
    ("keepalive-timeout", "keepalive_timeout", "kprobe:tcp_send_active_reset"),
    ("timewait", "timewait", "kprobe:tcp_v4_send_reset"),
    ("listen-overflow", "listen_overflow", "kprobe:tcp_v4_send_reset")])
def test_ordinary_resets_are_named_without_the_kernels_reason(tracer, name, cause, probe):
    """Before 6.10 there is no sk_rst_reason: the socket says it (keepalive probes
    outstanding, a timewait socket, a listener whose accept queue is full)."""
    with NatLab() as lab:
        run_scenario(name, lab)
        verdicts = lab_verdicts(tracer, lab)
    hits = [v for v in verdicts if v["cause"] == cause and v["direction"] == "sent"]
    assert hits, [v["cause"] for v in verdicts]
    assert {v["kernel"]["probe"] for v in hits} == {probe}
    assert not [v for v in verdicts if v["cause"] in ("unexplained", "no_connection")]


# -- incident 2 ---------------------------------------------------------------------------
@pytest.mark.race
@pytest.mark.skipif(KERNEL < (5, 17), reason="no drop reasons before 5.17: only nf_hook_slow's drops are seen, "
                    "and the lab's clash is freed by nf_reinject (tracer/lab/scenarios.py hold_racing_syns)")
def test_snat_race_names_the_entry_that_won_the_port(tracer):
    with NatLab() as lab:
        outcome = run_scenario("snat-race", lab, random_fully=False)
        verdicts = lab_verdicts(tracer, lab)
    clashes = [v for v in verdicts if v["cause"] == "snat_port_clash"]
    assert len(clashes) == outcome.facts["insert_failed"] == 1, ([v["cause"] for v in verdicts], outcome.facts)
    for v in clashes:
        ev = evidence(v)
        winner = ev["clash_winner"]
        # the winner holds the very reply tuple the dropped SYN's entry asked for
        assert winner["reply"]["dport"] == v["nat"]["outside"]["sport"]
        assert winner["orig"]["src"] == outcome.facts["winner"] and v["nat"]["inside"]["src"] == outcome.facts["loser"]
        assert winner["orig"]["sport"] == v["nat"]["inside"]["sport"]
        # the lab's clash follows an NFQUEUE verdict: nf_reinject frees the SYN, with no reason
        assert v["kernel"]["reason"] == "NOT_SPECIFIED" and "reinject" in v["kernel"]["location"]


# -- incidents 3 and 4 --------------------------------------------------------------------
def _flushed_by_masquerade(tracer, lab, outcome) -> dict:
    verdicts = lab_verdicts(tracer, lab)
    hits = [v for v in verdicts if v["cause"] == "conntrack_flushed"]
    assert hits, [v["cause"] for v in verdicts]
    v = hits[0]
    assert (v["nat"]["inside"]["src"], v["nat"]["inside"]["sport"]) == \
        (outcome.facts["inside"]["src"], outcome.facts["inside"]["sport"])
    reason = evidence(v)["delete_reason"]
    assert reason["reason"] == "masquerade"
    assert reason["address"] == outcome.facts["address_removed"].split("/")[0] and reason["ifname"] == "n2"
    return v


@pytest.mark.flush
def test_vip_move_flush_names_the_masquerade_walk(tracer):
    with NatLab() as lab:
        outcome = run_scenario("vip-move", lab)
        _flushed_by_masquerade(tracer, lab, outcome)


@pytest.mark.flush
def test_dhcp_renew_flush_names_the_masquerade_walk(tracer):
    with NatLab() as lab:
        outcome = run_scenario("dhcp-renew", lab)
        _flushed_by_masquerade(tracer, lab, outcome)


@pytest.mark.flush
def test_device_down_deletion_names_the_device(tracer):
    with NatLab() as lab:
        outcome = run_scenario("device-down", lab)
        verdicts = lab_verdicts(tracer, lab)
    v = next((v for v in verdicts if v["cause"] == "conntrack_flushed"), None)
    assert v is not None, [v["cause"] for v in verdicts]
    assert (v["nat"]["inside"]["src"], v["nat"]["inside"]["sport"]) == \
        (outcome.facts["inside"]["src"], outcome.facts["inside"]["sport"])
    reason = evidence(v)["delete_reason"]
    assert reason["reason"] == "device" and reason["ifname"] == "n2"


@pytest.mark.flush
def test_ctnetlink_deletion_names_the_deleting_process(tracer):
    """`conntrack -F` in the router: nf_ct_delete runs in the conntrack process, which the
    probe names exactly (pid and comm), though it has exited when the verdict is made."""
    with NatLab() as lab:
        outcome = run_scenario("ct-flush", lab)
        verdicts = lab_verdicts(tracer, lab)
    v = next((v for v in verdicts if v["cause"] == "conntrack_flushed"
              and v["netns"] == outcome.facts["netns"]["srv"]), None)
    assert v is not None, [v["cause"] for v in verdicts]
    ev = evidence(v)
    assert ev["delete_reason"]["reason"] == "ctnetlink"
    trigger = ev["flush_trigger"]
    assert trigger["kind"] == "ctnetlink_delete"
    assert trigger["requester"]["pid"] == outcome.facts["deleter_pid"]
    assert trigger["requester"]["comm"] == outcome.facts["deleter_comm"]


@pytest.mark.flush
def test_ct_expire_deletion_is_a_timeout(tracer):
    with NatLab() as lab:
        outcome = run_scenario("ct-expire", lab)
        nat = lab.netns_inode(lab.nat)
        verdicts = lab_verdicts(tracer, lab)
    hits = [v for v in verdicts if v["cause"] == "conntrack_expired"]
    assert hits, [v["cause"] for v in verdicts]
    inside, outside = outcome.facts["inside"], outcome.facts["outside"]
    # the idle entry goes first; a re-NATed successor, killed when the server's RST passes,
    # may follow (reason "other")
    gone = sorted((e for e in tracer.events() if e.kind == "ct_destroy" and e.probe == "kprobe:nf_ct_delete"
                   and e.netns == nat and e.entry.orig.src.port == inside["sport"]), key=lambda e: e.ts_ns)
    assert gone and gone[0].entry.reply.dst.port == outside["sport"]
    assert gone[0].delete_reason == "timeout" and gone[0].entry.timeout == 0
    assert all(e.delete_reason == "other" for e in gone[1:])
    ev = evidence(hits[0])
    assert ev["delete_reason"]["reason"] == "timeout"
