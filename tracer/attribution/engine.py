"""Runs the rules over events and keeps the little memory that links later resets on a
flow to the root cause that hit it first."""
from __future__ import annotations

import itertools
import socket
import time
from collections import OrderedDict
from typing import Optional

from ..events import RST_RECEIVED, RST_SENT, KernelEvent, flag_names
from ..schema import Verdict
from .rules import RULES, Finding

DIRECTIONS = {RST_SENT: "sent", RST_RECEIVED: "received"}


class FlowMemory:
    """Recent root-cause verdicts by the endpoint pairs they concern, bounded in size and age."""

    def __init__(self, ttl: float = 600.0, max_entries: int = 65536):
        self.ttl, self.max_entries = ttl, max_entries
        self._items: OrderedDict = OrderedDict()

    def remember(self, keys: list, record: dict, now: float) -> None:
        for key in keys:
            self._items[key] = (now, record)
            self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def recall(self, key, now: float) -> Optional[dict]:
        hit = self._items.get(key)
        if not hit or now - hit[0] > self.ttl:
            return None
        return dict(hit[1], age_s=round(now - hit[0], 6))

    def __len__(self) -> int:
        return len(self._items)


class Attributor:
    def __init__(self, backend: str, host: Optional[str] = None, rules=RULES,
                 id_prefix: Optional[str] = None):
        self.backend = backend
        self.host = host or socket.gethostname()
        self.rules = rules
        self.memory = FlowMemory()
        self.id_prefix = id_prefix or f"{self.host}-{int(time.time()):x}"
        self._ids = (f"{self.id_prefix}-{n}" for n in itertools.count(1))

    def feed(self, ev: KernelEvent) -> Verdict:
        related = self.memory.recall(ev.flow.endpoints(), ev.ts) if ev.flow else None
        finding = next(f for f in (r.explain(ev, related) for r in self.rules) if f is not None)
        verdict = self._verdict(ev, finding)
        rule = next(r for r in self.rules if r.cause == finding.cause)
        if rule.root_cause and finding.keys:
            self.memory.remember(finding.keys, {"id": verdict.id, "cause": verdict.cause}, ev.ts)
        return verdict

    def _verdict(self, ev: KernelEvent, f: Finding) -> Verdict:
        kernel = {"probe": ev.probe, "reason": ev.reason or None, "reason_code": ev.reason_code,
                  "location": ev.location or None, "has_ct": ev.has_ct,
                  "ct_status": ev.ct_status, "socket": ev.has_sock, "sk_state": ev.sk_state or None}
        return Verdict(
            id=next(self._ids), ts=ev.ts, host=self.host, netns=ev.netns,
            netns_name=ev.context.netns_name, interface=ev.context.ifname,
            direction=DIRECTIONS.get(ev.kind, "dropped"),
            flow=dict(proto="tcp", family=ev.family, **ev.flow.to_dict()) if ev.flow else None,
            packet={"flags": flag_names(ev.tcp_flags), "seq": ev.seq, "ack": ev.ack,
                    "len": ev.payload_len} if ev.has_skb else {},
            nat=f.nat, cause=f.cause, summary=f.summary, confidence=f.confidence,
            evidence=f.evidence, remedy=f.remedy, backend=self.backend, kernel=kernel,
            related=({"id": f.related["id"], "cause": f.related["cause"]} if f.related else None),
            process={"pid": ev.pid, "comm": ev.comm} if ev.pid else None,
        )
