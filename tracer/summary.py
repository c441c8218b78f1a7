"""Counts of verdicts by cause and namespace, and by workload (pod, container, or the
process of the reset socket), over a run, with losses: what `summary` prints and what
`watch` reports when it detaches."""
from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict

from .corrections import Chains
from .workloads import describe


class InputError(Exception):
    """An input of `summary` that cannot be read (further); one line for the operator."""


class Summary:
    """Each event counted once, at its effective verdict: a correction moves its event from
    the superseded cause to its own (in the namespace it was counted in), and is counted
    itself, by (from, to)."""

    def __init__(self):
        self.by_cause_netns: dict = defaultdict(Counter)
        self.by_direction: Counter = Counter()
        # 'pod ns/name' | 'container name' | 'process comm' -> cause -> n
        self.by_workload: dict = defaultdict(Counter)
        self.lost: Counter = Counter()
        self.verdicts = 0
        self.corrections: Counter = Counter()    # (superseded cause, cause) -> n
        self._counted = Chains()                 # record id -> (cause, namespace) it is counted as

    def add(self, record: dict) -> None:
        kind = record.get("type")
        if kind in ("verdict", "correction"):
            cause, direction = sys.intern(record["cause"]), record["direction"]   # all before counting
            was = record["superseded_cause"] if kind == "correction" else None
            ns = sys.intern(record.get("netns_name") or str(record.get("netns")))
            # each workload an endpoint names, and the socket's process (by name: pids come
            # and go), once per verdict
            named = {describe(w) for w in (record.get("workloads") or {}).values()}
            if record.get("socket_owner"):
                named.add(f"process {record['socket_owner']['comm']}")
            workloads = tuple(sorted(named - {""}))
            before = self._counted.superseded(record)
            self._counted.remember(record, (cause, ns, workloads))
            if before is not None:
                self._uncount(*before)
            else:     # a verdict, or the correction of one this input does not hold
                self.verdicts += 1
                self.by_direction[direction] += 1
            self.by_cause_netns[cause][ns] += 1
            for w in workloads:
                self.by_workload[w][cause] += 1
            if kind == "correction":
                self.corrections[was, cause] += 1
        elif kind == "loss":
            self.lost[record["source"]] += int(record["lost"])

    def _uncount(self, cause: str, ns: str, workloads: tuple) -> None:
        _decrement(self.by_cause_netns, cause, ns)
        for w in workloads:
            _decrement(self.by_workload, w, cause)

    def add_input(self, path: str) -> None:
        """Counts every good record of one input (see read_records); raises InputError at
        the first one that cannot be counted, the records before it counted."""
        for where, record in read_records(path):
            try:
                self.add(record)
            except (KeyError, TypeError, AttributeError) as e:
                raise InputError(f"{where}: malformed {record.get('type')} record "
                                 f"({e.__class__.__name__}: {e})") from None

    def to_dict(self) -> dict:
        by_from: dict = defaultdict(dict)
        for (was, cause), n in sorted(self.corrections.items()):
            by_from[was][cause] = n
        return {"verdicts": self.verdicts,
                "by_cause": {c: sum(n.values()) for c, n in sorted(self.by_cause_netns.items())},
                "by_cause_netns": {c: dict(sorted(n.items())) for c, n in sorted(self.by_cause_netns.items())},
                "by_direction": dict(sorted(self.by_direction.items())),
                "by_workload": {w: dict(sorted(n.items())) for w, n in sorted(self.by_workload.items())},
                "corrections": sum(self.corrections.values()),
                "corrections_by_cause": dict(by_from),
                "lost": dict(self.lost)}

    def format(self) -> str:
        corrected = sum(self.corrections.values())
        lines = [f"{self.verdicts} verdicts" + (f" ({corrected} corrections applied)" if corrected else "")]
        for cause, per_ns in sorted(self.by_cause_netns.items(), key=lambda kv: -sum(kv[1].values())):
            lines.append(f"  {cause:28} {sum(per_ns.values()):7}")
            for ns, n in per_ns.most_common():
                lines.append(f"      {ns:40} {n:7}")
        if self.by_workload:
            lines.append("by workload:")
            for w, causes in sorted(self.by_workload.items(), key=lambda kv: -sum(kv[1].values())):
                lines.append(f"  {w:40} {sum(causes.values()):7}  " +
                             ", ".join(f"{c} {n}" for c, n in causes.most_common()))
        if corrected:
            lines.append("corrections: " + ", ".join(f"{was} -> {cause} {n}" for (was, cause), n
                                                     in self.corrections.most_common()))
        if self.lost:
            lines.append("lost events: " + ", ".join(f"{s} {n}" for s, n in self.lost.items()))
        return "\n".join(lines)


def _decrement(table: dict, key: str, sub: str) -> None:
    counts = table[key]
    counts[sub] -= 1
    if counts[sub] <= 0:
        del counts[sub]
    if not counts:
        del table[key]


def read_records(path: str):
    """(where, record) of one input of `summary`: JSON lines from `watch --json` (a file, or
    "-" for stdin; where = "path:line") or a recording from `watch --record` (replayed;
    where = path). Raises InputError where the input cannot be read, after yielding every
    good record before that point."""
    from .recording import FORMAT, RecordingError
    from .replay import replay_verdicts

    try:
        stream = sys.stdin.buffer if path == "-" else open(path, "rb")
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None
    name, n = "stdin" if path == "-" else path, 0
    try:
        if FORMAT.encode() in stream.peek(64)[:64]:
            if path == "-":
                raise InputError("a recording cannot be read from stdin: name the file")
            try:
                for record in replay_verdicts(path):
                    yield path, record
            except RecordingError as e:
                raise InputError(str(e)) from None
            return
        for n, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:   # UnicodeDecodeError included
                raise InputError(f"{name}:{n}: not JSON ({e.__class__.__name__})") from None
            if not isinstance(record, dict) or "type" not in record or "schema_version" not in record:
                raise InputError(f"{name}:{n}: not a rst-tracer record (no type and schema_version)")
            yield f"{name}:{n}", record
    except OSError as e:    # a directory opens, and fails on the first read; so does a bad disk
        raise InputError(f"cannot read {name}{f' after line {n}' if n else ''}: {e.strerror}") from None
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
