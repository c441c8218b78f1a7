"""Tracepoint backend: raw tracepoints tcp_send_reset, tcp_receive_reset and kfree_skb
(filtered in the kernel to the drop reasons we attribute). Works without kprobes."""
from __future__ import annotations

import ctypes
import time

from ..decode import Kallsyms
from .btf import BTF
from .capabilities import Capabilities
from .loader import compile_program, kernel_defines

# kfree_skb reasons worth a user-space event; every other drop is filtered in the kernel
WANTED_DROP_REASONS = ("NETFILTER_DROP", "TCP_LISTEN_OVERFLOW")
# the masquerade notifiers whose runs flush conntrack entries (index = BPF array slot)
MASQ_NOTIFIERS = ("masq_inet_event", "masq_inet6_event", "masq_device_event")


class TracepointBackend:
    name = "tracepoint"
    source = "tracepoints.c"

    def __init__(self, caps: Capabilities, btf: BTF):
        self.caps, self.btf = caps, btf
        self.bpf = None
        self.attach_seconds = 0.0

    def attach(self) -> None:
        t0 = time.monotonic()
        self.bpf = compile_program(self.source, kernel_defines(self.btf), self.caps)
        drop = self.btf.enum("skb_drop_reason")
        table = self.bpf["wanted_drop_reasons"]
        for name in WANTED_DROP_REASONS:
            code = drop.get("SKB_DROP_REASON_" + name)
            if code is not None and code < 256:
                table[ctypes.c_int(code)] = ctypes.c_uint8(1)
        self._notifiers_known = 0
        self.refresh()
        self.attach_seconds = time.monotonic() - t0

    def refresh(self) -> None:
        """Look the masquerade notifiers up again: nf_nat may be a module loaded later."""
        if self._notifiers_known == len(MASQ_NOTIFIERS):
            return
        ksyms = Kallsyms.current()
        table = self.bpf["masq_notifiers"]
        known = 0
        for i, name in enumerate(MASQ_NOTIFIERS):
            addr = ksyms.address(name)
            if addr:
                table[ctypes.c_int(i)] = ctypes.c_uint64(addr)
                known += 1
        self._notifiers_known = known

    def open(self, on_raw) -> None:
        """Deliver each raw record (bytes) to on_raw from poll()."""
        def callback(_ctx, data, size):
            on_raw(ctypes.string_at(data, size))
            return 0
        self._callback = callback  # BCC keeps only a weak reference to it
        self.bpf["events"].open_ring_buffer(callback)

    def poll(self, timeout_ms: int) -> None:
        self.bpf.ring_buffer_poll(timeout_ms)

    def lost(self) -> int:
        """Events the kernel could not queue (ring buffer full), since attach."""
        return sum(int(v) for v in self.bpf["lost_events"][ctypes.c_int(0)]) if self.bpf else 0

    def probes(self) -> list:
        return ["tcp:tcp_send_reset", "tcp:tcp_receive_reset", "skb:kfree_skb", "notifier:notifier_run"]

    def detach(self) -> None:
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None
