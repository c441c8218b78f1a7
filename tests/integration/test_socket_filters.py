"""The netlink monitors' kernel-side filters, on a real NAT router: of everything conntrack
and rtnetlink report, only what can explain a reset reaches user space."""
import errno
import socket
import time

import pytest

from tracer.clock import Clock
from tracer.events import ADDR_REMOVED, CT_DESTROY, LINK_DOWN, NAT_BINDING
from tracer.lab.topology import CLI_ADDR, SRV_ADDR, NatLab
from tracer.netns import in_netns
from tracer.sources.netlink import (NETLINK_NETFILTER, NETLINK_ROUTE, NFNLGRP_CONNTRACK_DESTROY,
                                    NFNLGRP_CONNTRACK_NEW, RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR,
                                    RTMGRP_LINK, NetlinkMonitor)

pytestmark = pytest.mark.root
PORT, CLOSED, UDP_PORT = 7000, 7001, 7002


def unfiltered(path):
    """The same subscriptions without filters: what the kernel would otherwise queue."""
    def open_():
        ct = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        ct.bind((0, (1 << (NFNLGRP_CONNTRACK_NEW - 1)) | (1 << (NFNLGRP_CONNTRACK_DESTROY - 1))))
        rt = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        rt.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
        for s in (ct, rt):
            s.setblocking(False)
        return ct, rt
    return in_netns(path, open_)


def count_messages(sock) -> int:
    n = 0
    while True:
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            return n
        off = 0
        while off + 16 <= len(data):
            n += 1
            off += (int.from_bytes(data[off:off + 4], "little") + 3) & ~3


def test_only_what_can_explain_a_reset_crosses_into_user_space():
    with NatLab(masquerade_opts=("--random-fully",)) as lab:
        nat, cli, srv = (f"/run/netns/{ns}" for ns in (lab.nat, lab.cli, lab.srv))
        monitor = NetlinkMonitor(Clock())
        assert monitor.add(lab.netns_inode(lab.nat), nat)
        raw_ct, raw_rt = unfiltered(nat)
        listener = in_netns(srv, lambda: socket.create_server((SRV_ADDR, PORT)))
        udp = in_netns(srv, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        udp.bind((SRV_ADDR, UDP_PORT))
        # ordinary traffic through the NAT: connections that close normally, refused ones, UDP
        for _ in range(10):
            c = in_netns(cli, lambda: socket.create_connection((SRV_ADDR, PORT), timeout=5))
            a, _ = listener.accept()
            c.sendall(b"x")
            a.recv(1)
            c.close()
            a.close()
        for _ in range(5):
            c = in_netns(cli, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            assert c.connect_ex((SRV_ADDR, CLOSED)) == errno.ECONNREFUSED
            c.close()
        for _ in range(5):
            u = in_netns(cli, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            u.sendto(b"q", (SRV_ADDR, UDP_PORT))
            udp.recv(1)
            u.close()
        # one idle connection, then a flush: every entry goes (TIME_WAIT ones, UDP, the idle one)
        idle = in_netns(cli, lambda: socket.create_connection((SRV_ADDR, PORT), timeout=5))
        served, _ = listener.accept()
        idle.sendall(b"x")
        served.recv(1)
        lab.exec(lab.nat, ["conntrack", "-F"])
        # the idle client speaks again: conntrack picks the flow up mid-stream, re-NATed; the
        # server resets the unknown port and the new entry dies (CLOSE)
        idle.sendall(b"y")
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            for _ in range(50):
                idle.sendall(b"z")
                idle.recv(1)
                time.sleep(0.05)
        # addresses and links: an addition and a link coming up are not news; removals are
        lab.add_address(lab.nat, "n2", "10.200.2.77", 32)
        lab.del_address(lab.nat, "n2", "10.200.2.77", 32)
        lab.set_link(lab.nat, "n2", up=False)
        lab.set_link(lab.nat, "n2", up=True)
        events = monitor.read()
        everything = count_messages(raw_ct) + count_messages(raw_rt)
        kinds = sorted(ev.kind for ev in events)
        destroyed = [ev.entry for ev in events if ev.kind == CT_DESTROY]
        picked_up = [ev.entry for ev in events if ev.kind == NAT_BINDING]
        assert [(e.orig.src.addr, e.orig.src.port) for e in destroyed] == [(CLI_ADDR, idle.getsockname()[1])]
        assert destroyed[0].tcp_state == "ESTABLISHED"
        assert [e.orig for e in picked_up] == [destroyed[0].orig] and picked_up[0].reply != destroyed[0].reply
        # the link going down also removes its IPv6 addresses: those removals come too
        removed = [ev.address for ev in events if ev.kind == ADDR_REMOVED]
        assert removed[0] == "10.200.2.77/32" and all(":" in a for a in removed[1:])
        assert kinds.count(LINK_DOWN) == 1
        # the kernel kept back what the unfiltered sockets got: 10 normal closes (NEW and
        # DESTROY each), 5 refused, 5 UDP flows, address and link chatter
        assert everything >= 40 + len(events), (everything, kinds)
        monitor.close()
        for s in (raw_ct, raw_rt, listener, udp, idle, served):
            s.close()
