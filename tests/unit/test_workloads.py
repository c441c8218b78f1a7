"""Workload resolution (tracer/workloads.py) from what runtimes write and answer — cgroup
paths of each layout, Docker API answers recorded from a real engine (tests/fixtures/
docker-api, `python -m tracer.lab.docker fixtures tests/fixtures`) — and what verdicts make
of it: roles, console lines, summary counts, --container/--pod, remedies fitted to the
firewall. The recordings (docker-*.rec) come from the same engine's lab."""
import json

import pytest

from tracer.attribution.remedies import invalid_drop, random_fully, stable_snat
from tracer.enrich import firewall_facts
from tracer.filters import VerdictFilter
from tracer.nfrules import parse_iptables_save, parse_nft_json
from tracer.replay import replay_verdicts
from tracer.schema import Remedy
from tracer.sinks.console import format_human
from tracer.sources.namespaces import NETNS_DIRS, netns_dirs
from tracer.summary import Summary
from tracer.workloads import (Container, DockerContainer, Resolver, Workload, describe, parse_cgroup,
                              parse_docker_inspect, pod_of)

CID = "617db5a750e24db403e2e356a364264365da0159f324e0c9b37a43bb06f529c9"
UID = "5b0e4a3c-2f7d-4c1e-9a6b-0d8e7f1a2b3c"
POD = {"namespace": "shop", "name": "redis-0", "uid": UID}


# -- cgroups ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text, want", [
    # Docker, cgroupfs driver, cgroup v1 (this machine's, from a container of the lab)
    ("9:name=systemd:/docker/{id}\n8:pids:/docker/{id}\n0::/docker/{id}\n", ("docker", "")),
    # Docker, systemd driver, cgroup v2
    ("0::/system.slice/docker-{id}.scope\n", ("docker", "")),
    # containerd under Kubernetes, systemd driver (the uid's dashes are underscores there)
    ("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5b0e4a3c_2f7d_4c1e_9a6b_0d8e7f1a2b3c.slice/"
     "cri-containerd-{id}.scope\n", ("containerd", UID)),
    # Kubernetes, cgroupfs driver (any runtime: the path does not say which)
    ("11:memory:/kubepods/besteffort/pod5b0e4a3c-2f7d-4c1e-9a6b-0d8e7f1a2b3c/{id}\n", ("", UID)),
    # CRI-O under Kubernetes
    ("0::/kubepods.slice/kubepods-pod5b0e4a3c_2f7d_4c1e_9a6b_0d8e7f1a2b3c.slice/crio-{id}.scope\n", ("cri-o", UID)),
    # podman: its processes sit in a sub-cgroup of the container's scope
    ("0::/machine.slice/libpod-{id}.scope/container\n", ("podman", "")),
    ("0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{id}.scope\n", ("podman", "")),
])
def test_cgroup_paths_name_the_container_its_runtime_and_its_pod(text, want):
    assert parse_cgroup(text.format(id=CID)) == {"id": CID, "runtime": want[0], "pod_uid": want[1]}


@pytest.mark.parametrize("text", ["0::/user.slice/user-0.slice/session-1.scope\n", "0::/\n",
                                  "1:cpu:/system.slice/ssh.service\n", ""])
def test_a_process_in_no_container_has_no_container(text):
    assert parse_cgroup(text) is None


# -- Docker's answers --------------------------------------------------------------------------
def api(fixtures, name):
    return json.loads((fixtures / "docker-api" / name).read_text())


def test_inspections_recorded_from_a_real_engine(fixtures):
    sandbox = parse_docker_inspect(api(fixtures, "inspect-sandbox.json"))
    in_pod = parse_docker_inspect(api(fixtures, "inspect-in-pod.json"))
    plain = parse_docker_inspect(api(fixtures, "inspect-plain.json"))
    assert sandbox.sandbox and sandbox.pod == POD and sandbox.addrs == ["10.200.1.2"] and sandbox.sandbox_key
    assert not in_pod.sandbox and in_pod.pod == POD and in_pod.container.k8s_container == "web1"
    assert in_pod.addrs == [] and not in_pod.sandbox_key and in_pod.pid      # --network container:
    assert plain.pod is None and plain.container.name == "plain" and plain.container.image == "rstlab/busybox:1"
    assert plain.container.runtime == "docker" and plain.addrs == ["10.200.1.3"] and plain.running


def published(*containers) -> Resolver:
    r = Resolver(docker=False)
    with r._lock:
        r._docker = {c.container.id: c for c in containers}
        r._publish()
    return r


def test_a_pod_sandbox_and_its_container_make_one_workload_named_by_the_pod(fixtures):
    sandbox = parse_docker_inspect(api(fixtures, "inspect-sandbox.json"))
    in_pod = parse_docker_inspect(api(fixtures, "inspect-in-pod.json"))
    plain = parse_docker_inspect(api(fixtures, "inspect-plain.json"))
    sandbox.netns = in_pod.netns = 4026532917
    plain.netns = 4026532999
    r = published(sandbox, in_pod, plain)
    pod = r.by_netns(4026532917).record
    assert pod["pod"] == POD and [c["name"] for c in pod["containers"]] == [in_pod.container.name]
    assert r.by_addr("10.200.1.2").netns == 4026532917 and r.by_addr("10.200.1.3").netns == 4026532999
    assert describe(pod) == "pod shop/redis-0"
    assert describe(r.by_netns(4026532999).record) == "container plain"


def test_containers_of_the_host_network_do_not_name_the_host():
    host = DockerContainer(Container("a" * 64, "node-exporter"), None, False, 1, "", [], True, True, netns=4026531840)
    assert published(host).by_netns(4026531840) is None


class FakeDocker:
    """The engine of the fixtures: list and inspect answers, and its recorded events."""

    def __init__(self, fixtures, events):
        self.by_id = {}
        for name in ("inspect-sandbox.json", "inspect-in-pod.json", "inspect-plain.json"):
            d = api(fixtures, name)
            self.by_id[d["Id"]] = d
        self.listed = api(fixtures, "containers.json")
        self._events = events
        self.path = "/fixture.sock"

    def get(self, path):
        if path == "/containers/json":
            return self.listed
        return self.by_id.get(path.split("/")[2])

    def events(self):
        yield {"Type": "subscribed"}
        yield from self._events


def test_the_event_stream_keeps_the_table_and_a_destroyed_container_is_named_a_while(fixtures, monkeypatch):
    events = api(fixtures, "events.json")
    fake = FakeDocker(fixtures, events)
    short = next(e["Actor"]["ID"] for e in events if e["Action"] == "create")
    fake.by_id[short] = dict(api(fixtures, "inspect-plain.json"), Id=short, Name="/short-lived")
    r = Resolver(docker=False)
    r.docker = fake
    monkeypatch.setattr("tracer.workloads._netns_inode", lambda path: 4026533000 + len(path))
    for event in fake.events():
        if event.get("Type") == "subscribed":
            r._docker_sync()
        else:
            r._docker_event(event)
    assert {c.container.name for c in r._docker.values()} >= {"plain", "short-lived"}
    assert short in r._docker_gone          # destroyed: still named for GONE_KEEP_S
    monkeypatch.setattr("tracer.workloads.GONE_KEEP_S", -1.0)
    with r._lock:
        r._publish()
    assert short not in r._docker


def test_the_cri_plugins_annotations_name_the_pod_and_mark_its_sandbox():
    from tracer.workloads import is_sandbox
    containerd = {"io.kubernetes.cri.sandbox-name": "web-7d4b9", "io.kubernetes.cri.sandbox-namespace": "default",
                  "io.kubernetes.cri.sandbox-uid": UID, "io.kubernetes.cri.container-name": "nginx",
                  "io.kubernetes.cri.container-type": "container"}
    assert pod_of(containerd) == ({"namespace": "default", "name": "web-7d4b9", "uid": UID}, "nginx")
    assert is_sandbox({"io.kubernetes.cri.container-type": "sandbox"})
    assert is_sandbox({"io.kubernetes.cri-o.ContainerType": "sandbox"}) and not is_sandbox(containerd)
    assert pod_of({"io.kubernetes.pod.name": "x"}) == (None, "")      # no namespace: no pod


def test_an_engine_that_is_not_there_is_one_warning(tmp_path):
    r = Resolver(docker_socket=str(tmp_path / "docker.sock"), proc=str(tmp_path))
    (tmp_path / "self").mkdir()
    r.start()
    try:
        import time
        deadline = time.monotonic() + 5
        while not r.warnings and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        r.close()
    assert len(r.warnings) == 1 and "no Docker engine at" in r.warnings[0]


def test_a_host_without_docker_gets_no_warning(tmp_path, monkeypatch):
    import time
    monkeypatch.delenv("RST_TRACER_DOCKER_HOST", raising=False)
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    monkeypatch.setattr("tracer.workloads.DOCKER_SOCKET", str(tmp_path / "docker.sock"))
    (tmp_path / "self").mkdir()
    r = Resolver(proc=str(tmp_path))
    r.start()
    time.sleep(0.3)
    r.close()
    assert not r.docker_asked and r.warnings == []


def test_netns_dirs_take_extra_directories_with_a_name_prefix(monkeypatch):
    assert netns_dirs("") == NETNS_DIRS
    assert netns_dirs("/tmp/x/exec/netns=docker::/var/run/other")["/tmp/x/exec/netns"] == "docker:"
    assert netns_dirs("/tmp/x/exec/netns=docker::/var/run/other")["/var/run/other"] == ""
    monkeypatch.setenv("RST_TRACER_NETNS_DIRS", "/srv/netns=lab-")
    assert netns_dirs()["/srv/netns"] == "lab-"


# -- verdicts of the Docker lab's recordings ---------------------------------------------------
def replayed(fixtures, name):
    return list(replay_verdicts(str(fixtures / f"{name}.rec"))), \
        json.loads((fixtures / f"{name}.facts.json").read_text())


def test_replayed_verdicts_name_the_pod_as_the_live_run_did(fixtures):
    verdicts, facts = replayed(fixtures, "docker-invalid-window-pod")
    [v] = [v for v in verdicts if v["cause"] == "conntrack_invalid_unnat"]
    assert v["workloads"]["client"]["pod"] == POD and v["workloads"]["client"]["addr"] == facts["inside"]["src"]
    assert v["workloads"]["router"] == {"netns": facts["netns"]["nat"], "netns_name": facts["nat_name"],
                                        "containers": [], "pod": None}
    assert "iptables -I DOCKER-USER -m conntrack --ctstate INVALID -j DROP" in v["remedy"]["commands"]
    [mine] = [x for x in verdicts if x["netns"] == facts["netns"]["cli"]]
    assert mine["workloads"]["local"]["pod"] == POD and mine["workloads"]["local"]["containers"][0]["k8s_container"] == "web1"
    line = format_human(v)
    assert f"(inside {facts['inside']['src']}:{facts['inside']['sport']} > 10.200.2.2:8080 from pod shop/redis-0," in line
    assert " received pod shop/redis-0 " in format_human(mine)


def test_a_flushed_connection_is_named_by_the_deletion_read_before_its_reset(fixtures):
    """The router's reset carries no address of the container: its entry is gone. The name
    comes from the deletion's context, which the attribution learnt first."""
    verdicts, facts = replayed(fixtures, "docker-dhcp-renew")
    [v] = [v for v in verdicts if v["cause"] == "conntrack_flushed" and v["netns"] == facts["netns"]["nat"]]
    assert {c["name"] for c in v["workloads"]["client"]["containers"]} == set(facts["containers"])
    assert v["remedy"]["commands"][0].startswith("iptables -t nat -I POSTROUTING 1 -s 10.200.1.0/24 ! -o docker0 -j SNAT")


def test_summary_counts_by_workload_and_filters_pick_pods_and_containers(fixtures):
    verdicts, facts = replayed(fixtures, "docker-dhcp-renew")
    name = facts["containers"][0]
    s = Summary()
    for v in verdicts:
        s.add(v)
    named = [v for v in verdicts if v["workloads"] and any(c["name"] == name for w in v["workloads"].values()
                                                          for c in w["containers"])]
    assert sum(s.to_dict()["by_workload"][f"container {name}"].values()) == len(named) >= 2
    assert f"container {name}" in s.format()
    cid = next(c["id"] for v in named for w in v["workloads"].values() for c in w["containers"])
    for f in (VerdictFilter(containers={name}), VerdictFilter(containers={cid[:12]})):
        assert [v["id"] for v in verdicts if f.matches(v)] == [v["id"] for v in named]
    assert not [v for v in verdicts if VerdictFilter(containers={cid[:3]}).matches(v)]   # too short for an id
    pods, _ = replayed(fixtures, "docker-invalid-window-pod")
    assert {v["cause"] for v in pods if VerdictFilter(pods={"shop/redis-0"}).matches(v)} == \
        {"conntrack_invalid_unnat", "peer_reset"}
    assert not [v for v in pods if VerdictFilter(pods={"default/redis-0"}).matches(v)]


# -- remedies fitted to the firewall -----------------------------------------------------------
DOCKER_SAVE = """*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A POSTROUTING -o docker0 -m addrtype --src-type LOCAL -j MASQUERADE
-A POSTROUTING -s 10.200.1.0/24 ! -o docker0 -j MASQUERADE
COMMIT
*filter
:FORWARD DROP [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A DOCKER-USER -j RETURN
COMMIT
"""
KUBE_SAVE = """*nat
:POSTROUTING ACCEPT [0:0]
:KUBE-POSTROUTING - [0:0]
-A POSTROUTING -j KUBE-POSTROUTING
-A KUBE-POSTROUTING -j MASQUERADE
COMMIT
"""
NFT_NAT = {"nftables": [{"chain": {"family": "ip", "table": "nat", "name": "post", "hook": "postrouting", "prio": 100}},
                        {"rule": {"family": "ip", "table": "nat", "chain": "post", "handle": 4,
                                  "expr": [{"masquerade": None}]}}]}
PLAIN = Remedy("plain", ["iptables -I INPUT -m conntrack --ctstate INVALID -j DROP", "x"])


def test_docker_facts_put_the_invalid_drop_in_docker_user_and_nat_in_front_of_dockers():
    facts = firewall_facts(parse_iptables_save(DOCKER_SAVE, source="iptables-nft"))
    assert facts["docker"] and not facts["kube_proxy"] and not facts["nft"]
    assert "iptables -I DOCKER-USER -m conntrack --ctstate INVALID -j DROP" in invalid_drop(PLAIN, facts).commands
    assert random_fully(PLAIN, facts, "10.200.1.7").commands == [
        "iptables -t nat -I POSTROUTING 1 -s 10.200.1.0/24 ! -o docker0 -j MASQUERADE --random-fully"]
    assert stable_snat(PLAIN, facts, "10.200.1.7").commands[0] == \
        "iptables -t nat -I POSTROUTING 1 -s 10.200.1.0/24 ! -o docker0 -j SNAT --to-source <stable address>"
    assert random_fully(PLAIN, facts, "192.168.5.5") is PLAIN     # not a Docker network's client


def test_kube_proxy_facts_name_its_setting_and_native_nft_gets_nft_commands():
    kube = firewall_facts(parse_iptables_save(KUBE_SAVE, source="iptables-nft"))
    assert kube["kube_proxy"] and not kube["docker"]
    assert any("tcpBeLiberal" in c for c in invalid_drop(PLAIN, kube).commands)
    assert "KUBE" not in " ".join(invalid_drop(PLAIN, kube).commands)       # no rule in its chains
    nft = firewall_facts(parse_nft_json(json.dumps(NFT_NAT)))
    assert nft["nft"] and not nft["docker"]
    assert all(c.startswith("nft ") or c.startswith("sysctl") for c in invalid_drop(PLAIN, nft).commands)
    assert invalid_drop(PLAIN, {}) is PLAIN and invalid_drop(PLAIN, firewall_facts(parse_iptables_save(""))) is PLAIN


def test_a_workload_record_fits_the_memory_figure():
    from tests.unit.test_state_memory import retained_per_item
    from tracer.attribution.state import BUDGET_BYTES, ENTRY_BYTES, WorkloadBook
    from tracer.events import Context

    book = WorkloadBook(3600, BUDGET_BYTES["workload"], ENTRY_BYTES["workload"])

    def ctx(i):
        w = Workload(4026532000 + i, [Container(f"{i:064x}", f"web-{i}", "rstlab/busybox:1", "docker")],
                     None, [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"])
        return Context(workloads=[dict(w.to_dict(), netns_name="")])
    assert retained_per_item(lambda c: book.learn(c, 1.0), ctx) <= ENTRY_BYTES["workload"]
