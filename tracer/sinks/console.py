"""Terminal output: one human line per verdict (or correction) on a TTY, JSON lines otherwise."""
from __future__ import annotations

import json
import sys

from ..events import format_endpoint
from ..workloads import describe


class Sink:
    def emit(self, record: dict) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Called after each batch of events: one write syscall per batch, not per line."""

    def close(self) -> None:
        self.flush()


def _tuple(t: dict) -> str:
    return f"{format_endpoint(t['src'], t['sport'])} > {format_endpoint(t['dst'], t['dport'])}"


def format_human(record: dict, verbose: bool = False) -> str:
    kind = record.get("type")
    if kind == "loss":
        return f"{record['ts'][11:23]} LOST {record['lost']} events ({record['source']}; {record['lost_total']} in total)"
    if kind == "status":
        extra = " ".join(f"{k}={v}" for k, v in record.items()
                         if k not in ("type", "schema_version", "ts", "ts_unix", "host", "state"))
        return f"{record['ts'][11:23]} {record['state'].upper()} {extra}"
    roles = record.get("workloads") or {}
    where = describe(roles.get("local")) or record.get("netns_name") or str(record.get("netns"))
    if record.get("interface"):
        where += f"/{record['interface']}"
    owner = record.get("socket_owner")
    if owner:
        where += f" {owner['comm']}[{owner['pid']}]"
    line = record["ts"][11:23]
    if kind == "correction":   # same event time as the line it replaces
        line += f" correction of {record['supersedes']} (was {record['superseded_cause']}):"
    line += (f" {record['cause']} [{record['confidence']}] {record['direction']} "
             f"{where} {_tuple(record['flow']) if record.get('flow') else '-'}")
    nat = record.get("nat")
    if nat:
        client = roles.get("client")   # named here unless it is where the line already is
        who = describe(client) if client and client["netns"] != (roles.get("local") or {}).get("netns") else ""
        line += f" (inside {_tuple(nat['inside'])}{f' from {who}' if who else ''}, NATed {_tuple(nat['outside'])})"
    line += f" — {record['summary']}"
    remedy = record.get("remedy") or {}
    if remedy.get("commands"):
        line += f" — fix: {remedy['commands'][0]}"
    if verbose:
        if kind == "correction":
            line += f"\n    correction: {record['correction']}"
        for ev in record.get("evidence", []):
            line += f"\n    · {ev['text']}"
        if remedy.get("text"):
            line += f"\n    remedy: {remedy['text']}"
        for cmd in remedy.get("commands", [])[1:]:
            line += f"\n      {cmd}"
    return line


class JsonLinesSink(Sink):
    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def emit(self, record: dict) -> None:
        self.stream.write(json.dumps(record, separators=(",", ":"), default=str) + "\n")

    def flush(self) -> None:
        self.stream.flush()


class HumanSink(Sink):
    def __init__(self, stream=None, verbose: bool = False):
        self.stream = stream or sys.stdout
        self.verbose = verbose

    def emit(self, record: dict) -> None:
        self.stream.write(format_human(record, self.verbose) + "\n")

    def flush(self) -> None:
        self.stream.flush()
