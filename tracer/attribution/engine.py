"""Runs the rules over events and keeps the state that links later resets to the
deletion or root cause that hit their flow first.

A late fact corrects the record: a conntrack deletion or an address/device event that
arrives after the reset it explains (the entry a re-NATed segment created is deleted by
the very RST it drew; a lookup can lose that race) re-runs the rules on the recent verdicts
it concerns, and each one that is now better explained is reissued as a `correction` that
supersedes it. Corrections only ever add an explanation: a root cause where there was
none, a flush trigger, the related root cause of a later reset."""
from __future__ import annotations

import itertools
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Optional

from ..events import (ADDR_REMOVED, CT_DESTROY, CT_INVALID, LINK_DOWN, NAT_BINDING, RST_RECEIVED,
                      RST_SENT, TRIGGER_KINDS, KernelEvent, flag_names)
from ..schema import Verdict
from .rules import RULES, Finding
from .state import BUDGET_BYTES, ENTRY_BYTES, AttributionState

DIRECTIONS = {RST_SENT: "sent", RST_RECEIVED: "received"}
ROOT_CAUSES = frozenset(r.cause for r in RULES if r.root_cause)
# how long a verdict stays open to correction, and how many are kept (bounded in bytes)
REVISE_WINDOW_S = 10.0
REVISE_MAX = BUDGET_BYTES["judged"] // ENTRY_BYTES["judged"]


@dataclass
class _Judged:
    """A verdict a later fact may still improve."""
    ev: KernelEvent
    id: str
    cause: str
    related: Optional[str]
    evidence: frozenset


class Attributor:
    def __init__(self, backend: str, host: Optional[str] = None, rules=RULES,
                 id_prefix: Optional[str] = None):
        self.backend = backend
        self.host = host or socket.gethostname()
        self.rules = rules
        self.state = AttributionState()
        self.id_prefix = id_prefix or f"{self.host}-{int(time.time()):x}"
        self._ids = (f"{self.id_prefix}-{n}" for n in itertools.count(1))
        self._recent: deque = deque()
        self._by_endpoint: dict = {}      # Endpoint -> [_Judged] (flow source and destination)

    def feed(self, ev: KernelEvent) -> list:
        """The verdict of a reset or drop; for context events (deletions, address and device
        changes, INVALID reasons, bindings) none, but the corrections they bring, if any."""
        self.state.now = ev.mono
        self.state.workloads.learn(ev.context, ev.mono)
        if ev.kind == CT_DESTROY:
            gone = self.state.add_deletion(ev)
            return self._revise(self._near({gone.entry.reply.src, gone.entry.orig.dst}), ev)
        if ev.kind in TRIGGER_KINDS:
            self.state.add_trigger(ev)
            if ev.kind in (ADDR_REMOVED, LINK_DOWN):
                return self._revise([j for j in self._open(ev.mono) if j.cause in ROOT_CAUSES], ev)
            return []
        if ev.kind == CT_INVALID:
            self.state.add_invalid(ev)
            return []
        if ev.kind == NAT_BINDING:
            self.state.add_binding(ev)
            return []
        rule, finding = self._explain(ev)
        verdict = self._verdict(ev, finding)
        if rule.root_cause and finding.keys:
            self.state.remember(finding.keys, {"id": verdict.id, "cause": verdict.cause}, ev.mono)
        if ev.is_unknown_segment or ev.kind == RST_RECEIVED:
            self._keep(_Judged(ev, verdict.id, verdict.cause, _related_id(finding), _keys(finding)))
        return [verdict]

    def _explain(self, ev: KernelEvent):
        return next((r, f) for r, f in ((r, r.explain(ev, self.state)) for r in self.rules) if f is not None)

    # -- corrections -------------------------------------------------------------------
    def _keep(self, judged: _Judged) -> None:
        self._recent.append(judged)
        for ep in _endpoints(judged.ev):
            self._by_endpoint.setdefault(ep, []).append(judged)
        while len(self._recent) > REVISE_MAX or \
                (self._recent and judged.ev.mono - self._recent[0].ev.mono > REVISE_WINDOW_S):
            old = self._recent.popleft()
            for ep in _endpoints(old.ev):
                bucket = self._by_endpoint.get(ep)
                if bucket:
                    bucket.remove(old)
                    if not bucket:
                        del self._by_endpoint[ep]

    def _open(self, now: float) -> list:
        return [j for j in self._recent if now - j.ev.mono <= REVISE_WINDOW_S]

    def _near(self, endpoints: set) -> list:
        """Open verdicts whose flow has one of these endpoints, in event order."""
        if not self._recent:
            return []
        hits = {id(j): j for ep in endpoints for j in self._by_endpoint.get(ep, ())}
        now = self.state.now
        return sorted((j for j in hits.values() if now - j.ev.mono <= REVISE_WINDOW_S),
                      key=lambda j: j.ev.mono)

    def _revise(self, candidates: list, fact: KernelEvent) -> list:
        if not candidates:
            return []
        now, out = self.state.now, []
        for j in candidates:
            self.state.now = j.ev.mono      # rules judge the event at its own time
            rule, f = self._explain(j.ev)
            self.state.now = now
            if not _better(f, j):
                continue
            verdict = self._verdict(j.ev, f, supersedes=j, fact=fact)
            if rule.root_cause and f.keys:
                self.state.remember(f.keys, {"id": verdict.id, "cause": verdict.cause}, j.ev.mono)
            j.id, j.cause, j.related, j.evidence = verdict.id, f.cause, _related_id(f), _keys(f)
            out.append(verdict)
        return out

    def _verdict(self, ev: KernelEvent, f: Finding, supersedes: Optional[_Judged] = None,
                 fact: Optional[KernelEvent] = None) -> Verdict:
        kernel = {"probe": ev.probe, "reason": ev.reason or None, "reason_code": ev.reason_code,
                  "location": ev.location or None, "has_ct": ev.has_ct,
                  "ct_status": ev.ct_status, "socket": ev.has_sock, "sk_state": ev.sk_state or None}
        v = Verdict(
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
            socket_owner=dict(ev.context.socket_owner) if ev.context.socket_owner else None,
            workloads=self._workloads(ev, f),
        )
        if supersedes is not None:
            v.supersedes, v.superseded_cause = supersedes.id, supersedes.cause
            v.correction = (f"{_fact_name(fact)} read {fact.mono - ev.mono:.3f}s after the event "
                            f"explains it better than {supersedes.cause} (verdict {supersedes.id})")
        return v


    def _workloads(self, ev: KernelEvent, f: Finding) -> Optional[dict]:
        """The containers and pods of the verdict's endpoints, by role: `local` (its own
        namespace); with NAT, `client` (behind the inside tuple's source), `router` (where the
        entry was) and `server` (behind the NATed tuple's destination); without, `peer` (the
        flow's other end, when it lives on this host). Only roles where something lives, and
        the router."""
        book, now, roles = self.state.workloads, ev.mono, {}

        def put(role: str, w: Optional[dict], addr: str = "") -> None:
            if w is not None:
                roles[role] = {"netns": w["netns"], "netns_name": w.get("netns_name", ""),
                               "containers": w["containers"], "pod": w["pod"], **({"addr": addr} if addr else {})}
        put("local", book.netns(ev.netns, now))
        if f.nat:
            put("client", book.addr(f.nat["inside"]["src"], now), f.nat["inside"]["src"])
            if f.router:   # where the NAT entry was: named even when nothing lives there
                put("router", book.netns(f.router["netns"], now) or
                    {"netns": f.router["netns"], "netns_name": f.router["netns_name"], "containers": [], "pod": None})
            put("server", book.addr(f.nat["outside"]["dst"], now), f.nat["outside"]["dst"])
        elif ev.flow:
            for ep in (ev.flow.src, ev.flow.dst):
                w = book.addr(ep.addr, now)
                if w is not None and w["netns"] != ev.netns:
                    put("peer", w, ep.addr)
                    break
        return roles or None


def _related_id(f: Finding) -> Optional[str]:
    return f.related["id"] if f.related else None


def _keys(f: Finding) -> frozenset:
    return frozenset(e.key for e in f.evidence)


def _endpoints(ev: KernelEvent) -> tuple:
    return (ev.flow.src, ev.flow.dst) if ev.flow else ()


def _better(f: Finding, j: _Judged) -> bool:
    """Does the new finding add an explanation to the old verdict (never take one away)?"""
    if f.cause != j.cause:
        return f.cause in ROOT_CAUSES
    if _related_id(f) != j.related:
        return _related_id(f) is not None
    return f.cause in ROOT_CAUSES and _keys(f) > j.evidence


def _fact_name(fact: KernelEvent) -> str:
    if fact.kind == CT_DESTROY:
        return f"a conntrack deletion ({fact.probe})"
    return {ADDR_REMOVED: "an address removal", LINK_DOWN: "a link going down"}.get(fact.kind, fact.kind)

