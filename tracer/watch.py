"""The live loop: probes -> decode -> context -> attribution -> sinks, one direction."""
from __future__ import annotations

import gc
import os
import signal
import socket
import time

import structlog

from .attribution import Attributor
from .context import ContextGatherer
from .decode import DecodeError, KernelNames, decode
from .events import CT_DESTROY
from .filters import VerdictFilter
from .recording import Recorder
from .schema import loss_record, status_record
from .summary import Summary

log = structlog.get_logger("rst-tracer")
LOSS_CHECK_INTERVAL = 0.5


def _deletion_key(ev):
    return (ev.netns, ev.entry.orig, ev.entry.reply) if ev.entry is not None else None


def process_age() -> float:
    """Seconds since this process started (from /proc, so it includes interpreter start)."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


class Watch:
    def __init__(self, backend, btf, sinks: list, vfilter: VerdictFilter, record_path: str = "",
                 host: str = ""):
        self.backend = backend
        self.host = host or socket.gethostname()
        self.names = KernelNames.from_kernel(btf)
        self.gatherer = ContextGatherer()
        self.attributor = Attributor(backend.name, self.host)
        self.sinks, self.filter = sinks, vfilter
        # the recording carries the verdict id prefix so replay reproduces the ids too
        self.recorder = Recorder(record_path, backend.name, self.attributor.id_prefix) \
            if record_path else None
        self.stopping = False
        self.verdicts = 0
        self.decode_errors = 0
        self.context_errors = 0
        self.summary = Summary()
        self._lost_reported = 0
        self._decode_reported = 0
        self._sink_drops_reported: dict = {}
        self._overruns_reported = 0
        self._pending: list = []

    def emit(self, record: dict) -> None:
        self.summary.add(record)
        for sink in self.sinks:
            sink.emit(record)

    def on_raw(self, raw: bytes) -> None:
        try:
            ev = decode(raw, self.names)
        except DecodeError as e:
            self.decode_errors += 1
            log.warning("undecodable kernel event", error=str(e))
            return
        self._pending.append(ev)

    def process_batch(self) -> None:
        """Monitor events (deletions, address changes) before the kernel events of the same
        batch: a deletion always precedes the reset it explains, but its netlink message
        may arrive while the reset is already queued in the ring buffer.
        A netlink DESTROY whose entry the kprobe backend reported deleting in this batch
        (with the kernel's reason) is preceded by that record, taken out of its place: the
        attribution keeps the reason of a deletion reported first by the kernel."""
        monitored = self.gatherer.tick()
        if monitored:
            self.backend.poll(0)   # records emitted while the monitors were being read
        pending, self._pending = self._pending, []
        probed = {_deletion_key(ev): i for i, ev in enumerate(pending) if ev.kind == CT_DESTROY}
        done = set()
        for ev in monitored:
            i = probed.get(_deletion_key(ev)) if ev.kind == CT_DESTROY else None
            if i is not None and i not in done:
                done.add(i)
                self._enrich_and_attribute(pending[i])
            self.attribute(ev)
        for i, ev in enumerate(pending):
            if i not in done:
                self._enrich_and_attribute(ev)
        for sink in self.sinks:
            sink.flush()

    def _enrich_and_attribute(self, ev) -> None:
        try:
            self.gatherer.enrich(ev)
        except Exception as e:  # noqa: BLE001 — context is best effort, the event is not
            self.context_errors += 1
            log.warning("context gathering failed; attributing without it", error=repr(e))
        self.attribute(ev)

    def attribute(self, ev) -> None:
        if self.recorder is not None:
            self.recorder.write(ev)
        verdict = self.attributor.feed(ev)
        if verdict is None:   # context events (deletions, address changes) only inform
            return
        record = verdict.to_dict()
        self.verdicts += 1
        if self.filter.matches(record):
            self.emit(record)

    def report_losses(self) -> None:
        now = time.time()
        lost = self.backend.lost()
        if lost > self._lost_reported:
            self.emit(loss_record(now, self.host, "kernel_ringbuf", lost - self._lost_reported, lost))
            self._lost_reported = lost
        overruns = self.gatherer.monitor.overruns
        if overruns > self._overruns_reported:
            # the kernel does not say how many netlink messages it dropped: count overruns
            self.emit(loss_record(now, self.host, "netlink_monitor", overruns - self._overruns_reported,
                                  overruns))
            self._overruns_reported = overruns
        if self.decode_errors > self._decode_reported:
            self.emit(loss_record(now, self.host, "decode", self.decode_errors - self._decode_reported,
                                  self.decode_errors))
            self._decode_reported = self.decode_errors
        for sink in self.sinks:   # outputs that dropped records (queue full: destination down or slow)
            stats = sink.stats() if hasattr(sink, "stats") else None
            if not stats:
                continue
            reported = self._sink_drops_reported.get(stats["name"], 0)
            if stats["dropped"] > reported:
                self._sink_drops_reported[stats["name"]] = stats["dropped"]
                self.emit_offered(loss_record(now, self.host, f"sink:{stats['name']}",
                                              stats["dropped"] - reported, stats["dropped"]))

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

    def stop(self, *_):
        self.stopping = True

    def run(self, duration: float = 0.0) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.stop)
        self.backend.attach()
        try:
            self.backend.open(self.on_raw)
            self.gatherer.start()
            # start-up leaves ~10^6 long-lived objects (BTF, BCC): keep the collector from
            # rescanning them in the middle of the event loop (a ~100 ms pause)
            gc.collect()
            gc.freeze()
            self.emit(status_record(time.time(), self.host, "attached", backend=self.backend.name,
                                    probes=self.backend.probes(),
                                    attach_s=round(self.backend.attach_seconds, 3),
                                    since_process_start_s=round(process_age(), 3)))
            for sink in self.sinks:
                sink.flush()
            deadline = time.monotonic() + duration if duration else None
            next_loss_check = 0.0
            while not self.stopping and (deadline is None or time.monotonic() < deadline):
                self.backend.poll(50)
                self.process_batch()
                if time.monotonic() >= next_loss_check:
                    self.report_losses()
                    self.backend.refresh()
                    next_loss_check = time.monotonic() + LOSS_CHECK_INTERVAL
            self.backend.poll(0)  # drain what is already queued
            self.process_batch()
            self.report_losses()
        finally:
            self.backend.detach()
            self.gatherer.close()
            if self.recorder is not None:
                self.recorder.close()
        self.emit(status_record(time.time(), self.host, "detached", verdicts=self.verdicts,
                                lost_total=self._lost_reported, context_errors=self.context_errors,
                                summary=self.summary.to_dict()))
        for sink in self.sinks:
            sink.close()
        return 0
