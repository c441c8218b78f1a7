"""One rule per root cause: how it is recognised, the evidence it rests on and the remedy,
side by side. Rules are tried in RULES order; the first that explains an event wins, and
`Unexplained` explains everything else with all raw facts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..events import (RST_RECEIVED, RST_SENT, SKB_DROPPED, KernelEvent, ct_status_names,
                      flag_names)
from ..schema import Evidence, Remedy


@dataclass
class Finding:
    cause: str
    summary: str
    confidence: str
    evidence: list
    remedy: Remedy
    nat: Optional[dict] = None
    related: Optional[dict] = None
    keys: list = field(default_factory=list)   # endpoint sets this finding is about


def segment_evidence(ev: KernelEvent) -> Evidence:
    return Evidence("segment", f"segment {ev.flow} flags {'|'.join(flag_names(ev.tcp_flags)) or '-'} "
                    f"seq {ev.seq} ack {ev.ack} len {ev.payload_len}",
                    {"flags": flag_names(ev.tcp_flags), "seq": ev.seq, "ack": ev.ack,
                     "len": ev.payload_len, "window": ev.window})


def related_evidence(related: Optional[dict]) -> list:
    if not related:
        return []
    return [Evidence("related_verdict", f"this flow was hit {related['age_s']:.3f}s earlier by "
                     f"{related['cause']} (verdict {related['id']})", related)]


class Rule:
    cause = ""
    root_cause = False   # findings of this rule are remembered to explain later resets

    def explain(self, ev: KernelEvent, related: Optional[dict]) -> Optional[Finding]:
        raise NotImplementedError


class ConntrackInvalidUnnat(Rule):
    """Incident 1: conntrack marked a NATed flow's segment INVALID, so it kept no conntrack
    reference, was not de-NATed, reached this host's own stack at the NAT address/port where
    no socket exists, and the stack answered RST to the remote peer."""
    cause = "conntrack_invalid_unnat"
    root_cause = True

    REMEDY = Remedy(
        "Drop INVALID packets before they reach the host stack or get forwarded, or make "
        "conntrack's TCP window tracking liberal. Kernels >= 6.1 already ignore segments "
        "below the window; segments above it are still INVALID.",
        ["iptables -I INPUT -m conntrack --ctstate INVALID -j DROP",
         "iptables -I FORWARD -m conntrack --ctstate INVALID -j DROP",
         "sysctl -w net.netfilter.nf_conntrack_tcp_be_liberal=1"])

    def explain(self, ev, related):
        ct = ev.context.conntrack
        if not (ev.kind == RST_SENT and ev.has_skb and not ev.has_ct and not ev.has_sock
                and ct is not None and ct.nat and ct.reply == ev.flow):
            return None
        delta = ev.context.ct_invalid_delta
        inside = ct.orig
        outside = ct.reply.reversed()
        evidence = [
            Evidence("segment_conntrack", "the segment that drew the RST carried no conntrack "
                     "reference (skb->_nfct == 0): conntrack refused it", {"has_ct": False}),
            Evidence("nat_entry", f"a NAT conntrack entry exists whose reply tuple is exactly this "
                     f"segment: inside {inside}, NATed {outside} ({ct.tcp_state})", ct.to_dict()),
            segment_evidence(ev),
            Evidence("rst_reason", f"RST sent by this host's stack with no socket (reason {ev.reason or 'n/a'})",
                     {"reason": ev.reason, "socket": False}),
        ]
        if delta is not None:
            evidence.append(Evidence("ct_invalid_delta", f"conntrack 'invalid' counter rose by {delta} "
                                     "in this namespace", delta))
        return Finding(
            self.cause,
            f"conntrack marked a segment of NATed flow {inside} INVALID (out of window); it was "
            f"not de-NATed and this host answered RST on {outside}",
            "high" if delta else "medium", evidence, self.REMEDY,
            nat={"inside": inside.to_dict(), "outside": outside.to_dict()},
            keys=[inside.endpoints(), outside.endpoints()])


class NoListener(Rule):
    """A SYN to a port nobody listens on: the ordinary 'connection refused'."""
    cause = "no_listener"
    REMEDY = Remedy("Nothing listens on that port here: start the service or fix the client's "
                    "target address/port. Expected for port scans and health checks of stopped services.")

    def explain(self, ev, related):
        if not (ev.kind == RST_SENT and ev.has_skb and ev.is_syn and not ev.has_sock):
            return None
        return Finding(self.cause, f"SYN to {ev.flow.dst} where nothing listens (connection refused)",
                       "high", [segment_evidence(ev),
                                Evidence("rst_reason", f"RST for a SYN with no socket (reason {ev.reason or 'n/a'})",
                                         {"reason": ev.reason, "socket": False})], self.REMEDY)


class NoConnection(Rule):
    """A non-SYN segment for a connection this host does not have (any more): no socket at
    all, or only a listener on that port. The other end still believes in a connection that
    was reset, timed out, or whose NAT mapping changed."""
    cause = "no_connection"
    REMEDY = Remedy("The peer still sends on a connection this host no longer has. If a related "
                    "verdict names a root cause, fix that; otherwise look for a restart of the "
                    "local service or a connection idle past a middlebox timeout.")

    def explain(self, ev, related):
        if not (ev.kind == RST_SENT and ev.has_skb and not ev.is_syn
                and (not ev.has_sock or ev.sk_state == "LISTEN")):
            return None
        summary = f"segment {ev.flow} for a connection this host does not have"
        if related:
            summary += f" (after {related['cause']} on this flow)"
        return Finding(self.cause, summary, "high" if related else "medium",
                       [segment_evidence(ev), Evidence(
                           "rst_reason", f"RST from {'the listener' if ev.has_sock else 'no socket'} "
                           f"(reason {ev.reason or 'n/a'})", {"reason": ev.reason, "socket": ev.sk_state or None})]
                       + related_evidence(related), self.REMEDY, related=related)


class PeerReset(Rule):
    """A RST received on a local socket: the peer (or a middlebox) reset the connection."""
    cause = "peer_reset"
    REMEDY = Remedy("The remote end reset the connection. If a related verdict names a root "
                    "cause on this host, fix that; otherwise look at the peer's own tracer output.")

    def explain(self, ev, related):
        if ev.kind != RST_RECEIVED:
            return None
        if ev.sk_state == "SYN_SENT":
            summary = f"connection to {ev.flow.src} refused (RST answered our SYN)"
        else:
            summary = f"RST received from {ev.flow.src} on {ev.flow.dst} ({ev.sk_state})"
        if related:
            summary += f"; root cause on this host: {related['cause']}"
        return Finding(self.cause, summary, "high",
                       [Evidence("socket_state", f"socket was {ev.sk_state} when the RST arrived",
                                 ev.sk_state)] + related_evidence(related),
                       self.REMEDY, related=related)


class InvalidSegmentDropped(Rule):
    """A netfilter rule dropped a TCP segment that had no conntrack reference: conntrack
    found it INVALID and a DROP INVALID rule (the incident-1 remedy) did its job."""
    cause = "conntrack_invalid_dropped"
    REMEDY = Remedy("Nothing to fix: an INVALID segment was dropped instead of drawing a RST. "
                    "Frequent drops mean heavy reordering or loss on the path.")

    def explain(self, ev, related):
        if not (ev.kind == SKB_DROPPED and ev.reason == "NETFILTER_DROP" and not ev.has_ct
                and not ev.is_syn):
            return None
        return Finding(self.cause, f"INVALID segment {ev.flow} dropped by a netfilter rule (no RST sent)",
                       "medium", [segment_evidence(ev),
                                  Evidence("drop", f"kfree_skb NETFILTER_DROP at {ev.location}, no conntrack reference",
                                           {"reason": ev.reason, "location": ev.location})],
                       self.REMEDY)


class Unexplained(Rule):
    """Anything no rule understands: never dropped, reported with every raw fact."""
    cause = "unexplained"
    REMEDY = Remedy("Not attributed: the raw facts are in the evidence. Please report it with a "
                    "recording (rst-tracer watch --record FILE).")

    def explain(self, ev, related):
        facts = ev.to_dict()
        facts.pop("context", None)
        facts["ct_status_names"] = ct_status_names(ev.ct_status)
        facts["context"] = ev.context.to_dict()
        return Finding(self.cause, f"{ev.kind} {ev.flow or ''} not attributed", "low",
                       [Evidence("raw_event", "all facts the probes and context gathered", facts)]
                       + related_evidence(related), self.REMEDY, related=related)


RULES = (ConntrackInvalidUnnat(), NoListener(), NoConnection(), PeerReset(), InvalidSegmentDropped(),
         Unexplained())
