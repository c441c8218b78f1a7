"""Runs the rules over events and keeps the state that links later resets to the
deletion or root cause that hit their flow first."""
from __future__ import annotations

import itertools
import socket
import time
from typing import Optional

from ..events import (CT_DESTROY, CT_INVALID, NAT_BINDING, RST_RECEIVED, RST_SENT, TRIGGER_KINDS,
                      KernelEvent, flag_names)
from ..schema import Verdict
from .rules import RULES, Finding
from .state import AttributionState

DIRECTIONS = {RST_SENT: "sent", RST_RECEIVED: "received"}


class Attributor:
    def __init__(self, backend: str, host: Optional[str] = None, rules=RULES,
                 id_prefix: Optional[str] = None):
        self.backend = backend
        self.host = host or socket.gethostname()
        self.rules = rules
        self.state = AttributionState()
        self.id_prefix = id_prefix or f"{self.host}-{int(time.time()):x}"
        self._ids = (f"{self.id_prefix}-{n}" for n in itertools.count(1))

    def feed(self, ev: KernelEvent) -> Optional[Verdict]:
        """One verdict per reset or drop; None for context events (deletions, address and
        device changes), which only inform later verdicts."""
        self.state.now = ev.ts
        if ev.kind == CT_DESTROY:
            self.state.add_deletion(ev)
            return None
        if ev.kind in TRIGGER_KINDS:
            self.state.add_trigger(ev)
            return None
        if ev.kind == CT_INVALID:
            self.state.add_invalid(ev)
            return None
        if ev.kind == NAT_BINDING:
            self.state.add_binding(ev)
            return None
        rule, finding = next((r, f) for r, f in ((r, r.explain(ev, self.state)) for r in self.rules)
                             if f is not None)
        verdict = self._verdict(ev, finding)
        if rule.root_cause and finding.keys:
            self.state.remember(finding.keys, {"id": verdict.id, "cause": verdict.cause}, ev.ts)
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
