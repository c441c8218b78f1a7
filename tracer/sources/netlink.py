"""Netlink monitors, one pair per network namespace: conntrack events (the deletions that
later explain a reset and who asked for them; the entries conntrack picked up mid-stream,
i.e. re-created for the client of a lost entry) and address/link changes (what flushed
them). A source of events beside the ring buffer, read after it in every loop iteration.
Classic BPF filters (socket_filters.py) keep everything else in the kernel.

Deliveries are synchronous: the kernel queues a DESTROY on our socket while it deletes the
entry, before any packet can meet the missing entry. So everything that preceded an event
already drained from the ring buffer is in these sockets when they are read next. Each
event is stamped with the monotonic time it was read (`ts_ns`, an upper bound of when it
happened) and the time its socket was last found empty (`not_before_ns`, a lower bound).
"""
from __future__ import annotations

import errno
import select
import socket
import struct

import structlog
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from ..clock import Clock
from ..conntrack import parse_ct_entry
from ..events import ADDR_REMOVED, CT_DESTROY, LINK_DOWN, NAT_BINDING, KernelEvent
from ..netns import in_netns
from . import socket_filters

log = structlog.get_logger("rst-tracer.netlink")

NETLINK_ROUTE, NETLINK_NETFILTER = 0, 12
NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_DESTROY = 1, 3
RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x1, 0x10, 0x100
RTM_NEWLINK, RTM_DELADDR = 16, 21
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_DELETE = 0, 2
IFF_UP = 0x1
SO_RCVBUFFORCE = 33
RCVBUF = 8 << 20


class _Monitor:
    __slots__ = ("inode", "kind", "sock", "drained_ns")

    def __init__(self, inode: int, kind: str, sock: socket.socket, drained_ns: int):
        self.inode, self.kind, self.sock, self.drained_ns = inode, kind, sock, drained_ns


class NetlinkMonitor:
    def __init__(self, clock: Clock):
        self.clock = clock
        self._by_fd: dict = {}       # fileno -> _Monitor
        self._by_ns: dict = {}       # inode -> [_Monitor, ...]
        self.overruns = 0            # times the kernel dropped messages for us (ENOBUFS)
        self.failed = 0              # sockets closed after an error other than ENOBUFS

    def add(self, inode: int, ns_fd) -> bool:
        """Subscribe in the namespace (`ns_fd`: a descriptor or path of it, None: ours)."""
        if inode in self._by_ns:
            return True
        try:
            ct, rt = in_netns(ns_fd, lambda: (
                socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER),
                socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)))
            # filters first: nothing unfiltered is queued once the groups are joined
            socket_filters.attach(ct, socket_filters.conntrack_filter())
            socket_filters.attach(rt, socket_filters.route_filter())
            ct.bind((0, (1 << (NFNLGRP_CONNTRACK_NEW - 1)) | (1 << (NFNLGRP_CONNTRACK_DESTROY - 1))))
            rt.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
        except OSError as e:
            log.warning("cannot monitor namespace: its conntrack deletions and address changes "
                        "will not be seen", netns=inode, error=str(e))
            self._by_ns[inode] = []
            return False
        for s, kind in ((ct, "ct"), (rt, "rt")):
            try:   # root may exceed net.core.rmem_max
                s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            s.setblocking(False)
            self.watch_socket(inode, kind, s)
        return True

    def watch_socket(self, inode: int, kind: str, sock) -> None:
        """Read `sock` (a subscribed, non-blocking netlink socket: kind "ct" or "rt") as a
        monitor of namespace `inode`."""
        m = _Monitor(inode, kind, sock, self.clock.now_ns())
        self._by_fd[sock.fileno()] = m
        self._by_ns.setdefault(inode, []).append(m)

    def remove(self, inode: int) -> None:
        for m in self._by_ns.pop(inode, []):
            self._close(m)

    def watched(self) -> list:
        return [i for i, ms in self._by_ns.items() if ms]

    def _close(self, m: _Monitor) -> None:
        self._by_fd.pop(m.sock.fileno(), None)
        m.sock.close()

    def read(self) -> list:
        """Every message queued on every monitor, as KernelEvents (ts = read time)."""
        if not self._by_fd:
            return []
        ready, _, _ = select.select(list(self._by_fd), [], [], 0)
        events = []
        for fd in ready:
            m = self._by_fd.get(fd)
            if m is not None:
                events += self._drain(m)
        return events

    def _drain(self, m: _Monitor) -> list:
        events = []
        while True:
            try:
                data = m.sock.recv(1 << 16)
            except BlockingIOError:
                m.drained_ns = self.clock.now_ns()
                return events
            except OSError as e:
                if e.errno == errno.ENOBUFS:   # the kernel dropped messages for us: go on reading
                    self.overruns += 1
                    log.debug("netlink monitor overrun", netns=m.inode)
                    continue
                # anything else will not go away by reading again: stop using this socket
                self.failed += 1
                log.warning("netlink monitor failed; no longer reading it", netns=m.inode,
                            monitor=m.kind, error=str(e))
                self._close(m)
                self._by_ns[m.inode] = [x for x in self._by_ns.get(m.inode, []) if x is not m]
                return events
            events += self._parse(m, data)

    def _parse(self, m: _Monitor, data: bytes) -> list:
        out = []
        off = 0
        now = self.clock.now_ns()
        while off + 16 <= len(data):
            length, mtype, _flags, _seq, portid = struct.unpack_from("=IHHII", data, off)
            if length < 16:
                break
            raw = data[off:off + length]
            off += (length + 3) & ~3
            base = dict(ts=self.clock.wall(now), ts_ns=now, not_before_ns=m.drained_ns, netns=m.inode,
                        flow=None, probe="netlink")
            if m.kind == "ct" and mtype & 0xFF in (IPCTNL_MSG_CT_DELETE, IPCTNL_MSG_CT_NEW):
                entry = parse_ct_entry(raw)
                if entry is None:
                    continue
                family = 6 if ":" in entry.orig.src.addr else 4
                if mtype & 0xFF == IPCTNL_MSG_CT_DELETE:
                    # nlmsg_pid: the netlink port of whoever asked for the deletion, 0 for
                    # the kernel's own (timeouts, masquerade cleanup, early drop)
                    out.append(KernelEvent(kind=CT_DESTROY, ifindex=0, entry=entry, portid=portid,
                                           family=family, **base))
                else:   # picked up mid-stream: the new NAT binding of a flow whose entry was lost
                    out.append(KernelEvent(kind=NAT_BINDING, ifindex=0, entry=entry, family=family, **base))
            elif m.kind == "rt" and mtype == RTM_DELADDR:
                msg = ifaddrmsg(raw)
                msg.decode()
                out.append(KernelEvent(kind=ADDR_REMOVED, ifindex=msg["index"],
                                       address=f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}",
                                       **base))
            elif m.kind == "rt" and mtype == RTM_NEWLINK:
                msg = ifinfmsg(raw)
                msg.decode()
                # a link that went down: IFF_UP among the changed flags and now clear. A new
                # device (all flags "changed") that starts down never was up: no flush.
                if msg["change"] & IFF_UP and msg["change"] != 0xFFFFFFFF and not msg["flags"] & IFF_UP:
                    out.append(KernelEvent(kind=LINK_DOWN, ifindex=msg["index"], **base))
        return out

    def close(self) -> None:
        for inode in list(self._by_ns):
            self.remove(inode)
