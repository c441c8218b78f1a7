"""The live loop's merge of its sources, on event streams recorded from real lab runs: each
recorded event is delivered by the source that produced it (ring buffer or netlink
monitors) in iterations shaped the way the kernel delivers them."""
import dataclasses
import json
import types

from tracer.attribution import Attributor
from tracer.events import CT_DESTROY, NETNS_BORN, RST_SENT, KernelEvent
from tracer.filters import VerdictFilter
from tracer.recording import read_recording
from tracer.watch import Watch


class ScriptedSource:
    """Returns one scripted batch per call."""

    def __init__(self, batches):
        self.batches = list(batches)
        self.overruns = self.failed = self.decode_errors = 0
        self.added = []

    def next(self):
        return self.batches.pop(0) if self.batches else []

    drain = lambda self, timeout_ms=0: (self.next(), [])   # noqa: E731  (ring buffer: the root-cause lane)
    read = lambda self: self.next()                    # noqa: E731  (netlink monitors)
    lost = lambda self: 0                              # noqa: E731

    def add(self, inode, fd):
        self.added.append(inode)


class FakeNamespaces:
    def __init__(self):
        self.born_seen, self._added = [], []

    def born(self, inode, pid):
        self.born_seen.append((inode, pid))
        self._added.append(inode)

    def poll(self):
        pass

    def take(self):
        added, self._added = self._added, []
        return added, []

    def fd(self, inode):
        return None

    def name(self, inode):
        return ""


class ListSink:
    def __init__(self):
        self.records = []

    def emit(self, record):
        self.records.append(record)

    flush = close = lambda self: None   # noqa: E731


def make_watch(ring_batches, monitor_batches):
    ring, monitor = ScriptedSource(ring_batches), ScriptedSource(monitor_batches)
    backend = types.SimpleNamespace(known=[], name="tracepoint", shed_counts=dict, shed_ordinary=lambda netns, on: None)
    backend.mark_netns_known = backend.known.extend
    enricher = types.SimpleNamespace(enrich=lambda ev: ev,   # recorded events carry their context
                                     namespaces_changed=lambda added, removed: None)
    sink = ListSink()
    w = Watch(backend, ring, FakeNamespaces(), monitor, enricher, Attributor("tracepoint", "h"), [sink],
              VerdictFilter(), host="h")
    return w, sink, backend


def recorded(fixtures, name):
    events = list(read_recording(str(fixtures / f"{name}.rec"))[1])
    return events, json.loads((fixtures / f"{name}.facts.json").read_text())


def live_batches(events):
    """Iterations as the kernel delivers: each probe event is drained with the netlink facts
    recorded before it (queued on the monitors by then, read after the drain)."""
    ring, monitor, facts = [], [], []
    for ev in events:
        if ev.probe == "netlink":
            facts.append(ev)
        else:
            ring.append([ev])
            monitor.append(facts)
            facts = []
    ring.append([])
    monitor.append(facts)
    return ring, monitor


def run(w, iterations):
    for _ in range(iterations):
        w.step(0)


def test_netlink_facts_read_after_the_drain_explain_the_reset_of_that_drain(fixtures):
    events, facts = recorded(fixtures, "dhcp-renew")
    ring, monitor = live_batches(events)
    reset = next(i for i, b in enumerate(ring) if b and b[0].kind == RST_SENT
                 and b[0].netns == facts["netns"]["nat"])
    # the deletion is read in the very iteration that drained the router's reset
    moved = [ev for b in monitor[:reset + 1] for ev in b]
    monitor = [[] for _ in monitor[:reset]] + [moved] + monitor[reset + 1:]
    w, sink, _ = make_watch(ring, monitor)
    run(w, len(ring))
    verdicts = [r for r in sink.records if r["type"] == "verdict"]
    assert [v["cause"] for v in verdicts if v["netns"] == facts["netns"]["nat"]] == ["conntrack_flushed"]
    assert not [r for r in sink.records if r["type"] == "correction"]


def test_a_fact_read_after_its_reset_corrects_the_verdict(fixtures):
    events, facts = recorded(fixtures, "vip-move")
    ring, monitor = live_batches(events)
    srv_reset = next(i for i, b in enumerate(ring) if b and b[0].kind == RST_SENT
                     and b[0].netns == facts["netns"]["srv"])
    reset = ring[srv_reset][0]
    # the new entry the client's segment made is deleted by the server's RST on its way back:
    # the lookup found nothing, and its DESTROY is read one iteration after the reset
    new_entry = next(ev for b in monitor for ev in b
                     if ev.kind == CT_DESTROY and ev.entry.reply.dst.port == facts["new_port"])
    for b in monitor:
        if new_entry in b:
            b.remove(new_entry)
    late = dataclasses.replace(new_entry, ts_ns=reset.ts_ns + 2_000_000, not_before_ns=reset.ts_ns + 1_000_000)
    monitor[srv_reset + 1] = [late] + monitor[srv_reset + 1]
    reset.context.nat_elsewhere = []
    w, sink, _ = make_watch(ring, monitor)
    run(w, len(ring))
    first = next(r for r in sink.records if r["type"] == "verdict" and r["netns"] == facts["netns"]["srv"]
                 and r["direction"] == "sent")
    assert first["cause"] == "no_connection"
    corrections = [r for r in sink.records if r["type"] == "correction"]
    fixed = next(c for c in corrections if c["supersedes"] == first["id"])
    assert fixed["cause"] == "conntrack_flushed" and fixed["nat"]["outside_after"] == facts["new_outside"]
    # the server's reset counts at its corrected cause, beside the router's own conntrack_flushed
    summary = w.summary.to_dict()
    assert summary["by_cause"] == {"conntrack_flushed": 2, "peer_reset": 2} and summary["corrections"] == 1
    assert w.corrections == len(corrections)


def test_births_go_to_namespace_discovery_and_new_namespaces_get_monitors():
    born = KernelEvent(kind=NETNS_BORN, ts=1.0, ts_ns=1, netns=4026532999, ifindex=0, flow=None, pid=4242)
    w, sink, backend = make_watch([[born]], [[]])
    w.step(0)
    assert w.namespaces.born_seen == [(4026532999, 4242)]
    assert w.monitor.added == [4026532999] and backend.known == [4026532999]
    assert sink.records == []   # not an attribution event
