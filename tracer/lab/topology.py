"""cli ("container") -> nat (router, MASQUERADE) -> srv, built only from namespaces it
creates, with pyroute2. Every namespace is removed on exit, even on failure.

    cli 10.200.1.2/c0 --- n1/10.200.1.1  nat  10.200.2.1/n2 --- s0/10.200.2.2 srv

Optional (off by default): a DNAT "service" on the router (`dnat=DNAT_DEFAULT` or
`add_dnat()`): VIP 10.200.2.100:80 -> backend 10.200.2.2:8080, exempt from MASQUERADE so the
backend sees the client's own address and routes back through the router.
"""
from __future__ import annotations

import errno
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from pyroute2 import IPRoute, NetlinkError

from ..netns import in_netns

CLI_ADDR, NAT_IN_ADDR, NAT_OUT_ADDR, SRV_ADDR = "10.200.1.2", "10.200.1.1", "10.200.2.1", "10.200.2.2"
CLI_NET, SRV_NET = "10.200.1.0/24", "10.200.2.0/24"
CLI6_ADDR, NAT6_IN_ADDR, NAT6_OUT_ADDR, SRV6_ADDR = "fd00:200:1::2", "fd00:200:1::1", "fd00:200:2::1", "fd00:200:2::2"
NAT_OUT_PREFIX = 24
# the DNAT "service": (vip, vip port, backend, backend port)
DNAT_VIP, DNAT_VIP_PORT = "10.200.2.100", 80
DNAT_DEFAULT = (DNAT_VIP, DNAT_VIP_PORT, SRV_ADDR, 8080)


class LabError(RuntimeError):
    pass


def rtnl(ns: str) -> IPRoute:
    """An rtnetlink socket inside the named namespace, opened there with setns() by this
    thread: pyroute2's NetNS forks a helper per call and gives up after 2 s, which a loaded
    (or emulated) machine exceeds."""
    return in_netns(f"/run/netns/{ns}", IPRoute)


def run(cmd: list, check: bool = True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


@dataclass
class NatLab:
    """A lab instance; names carry a random id so labs never collide with anything."""
    masquerade_opts: tuple = ()
    drop_invalid: bool = False
    dnat: tuple = ()  # (vip, vport, backend, bport): see add_dnat()
    # seconds between building the lab and handing it to a scenario: the stress runs vary
    # it (0, 0.1, 1 s) so that namespaces are flushed at varying ages
    settle: float = field(default_factory=lambda: float(os.environ.get("RST_TRACER_LAB_SETTLE") or 0))
    # scripts/lib/lab-run.sh tags the labs of one run (its clean-up removes only those)
    lab_id: str = field(default_factory=lambda: "-".join(filter(None, (os.environ.get("RST_TRACER_LAB_RUN"),
                                                                        secrets.token_hex(3)))))
    procs: list = field(default_factory=list)
    _dnat_done: bool = field(default=False, init=False, repr=False)

    def __post_init__(self):
        self.cli, self.nat, self.srv = (f"rstlab-{self.lab_id}-{n}" for n in ("cli", "nat", "srv"))
        self.namespaces = (self.cli, self.nat, self.srv)

    # -- life cycle -------------------------------------------------------------------
    def __enter__(self) -> "NatLab":
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        for ns in self.namespaces:
            run(["ip", "netns", "add", ns])
        with rtnl(self.nat) as nat:
            nat.link("add", ifname="n1", kind="veth", peer={"ifname": "c0", "net_ns_fd": self.cli})
            nat.link("add", ifname="n2", kind="veth", peer={"ifname": "s0", "net_ns_fd": self.srv})
        self._addresses(self.cli, "c0", [(CLI_ADDR, 24), (CLI6_ADDR, 64)])
        self._addresses(self.nat, "n1", [(NAT_IN_ADDR, 24), (NAT6_IN_ADDR, 64)])
        self._addresses(self.nat, "n2", [(NAT_OUT_ADDR, 24), (NAT6_OUT_ADDR, 64)])
        self._addresses(self.srv, "s0", [(SRV_ADDR, 24), (SRV6_ADDR, 64)])
        with rtnl(self.cli) as cli:  # the only route anybody needs; no default routes
            cli.route("add", dst=SRV_NET, gateway=NAT_IN_ADDR)
            cli.route("add", dst="fd00:200:2::/64", gateway=NAT6_IN_ADDR, family=10)
        self.sysctl(self.nat, "net.ipv4.ip_forward", 1)
        self.sysctl(self.nat, "net.ipv6.conf.all.forwarding", 1)
        # conntrack DESTROY events for entries created before a listener subscribed
        self.sysctl(self.nat, "net.netfilter.nf_conntrack_events", 1, check=False)
        for tool in ("iptables", "ip6tables"):
            self.exec(self.nat, [tool, "-t", "nat", "-A", "POSTROUTING", "-o", "n2",
                                 "-j", "MASQUERADE", *self.masquerade_opts])
        if self.drop_invalid:
            self.set_drop_invalid()
        if self.dnat:
            self.add_dnat(*self.dnat)
        # offloads off so segments look like on the wire (no GSO super-segments)
        for ns, dev in ((self.cli, "c0"), (self.nat, "n1"), (self.nat, "n2"), (self.srv, "s0")):
            self.exec(ns, ["ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off"], check=False)
        self._wait_carrier()
        time.sleep(self.settle)

    def _addresses(self, ns: str, dev: str, addrs: list) -> None:
        with rtnl(ns) as ipr:
            idx = ipr.link_lookup(ifname=dev)[0]
            for addr, plen in addrs:
                ipr.addr("add", index=idx, address=addr, prefixlen=plen,
                         **({"flags": 0x02} if ":" in addr else {}))  # IFA_F_NODAD
            ipr.link("set", index=idx, state="up")
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.link("set", index=lo, state="up")

    def _wait_carrier(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        links = self.capture_points()   # every lab interface
        while True:
            down = []
            for ns, dev in links:
                with rtnl(ns) as ipr:
                    link = ipr.get_links(ifname=dev)[0]
                    if link.get_attr("IFLA_OPERSTATE") != "UP":
                        down.append(f"{ns}/{dev}")
            if not down:
                return
            if time.monotonic() > deadline:
                raise LabError("lab links never came up: " + ", ".join(down))
            time.sleep(0.05)

    def down(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                p.wait()
        self.procs.clear()
        for ns in self.namespaces:
            run(["ip", "netns", "del", ns], check=False)

    # -- helpers ----------------------------------------------------------------------
    def exec(self, ns: str, cmd: list, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return run(["ip", "netns", "exec", ns, *cmd], check=check, **kw)

    def sysctl(self, ns: str, key: str, value, check: bool = True) -> None:
        self.exec(ns, ["sysctl", "-qw", f"{key}={value}"], check=check)

    def set_drop_invalid(self) -> None:
        """The incident-1 remedy: INVALID segments never reach the stack or get forwarded."""
        for tool in ("iptables", "ip6tables"):
            for chain in ("INPUT", "FORWARD"):
                self.exec(self.nat, [tool, "-I", chain, "-m", "conntrack", "--ctstate", "INVALID",
                                     "-j", "DROP"])

    def set_masquerade(self, opts) -> None:
        """Replaces the router's MASQUERADE rules (IPv4 and IPv6) by ones with `opts`, e.g.
        ("--random-fully",); only connections NATed from now on are affected."""
        opts = tuple(opts)
        if opts == tuple(self.masquerade_opts):
            return
        for tool in ("iptables", "ip6tables"):
            self.exec(self.nat, [tool, "-t", "nat", "-D", "POSTROUTING", "-o", "n2", "-j", "MASQUERADE",
                                 *self.masquerade_opts])
            self.exec(self.nat, [tool, "-t", "nat", "-A", "POSTROUTING", "-o", "n2", "-j", "MASQUERADE", *opts])
        self.masquerade_opts = opts

    def add_dnat(self, vip: str = DNAT_VIP, vport: int = DNAT_VIP_PORT, backend: str = SRV_ADDR,
                 bport: int = 8080) -> None:
        """A "service" on the router (IPv4): PREROUTING DNAT vip:vport -> backend:bport.
        DNATed connections are exempt from MASQUERADE (the backend sees the client's real
        address, like a Kubernetes service reached from a pod), so the backend gets a route
        back to the client network through the router."""
        if self.dnat and tuple(self.dnat) != (vip, vport, backend, bport):
            raise LabError(f"this lab already has a different DNAT service: {self.dnat}")
        self.dnat = (vip, int(vport), backend, int(bport))
        if self._dnat_done:
            return
        self.exec(self.nat, ["iptables", "-t", "nat", "-A", "PREROUTING", "-i", "n1", "-p", "tcp", "-d", vip,
                             "--dport", str(vport), "-j", "DNAT", "--to-destination", f"{backend}:{bport}"])
        self.exec(self.nat, ["iptables", "-t", "nat", "-I", "POSTROUTING", "1", "-o", "n2", "-m", "conntrack",
                             "--ctstate", "DNAT", "-j", "ACCEPT"])
        with rtnl(self.srv) as srv:
            srv.route("replace", dst=CLI_NET, gateway=NAT_OUT_ADDR)
        self._dnat_done = True

    def add_address(self, ns: str, dev: str, addr: str, prefixlen: int, exist_ok: bool = False) -> None:
        with rtnl(ns) as ipr:
            try:
                ipr.addr("add", index=ipr.link_lookup(ifname=dev)[0], address=addr, prefixlen=prefixlen,
                         **({"flags": 0x02} if ":" in addr else {}))
            except NetlinkError as e:
                if not (exist_ok and e.code == errno.EEXIST):
                    raise

    def del_address(self, ns: str, dev: str, addr: str, prefixlen: int) -> None:
        with rtnl(ns) as ipr:
            ipr.addr("del", index=ipr.link_lookup(ifname=dev)[0], address=addr, prefixlen=prefixlen)

    def set_link(self, ns: str, dev: str, up: bool) -> None:
        with rtnl(ns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=dev)[0], state="up" if up else "down")
        if up:
            self._wait_carrier()

    def conntrack(self, ns: str = "", proto: str = "tcp") -> list:
        """The conntrack table of a namespace (the router by default), parsed:
        [{"proto", "state", "timeout", "orig": {src,dst,sport,dport}, "reply": {...}, "flags"}]."""
        p = self.exec(ns or self.nat, ["conntrack", "-L", "-p", proto], check=False)
        return [e for e in map(parse_conntrack_line, p.stdout.splitlines()) if e]

    def conntrack_stats(self, ns: str = "") -> dict:
        """`conntrack -S` summed over CPUs: {"insert_failed": n, "drop": n, ...}."""
        p = self.exec(ns or self.nat, ["conntrack", "-S"])
        out: dict = {}
        for tok in p.stdout.split():
            k, sep, v = tok.partition("=")
            if sep and k != "cpu" and v.isdigit():
                out[k] = out.get(k, 0) + int(v)
        return out

    def conntrack_count(self, ns: str = "") -> int:
        p = self.exec(ns or self.nat, ["sysctl", "-n", "net.netfilter.nf_conntrack_count"])
        return int(p.stdout.strip())

    def spawn(self, ns: str, args: list, **kw) -> subprocess.Popen:
        """A lab program (python -m tracer.lab.traffic ...) inside a namespace; killed on down()."""
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-u", "-m", "tracer.lab.traffic", *args]
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True,
                             cwd=_project_root(), **kw)
        self.procs.append(p)
        return p

    def capture_points(self) -> list:
        """Every lab interface, as (namespace, interface)."""
        return [(self.cli, "c0"), (self.nat, "n1"), (self.nat, "n2"), (self.srv, "s0")]

    def netns_inode(self, ns: str) -> int:
        return os.stat(f"/run/netns/{ns}").st_ino


def parse_conntrack_line(line: str):
    """One line of `conntrack -L` (None for anything else)."""
    f = line.split()
    if len(f) < 4 or not f[1].isdigit():
        return None
    entry = {"proto": f[0], "timeout": int(f[2]) if f[2].isdigit() else None, "state": "",
             "orig": {}, "reply": {}, "flags": []}
    side = None
    for tok in f[3:]:
        k, sep, v = tok.partition("=")
        if not sep:
            if tok.startswith("["):
                entry["flags"].append(tok.strip("[]"))
            elif tok.isupper():
                entry["state"] = tok
            continue
        if k == "src":
            side = "orig" if not entry["orig"] else "reply"
        if k in ("src", "dst") and side:
            entry[side][k] = v
        elif k in ("sport", "dport") and side:
            entry[side][k] = int(v)
    return entry if entry["orig"] else None


def _project_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
