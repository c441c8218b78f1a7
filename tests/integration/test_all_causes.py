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
from tracer.lab.harness import TracerProcess
from tracer.lab.topology import NatLab
from tracer.lab.wire import Capture, retransmitted_syns, rst_coverage

pytestmark = pytest.mark.root
CONNTRACK_CAUSES = {"conntrack_invalid_unnat", "snat_port_clash", "conntrack_flushed",
                    "conntrack_expired", "conntrack_table_full"}


class Run:
    def __init__(self, outcome, records, packets, lab_inodes):
        self.outcome = outcome
        self.records = records
        self.verdicts = [r for r in records if r.get("type") == "verdict" and r["netns"] in lab_inodes]
        self.packets = packets

    def causes(self, cause):
        return [v for v in self.verdicts if v["cause"] == cause]

    def evidence(self, v):
        return {e["key"]: e["value"] for e in v["evidence"]}

    def assert_wire_covered(self):
        cov = rst_coverage(self.packets, self.verdicts)
        assert cov["coverage"] == 1.0, (cov["unmatched"], cov["ambiguous"])
        return cov


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
            records = tracer.stop()
    finally:
        tracer.stop()
    yield Run(outcome, records, packets, inodes)


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


def test_ten_thousand_ordinary_resets_raise_no_conntrack_alarm():
    with traced("closed-port", wire=False, count=10000) as run:
        losses = sum(r["lost"] for r in run.records if r.get("type") == "loss")
        assert len(run.causes("no_listener")) + losses >= 10000
        assert not [v for v in run.verdicts if v["cause"] in CONNTRACK_CAUSES]
        assert not run.causes("unexplained")


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
