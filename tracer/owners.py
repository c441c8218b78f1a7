"""The process of a TCP socket older than the tracer: who held it when the tracer attached.

The kernel side names the process of every socket connected or listened on after it
attached (bpf/common.h, KernelEvent.owner). A connection made before — the idle Redis
connection of incident 4 — it cannot: for those, one look right after attaching, before
the tracer says `attached` (so that every socket is either seen here or told by the
kernel): the processes' descriptors give socket inode -> process, each namespace's
/proc/thread-self/net/tcp{,6} (read from inside it) gives inode -> (local, remote).
Enrichment, never attribution: the answer goes into the event's context, so a replay names
the same process.

/proc/net/tcp rather than sock_diag: 20 000 sockets are read and parsed in 0.17 s here,
where pyroute2's sock_diag dump took 1.36 s (0.41 s with its message classes alone); the
TIME_WAIT lines it also prints are dropped at their state field. Bounded: at most
MAX_SOCKETS sockets are kept (~110 bytes each: ~6 MiB); reading 20 000 takes ~0.35 s and
~11 MiB while it runs."""
from __future__ import annotations

import os
import socket
import struct
from typing import Optional

import structlog

from .netns import in_netns

log = structlog.get_logger("rst-tracer.owners")

MAX_SOCKETS = 50_000
TCP_LISTEN = 0x0A      # include/net/tcp_states.h, as /proc/net/tcp prints it
# TIME_WAIT, CLOSE, NEW_SYN_RECV: no process holds these
NOT_HELD = ("06", "07", "0C")


def unmapped(addr: str) -> str:
    """An IPv4 peer of an IPv6 socket as the IPv4 address its packets carry."""
    return addr[7:] if addr.startswith("::ffff:") and "." in addr else addr


def parse_proc_net_tcp(lines, family: int) -> list:
    """(state, (local addr, port), (remote addr, port), inode) of the rows of /proc/net/tcp
    (family 4) or tcp6 (6) a process can hold; addresses are printed as the kernel's 32-bit
    words in host order. `lines`: the file, read line by line (the whole text of a busy
    server's table would be tens of MiB at once)."""
    rows = []
    for line in lines:
        parts = line.split()
        if len(parts) < 10 or parts[3] in NOT_HELD or parts[0] == "sl":
            continue
        try:
            rows.append((int(parts[3], 16), _endpoint(parts[1], family), _endpoint(parts[2], family),
                         int(parts[9])))
        except ValueError:
            continue
    return rows


def _endpoint(text: str, family: int) -> tuple:
    addr, port = text.split(":")
    words = [int(addr[i:i + 8], 16) for i in range(0, len(addr), 8)]
    raw = struct.pack(f"<{len(words)}I", *words)
    return unmapped(socket.inet_ntop(socket.AF_INET if family == 4 else socket.AF_INET6, raw)), int(port, 16)


def tcp_sockets() -> list:
    """The calling thread's namespace's TCP sockets (parse_proc_net_tcp rows)."""
    rows = []
    for name, family in (("tcp", 4), ("tcp6", 6)):
        try:
            with open(f"/proc/thread-self/net/{name}") as f:
                rows += parse_proc_net_tcp(f, family)
        except OSError:
            continue   # no IPv6
    return rows


def _key(netns: int, local: tuple, remote: tuple) -> str:
    """One string per connection: a third of what nested tuples of addresses and ports cost."""
    return f"{netns} {local[0]} {local[1]} {remote[0]} {remote[1]}"


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
        self._connections: dict = {}   # _key(netns, local, remote) -> {pid, comm}
        self._listeners: dict = {}     # (netns, port) -> {pid, comm}
        self.sockets = 0

    def take(self, namespaces: dict) -> None:
        """namespaces: inode -> a descriptor of it (or None for the tracer's own)."""
        holders = socket_holders(self.proc)
        comms: dict = {}
        for netns, fd in namespaces.items():
            try:
                rows = in_netns(fd, tcp_sockets)
            except OSError as e:   # a namespace gone meanwhile
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
                    self._connections[_key(netns, local, remote)] = comms[pid]
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
        hit = self._connections.get(_key(netns, local, remote))
        if hit is not None:
            return dict(hit, how="open_at_start")
        hit = self._listeners.get((netns, local[1]))
        return dict(hit, how="listen") if hit is not None else None
