"""Tracepoint backend: raw tracepoints tcp_send_reset, tcp_receive_reset and kfree_skb
(filtered in the kernel to the drop reasons we attribute). Works without kprobes."""
from __future__ import annotations

import ctypes

from ..kallsyms import Kallsyms
from .base import COMMON_PROBES, Backend

# the masquerade notifiers whose runs flush conntrack entries (index = BPF array slot)
MASQ_NOTIFIERS = ("masq_inet_event", "masq_inet6_event", "masq_device_event")


class TracepointBackend(Backend):
    name = "tracepoint"
    source = "tracepoints.c"

    def attach_probes(self) -> None:
        self.filter_drop_reasons()
        self._notifiers_known = 0
        self.refresh()

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

    def probes(self) -> list:
        return ["tcp:tcp_send_reset", "tcp:tcp_receive_reset", "skb:kfree_skb",
                "notifier:notifier_run"] + COMMON_PROBES
