"""Real BPF, real namespaces, real packets: the spine end to end (tracepoint backend)."""
import json
import signal
import subprocess
import sys
import time

import pytest

from tracer.lab import scenarios
from tracer.lab.harness import TracerProcess, effective_verdicts
from tracer.lab.topology import NatLab

pytestmark = pytest.mark.root
CONNTRACK_CAUSES = {"conntrack_invalid_unnat", "snat_port_clash", "conntrack_flushed",
                    "conntrack_expired", "conntrack_table_full"}


def lab_verdicts(tracer, lab):
    """The lab's verdicts as they stand after any corrections."""
    return effective_verdicts(tracer.stop(), {lab.netns_inode(ns) for ns in lab.namespaces})[0]


def test_invalid_window_gives_one_verdict_on_the_clients_real_tuple(tracer):
    with NatLab() as lab:
        outcome = scenarios.invalid_window(lab)
        verdicts = lab_verdicts(tracer, lab)
    assert outcome.facts["client_after"] == "ECONNRESET"     # the incident really happened
    hits = [v for v in verdicts if v["cause"] == "conntrack_invalid_unnat"]
    assert len(hits) == 1
    v = hits[0]
    inside = outcome.facts["inside"]
    assert (v["nat"]["inside"]["src"], v["nat"]["inside"]["sport"]) == (inside["src"], inside["sport"])
    assert v["nat"]["outside"] == outcome.facts["outside"]
    assert v["netns"] == outcome.facts["netns"]["nat"] and v["interface"] == "n2"
    assert v["backend"] == "tracepoint" and v["kernel"]["reason"] == "NO_SOCKET"
    ev = {e["key"]: e["value"] for e in v["evidence"]}
    assert ev["ct_invalid_delta"] >= 1 and ev["segment"]["seq"] == outcome.facts["injected_seq"]


def test_drop_invalid_rule_means_no_reset_and_no_such_verdict(tracer):
    with NatLab(drop_invalid=True) as lab:
        outcome = scenarios.invalid_window(lab)
        verdicts = lab_verdicts(tracer, lab)
    assert outcome.facts["client_after"] == "response"       # the connection survived
    assert not [v for v in verdicts if v["direction"] in ("sent", "received")]
    assert not [v for v in verdicts if v["cause"] == "conntrack_invalid_unnat"]
    assert [v["cause"] for v in verdicts] == ["conntrack_invalid_dropped"]


def test_fifty_syns_to_a_closed_port(tracer):
    with NatLab() as lab:
        outcome = scenarios.closed_port(lab, count=50)
        verdicts = lab_verdicts(tracer, lab)
    assert outcome.facts["outcomes"] == {"ECONNREFUSED": 50}
    no_listener = [v for v in verdicts if v["cause"] == "no_listener"]
    assert len(no_listener) == 50
    assert all(v["netns"] == outcome.facts["netns"]["srv"] and v["flow"]["dport"] == 9 for v in no_listener)
    assert not [v for v in verdicts if v["cause"] in CONNTRACK_CAUSES]
    assert not [v for v in verdicts if v["cause"] == "unexplained"]


def test_filters_apply_to_inside_and_natted_tuples():
    with NatLab() as lab:
        port_tracer = TracerProcess("--port", "8080", "--host", "10.200.1.2")
        port_tracer.start()
        scenarios.closed_port(lab, count=3)      # port 9: filtered out
        outcome = scenarios.invalid_window(lab)  # 10.200.1.2 is only in the inside tuple of the nat verdict
        verdicts = lab_verdicts(port_tracer, lab)
    assert not [v for v in verdicts if v["cause"] == "no_listener"]
    assert [v["nat"]["inside"]["sport"] for v in verdicts if v["cause"] == "conntrack_invalid_unnat"] == \
        [outcome.facts["inside"]["sport"]]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_clean_detach_on_signal(sig):
    p = subprocess.Popen([sys.executable, "-m", "tracer", "watch", "--json"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    first = json.loads(p.stdout.readline())
    assert first["state"] == "attached"
    time.sleep(0.2)
    p.send_signal(sig)
    out, err = p.communicate(timeout=20)
    assert p.returncode == 0 and "Traceback" not in err
    last = json.loads(out.strip().splitlines()[-1])
    assert last["type"] == "status" and last["state"] == "detached"


def test_doctor_json_names_the_backend():
    p = subprocess.run([sys.executable, "-m", "tracer", "doctor", "--json"], capture_output=True, text=True)
    report = json.loads(p.stdout)
    caps = report["capabilities"]
    assert report["backend"] in ("tracepoint", "kprobe")
    assert caps["btf"] is True and all(caps["tracepoints"].values())
    assert isinstance(caps["kprobes"], bool) and caps["kprobes_why"]


def test_replay_of_a_live_recording_prints_the_live_verdicts(tmp_path):
    rec = tmp_path / "run.rec"
    with NatLab() as lab:
        t = TracerProcess(record=str(rec))
        t.start()
        scenarios.invalid_window(lab)
        live = t.stop()
    p = subprocess.run([sys.executable, "-m", "tracer", "replay", "--json", str(rec)],
                       capture_output=True, text=True)
    replayed = [json.loads(line) for line in p.stdout.splitlines()]
    assert p.returncode == 0 and replayed
    assert replayed == [r for r in live if r["type"] in ("verdict", "correction")]
