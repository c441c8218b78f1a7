"""Prometheus metrics: a sink that counts the records it sees, plus the state of the other
outputs (read from their ``stats()`` at scrape time). Everything lives in a registry of its
own (never prometheus_client's global one), so several can coexist in one process."""
from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..corrections import Chains
from .console import Sink


def parse_listen(text: str) -> tuple:
    """``ADDR:PORT`` for ``--metrics`` (``[::1]:9464``; ``:9464`` for every address) ->
    (addr, port), or ValueError with a one-line message."""
    from .outputs import host_port

    if text.startswith(":"):
        text = "0.0.0.0" + text
    return host_port(text, "ADDR:PORT, e.g. 127.0.0.1:9464, [::1]:9464 or :9464")


class _OutputsCollector:
    """rst_tracer_sink_* from the outputs' own counters, current at every scrape."""

    def __init__(self, metrics_sink: "MetricsSink"):
        self.owner = metrics_sink

    def _families(self):
        return {
            "delivered": CounterMetricFamily("rst_tracer_sink_delivered",
                                             "Records an output delivered.", labels=["sink"]),
            "dropped": CounterMetricFamily("rst_tracer_sink_dropped",
                                           "Records an output dropped (queue full, or left at exit).",
                                           labels=["sink"]),
            "errors": CounterMetricFamily("rst_tracer_sink_errors",
                                          "Failed connection attempts and writes of an output.",
                                          labels=["sink"]),
            "queued": GaugeMetricFamily("rst_tracer_sink_queue",
                                        "Records waiting in an output's queue.", labels=["sink"]),
            "connected": GaugeMetricFamily("rst_tracer_sink_connected",
                                           "1 if the output's destination is currently reachable.",
                                           labels=["sink"]),
        }

    def describe(self):
        return list(self._families().values())

    def collect(self):
        families = self._families()
        for stats in self.owner.outputs_stats():
            for key, family in families.items():
                family.add_metric([stats["name"]], float(stats[key]))
        return list(families.values())


class MetricsSink(Sink):
    def __init__(self, registry: CollectorRegistry = None, outputs=()):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.verdicts = Counter("rst_tracer_verdicts", "Verdicts emitted, at their first cause.",
                                ["cause", "netns", "direction"], registry=self.registry)
        self.corrections = Counter("rst_tracer_corrections", "Verdicts replaced by a correction record, by "
                                   "the cause replaced and the cause that replaced it.",
                                   ["from_cause", "to_cause", "netns"], registry=self.registry)
        self._counted = Chains()    # ids of the verdicts and corrections counted here
        self.lost = Counter("rst_tracer_lost_events", "Events lost before attribution or delivery "
                            "(kernel_ringbuf, decode, sink:<output>).", ["source"], registry=self.registry)
        self.probe_attached = Gauge("rst_tracer_probe_attached", "1 while the probe is attached.",
                                    ["backend", "probe"], registry=self.registry)
        self._outputs = list(outputs)
        self._lock = threading.Lock()
        self._attached: set = set()
        self.registry.register(_OutputsCollector(self))
        self.server = None

    def watch(self, output) -> None:
        """Also export the state of this output (anything with ``stats()``)."""
        with self._lock:
            self._outputs.append(output)

    def outputs_stats(self) -> list:
        with self._lock:
            outputs = list(self._outputs)
        return [o.stats() for o in outputs if hasattr(o, "stats")]

    def emit(self, record: dict) -> None:
        kind = record.get("type")
        if kind in ("verdict", "correction"):
            # counters never go down: a correction counts the move, not a second verdict,
            # unless the verdict it replaces never came here (filtered out)
            netns, cause = str(record.get("netns")), str(record.get("cause"))
            if self._counted.superseded(record) is not None:
                self.corrections.labels(from_cause=str(record.get("superseded_cause")), to_cause=cause,
                                        netns=netns).inc()
            else:
                self.verdicts.labels(cause=cause, netns=netns, direction=str(record.get("direction"))).inc()
            self._counted.remember(record, True)
        elif kind == "loss":
            lost = record.get("lost") or 0
            if lost > 0:
                self.lost.labels(source=str(record.get("source"))).inc(lost)
        elif kind == "status":
            state = record.get("state")
            if state == "attached":
                backend = str(record.get("backend", ""))
                for probe in record.get("probes") or ():
                    self.probe_attached.labels(backend=backend, probe=str(probe)).set(1)
                    self._attached.add((backend, str(probe)))
            elif state == "detached":
                for backend, probe in self._attached:
                    self.probe_attached.labels(backend=backend, probe=probe).set(0)
                self._attached.clear()

    def serve(self, addr: str, port: int) -> None:
        """Start the HTTP exporter (a daemon thread). Raises OSError if it cannot listen."""
        started = start_http_server(port, addr=addr, registry=self.registry)
        self.server = started[0] if isinstance(started, tuple) else None

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
