"""What both probe backends share: compiling bpf/<source> with the per-kernel defines, the
ring buffer and its loss counter, the drop reasons filtered in the kernel, the namespaces
the kernel side already knows, detaching. A backend adds its defines and its probes."""
from __future__ import annotations

import ctypes
import time

from .btf import BTF
from .capabilities import Capabilities
from .loader import compile_program, kernel_defines

# kfree_skb reasons worth a user-space event; every other drop is filtered in the kernel
WANTED_DROP_REASONS = ("NETFILTER_DROP", "TCP_LISTEN_OVERFLOW")
# bpf/common.h, auto-attached by BCC on both backends: namespaces as they are born
NETNS_PROBES = ["task:task_newtask", "sched:sched_process_exec"]


class Backend:
    name = ""
    source = ""

    def __init__(self, caps: Capabilities, btf: BTF):
        self.caps, self.btf = caps, btf
        self.bpf = None
        self.attach_seconds = 0.0
        self._callback = None

    # -- for subclasses ----------------------------------------------------------------
    def defines(self) -> dict:
        return kernel_defines(self.btf)

    def attach_probes(self) -> None:
        """Attach what BCC did not auto-attach (RAW_TRACEPOINT_PROBE functions it does)."""

    def refresh(self) -> None:
        """Periodic: follow modules loaded since attach."""

    def probes(self) -> list:
        raise NotImplementedError

    # -- shared mechanics ----------------------------------------------------------------
    def attach(self) -> None:
        t0 = time.monotonic()
        self.bpf = compile_program(self.source, self.defines(), self.caps)
        self.attach_probes()
        self.attach_seconds = time.monotonic() - t0

    def filter_drop_reasons(self) -> None:
        """Fill the kernel's table of wanted skb_drop_reason values (names from BTF)."""
        drop = self.btf.enum("skb_drop_reason")
        table = self.bpf["wanted_drop_reasons"]
        for name in WANTED_DROP_REASONS:
            code = drop.get("SKB_DROP_REASON_" + name)
            if code is not None and code < 256:
                table[ctypes.c_int(code)] = ctypes.c_uint8(1)

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

    def mark_netns_known(self, inodes) -> None:
        """Namespaces user space watches already: the kernel side reports only others."""
        table = self.bpf["known_netns"]
        for inode in inodes:
            table[ctypes.c_uint32(inode)] = ctypes.c_uint8(1)

    def detach(self) -> None:
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None
