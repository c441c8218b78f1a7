"""Event sources without a kernel: the netlink monitor's reading and parsing, the kernel
symbol names that follow module loads."""
import errno
import os
import struct

from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from tracer.clock import Clock
from tracer.decode import KernelNames
from tracer.events import CT_DESTROY, LINK_DOWN
from tracer.kallsyms import Kallsyms
from tracer.sources.netlink import NetlinkMonitor
from test_context_parsing import IPS_CONFIRMED, IPS_SRC_NAT, destroy_message

IFF_UP = 0x1


class FakeSocket:
    """A netlink socket whose recv() plays a script: bytes, exceptions, then EAGAIN. Its
    fileno is a pipe with a byte in it, so select() always finds it readable."""

    def __init__(self, script):
        self.script = list(script)
        self.calls = 0
        self.closed = False
        self._r, self._w = os.pipe()
        os.write(self._w, b"x")

    def fileno(self):
        return self._r

    def recv(self, _size):
        self.calls += 1
        item = self.script.pop(0) if self.script else BlockingIOError()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self.closed = True
        os.close(self._r)
        os.close(self._w)


def monitor_with(kind, script):
    m = NetlinkMonitor(Clock())
    sock = FakeSocket(script)
    m.watch_socket(4026531840, kind, sock)
    return m, sock


def test_only_enobufs_is_an_overrun_and_reading_goes_on():
    m, sock = monitor_with("ct", [OSError(errno.ENOBUFS, "No buffer space available"),
                                  destroy_message(IPS_SRC_NAT | IPS_CONFIRMED)])
    events = m.read()
    assert m.overruns == 1 and m.failed == 0 and not sock.closed
    assert [e.kind for e in events] == [CT_DESTROY]


def test_a_persistent_error_closes_the_monitor_instead_of_spinning():
    # before: every OSError counted as an overrun and recv() was retried at once, forever
    m, sock = monitor_with("ct", [OSError(errno.EBADF, "Bad file descriptor")] * 1000)
    assert m.read() == []
    assert sock.calls == 1 and m.failed == 1 and m.overruns == 0 and sock.closed
    assert m.read() == [] and m.watched() == []


def test_deletion_carries_the_requesting_port_and_read_time_bounds():
    raw = bytearray(destroy_message(IPS_SRC_NAT | IPS_CONFIRMED))
    struct.pack_into("=I", raw, 12, 31337)           # nlmsg_pid: who asked (conntrack -D)
    m, _ = monitor_with("ct", [bytes(raw)])
    before = Clock.now_ns()
    (ev,) = m.read()
    assert ev.portid == 31337 and ev.probe == "netlink"
    assert ev.not_before_ns <= before <= ev.ts_ns     # queued after the socket was last empty


def link_message(flags, change):
    msg = ifinfmsg()
    msg["index"], msg["flags"], msg["change"] = 7, flags, change
    msg["attrs"] = [("IFLA_IFNAME", "n2")]
    msg["header"]["type"] = 16   # RTM_NEWLINK
    msg.encode()
    return msg.data[:struct.unpack_from("=I", msg.data, 0)[0]]


def test_only_a_link_that_was_up_can_go_down():
    # a veth is created down (every flag "changed"), comes up, goes down: one LINK_DOWN
    m, _ = monitor_with("rt", [link_message(0x1002, 0xFFFFFFFF), link_message(0x1003, IFF_UP),
                               link_message(0x1002, IFF_UP), link_message(0x1002, 0)])
    assert [(e.kind, e.ifindex) for e in m.read()] == [(LINK_DOWN, 7)]


def test_kernel_names_follow_modules_loaded_after_start(tmp_path):
    kallsyms, modules = tmp_path / "kallsyms", tmp_path / "modules"
    kallsyms.write_text("ffffffff81000000 T tcp_v4_rcv\nffffffff81000400 T tcp_v4_do_rcv\n")
    modules.write_text("")
    names = KernelNames(kallsyms_path=str(kallsyms), modules_path=str(modules))
    names.refresh()
    site = 0xffffffffc0001010
    assert names.resolve_symbol(site) == "tcp_v4_do_rcv"   # before: the nearest symbol below
    kallsyms.write_text(kallsyms.read_text() + "ffffffffc0001000 t nf_hook_slow\t[nf_conntrack]\n")
    modules.write_text("nf_conntrack 200704 0 - Live 0x0\n")
    names.refresh()
    assert names.resolve_symbol(site) == "nf_hook_slow"


def test_kallsyms_finds_whole_text_symbols_by_name(tmp_path):
    kallsyms = tmp_path / "kallsyms"
    kallsyms.write_text("ffffffff81000000 T tcp_v4_send_reset\n"
                        "ffffffff81000100 t tcp_v4_send_reset_extra\n"
                        "ffffffff81000200 D early_drop_data\n"
                        "ffffffff81000300 d early_drop\n"                  # data, not text
                        "ffffffffc0002000 t early_drop\t[nf_conntrack]\n"
                        "ffffffffc0001000 t early_drop\t[other]\n"          # same static name twice
                        "ffffffff81000400 W masq_inet_event\n"
                        "0000000000000000 T hidden_by_kptr_restrict\n")
    symbols = Kallsyms(str(kallsyms))
    assert symbols.address("tcp_v4_send_reset") == 0xffffffff81000000
    assert symbols.address("early_drop") == 0xffffffffc0001000          # the lowest, as before
    assert symbols.address("masq_inet_event") == 0xffffffff81000400
    assert "hidden_by_kptr_restrict" in symbols and symbols.address("hidden_by_kptr_restrict") == 0
    assert "tcp_v4_send" not in symbols and "early_drop_data" not in symbols and "nope" not in symbols
    assert symbols.resolve(0xffffffff81000150) == "tcp_v4_send_reset_extra"
    assert symbols.end("tcp_v4_send_reset") == 0xffffffff81000100
