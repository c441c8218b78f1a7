"""Reading the host: which namespace to look at, its conntrack sysctls and its rule sets.

Everything namespace-specific runs in a helper thread that setns()es into the target
namespace: /proc/sys/net and /proc/thread-self/net show that namespace there, and the
rule tools it starts (iptables-save, nft) inherit it. The calling thread never moves.
"""
from __future__ import annotations

import ctypes
import fcntl
import glob
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from typing import Optional

from .conntrack import parse_sysctl_value
from .rules import V4, V6, IPTABLES_TABLES, RuleSet, parse_iptables_save, parse_nft_json, \
    parse_nft_text_handles

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703   # ioctl on a namespace file: its CLONE_NEW* type
SYSCTL_DIR = "/proc/sys/net/netfilter"
TOOL_TIMEOUT = 15
# (source, family, save command, edit command); a flavour whose tool is missing is skipped
IPTABLES_FLAVOURS = (
    ("iptables-legacy", V4, "iptables-legacy-save", "iptables-legacy"),
    ("iptables-nft", V4, "iptables-nft-save", "iptables-nft"),
    ("iptables-legacy", V6, "ip6tables-legacy-save", "ip6tables-legacy"),
    ("iptables-nft", V6, "ip6tables-nft-save", "ip6tables-nft"),
)
# iptables < 1.8 has neither -legacy nor -nft names
IPTABLES_PLAIN = (("iptables", V4, "iptables-save", "iptables"), ("iptables", V6, "ip6tables-save", "ip6tables"))


class TargetError(ValueError):
    """The --netns argument names no network namespace."""


@dataclass
class Target:
    path: Optional[str]    # None: this process's own namespace
    inode: int
    name: str              # `ip netns` name, "" when it has none
    own: bool              # the namespace this process runs in
    host: bool             # the host's (PID 1's) namespace

    @property
    def prefix(self) -> str:
        """Prepended to fix commands so they run in the target namespace."""
        if self.own:
            return ""
        return f"ip netns exec {self.name} " if self.name else f"nsenter --net={self.path} "

    def to_dict(self) -> dict:
        return {"inode": self.inode, "name": self.name or ("host" if self.host else ""),
                "path": self.path or "/proc/self/ns/net", "host": self.host}


def _ino(path: str) -> Optional[int]:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _netns_names() -> dict:
    out = {}
    for p in glob.glob("/run/netns/*"):
        ino = _ino(p)
        if ino is not None:
            out.setdefault(ino, (os.path.basename(p), p))
    return out


def resolve_target(spec=None) -> Target:
    """None (this namespace), an inode number, a name from `ip netns`, or a path such as
    /proc/PID/ns/net or /run/netns/NAME."""
    own = _ino("/proc/self/ns/net") or 0
    host_ino = _ino("/proc/1/ns/net") or own
    named = _netns_names()
    if spec is None or spec == "":
        return Target(None, own, named.get(own, ("", ""))[0], True, own == host_ino)
    spec = str(spec)
    if spec.isdigit():
        ino = int(spec)
        if ino in named:
            path = named[ino][1]
        elif ino == own:
            path = "/proc/self/ns/net"
        else:
            path = None
            for p in glob.glob("/proc/[0-9]*/ns/net"):
                if _ino(p) == ino:
                    path = p
                    break
            if path is None:
                raise TargetError(f"no network namespace with inode {ino} (not in /run/netns, "
                                  "no process in it)")
    elif "/" in spec:
        path = spec
        if not os.path.exists(path):
            raise TargetError(f"{path} does not exist")
    else:
        path = os.path.join("/run/netns", spec)
        if not os.path.exists(path):
            raise TargetError(f"no network namespace named {spec!r} in /run/netns (see `ip netns`)")
    ino = _ino(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise TargetError(f"cannot open {path}: {e.strerror}") from None
    try:
        try:
            kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError:
            kind = None
        if kind != CLONE_NEWNET:
            raise TargetError(f"{path} is not a network namespace")
    finally:
        os.close(fd)
    if ino == own:
        return Target(None, own, named.get(own, ("", ""))[0], True, own == host_ino)
    return Target(path, ino, named.get(ino, ("", ""))[0], False, ino == host_ino)


_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(target: Target, fn):
    """fn() in the target namespace (a helper thread that setns()es), or here if it is ours."""
    if target.own or target.path is None:
        return fn()
    box: dict = {}

    def runner():
        try:
            fd = os.open(target.path, os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({target.path}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()   # this thread ends here, still in the target namespace
        except BaseException as e:  # noqa: BLE001 -- re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=runner, name="doctor-netns", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def read_sysctls() -> Optional[dict]:
    """Every nf_conntrack_* value of the calling thread's namespace; None without conntrack."""
    try:
        names = os.listdir(SYSCTL_DIR)
    except OSError:
        return None
    if "nf_conntrack_max" not in names:
        return None
    out = {}
    for n in names:
        if not n.startswith("nf_conntrack_"):
            continue
        try:
            with open(os.path.join(SYSCTL_DIR, n)) as f:
                out[n] = parse_sysctl_value(f.read())
        except OSError:
            pass
    return out


def _run(cmd: list) -> tuple:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=TOOL_TIMEOUT)
    except subprocess.TimeoutExpired:
        return None, f"{cmd[0]} timed out after {TOOL_TIMEOUT} s"
    except OSError as e:
        return None, f"{cmd[0]}: {e.strerror}"
    if p.returncode != 0:
        err = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        return None, f"{' '.join(cmd)}: {err}"
    return p.stdout, ""


def read_rules(prefix: str = "") -> RuleSet:
    """Every flavour present: iptables legacy and nft (v4 and v6), then native nft. Without
    `-t`, *-save dumps only the tables that exist: reading never creates one."""
    rs = RuleSet()
    flavours = [f for f in IPTABLES_FLAVOURS if shutil.which(f[2])]
    if not any(f[1] == V4 for f in flavours):
        flavours += [f for f in IPTABLES_PLAIN if f[1] == V4 and shutil.which(f[2])]
    if not any(f[1] == V6 for f in flavours):
        flavours += [f for f in IPTABLES_PLAIN if f[1] == V6 and shutil.which(f[2])]
    for source, family, save, tool in flavours:
        text, err = _run([save])
        if text is None:
            rs.read.append({"source": save, "status": "error", "detail": err})
            continue
        rs.extend(parse_iptables_save(text, family, source, tool, prefix))
        rs.read.append({"source": save, "status": "read"})
    for source, family, save, tool in IPTABLES_FLAVOURS:
        if not any(save == f[2] for f in flavours):
            rs.read.append({"source": save, "status": "absent"})
    if shutil.which("nft"):
        text, err = _run(["nft", "-j", "list", "ruleset"])
        if text is None:
            rs.read.append({"source": "nft", "status": "error", "detail": err})
        else:
            listing, _ = _run(["nft", "-a", "list", "ruleset"])
            handles = parse_nft_text_handles(listing or "")
            # tables iptables-nft-save listed are read from there (xt rules are unreadable here)
            skip = frozenset(("ip6" if fam == V6 else "ip", t) for src, fam, t in rs.tables
                             if src == "iptables-nft" and t in IPTABLES_TABLES)
            try:
                rs.extend(parse_nft_json(text, prefix, handles, skip))
                rs.read.append({"source": "nft", "status": "read"})
            except ValueError as e:
                rs.read.append({"source": "nft", "status": "error", "detail": f"bad JSON: {e}"})
    else:
        rs.read.append({"source": "nft", "status": "absent"})
    return rs


@dataclass
class NamespaceState:
    sysctls: Optional[dict]
    rules: RuleSet
    interfaces: list


def read_namespace(target: Target) -> NamespaceState:
    def read():
        try:
            with open("/proc/thread-self/net/dev") as f:
                ifaces = sorted(line.split(":")[0].strip() for line in f.readlines()[2:])
        except OSError:
            ifaces = []
        return NamespaceState(read_sysctls(), read_rules(target.prefix), ifaces)
    return in_netns(target, read)
