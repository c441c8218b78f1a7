"""Reading the host: which namespace to look at, its conntrack sysctls and its rule sets.

Everything namespace-specific runs with the thread inside the target namespace
(tracer.netns.in_netns): /proc/sys/net and /proc/thread-self/net show that namespace, and
the rule tools it starts (iptables-save, nft) inherit it.
"""
from __future__ import annotations

import fcntl
import glob
import os
from dataclasses import dataclass
from typing import Optional

from ..netns import CLONE_NEWNET, in_netns, read_conntrack_sysctls
from ..nfrules import RuleSet, read_rules

NS_GET_NSTYPE = 0xB703   # ioctl on a namespace file: its CLONE_NEW* type


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
        return NamespaceState(read_conntrack_sysctls(), read_rules(target.prefix), ifaces)
    return in_netns(None if target.own else target.path, read)
