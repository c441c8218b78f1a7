"""What the attribution remembers is bounded by bytes (tracer/attribution/state.py
BUDGET_BYTES / ENTRY_BYTES): each kind of entry must retain no more than its figure, or the
budgets would not hold. Measured with tracemalloc over thousands of realistic entries."""
import gc
import tracemalloc

from tracer.attribution.engine import REVISE_MAX, Attributor
from tracer.attribution.state import ENTRY_BYTES, AttributionState
from tracer.events import (CT_DESTROY, CT_INVALID, NAT_BINDING, RST_SENT, ConntrackEntry, Context, Endpoint,
                           KernelEvent, Tuple)

N = 3000
SYSCTLS = {"nf_conntrack_tcp_timeout_established": 432000, "nf_conntrack_max": 262144}


def entry(i):
    inside = Endpoint(f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", 40000 + i % 20000)
    server = Endpoint("10.200.2.2", 8080)
    return ConntrackEntry(Tuple(inside, server), Tuple(server, Endpoint("10.200.2.1", 20000 + i % 40000)),
                          414, "ESTABLISHED", 431000)


def event(kind, i, **kw):
    return KernelEvent(kind=kind, ts=1.0, ts_ns=10**9 + i * 10**4, netns=4026532000, ifindex=3, probe="netlink",
                       context=Context(netns_name="rstlab-abc123-nat", ifname="n2", sysctls=SYSCTLS), **kw)


def retained_per_item(feed, make, n=N) -> float:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for i in range(n):
        feed(make(i))
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    return sum(d.size_diff for d in after.compare_to(before, "filename")) / n


def test_a_deletion_a_binding_an_invalid_verdict_and_a_remembered_root_cause_fit_their_figures():
    st = AttributionState()
    assert retained_per_item(st.add_deletion, lambda i: event(CT_DESTROY, i, flow=None, entry=entry(i))) \
        <= ENTRY_BYTES["deletion"]
    st = AttributionState()
    assert retained_per_item(st.add_binding, lambda i: event(NAT_BINDING, i, flow=None, entry=entry(i))) \
        <= ENTRY_BYTES["binding"]
    st = AttributionState()
    assert retained_per_item(st.add_invalid, lambda i: event(
        CT_INVALID, i, flow=entry(i).reply, has_skb=True, skb_ct=entry(i),
        invalid_reason="SEQ is over upper bound 1453621076 (over the window of the receiver)",
        ct_window={d: {"td_end": 1, "td_maxend": 2, "td_maxwin": 3, "td_scale": 7} for d in ("orig", "reply")})) \
        <= ENTRY_BYTES["invalid"]
    st = AttributionState()
    assert retained_per_item(lambda e: st.remember([e.orig.endpoints(), e.reply.endpoints()],
                                                   {"id": f"host-65a1b2c3-{e.timeout}", "cause": "conntrack_flushed"},
                                                   1.0), entry) <= 2 * ENTRY_BYTES["verdict"]


def test_a_verdict_kept_open_to_correction_fits_its_figure():
    a = Attributor("tracepoint", "h")
    reset = lambda i: event(RST_SENT, i, flow=entry(i).reply.reversed(), has_skb=True, tcp_flags=0x10)  # noqa: E731
    assert retained_per_item(a.feed, reset, n=REVISE_MAX) <= ENTRY_BYTES["judged"]
    assert len(a._recent) == REVISE_MAX
