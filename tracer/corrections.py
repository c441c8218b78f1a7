"""Following `correction` records (schema v1, README): a correction replaces the verdict or
earlier correction named by its `supersedes`, and the last record of such a chain is the
event's effective verdict. Consumers (the --netns/--port/--host filter, summary, metrics)
remember what they did with recent records to apply a correction to the record it replaces.
"""
from __future__ import annotations

from collections import OrderedDict

# The tracer emits a correction as soon as the late fact is read, usually milliseconds
# after the verdict, and never past 10 s (REVISE_WINDOW_S in tracer/attribution/engine.py).
# The last 16384 records (~3.5 MB per consumer) cover that window up to 1600 records a
# second; past that, a correction of a forgotten record counts as its event's first verdict.
RECENT_RECORDS = 16384


class Chains:
    """What a consumer made of each recent verdict and correction, by record id."""

    def __init__(self, limit: int = RECENT_RECORDS):
        self.limit = limit
        self._by_id: OrderedDict = OrderedDict()

    def superseded(self, record: dict):
        """For a correction, what was remembered for the record it supersedes (forgotten now:
        the correction takes its place); None for a verdict, or when that record was not
        seen (filtered out, or before this input began): the correction is then the first
        this consumer hears of its event."""
        if record.get("type") != "correction":
            return None
        return self._by_id.pop(record.get("supersedes"), None)

    def remember(self, record: dict, value) -> None:
        """What this consumer made of a verdict or correction (not None), for a later
        correction of it."""
        if record.get("id") is None:
            return
        self._by_id[record["id"]] = value
        if len(self._by_id) > self.limit:
            self._by_id.popitem(last=False)
