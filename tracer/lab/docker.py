"""The lab over a real Docker engine: dockerd (Debian's docker.io, with the containerd it
starts) confined to a network namespace of the lab, its containers on Docker's own bridge
(docker0) behind Docker's own MASQUERADE, and a server namespace outside:

    containers 10.200.1.x (docker0, 10.200.1.1)  rstlab-<id>-nat  10.200.2.1/n2 --- s0/10.200.2.2 srv

Confinement: dockerd runs in `rstlab-<id>-nat` (nsenter --net: the mount namespace is the
host's, so the namespaces it mounts under its exec root are visible to the tracer), with its
data root, exec root, pid file and socket under a temporary directory; its bridge, veths
and iptables rules exist only in that namespace. It is stopped by its pid (the containers
removed first); processes still naming the temporary directory (containerd, shims) are
killed by pid, mounts under it unmounted, the directory removed. Nothing reaches a registry:
the image is `docker import`ed from a root made of Debian's busybox-static, and the
containers mount the host's /usr read-only and the project, so the lab's traffic programs
(tracer.lab.traffic) run inside them with the host's Python.

The scenarios of tracer/lab/scenarios.py run unchanged on a DockerLab: `cli` is a container
(its programs run with `docker exec`) at 10.200.1.2, the first address of docker0's network.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from .scenarios import SERVER_PORT, Outcome, follow, hold_racing_syns, netns_facts, tup
from .topology import CLI_ADDR, NAT_IN_ADDR, NAT_OUT_ADDR, SRV_ADDR, LabError, NatLab, _project_root, rtnl, run

DOCKERD, DOCKER = "/usr/sbin/dockerd", "/usr/bin/docker"   # Debian's docker.io (not a client on PATH)
BUSYBOX = "/bin/busybox"                                   # Debian's busybox-static
IMAGE = "rstlab/busybox:1"
BRIDGE_CIDR = f"{NAT_IN_ADDR}/24"                          # docker0: containers get 10.200.1.2, .3, ...
START_TIMEOUT_S = 60.0
# the kubelet's label keys (what it puts on the containers it has Docker run)
KUBELET_LABELS = ("io.kubernetes.pod.name", "io.kubernetes.pod.namespace", "io.kubernetes.pod.uid",
                  "io.kubernetes.container.name")


def available() -> str:
    """'' when a confined Docker lab can run here, else why not."""
    missing = [p for p in (DOCKERD, DOCKER, BUSYBOX, "/usr/bin/nsenter") if not os.path.exists(p)]
    if missing:
        return f"missing {', '.join(missing)} (apt-get install docker.io busybox-static)"
    return ""


class DockerEngine:
    """One dockerd, confined (see the module's docstring). `docker(...)` runs its CLI."""

    def __init__(self, netns_name: str, tag: str):
        self.netns_name = netns_name
        self.dir = tempfile.mkdtemp(prefix=f"{tag}-docker.")
        self.socket = os.path.join(self.dir, "docker.sock")
        self.exec_root = os.path.join(self.dir, "exec")
        self.netns_dir = os.path.join(self.exec_root, "netns")   # where it mounts container namespaces
        self.proc = None
        self.log = None
        self.started_s = 0.0

    @property
    def env(self) -> dict:
        """What a tracer needs to see this engine's containers and namespaces."""
        return {"RST_TRACER_DOCKER_HOST": f"unix://{self.socket}",
                "RST_TRACER_NETNS_DIRS": f"{self.netns_dir}=docker:"}

    def start(self) -> None:
        t0 = time.monotonic()
        self.log = open(os.path.join(self.dir, "dockerd.log"), "wb")
        # nsenter execs dockerd: the pid is dockerd's own
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.netns_name}", DOCKERD,
             "--data-root", os.path.join(self.dir, "data"), "--exec-root", self.exec_root,
             "--pidfile", os.path.join(self.dir, "docker.pid"), "--host", f"unix://{self.socket}",
             "--bip", BRIDGE_CIDR, "--iptables=true", "--ip-masq=true", "--userland-proxy=false",
             "--log-level", "warn"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        while self.docker("version", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() - t0 > START_TIMEOUT_S:
                raise LabError(f"dockerd did not start: {self.log_tail()}")
            time.sleep(0.1)
        self.started_s = time.monotonic() - t0

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(os.path.join(self.dir, "dockerd.log"), errors="replace") as f:
                return " | ".join(f.read().splitlines()[-lines:])
        except OSError:
            return ""

    def docker(self, *args, check: bool = True, input: str = None) -> subprocess.CompletedProcess:
        return run([DOCKER, "--host", f"unix://{self.socket}", *args], check=check, input=input)

    def import_image(self) -> None:
        """A busybox root from busybox-static, with /lib pointing into the /usr it will mount."""
        root = os.path.join(self.dir, "rootfs")
        for d in ("bin", "usr", "tmp", "proc", "sys", "dev", "etc", "work"):
            os.makedirs(os.path.join(root, d), exist_ok=True)
        shutil.copy2(BUSYBOX, os.path.join(root, "bin", "busybox"))
        applets = run([BUSYBOX, "--list"]).stdout.split()
        for applet in applets:
            if applet != "busybox":
                os.symlink("busybox", os.path.join(root, "bin", applet))
        for link in ("lib", "lib64"):
            os.symlink(f"usr/{link}", os.path.join(root, link))
        tar = subprocess.run(["tar", "-C", root, "-c", "."], capture_output=True, check=True)
        p = subprocess.run([DOCKER, "--host", f"unix://{self.socket}", "import", "--change",
                            "ENV PATH=/usr/bin:/bin", "-", IMAGE], input=tar.stdout, capture_output=True)
        if p.returncode != 0:
            raise LabError(f"docker import failed: {p.stderr.decode(errors='replace').strip()}")

    def stop(self) -> None:
        if self.proc is not None:
            ids = self.docker("ps", "-aq", check=False).stdout.split()
            if ids:
                self.docker("rm", "-f", *ids, check=False)
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(20)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
        self._kill_leftovers()
        self._unmount()
        if self.log is not None:
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _kill_leftovers(self) -> None:
        """containerd and its shims name our directory in their command line: by pid."""
        mark = self.dir.encode()
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if mark in f.read():
                        os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass

    def _unmount(self) -> None:
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f if line.split()[4].startswith(self.dir + "/")]
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)


@dataclass
class DockerLab(NatLab):
    """NatLab's shape with Docker as the router: `nat` is dockerd's namespace, `cli` the
    first container, `containers` all of them (name -> address). `labels` of each container
    (name -> {key: value}); `pod_sandbox`: run the containers in a pod's sandbox, as the
    kubelet has Docker do (a 'POD' container holding the namespace, labelled podsandbox,
    the others joined to it with --network container:)."""
    clients: int = 1
    labels: dict = field(default_factory=dict)
    pod: dict = field(default_factory=dict)    # {namespace, name, uid}: a pod sandbox with kubelet labels
    engine: DockerEngine = field(default=None, init=False, repr=False)
    containers: dict = field(default_factory=dict, init=False)

    def __post_init__(self):
        super().__post_init__()
        self.namespaces = (self.nat, self.srv)       # the ones this lab creates with ip netns
        self.client_names = [f"rstlab-{self.lab_id}-web{k + 1}" for k in range(self.clients)]
        self.cli = self.client_names[0]

    def up(self) -> None:
        if available():
            raise LabError(available())
        for ns in self.namespaces:
            run(["ip", "netns", "add", ns])
        with rtnl(self.nat) as nat:
            nat.link("add", ifname="n2", kind="veth", peer={"ifname": "s0", "net_ns_fd": self.srv})
        self._addresses(self.nat, "n2", [(NAT_OUT_ADDR, 24)])
        self._addresses(self.srv, "s0", [(SRV_ADDR, 24)])
        self.sysctl(self.nat, "net.netfilter.nf_conntrack_events", 1, check=False)
        self.engine = DockerEngine(self.nat, f"rstlab-{self.lab_id}")
        self.engine.start()
        self.engine.import_image()
        root = _project_root()
        common = ["--volume", "/usr:/usr:ro", "--volume", f"{root}:{root}:ro", "--workdir", root]
        network = []
        if self.pod:
            sandbox = f"rstlab-{self.lab_id}-pod"
            pod_labels = {"io.kubernetes.pod.name": self.pod["name"],
                          "io.kubernetes.pod.namespace": self.pod["namespace"],
                          "io.kubernetes.pod.uid": self.pod["uid"]}
            self.engine.docker("run", "-d", "--name", sandbox, *_label_args(
                dict(pod_labels, **{"io.kubernetes.docker.type": "podsandbox", "io.kubernetes.container.name": "POD"})),
                *common, IMAGE, "sleep", "3600")
            network = ["--network", f"container:{sandbox}"]
            for name in self.client_names:
                self.labels[name] = {**pod_labels, "io.kubernetes.container.name": name.rsplit("-", 1)[1],
                                     "io.kubernetes.docker.type": "container", **self.labels.get(name, {})}
        for name in self.client_names:
            self.engine.docker("run", "-d", "--name", name, *_label_args(self.labels.get(name, {})),
                               *network, *common, IMAGE, "sleep", "3600")
        holders = [f"rstlab-{self.lab_id}-pod"] if self.pod else self.client_names
        for name in holders:
            info = self.inspect(name)
            addr = info["NetworkSettings"]["IPAddress"]
            for client in (self.client_names if self.pod else [name]):
                self.containers[client] = addr
        if self.containers[self.cli] != CLI_ADDR:   # the scenarios' client address
            raise LabError(f"the first container got {self.containers[self.cli]}, not {CLI_ADDR}")
        self.exec(self.nat, ["ethtool", "-K", "n2", "tso", "off", "gso", "off", "gro", "off"], check=False)
        self.exec(self.srv, ["ethtool", "-K", "s0", "tso", "off", "gso", "off", "gro", "off"], check=False)
        self._wait_carrier()

    def down(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                p.wait()
        self.procs.clear()
        if self.engine is not None:
            self.engine.stop()
        for ns in self.namespaces:
            run(["ip", "netns", "del", ns], check=False)

    def inspect(self, name: str) -> dict:
        return json.loads(self.engine.docker("inspect", name).stdout)[0]

    # -- what the scenarios ask of a lab, for a container ------------------------------------
    def _in_container(self, ns: str) -> bool:
        return ns in self.containers

    def exec(self, ns: str, cmd: list, check: bool = True, **kw) -> subprocess.CompletedProcess:
        if self._in_container(ns):
            return self.engine.docker("exec", ns, *cmd, check=check)
        return super().exec(ns, cmd, check=check, **kw)

    def spawn(self, ns: str, args: list, **kw) -> subprocess.Popen:
        if not self._in_container(ns):
            return super().spawn(ns, args, **kw)
        cmd = [DOCKER, "--host", f"unix://{self.engine.socket}", "exec", "-i", ns,
               "/usr/bin/python3", "-u", "-m", "tracer.lab.traffic", *args]
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def netns_inode(self, ns: str) -> int:
        if self._in_container(ns):
            return os.stat(f"/proc/{self.inspect(ns)['State']['Pid']}/ns/net").st_ino
        return super().netns_inode(ns)

    def capture_points(self) -> list:
        return [(self.nat, "docker0"), (self.nat, "n2"), (self.srv, "s0")]

    def set_masquerade(self, opts) -> None:
        if tuple(opts) != tuple(self.masquerade_opts):
            raise LabError("the Docker lab keeps Docker's own MASQUERADE")


def _label_args(labels: dict) -> list:
    return [a for k, v in labels.items() for a in ("--label", f"{k}={v}")]


# -- incident 2 from several containers ----------------------------------------------------
def snat_clash_containers(lab: DockerLab, port: int = 20000, lead: float = 3.0) -> Outcome:
    """Incident 2 from two containers, made certain: both connect from the same source port
    to one server through Docker's MASQUERADE (no --random-fully), so NAT wants the same
    port for both. Instead of hoping two CPUs meet between NAT and confirm (racing several
    containers through the bridge here produced no clash in 16 000 connects), the router
    makes them meet (scenarios.hold_racing_syns): the loser is dropped at confirm
    (insert_failed), its client retransmits 1 s later and gets another port."""
    t_start = time.monotonic()
    (winner, win_addr), (loser, lose_addr) = list(lab.containers.items())[:2]
    sink = follow(lab, lab.srv, ["sink", "--addr", SRV_ADDR, "--port", str(SERVER_PORT), "--hold"], "sink")
    sink.wait("listening")
    clash = hold_racing_syns(lab, win_addr, lose_addr, SERVER_PORT)
    before = lab.conntrack_stats()
    start = time.monotonic() + lead       # both docker execs have started by then
    racers = [follow(lab, name, ["race", "--addr", SRV_ADDR, "--port", str(SERVER_PORT), "--src-base", addr,
                                 "--procs", "1", "--rounds", "1", "--base", str(port), "--at", repr(start)],
                     f"connect from {name}")
              for name, addr in ((winner, win_addr), (loser, lose_addr))]
    clash.wait("released", timeout=lead + 10)
    done = [r.wait("done", timeout=10) for r in racers]
    after = lab.conntrack_stats()
    by_addr = {addr: name for name, addr in lab.containers.items()}
    return Outcome("snat-clash-containers", {
        "winner": winner, "loser": loser, "containers": dict(lab.containers),
        "insert_failed": after.get("insert_failed", 0) - before.get("insert_failed", 0),
        "retransmitted": [{"inside": tup(r["src"], r["sport"], SRV_ADDR, SERVER_PORT), "container": by_addr[r["src"]],
                           "latency": r["latency"], "ok": r["ok"], "retrans": r["retrans"]}
                          for d in done for r in d["resent"]],
        "connected": sum(d["ok"] for d in done),
        "netns": dict(netns_facts(lab), containers={name: lab.netns_inode(name) for name in lab.containers}),
        "duration": time.monotonic() - t_start,
    })


KUBE_POD = {"namespace": "shop", "name": "redis-0", "uid": "5b0e4a3c-2f7d-4c1e-9a6b-0d8e7f1a2b3c"}


def record_fixtures(out: str) -> None:
    """The unit tests' fixtures, from a real engine: Docker API answers (docker-api/*.json:
    the container list, inspections of a pod sandbox with the kubelet's labels, of a
    container in it and of a plain container, and the event stream of a container's life),
    and recordings of two scenarios with their ground truth (docker-*.rec, *.facts.json)."""
    from ..events import MASQ_NOTIFIER
    from ..recording import keep_only
    from ..workloads import DockerAPI
    from . import scenarios
    from .harness import TracerProcess

    api_dir = os.path.join(out, "docker-api")
    os.makedirs(api_dir, exist_ok=True)

    def save(name: str, obj) -> None:
        with open(os.path.join(api_dir, name), "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.write("\n")

    with DockerLab(clients=1, pod=KUBE_POD) as lab:
        api = DockerAPI(lab.engine.socket)
        lab.engine.docker("run", "-d", "--name", "plain", IMAGE, "sleep", "3600")
        events, lines = api.events(), []
        next(events)                                   # subscribed
        lab.engine.docker("run", "-d", "--name", "short-lived", IMAGE, "sleep", "3600")
        lab.engine.docker("rm", "-f", "short-lived")
        while not any(e.get("Action") == "destroy" for e in lines):
            lines.append(next(events))
        api.close()
        save("events.json", lines)
        save("containers.json", api.get("/containers/json"))
        for name, what in ((f"rstlab-{lab.lab_id}-pod", "sandbox"), (lab.cli, "in-pod"), ("plain", "plain")):
            save(f"inspect-{what}.json", api.get(f"/containers/{name}/json"))
    for name, scenario, opts in (("docker-invalid-window-pod", scenarios.invalid_window, {"pod": KUBE_POD}),
                                 ("docker-dhcp-renew", scenarios.dhcp_renew, {})):
        rec = os.path.join(out, f"{name}.rec")
        with DockerLab(**opts) as lab:
            tracer = TracerProcess(record=rec, env=lab.engine.env)
            tracer.start()
            try:
                outcome = scenario(lab)
                mine = {lab.netns_inode(ns) for ns in (lab.nat, lab.srv, lab.cli)}
            finally:
                tracer.stop()
        keep_only(rec, lambda ev: ev.netns in mine or (ev.kind == MASQ_NOTIFIER and ev.pid == os.getpid()))
        with open(os.path.join(out, f"{name}.facts.json"), "w") as f:
            json.dump(dict(outcome.facts, containers=[lab.cli], nat_name=lab.nat), f, indent=1, sort_keys=True)
            f.write("\n")


def main(argv=None) -> None:
    """python -m tracer.lab.docker [fixtures DIR]: start a confined engine, show what it
    made, stop it; or record the unit tests' fixtures into DIR."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fixtures"] and len(argv) == 2:
        record_fixtures(argv[1])
        return
    with DockerLab(clients=2) as lab:
        print(json.dumps({"engine_start_s": round(lab.engine.started_s, 2), "containers": lab.containers,
                          "env": lab.engine.env}))


if __name__ == "__main__":
    main()
