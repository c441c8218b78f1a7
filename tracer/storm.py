"""Storms of ordinary resets (a port scan, a SYN flood at a closed port, a crash-looping
client), per network namespace: when one namespace's come faster than STORM_ENTER_PER_S, the
kernel side stops sending that namespace's one by one and counts them instead (per namespace,
class and local port); every second the counts that rose become `aggregate` records, so
per-cause totals stay exact however many per-event verdicts are shed, the root-cause lane is
never held up, and every other namespace's resets are still explained one by one. A
namespace's storm ends when its rate stays below STORM_EXIT_PER_S for STORM_EXIT_S seconds.
Events the ordinary ring had no room for are counted the same way, storm or not."""
from __future__ import annotations

import time
from collections import Counter
from typing import Iterable

from .record import CLASS_CAUSES
from .schema import SCHEMA_VERSION, iso_time, status_record

AGGREGATE_INTERVAL_S = 1.0
STORM_ENTER_PER_S = 2000
STORM_EXIT_PER_S = 200
STORM_EXIT_S = 3


def aggregate_record(ts: float, host: str, interval: float, netns: int, netns_name: str, klass: int,
                     port: int, count: int, storm: bool) -> dict:
    return {"type": "aggregate", "schema_version": SCHEMA_VERSION, "ts": iso_time(ts), "ts_unix": ts,
            "host": host, "interval_s": round(interval, 3), "netns": netns, "netns_name": netns_name,
            "cause": CLASS_CAUSES.get(klass, f"class_{klass}"),
            "port": port, "count": count, "why": "storm" if storm else "ring_full"}


class Storm:
    def __init__(self, backend, host: str, netns_name):
        self.backend, self.host, self.netns_name = backend, host, netns_name
        self.storming: dict = {}        # netns -> since when it is quiet (None: still loud)
        self.shed: Counter = Counter()  # netns -> ordinary events shed (counted, not sent) in all
        self._seen: dict = {}           # (netns, class, port) -> count already reported
        self._per_event: Counter = Counter()   # netns -> ordinary events taken one by one since the last tick
        self._last = time.monotonic()

    @property
    def active(self) -> bool:
        return bool(self.storming)

    @property
    def shed_total(self) -> int:
        return sum(self.shed.values())

    def taken(self, netns: Iterable[int]) -> None:
        """Ordinary events came one by one, from these namespaces."""
        self._per_event.update(netns)

    def due(self, now: float) -> bool:
        return now - self._last >= AGGREGATE_INTERVAL_S

    def tick(self, now: float, final: bool = False) -> list:
        """Aggregates of what was shed since the last tick, and storm status changes (none
        when `final`: the last counts before detaching)."""
        interval, self._last = now - self._last, now
        wall = time.time()
        records, shed = [], Counter()
        for key, total in self.backend.shed_counts().items():
            delta = total - self._seen.get(key, 0)
            if delta <= 0:
                continue
            self._seen[key] = total
            netns, klass, port = key
            shed[netns] += delta
            records.append(aggregate_record(wall, self.host, interval, netns, self.netns_name(netns), klass,
                                            port, delta, netns in self.storming))
        self.shed.update(shed)
        rates = {ns: n / interval for ns, n in (self._per_event + shed).items()} if interval > 0 else {}
        self._per_event = Counter()
        if final:
            return records
        for netns in sorted(set(rates) | set(self.storming)):
            records += self._follow(netns, rates.get(netns, 0.0), now, wall)
        return records

    def _follow(self, netns: int, rate: float, now: float, wall: float) -> list:
        """One namespace's storm: begins above the enter rate, ends after a quiet spell."""
        where = {"netns": netns, "netns_name": self.netns_name(netns)}
        if netns not in self.storming:
            if rate < STORM_ENTER_PER_S:
                return []
            self.storming[netns] = None
            self.backend.shed_ordinary(netns, True)
            return [status_record(wall, self.host, "storm", **where, ordinary_per_s=round(rate),
                                  shedding="this namespace's ordinary resets and drops are counted in the kernel "
                                           "and reported as aggregate records every second")]
        if rate >= STORM_EXIT_PER_S:
            self.storming[netns] = None
        elif self.storming[netns] is None:
            self.storming[netns] = now
        elif now - self.storming[netns] >= STORM_EXIT_S:
            del self.storming[netns]
            self.backend.shed_ordinary(netns, False)
            return [status_record(wall, self.host, "storm_end", **where, shed_total=self.shed[netns])]
        return []
