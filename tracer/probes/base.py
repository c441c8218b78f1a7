"""What both probe backends share: compiling bpf/<source> with the per-kernel defines, the
ring buffer and its loss counter, the drop reasons filtered in the kernel, the namespaces
the kernel side already knows, detaching. A backend adds its defines and its probes."""
from __future__ import annotations

import ctypes
import threading
import time

from ..record import DropFilter
from .btf import BTF
from .capabilities import Capabilities
from .loader import compile_program, kernel_defines, release_compiler_memory

# kfree_skb reasons worth a user-space event, and what the kernel side keeps of them; every
# other drop is filtered in the kernel
WANTED_DROP_REASONS = {"NETFILTER_DROP": DropFilter.ROOT_CAUSE, "TCP_LISTEN_OVERFLOW": DropFilter.ORDINARY,
                       "NOT_SPECIFIED": DropFilter.UNCONFIRMED_NAT_SYN}
# bpf/common.h, auto-attached by BCC on both backends: namespaces as they are born, and
# the process of each socket
COMMON_PROBES = ["task:task_newtask", "sched:sched_process_exec", "sock:inet_sock_set_state"]


class Backend:
    name = ""
    source = ""

    def __init__(self, caps: Capabilities, btf: BTF):
        self.caps, self.btf = caps, btf
        self.bpf = None
        self.attach_seconds = 0.0
        self._callbacks = ()
        self._attaching = None
        self._attach_error = None

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
    def start_attach(self) -> None:
        """Compile and attach in a thread: the compiler runs outside the GIL, so the caller
        goes on importing and setting up meanwhile (start-up ~0.3 s shorter); attach()
        waits for it."""
        def run():
            try:
                self._attach()
            except BaseException as e:  # noqa: BLE001 — handed to attach()'s caller
                self._attach_error = e
        self._attaching = threading.Thread(target=run, name="attach", daemon=True)
        self._attaching.start()

    def attach(self) -> None:
        if self._attaching is None:
            self.start_attach()
        self._attaching.join()
        if self._attach_error is not None:
            raise self._attach_error

    def _attach(self) -> None:
        t0 = time.monotonic()
        self.bpf = compile_program(self.source, self.defines(), self.caps)
        self.attach_probes()
        self.btf.release()   # answers kept for the next start; the parsed types go
        release_compiler_memory()
        self.attach_seconds = time.monotonic() - t0

    def filter_drop_reasons(self) -> None:
        """Fill the kernel's table of wanted skb_drop_reason values (names from BTF)."""
        drop = self.btf.enum("skb_drop_reason")
        table = self.bpf["wanted_drop_reasons"]
        for name, lane in WANTED_DROP_REASONS.items():
            code = drop.get("SKB_DROP_REASON_" + name)
            if code is not None and code < 256:
                table[ctypes.c_int(code)] = ctypes.c_uint8(lane)

    def open(self, on_cause, on_ordinary) -> None:
        """Deliver each raw record (bytes) of the root-cause lane to on_cause and of the
        ordinary lane to on_ordinary, from poll()."""
        def lane(on_raw):
            def callback(_ctx, data, size):
                on_raw(ctypes.string_at(data, size))
                return 0
            return callback
        self._callbacks = (lane(on_cause), lane(on_ordinary))  # BCC keeps only weak references
        self.bpf["events"].open_ring_buffer(self._callbacks[0])
        self.bpf["ordinary"].open_ring_buffer(self._callbacks[1])

    def poll(self, timeout_ms: int) -> None:
        self.bpf.ring_buffer_poll(timeout_ms)

    def lost(self) -> int:
        """Events the kernel could not queue (ring buffer full), since attach."""
        return sum(int(v) for v in self.bpf["lost_events"][ctypes.c_int(0)]) if self.bpf else 0

    def shed_ordinary(self, netns: int, on: bool) -> None:
        """A storm in namespace `netns`: the kernel counts its ordinary events instead of
        sending them one by one (on), or sends them again (off)."""
        table, key = self.bpf["storming"], ctypes.c_uint32(netns)
        if on:
            try:
                table[key] = ctypes.c_uint8(1)
            except Exception:  # noqa: BLE001 — BCC's bare Exception: the table is full
                return         # (STORMING_ENTRIES): this one is taken one by one, or counted when the ring is full
        elif key in table:
            del table[key]

    def shed_counts(self) -> dict:
        """Ordinary events shed since attach: {(netns, class, port): count}; port 0 holds
        what found the table full (netns 0 too, if even that key found no room)."""
        table = self.bpf["shed"]
        # one system call for the whole table where BCC has it (its values come as ints)
        items = table.items_lookup_batch() if hasattr(table, "items_lookup_batch") else table.items()
        counts = {(k.netns, k.klass, k.port): int(getattr(v, "value", v)) for k, v in items}
        for klass, v in self.bpf["shed_unkeyed"].items():
            if v.value:
                counts[(0, klass.value, 0)] = int(v.value)
        return counts

    def mark_netns_known(self, inodes) -> None:
        """Namespaces user space watches already: the kernel side reports only others."""
        table = self.bpf["known_netns"]
        for inode in inodes:
            table[ctypes.c_uint32(inode)] = ctypes.c_uint8(1)

    def detach(self) -> None:
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None
