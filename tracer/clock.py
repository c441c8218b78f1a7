"""One clock for correlating events: CLOCK_MONOTONIC in nanoseconds, the clock of
bpf_ktime_get_ns() and of time.monotonic_ns(). Wall time is for display only, mapped once
so that every event of a run shifts by the same offset (a wall clock step in the middle of
a run must not reorder kernel events against netlink ones)."""
from __future__ import annotations

import time


class Clock:
    def __init__(self, offset: float = None):
        self.offset = time.time() - time.monotonic() if offset is None else offset

    @staticmethod
    def now_ns() -> int:
        return time.monotonic_ns()

    def wall(self, mono_ns: int) -> float:
        return mono_ns / 1e9 + self.offset
