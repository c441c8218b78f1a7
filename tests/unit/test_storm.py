"""Storm handling without a kernel: the shed counts a backend reports become aggregate
records (deltas, exact), shedding starts above the threshold and ends after a quiet spell."""
from tracer import storm
from tracer.record import Class


class CountingBackend:
    def __init__(self):
        self.counts, self.shedding = {}, []

    def shed_counts(self):
        return dict(self.counts)

    def shed_ordinary(self, on):
        self.shedding.append(on)


def test_a_storm_is_shed_counted_exactly_and_ends():
    backend = CountingBackend()
    s = storm.Storm(backend, "h", lambda netns: f"ns{netns}")
    t = s._last
    s.taken(storm.STORM_ENTER_PER_S + 1)            # a second of per-event resets, past the threshold
    records = s.tick(t + 1.0)
    assert [r["state"] for r in records] == ["storm"] and backend.shedding == [True]
    totals = {}
    for second in range(2, 5):                      # the kernel counts, user space reports deltas
        backend.counts[(7, Class.NO_LISTENER, 9)] = 5000 * (second - 1)
        backend.counts[(7, Class.PEER_RESET, 9)] = 10 * (second - 1)
        for r in s.tick(t + second):
            assert r["type"] == "aggregate" and r["why"] == "storm" and r["netns_name"] == "ns7"
            totals[r["cause"]] = totals.get(r["cause"], 0) + r["count"]
    assert totals == {"no_listener": 15000, "peer_reset": 30} and s.shed_total == 15030
    # quiet: below the exit rate for STORM_EXIT_S seconds
    ends = []
    for second in range(5, 5 + storm.STORM_EXIT_S + 2):
        ends += [r for r in s.tick(t + second) if r["type"] == "status"]
    assert [r["state"] for r in ends] == ["storm_end"] and ends[0]["shed_total"] == 15030
    assert backend.shedding == [True, False] and not s.active


def test_events_the_ring_had_no_room_for_are_aggregated_outside_a_storm_too():
    backend = CountingBackend()
    s = storm.Storm(backend, "h", str)
    backend.counts[(7, Class.SOCKET_RESET, 443)] = 3
    (r,) = s.tick(s._last + 1.0)
    assert (r["cause"], r["port"], r["count"], r["why"]) == ("socket_reset", 443, 3, "ring_full")
    assert s.tick(s._last + 1.0) == [] and backend.shedding == []
