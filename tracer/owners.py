"""The process of a TCP socket older than the tracer: who held it when the tracer attached.

The kernel side names the process of every socket connected or listened on after it
attached (bpf/common.h, KernelEvent.owner). A connection made before — the idle Redis
connection of incident 4 — it cannot: for those, one look right after attaching, before
the tracer says `attached` (so that every socket is either seen here or told by the
kernel): the processes' descriptors give socket inode -> process, a sock_diag dump in each
namespace gives inode -> (local, remote) of its TCP sockets. Enrichment, never
attribution: the answer goes into the event's context, so a replay names the same process.

sock_diag, not /proc/net/tcp: it filters by state in the kernel (TIME_WAIT sockets, tens of
thousands on a busy server, are never read) where /proc/net/tcp prints them all. Cost
~5 ms here; ~1 s per 100 000 descriptors on the host. Bounded: at most MAX_SOCKETS sockets
are kept (~250 bytes each: ~12 MiB)."""
from __future__ import annotations

import os
from typing import Optional

import structlog
from pyroute2.netlink.diag import AF_INET, AF_INET6, SS_CONN, DiagSocket

from .netns import in_netns

log = structlog.get_logger("rst-tracer.owners")

MAX_SOCKETS = 50_000
TCP_SYN_RECV, TCP_LISTEN = 3, 10      # include/net/tcp_states.h
# every state a socket that can still reset is in (SS_CONN lacks SYN_RECV and LISTEN)
STATES = SS_CONN | 1 << TCP_SYN_RECV | 1 << TCP_LISTEN


def unmapped(addr: str) -> str:
    """An IPv4 peer of an IPv6 socket as the IPv4 address its packets carry."""
    return addr[7:] if addr.startswith("::ffff:") and "." in addr else addr


def tcp_sockets() -> list:
    """(state, (local addr, port), (remote addr, port), inode) of the calling thread's
    namespace's TCP sockets in STATES."""
    rows = []
    with DiagSocket() as ds:
        ds.bind()
        for family in (AF_INET, AF_INET6):
            for m in ds.get_sock_stats(family=family, states=STATES):
                rows.append((m.get("idiag_state"), (unmapped(m.get("idiag_src")), m.get("idiag_sport")),
                             (unmapped(m.get("idiag_dst")), m.get("idiag_dport")), m.get("idiag_inode")))
    return rows


def socket_holders(proc: str = "/proc") -> dict:
    """socket inode -> the lowest pid holding it (the parent, for a prefork server's
    listener)."""
    holders: dict = {}
    for pid in sorted(int(d) for d in os.listdir(proc) if d.isdigit()):
        try:
            fds = os.listdir(f"{proc}/{pid}/fd")
        except OSError:
            continue   # gone
        for fd in fds:
            try:
                link = os.readlink(f"{proc}/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                holders.setdefault(int(link[8:-1]), pid)
    return holders


class SocketSnapshot:
    """TCP sockets and their processes as they were when take() ran."""

    def __init__(self, proc: str = "/proc", max_sockets: int = MAX_SOCKETS):
        self.proc, self.max_sockets = proc, max_sockets
        self._connections: dict = {}   # (netns, local, remote) -> {pid, comm}
        self._listeners: dict = {}     # (netns, port) -> {pid, comm}
        self.sockets = 0

    def take(self, namespaces: dict) -> None:
        """namespaces: inode -> a descriptor of it (or None for the tracer's own)."""
        holders = socket_holders(self.proc)
        comms: dict = {}
        for netns, fd in namespaces.items():
            try:
                rows = in_netns(fd, tcp_sockets)
            except OSError as e:
                log.warning("sockets of a namespace not read", netns=netns, error=str(e))
                continue
            for state, local, remote, inode in rows:
                pid = holders.get(inode)
                if pid is None:
                    continue
                if self.sockets >= self.max_sockets:
                    log.warning("more TCP sockets than kept: the processes of the rest go unnamed",
                                kept=self.max_sockets)
                    return
                if pid not in comms:
                    comms[pid] = {"pid": pid, "comm": self._comm(pid)}
                if state == TCP_LISTEN:
                    self._listeners.setdefault((netns, local[1]), comms[pid])
                else:
                    self._connections[(netns, local, remote)] = comms[pid]
                self.sockets += 1

    def _comm(self, pid: int) -> str:
        try:
            with open(f"{self.proc}/{pid}/comm") as f:
                return f.read().strip()
        except OSError:
            return ""

    def owner(self, netns: int, local: tuple, remote: tuple) -> Optional[dict]:
        """{pid, comm, how} of the socket local <-> remote in netns if it existed at start
        (how "open_at_start"), or of the listener on its local port then ("listen")."""
        local, remote = (unmapped(local[0]), local[1]), (unmapped(remote[0]), remote[1])
        hit = self._connections.get((netns, local, remote))
        if hit is not None:
            return dict(hit, how="open_at_start")
        hit = self._listeners.get((netns, local[1]))
        return dict(hit, how="listen") if hit is not None else None
