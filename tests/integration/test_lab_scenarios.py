"""The lab's ground truth: each scenario really produces its incident (or ordinary reset) in
the network namespaces, and reports the facts a tracer test checks its verdicts against.
Nothing here runs the tracer."""
import os
import subprocess
import time

import pytest

from tracer.lab import scenarios
from tracer.lab.scenarios import ScenarioSkipped
from tracer.lab.topology import CLI_ADDR, NAT_OUT_ADDR, SRV_ADDR, NatLab

pytestmark = pytest.mark.root
BOUND = 20.0  # seconds: every scenario must stay under it


def run(name, lab_opts=None, **opts):
    t0 = time.monotonic()
    with NatLab(**(lab_opts or {})) as lab:
        outcome = scenarios.SCENARIOS[name](lab, **opts)
        inodes = {n: lab.netns_inode(ns) for n, ns in (("cli", lab.cli), ("nat", lab.nat), ("srv", lab.srv))}
        lab_id = lab.lab_id
    elapsed = time.monotonic() - t0
    facts = outcome.facts
    assert outcome.name == name
    assert facts["netns"] and facts["netns"].items() <= inodes.items()
    assert facts.get("duration", 0) < BOUND and elapsed < BOUND + 5, (facts.get("duration"), elapsed)
    # nothing left behind: the namespaces and the programs went with the lab
    assert lab_id not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [p for p in lab.procs if p.poll() is None]
    return facts


def rsts_from(facts, sender):
    return [r for r in facts["rsts"] if r["sender"] == sender]


def test_every_scenario_is_registered():
    assert {"invalid-window", "closed-port", "invalid-dnat", "snat-race", "vip-move", "dhcp-renew",
            "ct-expire", "table-full", "app-abort"} <= set(scenarios.SCENARIOS)


def test_invalid_dnat_reply_is_not_un_dnated_and_the_client_resets():
    f = run("invalid-dnat")
    vip, backend, cport = f["vip"], f["backend"], f["client"]["port"]
    assert f["inside"] == {"src": CLI_ADDR, "sport": cport, "dst": vip["addr"], "dport": vip["port"]}
    assert f["outside"] == {"src": CLI_ADDR, "sport": cport, "dst": backend["addr"], "dport": backend["port"]}
    # the INVALID segment crossed the router with the backend's own address
    assert f["injected_at_client"] == {"src": backend["addr"], "sport": backend["port"],
                                       "dst": CLI_ADDR, "dport": cport}
    assert f["rst_sender"] == "cli"
    cli_rst = rsts_from(f, "cli")[0]
    assert (cli_rst["src"], cli_rst["sport"], cli_rst["dst"], cli_rst["dport"]) == \
        (CLI_ADDR, cport, backend["addr"], backend["port"])
    assert not rsts_from(f, "nat")                      # the router itself sent nothing
    assert f["backend_after"] == "ECONNRESET"           # the client's RST killed the backend's socket
    assert f["client_after"] == "ECONNRESET"            # and the client learns on its next request


@pytest.mark.race
def test_snat_race_without_random_fully_drops_syns():
    f = run("snat-race", random_fully=False)
    assert f["random_fully"] is False
    assert f["insert_failed"] == 1 and f["drop"] >= 1 and f["connected"] == 2
    [c] = f["retransmitted"]                          # the loser's SYN, dropped at confirm
    assert c["inside"]["src"] == f["loser"] and c["inside"]["dst"] == SRV_ADDR
    assert c["ok"] and c["latency"] >= 0.9            # the SYN was retransmitted after the 1 s RTO
    assert c["outside"]["src"] == NAT_OUT_ADDR and c["outside"]["sport"] != c["inside"]["sport"]
    assert c["port_taken_by"] == dict(c["inside"], src=f["winner"])   # the winner got that port


@pytest.mark.race
def test_snat_race_with_random_fully_does_not_clash():
    f = run("snat-race", random_fully=True)
    assert f["random_fully"] is True and f["connected"] == 2
    # each SYN draws its own port: they meet only if both draw the same (about 1 in 64 000)
    assert f["insert_failed"] <= 1 and len(f["retransmitted"]) == f["insert_failed"]


def test_vip_move_resnats_to_a_new_port_and_the_server_resets():
    f = run("vip-move")
    assert f["random_fully"] is True and f["flushed"]
    assert f["new_port"] is not None and f["port_changed"] and f["new_port"] != f["old_port"]
    assert f["new_port_router"] == f["new_port"]
    assert f["new_outside"] == dict(f["outside"], sport=f["new_port"])
    assert f["client_after"] == "ECONNRESET"
    srv = rsts_from(f, "srv")
    assert len(srv) == 1 and srv[0]["dport"] == f["new_port"] and srv[0]["dst"] == NAT_OUT_ADDR
    ts = f["timestamps"]
    assert ts["removed"] < ts["readded"] <= ts["client_sent"] <= ts["reset"]


@pytest.mark.parametrize("probe", ["keepalive", "data"])
def test_dhcp_renew_server_first_segment_gets_a_router_reset(probe):
    f = run("dhcp-renew", probe=probe)
    assert f["flushed"] and f["probe"] == probe
    router = f["router_rst"]
    assert router and router["sender"] == "nat"
    assert (router["src"], router["sport"], router["dst"], router["dport"]) == \
        (f["outside"]["src"], f["outside"]["sport"], SRV_ADDR, f["outside"]["dport"])
    assert f["server_after"] == "ECONNRESET"
    assert f["client_after"] == "ECONNRESET"
    if probe == "keepalive":  # TCP_KEEPIDLE=1: the probe left about a second after it was enabled
        assert f["timestamps"]["router_rst"] - f["probe_sent"] >= 0.5


@pytest.mark.parametrize("evict", ["listing", "lookup"])
def test_ct_expire_entry_is_gone_then_the_router_resets(evict):
    f = run("ct-expire", timeout=3, evict=evict)
    assert f["entry_gone"] and f["evict"] == evict and f["timeout"] == 3
    if evict == "listing":  # polled with conntrack -L until gone: the listing evicts it
        assert f["removed_by"] in ("gc", "ctnetlink-dump") and f["gone_after"] >= 2.0
    else:                   # nobody listed it: the GC or the server's segment's lookup did
        assert f["removed_by"] in ("gc", "lookup")
    assert f["idle_seconds"] >= 3.0
    router = f["router_rst"]
    assert router and (router["src"], router["sport"]) == (f["outside"]["src"], f["outside"]["sport"])
    assert f["server_after"] == "ECONNRESET" and f["client_after"] == "ECONNRESET"


def test_app_abort_each_side_resets_its_own_connection():
    f = run("app-abort")
    kinds = {c["kind"]: c for c in f["cases"]}
    assert set(kinds) == {"unread_data", "linger_zero"}
    assert kinds["unread_data"]["unread"] == 100
    for c in f["cases"]:
        assert c["sender"] == c["expected_sender"], c
        assert c["peer_after"] == "ECONNRESET"
        assert len(c["rsts"]) == 1
    assert not rsts_from(f, "nat")


def test_closed_port_answers_every_syn():
    f = run("closed-port", count=5)
    assert f["outcomes"] == {"ECONNREFUSED": 5}


def test_table_full_needs_an_opt_in(monkeypatch):
    monkeypatch.delenv(scenarios.ALLOW_GLOBAL_SYSCTL, raising=False)
    with NatLab() as lab:
        with pytest.raises(ScenarioSkipped):
            scenarios.table_full(lab)


def test_table_full_drops_new_syns_and_restores_the_max():
    if os.environ.get(scenarios.ALLOW_GLOBAL_SYSCTL) != "1":
        pytest.skip(f"lowers the host-wide nf_conntrack_max: set {scenarios.ALLOW_GLOBAL_SYSCTL}=1")
    with open(scenarios.CT_MAX_PATH) as fh:
        before = int(fh.read())
    try:
        f = run("table-full")
    except ScenarioSkipped as e:
        pytest.skip(str(e))
    with open(scenarios.CT_MAX_PATH) as fh:
        assert int(fh.read()) == before == f["max_before"] == f["max_after"]
    assert f["max_during"] < before and f["count_full"] >= f["max_during"]
    assert f["failed_connects"] >= 1 and f["dropped_syns"] >= f["failed_connects"]
    assert f["conntrack_drop"] >= f["dropped_syns"]
    for c in f["failed"]:
        assert c["errno"] == "timeout" and c["syns_in"] >= 2 and c["syns_forwarded"] == 0
        assert c["inside"]["src"] == CLI_ADDR and c["inside"]["dst"] == SRV_ADDR
