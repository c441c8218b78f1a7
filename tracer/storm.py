"""Storms of ordinary resets (a port scan, a SYN flood at a closed port, a crash-looping
client): when they come faster than STORM_ENTER_PER_S, the kernel side stops sending them one
by one and counts them instead (per namespace, class and local port); every second the counts
that rose become `aggregate` records, so per-cause totals stay exact however many per-event
verdicts are shed, and the root-cause lane is never held up. The storm ends when the shed
rate stays below STORM_EXIT_PER_S for STORM_EXIT_S seconds. Events the ordinary ring had no
room for are counted the same way, storm or not."""
from __future__ import annotations

import time

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
        self.active = False
        self.shed_total = 0
        self._seen: dict = {}          # (netns, class, port) -> count already reported
        self._per_event = 0            # ordinary events taken one by one since the last tick
        self._last = time.monotonic()
        self._quiet_since = None

    def taken(self, n: int) -> None:
        """n ordinary events came one by one."""
        self._per_event += n

    def due(self, now: float) -> bool:
        return now - self._last >= AGGREGATE_INTERVAL_S

    def tick(self, now: float, final: bool = False) -> list:
        """Aggregates of what was shed since the last tick, and storm status changes (none
        when `final`: the last counts before detaching)."""
        interval, self._last = now - self._last, now
        counts = self.backend.shed_counts()
        wall = time.time()
        records, shed = [], 0
        for key, total in counts.items():
            delta = total - self._seen.get(key, 0)
            if delta <= 0:
                continue
            self._seen[key] = total
            shed += delta
            netns, klass, port = key
            records.append(aggregate_record(wall, self.host, interval, netns, self.netns_name(netns), klass,
                                            port, delta, self.active))
        self.shed_total += shed
        rate = (self._per_event + shed) / interval if interval > 0 else 0.0
        self._per_event = 0
        if final:
            return records
        if not self.active and rate >= STORM_ENTER_PER_S:
            self.active = True
            self._quiet_since = None
            self.backend.shed_ordinary(True)
            records.append(status_record(wall, self.host, "storm", ordinary_per_s=round(rate),
                                         shedding="ordinary resets and drops are counted in the kernel and "
                                                  "reported as aggregate records every second"))
        elif self.active:
            if rate >= STORM_EXIT_PER_S:
                self._quiet_since = None
            elif self._quiet_since is None:
                self._quiet_since = now
            elif now - self._quiet_since >= STORM_EXIT_S:
                self.active = False
                self.backend.shed_ordinary(False)
                records.append(status_record(wall, self.host, "storm_end", shed_total=self.shed_total))
        return records
