#!/usr/bin/env python3
"""Side by side (issue 11, item 4): the same workloads through the lab's NAT
(cli -> nat (MASQUERADE) -> srv) with no observer and with each of
  rst-tracer  `python -m tracer watch --json`, stdout drained by this script
  tcpdump     RST filter, one per lab interface, inside the namespaces
  bpftrace    the tracer's reset/drop tracepoints (tcp_send_reset, tcp_receive_reset,
              kfree_skb with the NETFILTER_DROP / TCP_LISTEN_OVERFLOW reasons), a line per event
  conntrack   `conntrack -E -e DESTROY` in the router
in alternating rounds (none, rst-tracer, tcpdump, bpftrace, conntrack, none, ...).
Workloads: bulk (iperf3), keep-alive HTTP and churn (`Connection: close`) with wrk against
nginx in the server namespace, UDP churn (DNS-like queries, each from a new source port, through
the NAT), and a closed-port SYN storm (bench/synstorm.c) with an incident-1 reset
(scenarios.invalid_window) in its middle, each storm run in a fresh lab.
Printed: throughput as a ratio to no observer, the observer's CPU (utime + stime of its whole
process tree, seconds per second of the workload) and RSS, every round's raw figures, the
tracer's storm accounting (incident verdict latency, per-cause totals vs the RSTs on the wire,
loss) and its start -> attached time.
Run as root: .venv/bin/python bench/compare.py [--rounds 3] [--seconds 5] [--storm-seconds 60]
             [--only WORKLOAD...] [--observers NAME...] [--tracer-root DIR]
"""
import argparse
import collections
import fcntl
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


from tracer.lab import scenarios  # noqa: E402
from tracer.lab.scenarios import follow  # noqa: E402
from tracer.lab.topology import CLI_ADDR, NAT_IN_ADDR, SRV_ADDR, LabError, NatLab, rtnl  # noqa: E402
from tracer.probes.base import WANTED_DROP_REASONS  # noqa: E402
from tracer.probes.btf import BTF  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKLOADS = ("bulk", "keepalive", "churn", "udp-churn", "storm")
OBSERVERS = ("none", "rst-tracer", "tcpdump", "bpftrace", "conntrack")
LABELS = {"none": "none", "rst-tracer": "rst-tracer `watch --json`",
          "tcpdump": "tcpdump (RST filter, every lab interface)", "bpftrace": "bpftrace (same reset/drop tracepoints)",
          "conntrack": "`conntrack -E -e DESTROY` in the router"}
ROWS = {"bulk": "bulk, Gbit/s", "keepalive": "keep-alive HTTP, req/s", "churn": "churn, `Connection: close`, conn/s",
        "udp-churn": "UDP churn, DNS-like, new flows/s", "storm": "storm, closed-port RSTs/s on the wire"}
HTTP_PORT, DNS_PORT, CLOSED_PORT, IPERF_PORT = 80, 53, 9, 5201
WRK_CONNECTIONS = 32
# the storm's own router-server link: the incident's injector (a Python packet socket on s0)
# would drown in 100k storm packets/s there and miss the segment it learns the window from
STORM_NAT_ADDR, STORM_SRV_ADDR, STORM_NET = "10.200.3.1", "10.200.3.2", "10.200.3.0/24"
# conntrack's UDP timeout in the lab's router during UDP churn: shorter than the time a source
# port takes to come back (51k ports at 20k/s: 2.5 s), so every query is a new flow, and the
# router's table stays near rate x timeout entries
UDP_CT_TIMEOUT = 1
SAMPLE_S = 0.5
MAX_ATTEMPTS = 3
CLK_TCK = os.sysconf("SC_CLK_TCK")
REQUIRED = {"nginx": "nginx-light", "wrk": "wrk", "iperf3": "iperf3", "tcpdump": "tcpdump", "bpftrace": "bpftrace",
            "conntrack": "conntrack", "gcc": "gcc", "unshare": "util-linux"}


# -- process trees: CPU and memory ------------------------------------------------------
def _proc_table() -> dict:
    """pid -> (ppid, CPU ticks: utime + stime + those of reaped children)."""
    table = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                raw = f.read()
            fields = raw[raw.rindex(b")") + 2:].split()   # from field 3 (state) on: comm may hold spaces
            table[int(d)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
        except (OSError, ValueError, IndexError):   # gone meanwhile
            continue
    return table


def _status_kib(pid: int, key: bytes) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            return next((int(line.split()[1]) for line in f if line.startswith(key)), 0)
    except OSError:
        return 0


class ProcTree:
    """An observer's processes and all their descendants."""

    def __init__(self, roots=()):
        self.roots = list(roots)

    def pids(self, table: dict = None) -> list:
        table = table if table is not None else _proc_table()
        children = collections.defaultdict(list)
        for pid, (ppid, _) in table.items():
            children[ppid].append(pid)
        out, todo = [], [p for p in self.roots if p in table]
        while todo:
            p = todo.pop()
            out.append(p)
            todo += children[p]
        return out

    def cpu_s(self) -> float:
        table = _proc_table()
        return sum(table[p][1] for p in self.pids(table)) / CLK_TCK

    def rss_kib(self, key: bytes = b"VmRSS:") -> int:
        return sum(_status_kib(p, key) for p in self.pids())


def conntrack_max() -> int:
    with open(scenarios.CT_MAX_PATH) as f:
        return int(f.read())


def wait_conntrack_max(at_least: int = 0, timeout: float = 600) -> int:
    """Waits until no run holds the host-wide nf_conntrack_max lowered (the table-full
    scenario's lock, then the value itself): the table size is per namespace but its maximum
    is global, so a lowered maximum fills our router's table too. Returns the value."""
    deadline = time.monotonic() + timeout
    with open(scenarios.CT_MAX_LOCK, "a+") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(lock, fcntl.LOCK_UN)
                value = conntrack_max()
                if value >= at_least:
                    return value
            except BlockingIOError:
                pass
            if time.monotonic() > deadline:
                raise LabError(f"nf_conntrack_max stayed lowered for {timeout:.0f} s (another run)")
            time.sleep(0.5)


class Sampler(threading.Thread):
    """Every SAMPLE_S s: RSS of the current observer's tree [(wall time, KiB)], and the
    host-wide nf_conntrack_max [(wall time, value)]."""

    def __init__(self):
        super().__init__(daemon=True)
        self.tree, self.samples, self.ct_max, self.stopping = ProcTree(), [], [], threading.Event()

    def watch(self, tree: ProcTree) -> None:
        self.tree, self.samples = tree, []

    def run(self) -> None:
        while not self.stopping.wait(SAMPLE_S):
            tree, samples, now = self.tree, self.samples, time.time()
            self.ct_max.append((now, conntrack_max()))
            if tree.roots:
                samples.append((now, tree.rss_kib()))

    def between(self, t0: float, t1: float) -> list:
        return [kib for t, kib in self.samples if t0 <= t <= t1]

    def ct_max_lowered_s(self, t0: float, t1: float, normal: int) -> float:
        """Seconds of [t0, t1] during which nf_conntrack_max was below its normal value."""
        return SAMPLE_S * sum(1 for t, v in self.ct_max if t0 <= t <= t1 + SAMPLE_S and v < normal) + \
            (SAMPLE_S if conntrack_max() < normal else 0)


# -- output of observers -----------------------------------------------------------------
class Drain(threading.Thread):
    """Copies a pipe into a file in large reads. Lines holding one of `markers` are parsed (JSON)
    and kept with the time their chunk arrived: when a verdict reached the tracer's stdout."""

    def __init__(self, pipe, path: str, markers=(), on_record=None):
        super().__init__(daemon=True)
        self.pipe, self.path, self.markers, self.on_record = pipe, path, markers, on_record
        self.noted, self.lines, self.bytes = [], 0, 0
        self.start()

    def run(self) -> None:
        fd, tail = self.pipe.fileno(), b""
        with open(self.path, "wb") as out:
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                arrived = time.time()
                out.write(chunk)
                self.bytes += len(chunk)
                self.lines += chunk.count(b"\n")
                if not self.markers:
                    continue
                data = tail + chunk
                cut = data.rfind(b"\n") + 1
                whole, tail = data[:cut], data[cut:]
                if any(m in whole for m in self.markers):
                    for line in whole.split(b"\n"):
                        if any(m in line for m in self.markers):
                            try:
                                rec = json.loads(line)
                            except ValueError:
                                continue
                            self.noted.append((arrived, rec))
                            if self.on_record:
                                self.on_record(rec)


class Lines(threading.Thread):
    """A small stream (stderr) kept as lines; wait() for one containing a text."""

    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe, self.lines, self.cv = pipe, [], threading.Condition()
        self.start()

    def run(self) -> None:
        for raw in self.pipe:
            with self.cv:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self.cv.notify_all()

    def wait(self, text: str, timeout: float) -> bool:
        with self.cv:
            return self.cv.wait_for(lambda: any(text in line for line in self.lines), timeout)

    def text(self) -> str:
        with self.cv:
            return "\n".join(self.lines)


# -- observers ---------------------------------------------------------------------------
class Observer:
    name = "none"

    def __init__(self, workdir: str, tag: str):
        self.workdir, self.tag = workdir, tag
        self.procs, self.drains, self.errs = [], [], []

    def _popen(self, cmd: list, markers=(), on_record=None, **kw) -> subprocess.Popen:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
        self.procs.append(p)
        out = os.path.join(self.workdir, f"{self.tag.replace(' ', '-')}-{len(self.procs)}.out")
        self.drains.append(Drain(p.stdout, out, markers, on_record))
        self.errs.append(Lines(p.stderr))
        return p

    def start(self, lab: NatLab, points: list) -> None:
        """Returns once the observer sees events."""

    def tree(self) -> ProcTree:
        return ProcTree(p.pid for p in self.procs)

    def stop(self) -> dict:
        """SIGINT, then what the observer said about itself: {"lines", "lost", ...}."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for d in self.drains + self.errs:
            d.join(10)
        return {"lines": sum(d.lines for d in self.drains)}

    def fail(self, what: str) -> None:
        err = " | ".join(e.text().strip()[-300:] for e in self.errs if e.text().strip())
        self.stop()
        raise LabError(f"{self.name}: {what}: {err or 'no message'}")


class Tracer(Observer):
    name = "rst-tracer"
    MARKERS = (b'"status"', b"conntrack_invalid_unnat")

    def __init__(self, workdir: str, tag: str, root: str):
        super().__init__(workdir, tag)
        self.root, self.attached, self.attached_ev = root, {}, threading.Event()

    def _on_record(self, rec: dict) -> None:
        if rec.get("type") == "status" and rec.get("state") == "attached":
            self.attached = rec
            self.attached_ev.set()

    def start(self, lab, points) -> None:
        p = self._popen([sys.executable, "-m", "tracer", "watch", "--json"], self.MARKERS, self._on_record,
                        cwd=self.root)
        deadline = time.monotonic() + 60
        while not self.attached_ev.wait(0.2):
            if p.poll() is not None or time.monotonic() > deadline:
                self.fail("did not attach")

    def stop(self) -> dict:
        notes = super().stop()
        notes.update(records_summary(self.drains[0].path), attached=self.attached,
                     exit=self.procs[0].returncode, noted=self.drains[0].noted)
        notes["lost"] = sum(notes["loss"].values())
        return notes


class Tcpdump(Observer):
    name = "tcpdump"

    def start(self, lab, points) -> None:
        for ns, dev in points:
            self._popen(["ip", "netns", "exec", ns, "tcpdump", "-i", dev, "-nn", "-l", "tcp[tcpflags] & tcp-rst != 0"])
        for e in self.errs:
            if not e.wait("listening on", 10):
                self.fail("did not start capturing")

    def stop(self) -> dict:
        notes = super().stop()
        dropped = [int(m) for e in self.errs for m in re.findall(r"(\d+) packets? dropped by kernel", e.text())]
        notes["lost"] = sum(dropped)
        return notes


def bpftrace_script() -> str:
    """One line per event, from the tracepoints the tracer uses; kfree_skb only for the drop
    reasons the tracer attributes (numbers from this kernel's BTF, like the tracer's)."""
    drop = BTF.vmlinux().enum("skb_drop_reason")
    reasons = " || ".join(f"args->reason == {drop['SKB_DROP_REASON_' + name]}" for name in WANTED_DROP_REASONS)

    def addr(field: str) -> str:   # sockaddr_in inside the 28-byte sockaddr of tcp_send_reset
        return (f"ntop(2, (uint32)args->{field}[4] | (uint32)args->{field}[5] << 8 | "
                f"(uint32)args->{field}[6] << 16 | (uint32)args->{field}[7] << 24), "
                f"(uint16)args->{field}[2] << 8 | (uint16)args->{field}[3]")
    return f"""
tracepoint:tcp:tcp_send_reset {{
  printf("%llu send_reset state=%d reason=%d %s:%d > %s:%d\\n", nsecs, args->state, args->reason,
         {addr("saddr")}, {addr("daddr")});
}}
tracepoint:tcp:tcp_receive_reset {{
  printf("%llu receive_reset %s:%d > %s:%d\\n", nsecs, ntop(args->saddr), args->sport, ntop(args->daddr), args->dport);
}}
tracepoint:skb:kfree_skb /{reasons}/ {{
  printf("%llu drop reason=%d proto=0x%x at %s\\n", nsecs, args->reason, args->protocol, ksym(args->location));
}}
"""


class Bpftrace(Observer):
    name = "bpftrace"

    def start(self, lab, points) -> None:
        path = os.path.join(self.workdir, "observer.bt")
        with open(path, "w") as f:
            f.write(bpftrace_script())
        # bpftrace 0.17 attaches tracepoints through tracefs, which this machine does not mount:
        # mount it in a private mount namespace, never on the host
        p = self._popen(["unshare", "-m", "sh", "-c",
                         f"mount -t tracefs tracefs /sys/kernel/tracing && exec bpftrace {path}"])
        deadline = time.monotonic() + 60
        while self.drains[0].lines == 0:   # "Attaching N probes..."
            if p.poll() is not None or time.monotonic() > deadline:
                self.fail("did not attach")
            time.sleep(0.1)

    def stop(self) -> dict:
        notes = super().stop()
        lost = [int(m) for m in re.findall(r"Lost (\d+) events", self.errs[0].text())]
        with open(self.drains[0].path, "rb") as f:
            for line in f:
                if line.startswith(b"Lost "):
                    lost += [int(x) for x in re.findall(rb"Lost (\d+) events", line)]
        notes["lost"] = sum(lost)
        return notes


class ConntrackEvents(Observer):
    name = "conntrack"

    def start(self, lab, points) -> None:
        p = self._popen(["ip", "netns", "exec", lab.nat, "conntrack", "-E", "-e", "DESTROY"])
        time.sleep(0.5)   # it prints nothing before the first event
        if p.poll() is not None:
            self.fail("exited")

    def stop(self) -> dict:
        notes = super().stop()
        notes["lost"] = self.errs[0].text().count("ENOBUFS")   # one warning per overrun, events uncounted
        return notes


def make_observer(name: str, workdir: str, tag: str, tracer_root: str) -> Observer:
    if name == "rst-tracer":
        return Tracer(workdir, tag, tracer_root)
    kinds = {"none": Observer, "tcpdump": Tcpdump, "bpftrace": Bpftrace, "conntrack": ConntrackEvents}
    return kinds[name](workdir, tag)


def records_summary(path: str) -> dict:
    """Counts over the tracer's whole output (read after the run, off the clock)."""
    types, loss = collections.Counter(), collections.Counter()
    verdicts, aggregates, states = collections.Counter(), collections.Counter(), collections.Counter()
    aggregate_ports, corrections, bad = collections.Counter(), 0, 0
    with open(path, "rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                bad += 1
                continue
            kind = rec.get("type", "?")
            types[kind] += 1
            if kind == "verdict":
                verdicts[(rec.get("netns"), rec.get("cause"))] += 1
            elif kind == "correction":
                corrections += 1
            elif kind == "aggregate":
                aggregates[(rec.get("netns"), rec.get("cause"))] += rec.get("count", 0)
                aggregate_ports[(rec.get("netns"), rec.get("cause"), rec.get("port"))] += rec.get("count", 0)
            elif kind == "loss":
                loss[rec.get("source", "?")] += rec.get("lost", 0)
            elif kind == "status":
                states[rec.get("state", "?")] += 1
    return {"types": dict(types), "loss": dict(loss), "verdicts": verdicts, "aggregates": aggregates,
            "aggregate_ports": aggregate_ports, "corrections": corrections, "states": dict(states),
            "unparsable": bad}


# -- servers in the lab ------------------------------------------------------------------
NGINX_CONF = """worker_processes 2;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
lock_file {prefix}/nginx.lock;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen {addr}:{port} backlog=4096;
        root {prefix}/www;
    }}
}}
"""


def _confined(lab: NatLab, ns: str, cmd: list, log: str, port: int) -> subprocess.Popen:
    """A TCP server in a lab namespace, in its own session (killed by lab.down() on any failure),
    its stderr in `log`; returns once it listens on `port`."""
    with open(log, "wb") as err:
        p = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=err, start_new_session=True)
    lab.procs.append(p)
    deadline = time.monotonic() + 10
    while not lab.exec(ns, ["ss", "-Hltn", f"sport = :{port}"]).stdout.strip():
        if p.poll() is not None or time.monotonic() > deadline:
            with open(log, errors="replace") as f:
                raise LabError(f"{cmd[0]} did not start: {f.read().strip()[-300:]}")
        time.sleep(0.1)
    return p


class Servers:
    """nginx (own prefix, config and pid file; a 1 KiB page), iperf3 and a DNS-like UDP
    responder in the server namespace; the router's UDP timeout lowered for UDP churn."""

    def __init__(self, lab: NatLab, workdir: str):
        self.lab, self.prefix = lab, os.path.join(workdir, "nginx")

    def __enter__(self) -> "Servers":
        lab, prefix = self.lab, self.prefix
        os.makedirs(os.path.join(prefix, "www"))
        os.chmod(os.path.dirname(prefix), 0o755)   # nginx's workers run as nobody
        with open(os.path.join(prefix, "www", "index.html"), "w") as f:
            f.write("<html><body>" + "x" * 998 + "</body></html>\n")
        conf = os.path.join(prefix, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(prefix=prefix, addr=SRV_ADDR, port=HTTP_PORT))
        self.nginx = _confined(lab, lab.srv, ["nginx", "-p", prefix, "-c", conf, "-g", "daemon off;"],
                               os.path.join(prefix, "stderr.log"), HTTP_PORT)
        _confined(lab, lab.srv, ["iperf3", "-s", "-B", SRV_ADDR], os.path.join(prefix, "iperf3.log"), IPERF_PORT)
        follow(lab, lab.srv, ["udp-responder", "--addr", SRV_ADDR, "--port", str(DNS_PORT)]).wait("listening")
        for key in ("udp_timeout", "udp_timeout_stream"):
            lab.sysctl(lab.nat, f"net.netfilter.nf_conntrack_{key}", UDP_CT_TIMEOUT)
        return self

    def __exit__(self, *exc) -> None:
        with open(os.path.join(self.prefix, "nginx.pid")) as f:   # stopped by its own pid
            os.kill(int(f.read()), signal.SIGTERM)
        self.nginx.wait(10)


# -- workloads: each returns (figure, details) ---------------------------------------------
def bulk(lab: NatLab, seconds: float) -> tuple:
    out = lab.exec(lab.cli, ["iperf3", "-c", SRV_ADDR, "-t", str(seconds), "-J"]).stdout
    end = json.loads(out)["end"]
    return end["sum_received"]["bits_per_second"] / 1e9, {"retransmits": end["sum_sent"].get("retransmits")}


def wrk(lab: NatLab, seconds: float, close: bool) -> tuple:
    cmd = ["wrk", "-t2", f"-c{WRK_CONNECTIONS}", f"-d{seconds}s", "--timeout", "2s"]
    if close:
        cmd += ["-H", "Connection: close"]
    out = lab.exec(lab.cli, cmd + [f"http://{SRV_ADDR}:{HTTP_PORT}/index.html"]).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    details = {}
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        details["socket_errors"] = sum(map(int, m.groups()))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        details["non_2xx"] = int(m.group(1))
    return rate, details


def udp_churn(lab: NatLab, seconds: float, rate: float) -> tuple:
    g = follow(lab, lab.cli, ["udp-churn", "--addr", SRV_ADDR, "--port", str(DNS_PORT), "--rate", str(rate),
                              "--seconds", str(seconds)])
    done = g.wait(("done", "error"), timeout=seconds + 30)
    if done["event"] != "done":
        raise LabError(f"udp-churn failed: {done}")
    return done["answered"] / done["seconds"], {k: done[k] for k in ("sent", "timeouts", "errors")}


# -- the storm -----------------------------------------------------------------------------
def compile_synstorm(workdir: str) -> str:
    exe = os.path.join(workdir, "synstorm")
    p = subprocess.run(["gcc", "-O2", "-Wall", "-o", exe, os.path.join(HERE, "synstorm.c")],
                       capture_output=True, text=True)
    if p.returncode:
        raise LabError(f"gcc bench/synstorm.c failed: {p.stderr.strip()}")
    return exe


def add_storm_link(lab: NatLab) -> list:
    """nat/n3 10.200.3.1 -- srv/s1 10.200.3.2, MASQUERADE out of n3, a route from the client;
    an iptables rule without target on the server's OUTPUT counts every RST from the closed
    port (the wire count). Returns the new capture points."""
    with rtnl(lab.nat) as nat:
        nat.link("add", ifname="n3", kind="veth", peer={"ifname": "s1", "net_ns_fd": lab.srv})
    for ns, dev, addr in ((lab.nat, "n3", STORM_NAT_ADDR), (lab.srv, "s1", STORM_SRV_ADDR)):
        lab.add_address(ns, dev, addr, 24)
        lab.exec(ns, ["ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off"], check=False)
        with rtnl(ns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=dev)[0], state="up")
    with rtnl(lab.cli) as cli:
        cli.route("add", dst=STORM_NET, gateway=NAT_IN_ADDR)
    lab.exec(lab.nat, ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "n3", "-j", "MASQUERADE"])
    lab.exec(lab.srv, ["iptables", "-A", "OUTPUT", "-p", "tcp", "--sport", str(CLOSED_PORT),
                       "--tcp-flags", "RST", "RST"])
    deadline = time.monotonic() + 5
    for ns, dev in ((lab.nat, "n3"), (lab.srv, "s1")):
        with rtnl(ns) as ipr:
            while ipr.get_links(ifname=dev)[0].get_attr("IFLA_OPERSTATE") != "UP":
                if time.monotonic() > deadline:
                    raise LabError(f"{ns}/{dev} never came up")
                time.sleep(0.05)
    return [(lab.nat, "n3"), (lab.srv, "s1")]


def wire_rsts(lab: NatLab) -> int:
    out = lab.exec(lab.srv, ["iptables", "-L", "OUTPUT", "-v", "-x", "-n"]).stdout
    return next(int(line.split()[0]) for line in out.splitlines() if f"spt:{CLOSED_PORT}" in line)


def storm(lab: NatLab, seconds: float, rate: float, exe: str, extra: dict) -> tuple:
    """Closed-port SYNs for `seconds`; the incident-1 reset in the middle."""
    drops, started = lab.conntrack_stats()["drop"], time.time()
    gen = subprocess.Popen(["ip", "netns", "exec", lab.cli, exe, CLI_ADDR, STORM_SRV_ADDR, str(CLOSED_PORT),
                            str(rate), str(seconds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(max(0.0, seconds / 2 - 0.5))
        try:
            extra["incident"] = scenarios.invalid_window(lab).facts
        except LabError as e:
            extra["incident_error"] = str(e)
        out, err = gen.communicate(timeout=seconds + 60)
    finally:
        if gen.poll() is None:
            gen.kill()
            gen.wait()
    if gen.returncode:
        raise LabError(f"synstorm failed: {err.strip()}")
    sent = json.loads(out)
    time.sleep(0.5)   # the last RSTs cross the lab
    extra.update(sent=sent["sent"], storm_s=sent["seconds"], wire=wire_rsts(lab), window=(started, time.time()),
                 router_drops=lab.conntrack_stats()["drop"] - drops)
    return extra["wire"] / sent["seconds"], extra


def storm_accounting(lab_inodes: dict, notes: dict, extra: dict) -> dict:
    """The tracer's view of one storm: per-cause totals in the server vs the wire, the incident."""
    srv = lab_inodes["srv"]
    verdicts = notes["verdicts"][(srv, "no_listener")]
    aggregated = notes["aggregates"][(srv, "no_listener")]
    ports = {port: n for (ns, cause, port), n in notes["aggregate_ports"].items()
             if ns == srv and cause == "no_listener"}
    acc = {"wire": extra["wire"], "verdicts": verdicts, "aggregated": aggregated, "aggregate_ports": ports,
           "missing": extra["wire"] - verdicts - aggregated, "loss": notes["loss"], "states": notes["states"],
           "types": notes["types"], "corrections": notes["corrections"], "latency_ms": None}
    outside = (extra.get("incident") or {}).get("outside") or {}
    for arrived, rec in notes["noted"]:
        if (rec.get("type") in ("verdict", "correction") and rec.get("cause") == "conntrack_invalid_unnat"
                and rec.get("netns") == lab_inodes["nat"]
                and (not outside or (rec.get("flow") or {}).get("dport") == outside.get("sport"))):
            acc["latency_ms"] = (arrived - rec["ts_unix"]) * 1000
            break
    return acc


# -- running ---------------------------------------------------------------------------------
def measure(obs: Observer, sampler: Sampler, run, ct_max: int) -> dict:
    tree = obs.tree()
    c0, t0 = tree.cpu_s(), time.time()
    figure, details = run()
    t1 = time.time()
    c1 = tree.cpu_s()
    rss = sampler.between(t0, t1)
    return {"value": figure, "details": details, "cpu": (c1 - c0) / (t1 - t0) if tree.roots else None,
            "rss_median": statistics.median(rss) / 1024 if rss else None,
            "rss_max": max(rss) / 1024 if rss else None, "rss_curve": [kib / 1024 for kib in rss],
            "ct_max_lowered_s": sampler.ct_max_lowered_s(t0, t1, ct_max)}


def run_observer(name: str, lab: NatLab, points: list, a, sampler: Sampler, tag: str, jobs: list,
                 repeats: collections.Counter, attempts: int = MAX_ATTEMPTS) -> tuple:
    """Starts the observer, runs each job in its own window, stops it. A window during which
    another run held nf_conntrack_max lowered measured conntrack's table-full drops, not the
    observer: it is measured again (up to `attempts` in all; still disturbed: kept, flagged)."""
    obs = make_observer(name, a.workdir, tag, a.tracer_root)
    wait_conntrack_max(a.ct_max)
    obs.start(lab, points)
    results = {}
    try:
        sampler.watch(obs.tree())
        for workload, run in jobs:
            for attempt in range(attempts):
                time.sleep(1)   # let the previous workload's connections close
                wait_conntrack_max(a.ct_max)
                results[workload] = m = measure(obs, sampler, run, a.ct_max)
                if not m["ct_max_lowered_s"] or attempt == attempts - 1:
                    break
                repeats[workload] += 1
                print(f"{tag} {workload}: nf_conntrack_max lowered by another run during the window: again",
                      file=sys.stderr, flush=True)
        hwm = obs.tree().rss_kib(b"VmHWM:") / 1024
    finally:
        sampler.watch(ProcTree())
        notes = obs.stop()
    notes["hwm"] = hwm
    return results, notes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5, help="per workload and round")
    ap.add_argument("--storm-seconds", type=int, default=60)
    ap.add_argument("--storm-rate", type=float, default=50000)
    ap.add_argument("--storm-rounds", type=int, default=1)
    ap.add_argument("--udp-rate", type=float, default=20000)
    ap.add_argument("--only", nargs="+", choices=WORKLOADS, default=list(WORKLOADS), metavar="WORKLOAD",
                    help=" ".join(WORKLOADS))
    ap.add_argument("--observers", nargs="+", choices=OBSERVERS, default=list(OBSERVERS), metavar="NAME",
                    help=" ".join(OBSERVERS))
    ap.add_argument("--tracer-root", default=ROOT, help="checkout whose tracer runs (default: this one)")
    ap.add_argument("--tracer-rev", default="", help="run the tracer of this commit of this checkout instead "
                    "(exported with git archive: others' uncommitted changes left out)")
    ap.add_argument("--keep", action="store_true", help="keep the observers' output (path printed)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("compare: must run as root (network namespaces, BPF)", file=sys.stderr)
        return 1
    missing = sorted({pkg for tool, pkg in REQUIRED.items() if not shutil.which(tool)})
    if missing:
        print(f"compare: missing {', '.join(missing)}: run scripts/setup.sh --bench", file=sys.stderr)
        return 1
    if not os.path.isdir(os.path.join(a.tracer_root, "tracer")):
        print(f"compare: --tracer-root {a.tracer_root}: no tracer/ package there", file=sys.stderr)
        return 2
    if a.rounds < 1 or a.storm_rounds < 1 or a.seconds <= 0 or a.storm_seconds < 4:
        print("compare: --rounds/--storm-rounds >= 1, --seconds > 0, --storm-seconds >= 4", file=sys.stderr)
        return 2
    if "none" not in a.observers:
        a.observers.insert(0, "none")   # the ratios need it
    a.workdir = tempfile.mkdtemp(prefix="rst-compare-")
    if a.tracer_rev:
        try:
            a.revision = export_revision(a.tracer_rev, a.workdir)
        except LabError as e:
            shutil.rmtree(a.workdir, ignore_errors=True)
            print(f"compare: --tracer-rev {a.tracer_rev}: {e}", file=sys.stderr)
            return 2
        a.tracer_root = os.path.join(a.workdir, "tracer-rev")
    else:
        a.revision = _revision(a.tracer_root)
    sampler = Sampler()
    sampler.start()
    runs = collections.defaultdict(list)   # (workload, observer) -> [measure()]
    notes = collections.defaultdict(list)  # observer -> [stop() notes]
    storms = []                            # tracer storm accounting per round
    repeats = collections.Counter()        # observer runs measured again (nf_conntrack_max lowered)
    loads = [("start", os.getloadavg())]
    started = time.time()
    try:
        a.ct_max = wait_conntrack_max()
        flows = [w for w in a.only if w != "storm"]
        if flows:
            with NatLab() as lab, Servers(lab, a.workdir):
                jobs = [(w, {"bulk": lambda: bulk(lab, a.seconds),
                             "keepalive": lambda: wrk(lab, a.seconds, close=False),
                             "churn": lambda: wrk(lab, a.seconds, close=True),
                             "udp-churn": lambda: udp_churn(lab, a.seconds, a.udp_rate)}[w]) for w in flows]
                for r in range(a.rounds):
                    for name in a.observers:
                        res, n = run_observer(name, lab, lab.capture_points(), a, sampler, f"round {r + 1} {name}",
                                              jobs, repeats)
                        for w, m in res.items():
                            runs[(w, name)].append(m)
                        notes[name].append(n)
                        print(f"round {r + 1} {name}: " + ", ".join(f"{w} {m['value']:.4g}" for w, m in res.items()),
                              file=sys.stderr, flush=True)
                    loads.append((f"after round {r + 1}", os.getloadavg()))
        if "storm" in a.only:
            exe = compile_synstorm(a.workdir)
            for r in range(a.storm_rounds):
                for name in a.observers:
                    with NatLab() as lab:
                        points = lab.capture_points() + add_storm_link(lab)
                        inodes = {k: lab.netns_inode(ns) for k, ns in (("nat", lab.nat), ("srv", lab.srv))}
                        extra = {}
                        # one attempt: the incident cannot happen twice in a lab, and a minute-long
                        # window would rarely miss a lowered nf_conntrack_max; flagged instead
                        res, n = run_observer(name, lab, points, a, sampler, f"storm {r + 1} {name}", [(
                            "storm", lambda: storm(lab, a.storm_seconds, a.storm_rate, exe, extra))], repeats, 1)
                    runs[("storm", name)].append(res["storm"])
                    notes[name].append(n)
                    if name == "rst-tracer":
                        storms.append(dict(storm_accounting(inodes, n, extra),
                                           rss_curve=res["storm"]["rss_curve"], sent=extra["sent"],
                                           router_drops=extra["router_drops"],
                                           storm_s=extra["storm_s"], incident_error=extra.get("incident_error")))
                    print(f"storm {r + 1} {name}: {res['storm']['value']:.0f} RSTs/s", file=sys.stderr, flush=True)
                loads.append((f"after storm round {r + 1}", os.getloadavg()))
    except LabError as e:
        print(f"compare: {e}", file=sys.stderr)
        return 1
    finally:
        sampler.stopping.set()
        if not a.keep:
            shutil.rmtree(a.workdir, ignore_errors=True)
    report(a, runs, notes, storms, loads, repeats, time.time() - started)
    return 0


# -- the report ------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    if x >= 10000:
        return f"{x / 1000:.1f}k"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _span(xs: list, digits: int = 2) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    lo, hi = min(xs), max(xs)
    return f"{lo:.{digits}f}" if round(lo, digits) == round(hi, digits) else f"{lo:.{digits}f}–{hi:.{digits}f}"


def _revision(root: str) -> str:
    p = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty"], capture_output=True, text=True)
    return p.stdout.strip() if p.returncode == 0 else "not a git checkout"


def export_revision(rev: str, workdir: str) -> str:
    """This checkout's tree at `rev` in workdir/tracer-rev; returns the commit's short hash."""
    p = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "--verify", rev + "^{commit}"],
                       capture_output=True, text=True)
    if p.returncode:
        raise LabError("not a commit of this checkout")
    dest = os.path.join(workdir, "tracer-rev")
    os.makedirs(dest)
    archive = subprocess.Popen(["git", "-C", ROOT, "archive", p.stdout.strip()], stdout=subprocess.PIPE)
    untar = subprocess.run(["tar", "-x", "-C", dest], stdin=archive.stdout, capture_output=True, text=True)
    archive.stdout.close()
    if archive.wait() or untar.returncode:
        raise LabError(f"git archive | tar failed: {untar.stderr.strip()}")
    return f"{p.stdout.strip()} (exported)"


def report(a, runs, notes, storms, loads, repeats, elapsed) -> None:
    obs = a.observers
    workloads = [w for w in WORKLOADS if any((w, o) in runs for o in obs)]
    print(f"## Side by side ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, kernel {os.uname().release}, "
          f"tracer at {a.revision}, {elapsed / 60:.0f} min)\n")
    print(f"`{' '.join(['.venv/bin/python', 'bench/compare.py'] + sys.argv[1:])}` — {a.rounds} alternating rounds "
          f"of {a.seconds:g} s per workload and observer; storm {a.storm_rounds} x {a.storm_seconds:g} s at "
          f"{a.storm_rate:g} SYN/s per observer. Load average (1/5/15 min): "
          + "; ".join(f"{k} {l[0]:.2f}/{l[1]:.2f}/{l[2]:.2f}" for k, l in loads) + ".")
    if repeats:
        print("Windows measured again because another run held the host-wide nf_conntrack_max lowered "
              "meanwhile (it fills our router's table too): " + ", ".join(f"{k} {n}x" for k, n in repeats.items())
              + "; † marks a window where it happened anyway (seconds lowered).")
    print()
    print("| workload | " + " | ".join(LABELS[o] for o in obs) + " |")
    print("|---" * (len(obs) + 1) + "|")
    base = {w: statistics.mean(m["value"] for m in runs[(w, "none")]) for w in workloads if runs[(w, "none")]}
    for w in workloads:
        cells = []
        for o in obs:
            vals = [m["value"] for m in runs[(w, o)]]
            if not vals:
                cells.append("–")
            elif o == "none":
                cells.append(_fmt(statistics.mean(vals)))
            else:
                cells.append(f"{statistics.mean(vals) / base[w]:.2f}" if base.get(w) else "–")
        print(f"| {ROWS[w]} (ratio to none) | " + " | ".join(cells) + " |")
    for w in workloads:
        print(f"| observer CPU s/s, {w} | " + " | ".join(
            "–" if o == "none" else _span([m["cpu"] for m in runs[(w, o)]]) for o in obs) + " |")
    all_runs = {o: [m for w in workloads for m in runs[(w, o)]] for o in obs}
    print("| observer RSS MiB, median in the windows | " + " | ".join(
        "–" if o == "none" else _span([m["rss_median"] for m in all_runs[o]], 0) for o in obs) + " |")
    print("| observer RSS MiB, max in the windows | " + " | ".join(
        "–" if o == "none" else _span([m["rss_max"] for m in all_runs[o]], 0) for o in obs) + " |")
    print("| observer peak RSS MiB (VmHWM, start-up included) | " + " | ".join(
        "–" if o == "none" else _span([n["hwm"] for n in notes[o]], 0) for o in obs) + " |")
    print("| lines printed / events lost (all runs) | " + " | ".join(
        "–" if o == "none" else f"{sum(n['lines'] for n in notes[o])} / {sum(n['lost'] for n in notes[o])}"
        for o in obs) + " |")
    print("\nLost: the tracer's `loss` records (sum of `lost`); tcpdump's \"dropped by kernel\"; bpftrace's "
          "\"Lost N events\"; conntrack: ENOBUFS warnings (each an unknown number of events).\n")

    print("### Every round\n")
    print("| workload | round | " + " | ".join(o for o in obs) + " |")
    print("|---|---" + "|---" * len(obs) + "|")
    for w in workloads:
        n = max(len(runs[(w, o)]) for o in obs)
        for r in range(n):
            cells = []
            for o in obs:
                if r >= len(runs[(w, o)]):
                    cells.append("–")
                    continue
                m = runs[(w, o)][r]
                cell = _fmt(m["value"])
                if m["cpu"] is not None:
                    cell += f" (CPU {m['cpu']:.3f}, RSS {m['rss_max'] or 0:.0f})"
                if m["ct_max_lowered_s"]:
                    cell += f" †{m['ct_max_lowered_s']:g}s"
                if any(m["details"].get(k) for k in ("socket_errors", "non_2xx", "timeouts", "errors")):
                    cell += " " + ",".join(f"{k}={m['details'][k]}" for k in ("socket_errors", "non_2xx", "timeouts",
                                                                              "errors") if m["details"].get(k))
                cells.append(cell)
            print(f"| {w} | {r + 1} | " + " | ".join(cells) + " |")

    if storms:
        print("\n### rst-tracer in the storm\n")
        for i, s in enumerate(storms, 1):
            lat = f"{s['latency_ms']:.1f} ms" if s["latency_ms"] is not None else "never came"
            if s.get("incident_error"):
                lat += f" (incident failed: {s['incident_error']})"
            curve = s["rss_curve"]
            print(f"- storm {i}: {s['sent']} SYNs in {s['storm_s']:.1f} s ({s['sent'] / s['storm_s']:.0f}/s); "
                  f"RSTs on the wire from the closed port: {s['wire']}; dropped by the router's conntrack: "
                  f"{s['router_drops']}")
            print(f"  - incident-1 root-cause verdict (`conntrack_invalid_unnat` in the router): {lat} after its RST")
            print(f"  - `no_listener` in the server: {s['verdicts']} verdicts + {s['aggregated']} in aggregates = "
                  f"{s['verdicts'] + s['aggregated']} vs {s['wire']} on the wire: "
                  + ("exact" if s["missing"] == 0 else f"{s['missing']} missing"))
            print(f"  - loss records: {s['loss'] or 'none'}; status states: {s['states']}; "
                  f"records by type: {s['types']}"
                  + (f"; corrections: {s['corrections']}" if s["corrections"] else ""))
            if s["aggregate_ports"]:
                print(f"  - aggregates by port: {s['aggregate_ports']}")
            if curve:
                print(f"  - RSS every 5 s (MiB): {' '.join(f'{x:.0f}' for x in curve[::int(5 / SAMPLE_S)])}; "
                      f"max {max(curve):.0f}")
    windows = [(o, m["details"]["window"]) for o in obs for m in runs[("storm", o)]]
    if windows:   # other engineers' tracers see our storms too
        print("\nStorms ran (UTC): " + "; ".join(
            f"{o} {time.strftime('%H:%M:%S', time.gmtime(t0))}–{time.strftime('%H:%M:%S', time.gmtime(t1))}"
            for o, (t0, t1) in sorted(windows, key=lambda x: x[1])))
    starts = [n["attached"] for n in notes.get("rst-tracer", []) if n.get("attached")]
    if starts:
        since = sorted(s["since_process_start_s"] for s in starts)
        print(f"\nrst-tracer start -> attached (`since_process_start_s` of its `attached` record): median "
              f"{statistics.median(since):.2f} s, min {since[0]:.2f} s, max {since[-1]:.2f} s over {len(since)} starts")
    if a.keep:
        print(f"\nobservers' output kept in {a.workdir}")


if __name__ == "__main__":
    sys.exit(main())
