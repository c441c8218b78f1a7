"""Following `correction` records (schema v1, README): a correction replaces the verdict or
earlier correction named by its `supersedes`, and the last record of such a chain is the
event's effective verdict. Consumers (the --netns/--port/--host filter, summary, metrics)
remember what they did with recent records to apply a correction to the record it replaces.
"""
from __future__ import annotations

from collections import OrderedDict

# The tracer corrects a verdict within seconds (REVISE_WINDOW_S in tracer/attribution/
# engine.py) of its event; this many records back is far more than that at any rate the
# tracer keeps up with, and bounds the memory of a long run.
RECENT_RECORDS = 65536


class Chains:
    """What a consumer made of each recent verdict and correction, by record id."""

    def __init__(self, limit: int = RECENT_RECORDS):
        self.limit = limit
        self._by_id: OrderedDict = OrderedDict()

    def follow(self, record: dict, value):
        """Remembers `value` (not None) for this verdict or correction. For a correction,
        returns the value remembered for the record it supersedes, which it replaces; None
        when that record was not seen (filtered out, or before this input began): the
        correction is then the first this consumer hears of the event."""
        before = self._by_id.pop(record.get("supersedes"), None) if record.get("type") == "correction" else None
        if record.get("id") is not None:
            self._by_id[record["id"]] = value
            if len(self._by_id) > self.limit:
                self._by_id.popitem(last=False)
        return before
