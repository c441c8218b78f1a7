"""What lives in a network namespace, and behind an address: containers and Kubernetes pods.

Enrichment, not attribution: the resolver answers from a table kept up to date in a
background thread, and the enricher copies what an event needs into its Context (so a
recording replays to the same names). Nothing here runs per event but dictionary lookups.

Sources, best first:
- Docker, through its Engine API on its unix socket (the stdlib speaks HTTP/1.1 over it):
  the running containers at start, then its event stream (start, die, destroy, rename,
  network connect/disconnect) re-inspects the container concerned. Each container gives its
  name, image, labels, addresses, and its namespace (the sandbox file it mounts, or its
  init process's /proc/PID/ns/net). Containers of the host's network are not attached to
  the host's namespace: they do not define it.
- Any other runtime (containerd, CRI-O, podman): when namespace discovery reports a new
  namespace, the processes in it are found in /proc; a container id, the runtime and a
  Kubernetes pod uid come from /proc/PID/cgroup; names and pod fields from the OCI bundle's
  config.json annotations (the CRI plugin's and CRI-O's), the bundle being found through
  the container's shim (containerd-shim's working directory, conmon's --bundle). No gRPC:
  the bundle holds what the CRI API would tell. A namespace with no process yet (a pod
  sandbox made before its pause container starts) is tried again later.
- Kubernetes: pod namespace, name and uid, and the container's name, from the kubelet's
  labels (io.kubernetes.pod.*, io.kubernetes.container.name: Docker labels, CRI-O
  annotations) or the containerd CRI plugin's annotations (io.kubernetes.cri.*).

An engine that was asked for (RST_TRACER_DOCKER_HOST, DOCKER_HOST) and is absent, or one
whose socket exists but does not answer, is one warning, never an error; a host without
/run/docker.sock has no Docker, which needs no warning (it is looked for again, quietly, in
case it starts later). Entries of containers that went away are kept a minute (late
verdicts still name them).
"""
from __future__ import annotations

import http.client
import json
import os
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Optional

import structlog

log = structlog.get_logger("rst-tracer.workloads")

DOCKER_HOST_ENV = "RST_TRACER_DOCKER_HOST"
DOCKER_SOCKET = "/run/docker.sock"
DOCKER_API = "/v1.41"        # Docker 20.10; every later engine still serves it
GONE_KEEP_S = 60.0           # a container that went away is still named this long
RETRY_DELAYS_S = (1.0, 5.0, 30.0)   # a namespace with no container process yet: tried again
BACKOFF_MAX_S = 30.0

# the kubelet's labels (Docker labels, CRI-O annotations) and the containerd CRI plugin's
# annotations, for the same four facts
POD_KEYS = (
    {"name": "io.kubernetes.pod.name", "namespace": "io.kubernetes.pod.namespace",
     "uid": "io.kubernetes.pod.uid", "container": "io.kubernetes.container.name"},
    {"name": "io.kubernetes.cri.sandbox-name", "namespace": "io.kubernetes.cri.sandbox-namespace",
     "uid": "io.kubernetes.cri.sandbox-uid", "container": "io.kubernetes.cri.container-name"},
)
# a pod's infrastructure ("pause") container: the pod, not one of its containers
SANDBOX_MARKS = (("io.kubernetes.docker.type", "podsandbox"), ("io.kubernetes.cri.container-type", "sandbox"),
                 ("io.kubernetes.cri-o.ContainerType", "sandbox"))
IMAGE_ANNOTATIONS = ("io.kubernetes.cri.image-name", "io.kubernetes.cri-o.ImageName")

# a cgroup path component naming a container: <64 hex>, or <prefix>-<64 hex>[.scope]
_CGROUP_ID = re.compile(r"^(?:(docker|cri-containerd|crio|libpod|containerd)-)?([0-9a-f]{64})(?:\.scope)?$")
_CGROUP_POD = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")
_CGROUP_RUNTIME = {"docker": "docker", "cri-containerd": "containerd", "containerd": "containerd",
                   "crio": "cri-o", "libpod": "podman"}


# -- what a namespace holds ----------------------------------------------------------------
@dataclass(frozen=True)
class Container:
    id: str
    name: str
    image: str = ""
    runtime: str = ""
    k8s_container: str = ""     # the container's name in its pod (kubelet label)

    def to_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "image": self.image, "runtime": self.runtime,
                "k8s_container": self.k8s_container or None}


@dataclass
class Workload:
    """Everything in one network namespace: its containers (several share one in a pod or
    with --network container:X), the pod, and the addresses it is reached at."""
    netns: int
    containers: list = field(default_factory=list)
    pod: Optional[dict] = None   # {namespace, name, uid}
    addrs: list = field(default_factory=list)
    record: dict = field(default_factory=dict, repr=False)   # to_dict(), made once when published

    def to_dict(self) -> dict:
        return {"netns": self.netns, "addrs": list(self.addrs),
                "containers": [c.to_dict() for c in sorted(self.containers, key=lambda c: c.name)],
                "pod": dict(self.pod) if self.pod else None}


def describe(w: Optional[dict]) -> str:
    """'pod NS/NAME' or 'container NAME[,NAME]' for a workload record, '' when it has neither."""
    if not w:
        return ""
    if w.get("pod"):
        return f"pod {w['pod']['namespace']}/{w['pod']['name']}"
    names = [c["name"] for c in w.get("containers") or ()]
    return f"container {','.join(names)}" if names else ""


def pod_of(labels: dict) -> tuple:
    """(pod {namespace, name, uid} or None, container name in the pod) from the kubelet's
    labels or the CRI plugin's annotations."""
    for keys in POD_KEYS:
        if labels.get(keys["name"]) and labels.get(keys["namespace"]):
            return ({"namespace": labels[keys["namespace"]], "name": labels[keys["name"]],
                     "uid": labels.get(keys["uid"], "")}, labels.get(keys["container"], ""))
    return None, ""


def is_sandbox(labels: dict) -> bool:
    return any(labels.get(k) == v for k, v in SANDBOX_MARKS)


def parse_cgroup(text: str) -> Optional[dict]:
    """{id, runtime, pod_uid} of the container a /proc/PID/cgroup names (cgroup v1 or v2;
    Docker, containerd, CRI-O, podman, under Kubernetes' kubepods or not; cgroupfs or
    systemd drivers), or None for a process in no container."""
    for line in text.splitlines():
        path = line.split(":", 2)[-1].rstrip("/")
        # the innermost component that names one (podman's processes sit in .../libpod-ID.scope/container)
        m = next(filter(None, (_CGROUP_ID.match(c) for c in reversed(path.split("/")))), None)
        if not m:
            continue
        prefix, cid = m.groups()
        runtime = _CGROUP_RUNTIME.get(prefix or "", "")
        if not runtime and "/docker/" in f"{path}/":
            runtime = "docker"
        pod = _CGROUP_POD.search(path)
        return {"id": cid, "runtime": runtime, "pod_uid": pod.group(1).replace("_", "-") if pod else ""}
    return None


# -- Docker Engine API -----------------------------------------------------------------------
class DockerError(Exception):
    pass


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: Optional[float]):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except OSError:
            s.close()
            raise
        self.sock = s


def docker_socket_path(value: Optional[str] = None) -> tuple:
    """(the Engine's socket, whether it was asked for): `value`, RST_TRACER_DOCKER_HOST (a
    path or unix:///path), DOCKER_HOST when it is a unix socket, else /run/docker.sock."""
    for v in (value, os.environ.get(DOCKER_HOST_ENV), os.environ.get("DOCKER_HOST")):
        if v and (v.startswith("unix://") or v.startswith("/")):
            return (v[len("unix://"):] if v.startswith("unix://") else v), True
    return DOCKER_SOCKET, False


class DockerAPI:
    """The three calls we need, over the unix socket: list, inspect, events."""

    def __init__(self, path: str, timeout: float = 5.0):
        self.path, self.timeout = path, timeout
        self._stream: Optional[_UnixHTTPConnection] = None

    def get(self, path: str):
        conn = _UnixHTTPConnection(self.path, self.timeout)
        try:
            conn.request("GET", DOCKER_API + path)
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise DockerError(f"{self.path}: {e}") from None
        finally:
            conn.close()
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise DockerError(f"GET {path}: HTTP {resp.status} {body[:200]!r}")
        return json.loads(body)

    def events(self):
        """Container and network events as they happen (blocks; close() ends it)."""
        filters = urllib.parse.quote(json.dumps({"type": ["container", "network"]}))
        conn = _UnixHTTPConnection(self.path, None)
        self._stream = conn
        try:
            conn.request("GET", f"{DOCKER_API}/events?filters={filters}")
            resp = conn.getresponse()
            if resp.status != 200:
                raise DockerError(f"GET /events: HTTP {resp.status}")
            yield {"Type": "subscribed"}
            while True:
                line = resp.readline()
                if not line:
                    raise DockerError("event stream closed")
                if line.strip():
                    yield json.loads(line)
        except (OSError, ValueError, http.client.HTTPException) as e:
            raise DockerError(f"{self.path}: event stream: {e}") from None
        finally:
            self._stream = None
            conn.close()

    def close(self) -> None:
        stream = self._stream
        if stream is not None and stream.sock is not None:
            try:
                stream.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@dataclass
class DockerContainer:
    """What one `GET /containers/{id}/json` tells us."""
    container: Container
    pod: Optional[dict]
    sandbox: bool
    pid: int
    sandbox_key: str
    addrs: list
    host_network: bool
    running: bool
    netns: int = 0          # found when published; kept after the container dies


def parse_docker_inspect(d: dict) -> DockerContainer:
    cfg, net, state = d.get("Config") or {}, d.get("NetworkSettings") or {}, d.get("State") or {}
    labels = cfg.get("Labels") or {}
    pod, k8s_name = pod_of(labels)
    addrs = []
    for n in (net.get("Networks") or {}).values():
        for key in ("IPAddress", "GlobalIPv6Address"):
            if n.get(key) and n[key] not in addrs:
                addrs.append(n[key])
    mode = (d.get("HostConfig") or {}).get("NetworkMode", "")
    return DockerContainer(
        Container(d["Id"], (d.get("Name") or "").lstrip("/"), cfg.get("Image", ""), "docker", k8s_name),
        pod, is_sandbox(labels), int(state.get("Pid") or 0), net.get("SandboxKey") or "", addrs,
        mode == "host", bool(state.get("Running")))


# -- the resolver ---------------------------------------------------------------------------
def _netns_inode(path: str) -> int:
    try:
        return os.stat(path).st_ino
    except OSError:
        return 0


class Resolver:
    """netns inode -> Workload and address -> Workload, kept by background threads; the
    lookups are dictionary reads of tables replaced whole (no lock on the read side)."""

    def __init__(self, docker_socket: Optional[str] = None, proc: str = "/proc", docker: bool = True):
        self.proc = proc
        path, self.docker_asked = docker_socket_path(docker_socket)
        self.docker = DockerAPI(path) if docker else None
        self._docker: dict = {}          # container id -> DockerContainer
        self._docker_gone: dict = {}     # container id -> monotonic time it went away
        self._cgroup: dict = {}          # netns inode -> Workload found through /proc and cgroups
        self._by_netns: dict = {}
        self._by_addr: dict = {}
        self._lock = threading.Lock()    # writers only
        self._pending: dict = {}         # netns inode -> [attempt, not before]
        self._wake = threading.Condition()
        self._stopping = False
        self._threads: list = []
        self.warnings: list = []

    # -- lookups (any thread) ------------------------------------------------------------------
    def by_netns(self, inode: int) -> Optional[Workload]:
        return self._by_netns.get(inode)

    def by_addr(self, addr: str) -> Optional[Workload]:
        return self._by_addr.get(addr)

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Docker's containers and events in one thread; every namespace with a container
        process now (one /proc walk), then the ones discovery reports, in another."""
        if self.docker is not None:
            self._spawn(self._docker_loop, "workloads-docker")
        self._spawn(self._cgroup_loop, "workloads-cgroup")

    def _spawn(self, target, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def close(self) -> None:
        self._stopping = True
        if self.docker is not None:
            self.docker.close()
        with self._wake:
            self._wake.notify_all()
        for t in self._threads:
            t.join(2)

    def namespaces_added(self, inodes) -> None:
        """Namespace discovery found these: resolve them through /proc (where Docker also
        answers for one, Docker's answer wins)."""
        now = time.monotonic()
        with self._wake:
            for inode in inodes:
                self._pending.setdefault(inode, [0, now])
            self._wake.notify_all()

    def namespaces_removed(self, inodes) -> None:
        with self._wake:
            for inode in inodes:
                self._pending.pop(inode, None)
        with self._lock:
            for inode in inodes:
                self._cgroup.pop(inode, None)
            self._publish()

    def _warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)
            log.warning(text)

    # -- Docker ---------------------------------------------------------------------------------
    def _docker_loop(self) -> None:
        delay = 0.5
        while not self._stopping:
            try:
                for event in self.docker.events():
                    if self._stopping:
                        return
                    if event.get("Type") == "subscribed":   # subscribed first: nothing falls in between
                        self._docker_sync()
                        delay = 0.5
                    else:
                        self._docker_event(event)
            except DockerError as e:
                if self._stopping:
                    return
                if not os.path.exists(self.docker.path):
                    if self.docker_asked:   # no engine where none was asked for: a host without Docker
                        self._warn(f"no Docker engine at {self.docker.path}: containers it runs are not named")
                else:
                    log.debug("docker engine unreachable", path=self.docker.path, error=str(e))
                    self._warn(f"Docker engine at {self.docker.path} unreachable: containers it runs are not "
                               f"named until it answers (tried again in the background)")
            with self._wake:
                self._wake.wait(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)

    def _docker_sync(self) -> None:
        listed = self.docker.get("/containers/json") or []
        found = {}
        for c in listed:
            got = self._inspect(c["Id"])
            if got is not None:
                found[got.container.id] = got
        with self._lock:
            self._docker = found
            self._publish()
        log.debug("docker containers", count=len(found))

    def _inspect(self, cid: str) -> Optional[DockerContainer]:
        d = self.docker.get(f"/containers/{cid}/json")
        return parse_docker_inspect(d) if d else None

    def _docker_event(self, event: dict) -> None:
        actor = event.get("Actor") or {}
        if event.get("Type") == "network":
            cid = (actor.get("Attributes") or {}).get("container", "")
        else:
            cid = actor.get("ID") or event.get("id", "")
        action = event.get("Action", "")
        if not cid:
            return
        if action == "destroy":
            with self._lock:
                self._docker_gone.setdefault(cid, time.monotonic())
                self._publish()
            return
        if action not in ("start", "die", "rename", "connect", "disconnect", "update"):
            return
        got = self._inspect(cid)
        with self._lock:
            if got is None:
                self._docker_gone.setdefault(cid, time.monotonic())
            elif action == "die" and cid in self._docker:
                # its namespace is going: keep what it was, named for a while
                old = self._docker[cid]
                got.pid, got.sandbox_key, got.netns = old.pid, old.sandbox_key, old.netns
                got.addrs = got.addrs or old.addrs
                self._docker[cid] = got
                self._docker_gone.setdefault(cid, time.monotonic())
            else:
                self._docker[cid] = got
                self._docker_gone.pop(cid, None)
            self._publish()

    # -- /proc and cgroups ---------------------------------------------------------------------
    def _cgroup_loop(self) -> None:
        try:
            found = self._resolve_by_proc(None)
        except Exception as e:  # noqa: BLE001 — best effort, never kills the thread
            log.warning("resolving namespaces through /proc failed", error=repr(e))
            found = {}
        with self._lock:
            self._cgroup.update(found)
            self._publish()
        while not self._stopping:
            with self._wake:
                now = time.monotonic()
                due = [i for i, (_, t) in self._pending.items() if t <= now]
                if not due:
                    later = [t for _, t in self._pending.values()]
                    self._wake.wait(min(later) - now if later else None)
                    continue
            try:
                found = self._resolve_by_proc(set(due))
            except Exception as e:  # noqa: BLE001 — best effort, never kills the thread
                log.warning("resolving namespaces through /proc failed", error=repr(e))
                found = {}
            with self._wake:
                for inode in due:
                    if inode in found or inode not in self._pending:
                        self._pending.pop(inode, None)
                        continue
                    attempt = self._pending[inode][0]
                    if attempt >= len(RETRY_DELAYS_S):
                        self._pending.pop(inode)
                    else:
                        self._pending[inode] = [attempt + 1, time.monotonic() + RETRY_DELAYS_S[attempt]]
            if found:
                with self._lock:
                    self._cgroup.update(found)
                    self._publish()

    def _resolve_by_proc(self, inodes: Optional[set]) -> dict:
        """Containers whose processes are in these namespaces (None: in any): {inode: Workload}."""
        members: dict = {}
        for pid in (p for p in os.listdir(self.proc) if p.isdigit()):
            ino = _netns_inode(f"{self.proc}/{pid}/ns/net")
            if ino and (inodes is None or ino in inodes):
                members.setdefault(ino, []).append(int(pid))
        found = {}
        for inode, pids in members.items():
            w = self._workload_of_pids(inode, sorted(pids))
            if w is not None:
                found[inode] = w
        return found

    def _workload_of_pids(self, inode: int, pids: list) -> Optional[Workload]:
        """The containers of a namespace whose processes all are in containers (one that also
        holds other processes is a host's, where containers of its network run: they do not
        define it)."""
        seen, w = set(), Workload(inode)
        for pid in pids:
            try:
                with open(f"{self.proc}/{pid}/cgroup") as f:
                    cg = parse_cgroup(f.read())
            except OSError:
                continue
            if cg is None:    # a process in no container: the host's namespace, or a plain one
                return None
            if cg["id"] in seen:
                continue
            seen.add(cg["id"])
            annotations, runtime = self._bundle_annotations(pid, cg["id"])
            pod, k8s_name = pod_of(annotations)
            if pod is None and cg["pod_uid"]:
                pod = {"namespace": "", "name": "", "uid": cg["pod_uid"]}
            if pod is not None and (w.pod is None or not w.pod.get("name")):
                w.pod = pod
            if is_sandbox(annotations):
                continue
            image = next((annotations[k] for k in IMAGE_ANNOTATIONS if annotations.get(k)), "")
            w.containers.append(Container(cg["id"], k8s_name or cg["id"][:12], image,
                                          cg["runtime"] or runtime, k8s_name))
        if not seen:
            return None
        w.addrs = self._addresses(pids[0])
        return w

    def _bundle_annotations(self, pid: int, cid: str) -> tuple:
        """(OCI annotations of the container's bundle, runtime) found through its shim:
        containerd-shim runs in the bundle directory, conmon names it with --bundle/-b."""
        for _ in range(3):    # the init process, or a process it started
            try:
                with open(f"{self.proc}/{pid}/stat") as f:
                    pid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"{self.proc}/{pid}/comm") as f:
                    comm = f.read().strip()
            except (OSError, ValueError, IndexError):
                return {}, ""
            if comm.startswith("containerd-shim"):
                bundle, runtime = os.path.realpath(f"{self.proc}/{pid}/cwd"), "containerd"
            elif comm == "conmon":
                with open(f"{self.proc}/{pid}/cmdline", "rb") as f:
                    args = f.read().decode(errors="replace").split("\0")
                bundle = next((args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-b", "--bundle")), "")
                runtime = "cri-o"
            else:
                continue
            if os.path.basename(bundle) not in (cid, "userdata"):
                return {}, runtime
            try:
                with open(os.path.join(bundle, "config.json")) as f:
                    return json.load(f).get("annotations") or {}, runtime
            except (OSError, ValueError):
                return {}, runtime
        return {}, ""

    def _addresses(self, pid: int) -> list:
        """Addresses of the namespace pid is in (the ones other namespaces reach it at)."""
        from pyroute2 import IPRoute

        from .netns import in_netns

        def read():
            with IPRoute() as ipr:
                return [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr()
                        if a.get_attr("IFA_ADDRESS") and a["scope"] == 0
                        and not a.get_attr("IFA_ADDRESS").startswith(("127.", "::1"))]
        try:
            return in_netns(f"{self.proc}/{pid}/ns/net", read)
        except OSError:
            return []

    # -- the published tables ------------------------------------------------------------------
    def _publish(self) -> None:
        """Rebuild both tables from what is known (caller holds the lock)."""
        now = time.monotonic()
        for cid in [c for c, t in self._docker_gone.items() if now - t > GONE_KEEP_S]:
            self._docker.pop(cid, None)
            del self._docker_gone[cid]
        by_netns: dict = {inode: Workload(inode, list(w.containers), w.pod, list(w.addrs))
                          for inode, w in self._cgroup.items()}
        docker_ns: set = set()
        # the gone first: a live container that took over an address wins it
        for dc in sorted(self._docker.values(), key=lambda c: c.container.id not in self._docker_gone):
            if dc.host_network:
                continue
            if not dc.netns and dc.sandbox_key:
                dc.netns = _netns_inode(dc.sandbox_key)
            if not dc.netns and dc.pid:
                dc.netns = _netns_inode(f"{self.proc}/{dc.pid}/ns/net")
            inode = dc.netns
            if not inode:
                continue
            w = by_netns.get(inode)
            if inode not in docker_ns:      # Docker's answer replaces what /proc found
                w = by_netns[inode] = Workload(inode)
                docker_ns.add(inode)
            if dc.pod is not None and (w.pod is None or dc.sandbox):
                w.pod = dc.pod
            if not dc.sandbox:
                w.containers.append(dc.container)
            w.addrs += [a for a in dc.addrs if a not in w.addrs]
        for w in by_netns.values():
            w.record = w.to_dict()
        by_addr = {a: w for w in by_netns.values() for a in w.addrs}
        self._by_netns, self._by_addr = by_netns, by_addr
