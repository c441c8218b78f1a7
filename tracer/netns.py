"""Entering network namespaces and reading their netfilter settings: the one place the
tracer (context gathering) and `doctor` do this."""
from __future__ import annotations

import ctypes
import os
from typing import Iterable, Optional, Union

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000
SYSCTL_DIR = "/proc/sys/net/netfilter"
_OWN_NETNS = os.open("/proc/self/ns/net", os.O_RDONLY)


def in_netns(where: Union[None, str, int], fn):
    """Run fn() with this thread inside the namespace `where` — a path, a descriptor we hold
    open, or None for where we are: sockets created there stay bound to it, /proc/sys/net and
    /proc/thread-self/net show it, and programs started from fn() inherit it. A setns() pair
    costs ~50 µs, where pyroute2's netns helpers fork a child (~5 ms) — too slow where
    namespaces churn."""
    if where is None:
        return fn()
    fd = where if isinstance(where, int) else os.open(where, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({where}): {os.strerror(err)}")
        try:
            return fn()
        finally:
            if _libc.setns(_OWN_NETNS, CLONE_NEWNET) != 0:  # never go on in the wrong namespace
                raise RuntimeError("cannot return to the tracer's own network namespace")
    finally:
        if fd is not where:
            os.close(fd)


def parse_sysctl_value(text: str):
    """'262144\\n' -> 262144; '1 2\\n' -> '1 2'; anything else stays a string."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        return text


def read_conntrack_sysctls(names: Optional[Iterable[str]] = None) -> Optional[dict]:
    """nf_conntrack_* values of the calling thread's namespace (all, or `names`);
    None where conntrack is not loaded."""
    try:
        present = os.listdir(SYSCTL_DIR)
    except OSError:
        return None
    if "nf_conntrack_max" not in present:
        return None
    wanted = set(names) if names is not None else None
    out = {}
    for n in present:
        if not n.startswith("nf_conntrack_") or (wanted is not None and n not in wanted):
            continue
        try:
            with open(os.path.join(SYSCTL_DIR, n)) as f:
                out[n] = parse_sysctl_value(f.read())
        except OSError:
            pass
    return out
