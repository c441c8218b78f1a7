"""The incidents over a real Docker engine (Debian's docker.io, confined to a namespace of
the lab: tracer/lab/docker.py): Docker's bridge, Docker's MASQUERADE, containers made from
an imported busybox image. Each verdict must name the container (and the pod, for
containers carrying the kubelet's labels); remedies must fit Docker's chains; the root
namespace must keep no rule, address or link it did not have."""
import json
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest

from tracer.lab import docker as dlab
from tracer.lab import scenarios
from tracer.lab.harness import TracerProcess, effective_verdicts

pytestmark = [pytest.mark.root, pytest.mark.skipif(bool(dlab.available()), reason=dlab.available() or "")]
POD = {"namespace": "shop", "name": "redis-0", "uid": "5b0e4a3c-2f7d-4c1e-9a6b-0d8e7f1a2b3c"}


def root_namespace_state() -> dict:
    """What must not change in the root namespace: links, addresses, rules of every flavour."""
    def out(cmd):
        return subprocess.run(cmd, capture_output=True, text=True).stdout
    return {"links": out(["ip", "-br", "link"]), "addrs": out(["ip", "-br", "addr"]),
            "iptables": [line for line in out(["iptables-save"]).splitlines() if not line.startswith("#")],
            "nft": out(["nft", "list", "ruleset"])}


@pytest.fixture(autouse=True)
def root_namespace_untouched():
    before = root_namespace_state()
    yield
    assert root_namespace_state() == before


@contextmanager
def traced_docker(scenario, tracer_args=(), record="", **lab_opts):
    """A DockerLab with its containers up, the tracer started next (it lists them), then the
    scenario; the tracer's records after the lab is gone."""
    with dlab.DockerLab(**lab_opts) as lab:
        tracer = TracerProcess(*tracer_args, record=record, env=lab.engine.env)
        tracer.start()
        try:
            outcome = scenario(lab)
            containers = {name: lab.netns_inode(name) for name in lab.containers}
            inodes = {lab.netns_inode(ns) for ns in (lab.nat, lab.srv)} | set(containers.values())
        finally:
            records = tracer.stop()
    verdicts, _ = effective_verdicts(records, inodes)
    yield lab, outcome, verdicts, records


def names(role: dict) -> set:
    return {c["name"] for c in role["containers"]}


def test_invalid_window_names_the_pod_and_its_container_and_fits_the_remedy_to_docker():
    with traced_docker(scenarios.invalid_window, pod=POD) as (lab, outcome, verdicts, _):
        [v] = [v for v in verdicts if v["cause"] == "conntrack_invalid_unnat"]
        assert v["netns"] == outcome.facts["netns"]["nat"] and v["nat"]["inside"] == outcome.facts["inside"]
        client = v["workloads"]["client"]
        assert client["pod"] == POD and names(client) == {lab.cli}
        assert client["containers"][0]["k8s_container"] == "web1"
        assert client["containers"][0]["image"] == dlab.IMAGE and client["containers"][0]["runtime"] == "docker"
        assert client["netns"] == outcome.facts["netns"]["cli"] and client["addr"] == outcome.facts["inside"]["src"]
        assert "local" not in v["workloads"]          # dockerd's namespace holds no container
        assert "iptables -I DOCKER-USER -m conntrack --ctstate INVALID -j DROP" in v["remedy"]["commands"]
        # the client's own resets name it where it is: the server's answer reached it
        peer = [x for x in verdicts if x["netns"] == outcome.facts["netns"]["cli"]]
        assert peer and all(x["workloads"]["local"]["pod"] == POD for x in peer)
