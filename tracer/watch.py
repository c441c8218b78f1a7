"""The live loop: sources (ring buffer, namespace discovery, netlink monitors) -> enrichment
-> attribution -> sinks, one direction.

One iteration (`step`):
1. drain the ring buffers: the probes' events, each lane in kernel order (the root-cause
   lane is never shed; ordinary resets are, in a storm: tracer/storm.py);
2. follow namespaces: births the kernel reported, mount changes, the occasional walk; a new
   namespace gets its netlink monitors at once;
3. read the netlink monitors. The kernel queues a deletion or an address event on our
   sockets synchronously, when it happens: whatever preceded an event of step 1 is there now;
4. attribute the netlink facts first, then the root-cause lane, then the ordinary lane
   (`order_batch`). A fact
   read here that happened after a reset of step 1 is harmless: a deletion known to follow a
   reset cannot explain it (its lower time bound), and anything that arrives later still
   (the entry a reset's RST killed on its way back) corrects the verdict it improves.
"""
from __future__ import annotations

import gc
import os
import signal
import socket
import time

import structlog

from .attribution import Attributor
from .clock import Clock
from .decode import KernelNames
from .enrich import Enricher
from .events import NETNS_BORN
from .filters import VerdictFilter
from .owners import SocketSnapshot
from .recording import Recorder
from .schema import loss_record, status_record
from .sources.namespaces import Namespaces
from .sources.netlink import NetlinkMonitor
from .sources.ringbuf import RingBuffer
from .storm import Storm
from .summary import Summary
from .workloads import Resolver

log = structlog.get_logger("rst-tracer")
LOSS_CHECK_INTERVAL = 0.5
POLL_MS = 50


def process_age() -> float:
    """Seconds since this process started (from /proc, so it includes interpreter start)."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def order_batch(cause: list, ordinary: list, monitored: list) -> list:
    """The order one iteration's events are attributed in: the netlink facts (deletions,
    address and link events, all read after the ring buffers were drained), the root-cause
    lane, then the ordinary lane, each in kernel order. Births are not attribution events."""
    return monitored + [ev for ev in cause if ev.kind != NETNS_BORN] + ordinary


class Watch:
    def __init__(self, backend, ring: RingBuffer, namespaces: Namespaces, monitor: NetlinkMonitor,
                 enricher: Enricher, attributor: Attributor, sinks: list, vfilter: VerdictFilter,
                 recorder=None, host: str = "", refresh=()):
        self.backend, self.ring, self.namespaces, self.monitor = backend, ring, namespaces, monitor
        self.enricher, self.attributor = enricher, attributor
        self.sinks, self.filter, self.recorder = sinks, vfilter, recorder
        self.host = host or socket.gethostname()
        self._refresh = refresh           # periodic: modules loaded since start
        self.stopping = False
        self.verdicts = 0
        self.corrections = 0
        self.context_errors = 0
        self.summary = Summary()
        self._reported: dict = {}         # loss source -> total reported
        self.storm = Storm(backend, self.host, namespaces.name if namespaces is not None else str)

    @classmethod
    def live(cls, backend, btf, sinks: list, vfilter: VerdictFilter, record_path: str = "",
             host: str = "") -> "Watch":
        host = host or socket.gethostname()
        clock = Clock()
        names = KernelNames.from_kernel(btf, clock)
        namespaces = Namespaces()
        workloads = Resolver()
        workloads.start()    # background threads: names come while the probes compile
        attributor = Attributor(backend.name, host)
        # the recording carries the verdict id prefix so replay reproduces the ids too
        recorder = Recorder(record_path, backend.name, attributor.id_prefix) if record_path else None
        return cls(backend, RingBuffer(backend, names), namespaces, NetlinkMonitor(clock),
                   Enricher(namespaces, workloads, SocketSnapshot()), attributor, sinks, vfilter, recorder, host,
                   refresh=(backend.refresh, names.refresh))

    # -- one iteration -----------------------------------------------------------------
    def step(self, timeout_ms: int = POLL_MS) -> None:
        cause, ordinary = self.ring.drain(timeout_ms)
        for ev in cause:
            if ev.kind == NETNS_BORN:
                self.namespaces.born(ev.netns, ev.pid)
        self.namespaces.poll()
        self.follow_namespaces()
        self.storm.taken(ev.netns for ev in ordinary)
        for ev in order_batch(cause, ordinary, self.monitor.read()):
            self._enrich(ev)
            self.attribute(ev)
        if self.storm.due(time.monotonic()):
            for record in self.storm.tick(time.monotonic()):
                self.emit(record)
        for sink in self.sinks:
            sink.flush()

    def follow_namespaces(self) -> None:
        added, removed = self.namespaces.take()
        for inode in removed:
            self.monitor.remove(inode)
            self.enricher.handles.forget(inode)
        for inode in added:
            self.monitor.add(inode, self.namespaces.fd(inode))
        if added:
            self.backend.mark_netns_known(added)
        self.enricher.namespaces_changed(added, removed)

    def _enrich(self, ev) -> None:
        try:
            self.enricher.enrich(ev)
        except Exception as e:  # noqa: BLE001 — context is best effort, the event is not
            self.context_errors += 1
            log.warning("context gathering failed; attributing without it", error=repr(e))

    def attribute(self, ev) -> None:
        if self.recorder is not None:
            self.recorder.write(ev)
        for verdict in self.attributor.feed(ev):
            record = verdict.to_dict()
            if verdict.supersedes:
                self.corrections += 1
            else:
                self.verdicts += 1
            if self.filter.matches(record):
                self.emit(record)

    # -- output ------------------------------------------------------------------------
    def emit(self, record: dict) -> None:
        self.summary.add(record)
        for sink in self.sinks:
            sink.emit(record)

    def emit_offered(self, record: dict) -> None:
        """Like emit, but an output with no room refuses the record without counting a
        drop: a report of drops must not cause the next one (two outputs down would
        otherwise report each other's drops forever)."""
        self.summary.add(record)
        for sink in self.sinks:
            if hasattr(sink, "offer"):
                sink.offer(record)
            else:
                sink.emit(record)

    def report_losses(self) -> None:
        now = time.time()
        # the kernel does not say how many netlink messages it dropped: overruns are counted
        totals = {"kernel_ringbuf": self.ring.lost(), "netlink_monitor": self.monitor.overruns,
                  "netlink_monitor_failed": self.monitor.failed, "decode": self.ring.decode_errors}
        for source, total in totals.items():
            if total > self._reported.get(source, 0):
                self.emit(loss_record(now, self.host, source, total - self._reported.get(source, 0), total))
                self._reported[source] = total
        for sink in self.sinks:   # outputs that dropped records (queue full: destination down or slow)
            stats = sink.stats() if hasattr(sink, "stats") else None
            if not stats:
                continue
            source = f"sink:{stats['name']}"
            reported = self._reported.get(source, 0)
            if stats["dropped"] > reported:
                self._reported[source] = stats["dropped"]
                self.emit_offered(loss_record(now, self.host, source, stats["dropped"] - reported,
                                              stats["dropped"]))

    # -- life cycle ----------------------------------------------------------------------
    def stop(self, *_):
        self.stopping = True

    def start(self) -> None:
        """Find every namespace that exists and subscribe in each (while the backend may
        still be compiling), then attach and open the ring buffers."""
        existing = self.namespaces.start()
        for inode in existing:
            self.monitor.add(inode, self.namespaces.fd(inode))
        self.enricher.handles.baseline(existing)
        self.backend.attach()
        self.ring.open()
        self.backend.mark_netns_known(existing)
        # born while the programs compiled, before the kernel side could report them
        self.namespaces.walk()
        self.follow_namespaces()
        self.enricher.probes_attached()

    def run(self, duration: float = 0.0) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.stop)
        try:
            self.start()
            # start-up leaves ~10^6 long-lived objects (BTF, BCC): keep the collector from
            # rescanning them in the middle of the event loop (a ~100 ms pause)
            gc.collect()
            gc.freeze()
            self.emit(status_record(time.time(), self.host, "attached", backend=self.backend.name,
                                    probes=self.backend.probes(),
                                    attach_s=round(self.backend.attach_seconds, 3),
                                    since_process_start_s=round(process_age(), 3),
                                    namespaces=len(self.monitor.watched())))
            for sink in self.sinks:
                sink.flush()
            deadline = time.monotonic() + duration if duration else None
            next_loss_check = 0.0
            while not self.stopping and (deadline is None or time.monotonic() < deadline):
                self.step(POLL_MS)
                if time.monotonic() >= next_loss_check:
                    self.report_losses()
                    for refresh in self._refresh:
                        refresh()
                    next_loss_check = time.monotonic() + LOSS_CHECK_INTERVAL
            self.step(0)  # what is already queued
            for record in self.storm.tick(time.monotonic(), final=True):
                self.emit(record)
            self.report_losses()
        finally:
            self.backend.detach()
            self.monitor.close()
            self.enricher.close()
            self.namespaces.close()
            if self.recorder is not None:
                self.recorder.close()
        self.emit(status_record(time.time(), self.host, "detached", verdicts=self.verdicts,
                                corrections=self.corrections, lost_total=self._reported.get("kernel_ringbuf", 0),
                                context_errors=self.context_errors, summary=self.summary.to_dict()))
        for sink in self.sinks:
            sink.close()
        return 0
