"""The verdict event schema (v1): the contract with every consumer of our output.

Field names are stable within a major version; additions are backward compatible and
bump nothing, renames or removals bump SCHEMA_VERSION. Documented in README.md.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Optional

SCHEMA_VERSION = 1
RECORD_TYPES = ("verdict", "correction", "loss", "status")
DIRECTIONS = ("sent", "received", "dropped")
CONFIDENCES = ("high", "medium", "low")


class SchemaError(ValueError):
    pass


def iso_time(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class Evidence:
    key: str              # stable machine name, e.g. "segment_conntrack"
    text: str             # one sentence for humans
    value: object = None  # the observed value(s)


@dataclass
class Remedy:
    text: str
    commands: list = field(default_factory=list)


@dataclass
class Verdict:
    id: str
    ts: float
    host: str
    netns: int
    netns_name: str
    interface: str
    direction: str
    flow: Optional[dict]
    packet: dict
    nat: Optional[dict]
    cause: str
    summary: str
    confidence: str
    evidence: list
    remedy: Remedy
    backend: str
    kernel: dict
    related: Optional[dict] = None
    process: Optional[dict] = None
    # the process of the event's socket: {pid, comm, how} (tracer/owners.py, bpf/common.h)
    socket_owner: Optional[dict] = None
    # containers and pods of the verdict's endpoints: {role: {netns, netns_name, containers, pod[, addr]}}
    workloads: Optional[dict] = None
    # a correction: the record this one replaces, its cause, and the late fact that changed it
    supersedes: Optional[str] = None
    superseded_cause: Optional[str] = None
    correction: Optional[str] = None

    def to_dict(self) -> dict:
        # built by hand: dataclasses.asdict deep-copies every value and dominated the cost
        # of a verdict in RST storms; values here are plain data already
        d = {"type": "verdict", "schema_version": SCHEMA_VERSION, "id": self.id,
                "ts": iso_time(self.ts), "host": self.host, "netns": self.netns,
                "netns_name": self.netns_name, "interface": self.interface,
                "direction": self.direction, "flow": self.flow, "packet": self.packet,
                "nat": self.nat, "cause": self.cause, "summary": self.summary,
                "confidence": self.confidence,
                "evidence": [{"key": e.key, "text": e.text, "value": e.value} for e in self.evidence],
                "remedy": {"text": self.remedy.text, "commands": list(self.remedy.commands)},
                "backend": self.backend, "kernel": self.kernel, "related": self.related,
                "process": self.process, "socket_owner": self.socket_owner, "workloads": self.workloads,
                "ts_unix": self.ts}
        if self.supersedes:
            d.update(type="correction", supersedes=self.supersedes, superseded_cause=self.superseded_cause,
                     correction=self.correction)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Verdict":
        if d.get("type") not in ("verdict", "correction"):
            raise SchemaError(f"not a verdict record: type={d.get('type')!r}")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise SchemaError(f"unsupported schema_version {d.get('schema_version')!r}")
        d = dict(d)
        d.pop("type")
        d.pop("schema_version")
        d.pop("ts")
        d["ts"] = d.pop("ts_unix")
        if d.get("direction") not in DIRECTIONS:
            raise SchemaError(f"bad direction {d.get('direction')!r}")
        if d.get("confidence") not in CONFIDENCES:
            raise SchemaError(f"bad confidence {d.get('confidence')!r}")
        try:
            d["evidence"] = [Evidence(**e) for e in d["evidence"]]
            d["remedy"] = Remedy(**d["remedy"])
            return cls(**d)
        except TypeError as e:
            raise SchemaError(f"malformed verdict: {e}") from None


def loss_record(ts: float, host: str, source: str, lost: int, total: int) -> dict:
    """In-band report that events were lost (never silently)."""
    return {"type": "loss", "schema_version": SCHEMA_VERSION, "ts": iso_time(ts), "ts_unix": ts,
            "host": host, "source": source, "lost": lost, "lost_total": total}


def status_record(ts: float, host: str, state: str, **details) -> dict:
    return {"type": "status", "schema_version": SCHEMA_VERSION, "ts": iso_time(ts), "ts_unix": ts,
            "host": host, "state": state, **details}
