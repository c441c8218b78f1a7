"""Counts of verdicts by cause and namespace over a run, with losses: what `summary`
prints and what `watch` reports when it detaches."""
from __future__ import annotations

from collections import Counter, defaultdict


class Summary:
    def __init__(self):
        self.by_cause_netns: dict = defaultdict(Counter)
        self.by_direction: Counter = Counter()
        self.lost: Counter = Counter()
        self.verdicts = 0

    def add(self, record: dict) -> None:
        kind = record.get("type")
        if kind == "verdict":
            self.verdicts += 1
            ns = record.get("netns_name") or str(record.get("netns"))
            self.by_cause_netns[record["cause"]][ns] += 1
            self.by_direction[record["direction"]] += 1
        elif kind == "loss":
            self.lost[record["source"]] += record["lost"]

    def to_dict(self) -> dict:
        return {"verdicts": self.verdicts,
                "by_cause": {c: sum(n.values()) for c, n in sorted(self.by_cause_netns.items())},
                "by_cause_netns": {c: dict(sorted(n.items())) for c, n in sorted(self.by_cause_netns.items())},
                "by_direction": dict(sorted(self.by_direction.items())),
                "lost": dict(self.lost)}

    def format(self) -> str:
        lines = [f"{self.verdicts} verdicts"]
        for cause, per_ns in sorted(self.by_cause_netns.items(), key=lambda kv: -sum(kv[1].values())):
            lines.append(f"  {cause:28} {sum(per_ns.values()):7}")
            for ns, n in per_ns.most_common():
                lines.append(f"      {ns:40} {n:7}")
        if self.lost:
            lines.append("lost events: " + ", ".join(f"{s} {n}" for s, n in self.lost.items()))
        return "\n".join(lines)
