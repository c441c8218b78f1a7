"""Storm handling without a kernel: the shed counts a backend reports become aggregate
records (deltas, exact), shedding starts above the threshold and ends after a quiet spell,
in the storming namespace only."""
from tracer import storm
from tracer.record import Class


class CountingBackend:
    def __init__(self):
        self.counts, self.shedding = {}, []

    def shed_counts(self):
        return dict(self.counts)

    def shed_ordinary(self, netns, on):
        self.shedding.append((netns, on))


def test_a_storm_is_shed_counted_exactly_and_ends():
    backend = CountingBackend()
    s = storm.Storm(backend, "h", lambda netns: f"ns{netns}")
    t = s._last
    s.taken([7] * (storm.STORM_ENTER_PER_S + 1))    # a second of per-event resets, past the threshold
    s.taken([8] * 100)                              # another namespace, quiet
    records = s.tick(t + 1.0)
    assert [(r["state"], r["netns"], r["netns_name"]) for r in records] == [("storm", 7, "ns7")]
    assert backend.shedding == [(7, True)]
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
    assert [(r["state"], r["netns"]) for r in ends] == [("storm_end", 7)] and ends[0]["shed_total"] == 15030
    assert backend.shedding == [(7, True), (7, False)] and not s.active


def test_events_the_ring_had_no_room_for_are_aggregated_outside_a_storm_too():
    backend = CountingBackend()
    s = storm.Storm(backend, "h", str)
    backend.counts[(7, Class.SOCKET_RESET, 443)] = 3
    (r,) = s.tick(s._last + 1.0)
    assert (r["cause"], r["port"], r["count"], r["why"]) == ("socket_reset", 443, 3, "ring_full")
    assert s.tick(s._last + 1.0) == [] and backend.shedding == []


def test_a_storm_in_one_namespace_leaves_the_others_alone():
    """A port scan of one namespace; another's own resets stay per-event, and each
    namespace's storm begins and ends on its own rate."""
    backend = CountingBackend()
    s = storm.Storm(backend, "h", str)
    t = s._last
    backend.counts[(7, Class.NO_LISTENER, 22)] = 50000
    s.taken([8] * (storm.STORM_EXIT_PER_S + 1))
    records = s.tick(t + 1.0)
    assert [(r["state"], r["netns"]) for r in records if r["type"] == "status"] == [("storm", 7)]
    assert backend.shedding == [(7, True)]
    # 8 stays between the rates: never a storm, and 7's storm does not keep 8 shed
    for second in range(2, 6):
        s.taken([8] * (storm.STORM_ENTER_PER_S - 1))
        backend.counts[(7, Class.NO_LISTENER, 22)] += 50000
        assert [r for r in s.tick(t + second) if r["type"] == "status"] == []
    assert backend.shedding == [(7, True)] and set(s.storming) == {7}
