"""One finding of `rst-tracer doctor`: what was checked, what was seen, how to fix it."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

RISK, INFO, OK = "risk", "info", "ok"
SEVERITIES = (RISK, INFO, OK)


@dataclass
class Finding:
    id: str                    # stable, dotted: "nat.random_fully"
    incident: Optional[int]    # 1..4 of docs/incidents.md, None for related causes
    severity: str              # risk | info | ok
    title: str
    detail: str                # what was observed, with the values
    fix: str = ""              # a command or a config an operator can paste ("" when none)

    def __post_init__(self):
        if self.severity not in SEVERITIES:
            raise ValueError(f"bad severity {self.severity!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def exposed_incidents(findings) -> list:
    return sorted({f.incident for f in findings if f.severity == RISK and f.incident is not None})
