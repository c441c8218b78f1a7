"""One rule per root cause: how it is recognised, the evidence it rests on and the remedy,
side by side. Rules are tried in RULES order; the first that explains an event wins, and
`Unexplained` explains everything else with all raw facts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..events import (IPS_CONFIRMED, IPS_SRC_NAT, LINK_DOWN, RST_RECEIVED, RST_SENT, SKB_DROPPED,
                      KernelEvent, ct_status_names, flag_names)
from ..schema import Evidence, Remedy
from . import remedies
from .state import AttributionState, Deletion, Trigger

@dataclass
class Finding:
    cause: str
    summary: str
    confidence: str
    evidence: list
    remedy: Remedy
    nat: Optional[dict] = None
    related: Optional[dict] = None
    keys: list = field(default_factory=list)   # endpoint sets this root cause concerns
    router: Optional[dict] = None              # {netns, netns_name} where the NAT entry was


def router_of(netns: int, netns_name: str) -> dict:
    return {"netns": netns, "netns_name": netns_name}


def segment_evidence(ev: KernelEvent) -> Evidence:
    return Evidence("segment", f"segment {ev.flow} flags {'|'.join(flag_names(ev.tcp_flags)) or '-'} "
                    f"seq {ev.seq} ack {ev.ack} len {ev.payload_len}",
                    {"flags": flag_names(ev.tcp_flags), "seq": ev.seq, "ack": ev.ack,
                     "len": ev.payload_len, "window": ev.window})


def reason_evidence(ev: KernelEvent, who: str) -> Evidence:
    return Evidence("rst_reason", f"RST sent by {who} (kernel reason {ev.reason or 'n/a'})",
                    {"reason": ev.reason or None, "socket": ev.sk_state or None})


def related_evidence(related: Optional[dict]) -> list:
    if not related:
        return []
    return [Evidence("related_verdict", f"this flow was hit {related['age_s']:.3f}s earlier by "
                     f"{related['cause']} (verdict {related['id']})", related)]


def no_reason(ev: KernelEvent) -> bool:
    """The kernel gave no reason: none on this kernel/probe, or SK_RST_REASON_NOT_SPECIFIED."""
    return ev.reason in ("", "NOT_SPECIFIED")


def unknown_segment(ev: KernelEvent) -> bool:
    """A stack RST for a non-SYN segment with no connection socket (none, or a listener)."""
    return ev.is_unknown_segment


def nat_tuples(entry) -> dict:
    return {"inside": entry.orig.to_dict(), "outside": entry.reply.reversed().to_dict()}


def invalid_delta_evidence(delta: Optional[dict], where: str) -> list:
    if not delta or delta.get("invalid") is None:
        return []
    return [Evidence("ct_invalid_delta", f"conntrack 'invalid' counter rose by {delta['invalid']} "
                     f"in {where} since the tracer started watching it", delta["invalid"])]


def invalid_verdict_evidence(verdict: Optional[KernelEvent]) -> list:
    """kprobe backend: conntrack's own words and the window it compared against."""
    if verdict is None:
        return []
    return [Evidence("invalid_reason", f"conntrack: {verdict.invalid_reason}",
                     {"reason": verdict.invalid_reason, "seq": verdict.seq, "ack": verdict.ack,
                      "len": verdict.payload_len}),
            Evidence("tcp_window", "conntrack's window state of the flow (td_end, td_maxend, "
                     "td_maxwin, td_scale per direction)", verdict.ct_window)]


class Rule:
    cause = ""
    root_cause = False   # findings of this rule are remembered to explain later resets

    def explain(self, ev: KernelEvent, state: AttributionState) -> Optional[Finding]:
        raise NotImplementedError


# -- incident 1 -----------------------------------------------------------------------
class ConntrackInvalidUnnat(Rule):
    """Incident 1: conntrack marked a NATed flow's segment INVALID, so it kept no conntrack
    reference and was not un-NATed. Either it reached this host's own stack at the SNAT
    address/port (no socket there: RST to the remote peer), or, in the DNAT/service
    direction, a backend's reply reached the client with the backend's real address and the
    client (no socket for it) reset it."""
    cause = "conntrack_invalid_unnat"
    root_cause = True

    REMEDY = Remedy(
        "Drop INVALID packets before they reach the host stack or get forwarded, or make "
        "conntrack's TCP window tracking liberal. Kernels >= 6.1 already ignore segments "
        "below the window; segments above it are still INVALID.",
        ["iptables -I INPUT -m conntrack --ctstate INVALID -j DROP",
         "iptables -I FORWARD -m conntrack --ctstate INVALID -j DROP",
         "sysctl -w net.netfilter.nf_conntrack_tcp_be_liberal=1"])

    def explain(self, ev, state):
        if not unknown_segment(ev) or ev.has_ct:
            return None
        ct = ev.context.conntrack
        if ct is not None and ct.nat and ct.reply == ev.flow and not ev.has_sock:
            return self._snat_side(ev, ct, state)
        for hit in ev.context.nat_elsewhere:
            if hit["match"] == "reply" and not state.deletions_by_orig(hit["netns"], hit["entry"].orig):
                return self._dnat_side(ev, hit, state)
        return None

    def _snat_side(self, ev, ct, state):
        inside, outside = ct.orig, ct.reply.reversed()
        delta = ev.context.ct_stats_delta
        evidence = [
            Evidence("segment_conntrack", "the segment that drew the RST carried no conntrack "
                     "reference (skb->_nfct == 0): conntrack refused it", {"has_ct": False}),
            Evidence("nat_entry", f"a NAT conntrack entry exists whose reply tuple is exactly this "
                     f"segment: inside {inside}, NATed {outside} ({ct.tcp_state})", ct.to_dict()),
            segment_evidence(ev), reason_evidence(ev, "this host's stack with no socket"),
        ] + invalid_delta_evidence(delta, "this namespace")
        verdict = state.invalid_for(ev.netns, ev.flow)
        evidence += invalid_verdict_evidence(verdict)
        return Finding(
            self.cause,
            f"conntrack marked a segment of NATed flow {inside} INVALID "
            f"({verdict.invalid_reason if verdict else 'out of window'}); it was "
            f"not de-NATed and this host answered RST on {outside}",
            "high" if (delta.get("invalid") or verdict) else "medium", evidence,
            remedies.invalid_drop(self.REMEDY, state.firewall(ev.netns)),
            nat=nat_tuples(ct), keys=[inside.endpoints(), outside.endpoints()],
            router=router_of(ev.netns, ev.context.netns_name))

    def _dnat_side(self, ev, hit, state):
        ct = hit["entry"]
        delta = hit.get("ct_stats_delta") or {}
        verdict = state.invalid_for(hit["netns"], ct.reply)
        evidence = [
            Evidence("unnated_reply", f"the segment {ev.flow} is the reply tuple of a NAT entry in "
                     f"namespace {hit['netns_name'] or hit['netns']}: it was forwarded without its "
                     f"source being translated back", {"router_netns": hit["netns"], "entry": ct.to_dict()}),
            segment_evidence(ev), reason_evidence(ev, "the client, which has no socket for the backend's address"),
        ] + invalid_delta_evidence(delta, f"the router namespace {hit['netns_name'] or hit['netns']}")
        evidence += invalid_verdict_evidence(verdict)
        return Finding(
            self.cause,
            f"conntrack in {hit['netns_name'] or hit['netns']} marked a reply of {ct.orig} INVALID; "
            f"it reached the client un-NATed from {ct.reply.src} and the client answered RST",
            "high" if (delta.get("invalid") or verdict) else "medium", evidence,
            remedies.invalid_drop(self.REMEDY, state.firewall(hit["netns"])),
            nat=nat_tuples(ct), keys=[ct.orig.endpoints(), ct.reply.endpoints()],
            router=router_of(hit["netns"], hit["netns_name"]))


# -- incidents 3 and 4: the entry went away --------------------------------------------
def deletion_for(ev: KernelEvent, state: AttributionState):
    """The deleted NAT entry an unknown segment belonged to, and how it shows:
    - "unnated": the segment is the reply tuple of an entry deleted in this namespace (a
      server sent first, its packet was not de-NATed and reached this host's stack);
    - "renated": a router namespace NATed this segment's flow with a *new* entry whose
      original tuple is that of a deleted one (the client was re-SNATed to a new port).
      The new entry is found alive, or among deletions: conntrack kills a not-yet-assured
      entry as soon as the server's RST passes back through it.
    A deletion known to have happened after the reset cannot have caused it."""
    if not unknown_segment(ev):
        return None, "", None
    if not ev.has_sock:
        gone = state.deletion_by_reply(ev.netns, ev.flow)
        if gone is not None and gone.preceded(ev.mono):
            return gone, "unnated", None
    successors = [(hit["netns"], hit["entry"]) for hit in ev.context.nat_elsewhere
                  if hit["match"] == "reply_reversed"]
    # the kprobe backend saw the new entry being bound, before this reset: unlike the
    # ctnetlink lookup, that cannot lose the race with the RST that kills the entry
    reply = ev.flow.reversed()
    for seen in (state.binding_anywhere(reply), state.deletion_by_reply_anywhere(reply)):
        if seen is not None:
            successors.append((seen.netns, seen.entry))
    for netns, new in successors:
        for old in state.deletions_by_orig(netns, new.orig):
            if old.entry.reply != new.reply and old.preceded(ev.mono):
                return old, "renated", {"netns": netns, "entry": new}
    return None, "", None


def deletion_evidence(ev: KernelEvent, gone: Deletion, how: str, hit: Optional[dict]) -> list:
    e = gone.entry
    out = [Evidence("deleted_entry", f"conntrack entry inside {e.orig}, NATed {e.reply.reversed()} "
                    f"was deleted {ev.mono - gone.ts:.3f}s before this reset", dict(e.to_dict(), deleted_ts=gone.wall)),
           segment_evidence(ev)]
    if gone.reason:   # kprobe backend: the kernel's own reason for the deletion
        out.insert(0, Evidence("delete_reason", f"the kernel deleted the entry: {gone.reason} "
                               f"{gone.detail or ''}".strip(), dict(gone.detail, reason=gone.reason)))
    if how == "unnated":
        out.append(Evidence("unnated_segment", "the segment arrived with no entry to de-NAT it and "
                            "reached this host's own stack at the NAT address", {"has_ct": ev.has_ct}))
    else:
        new = hit["entry"]
        out.append(Evidence("new_nat_port", f"the client's next packet created a new entry NATed to "
                            f"{new.reply.dst} instead of {e.reply.dst}: the server has no such connection",
                            {"old": e.reply.reversed().to_dict(), "new": new.reply.reversed().to_dict(),
                             "router_netns": hit["netns"]}))
    out.append(reason_evidence(ev, "the listener" if ev.has_sock else "a stack with no socket"))
    return out


class ConntrackFlushed(Rule):
    """Incidents 3 and 4: an address removal or device event on the masquerading interface
    (VIP move, DHCP renewal) deleted the flow's conntrack entry; its next packet was either
    re-SNATed to a new port (the server's stack resets it) or, server first, arrived with no
    entry to de-NAT it (the router's stack resets it)."""
    cause = "conntrack_flushed"
    root_cause = True

    REMEDY_ADDRESS = Remedy(
        "Keep the masquerading address stable: static addressing or systemd-networkd "
        "KeepConfiguration=dhcp (DHCP renewals), move VIPs on another interface than the "
        "MASQUERADE one or use SNAT --to-source with a fixed address instead of MASQUERADE; "
        "applications should reconnect on ECONNRESET.",
        ["# /etc/systemd/network/<link>.network: [Network] KeepConfiguration=dhcp",
         "iptables -t nat -R POSTROUTING <n> -o <if> -j SNAT --to-source <stable address>"])
    REMEDY_DEVICE = Remedy(
        "MASQUERADE forgets every connection through an interface that goes down, even for an "
        "instant; SNAT to a fixed address keeps them. Find why the link flapped (carrier loss, "
        "a network manager reconfiguring it); applications should reconnect on ECONNRESET.",
        ["iptables -t nat -R POSTROUTING <n> -o <if> -j SNAT --to-source <stable address>",
         "ip monitor link   # or: journalctl -k | grep -i 'link is down'"])
    REMEDY_CTNETLINK = Remedy(
        "A process deleted the entry over ctnetlink: `conntrack -D/-F` by a person or a script, "
        "kube-proxy cleaning entries of a service whose endpoints changed, a CNI plugin tearing "
        "a pod down. Find why it deleted a live connection's entry; applications should "
        "reconnect on ECONNRESET.",
        ["conntrack -E -e DESTROY -o extended,id   # watch the deletions as they happen",
         "ps -o pid,comm,args -p <pid>"])
    REMEDY_UNKNOWN = Remedy(
        "The entry was deleted without an address or device event: look for `conntrack -D/-F` "
        "or an agent (kube-proxy, CNI) deleting entries over ctnetlink.",
        ["conntrack -E -e DESTROY   # watch who deletes entries"])

    def explain(self, ev, state):
        gone, how, hit = deletion_for(ev, state)
        if gone is None:
            return None
        if gone.by_ctnetlink:   # the kernel says who asked: no need to guess from nearby events
            trigger = Trigger.of_deletion(gone)
        else:
            trigger = state.trigger_near(gone.netns, gone.when, gone)
        if gone.expired and (trigger is None or gone.reason == "timeout"):
            return None   # ConntrackExpired
        evidence = deletion_evidence(ev, gone, how, hit)
        if trigger is not None:
            notifier = state.notifier_for(trigger)
            if notifier is not None:
                evidence.insert(0, Evidence("masquerade_notifier", f"the masquerade cleanup "
                                            f"{notifier.notifier} ran for it", notifier.to_dict()))
            lead = gone.ts - trigger.ts   # netlink may deliver the address event after the DESTROYs
            when = "" if gone.by_ctnetlink else \
                f", {abs(lead):.3f}s {'before' if lead >= 0 else 'after'} the deletion was seen"
            evidence.insert(0, Evidence("flush_trigger", f"{trigger.describe()} in namespace "
                                        f"{trigger.netns_name or trigger.netns}{when}", trigger.to_dict()))
        nat = nat_tuples(gone.entry)
        keys = [gone.entry.orig.endpoints(), gone.entry.reply.endpoints()]
        if hit is not None:
            nat["outside_after"] = hit["entry"].reply.reversed().to_dict()
            keys.append(hit["entry"].reply.endpoints())
        what = trigger.describe() if trigger else "a deletion with no address or device event"
        if trigger is None and gone.reason in ("masquerade", "device"):
            what = f"the masquerade cleanup ({gone.reason} {gone.detail or ''})".strip()
        known = trigger is not None or gone.reason in ("masquerade", "device")
        by_device = trigger.kind == LINK_DOWN if trigger is not None else gone.reason == "device"
        remedy = self.REMEDY_CTNETLINK if gone.by_ctnetlink else self.REMEDY_DEVICE if by_device \
            else self.REMEDY_ADDRESS if known else self.REMEDY_UNKNOWN
        if remedy in (self.REMEDY_DEVICE, self.REMEDY_ADDRESS):
            remedy = remedies.stable_snat(remedy, state.firewall(gone.netns), gone.entry.orig.src.addr)
        return Finding(self.cause,
                       f"conntrack entry of {gone.entry.orig} was flushed by {what}; "
                       f"{'its next packet was re-NATed to a new port' if how == 'renated' else 'the next packet was not de-NATed'}"
                       f" and drew this RST",
                       "high" if known or gone.reason else "medium", evidence,
                       remedy, nat=nat, keys=keys, router=router_of(gone.netns, gone.netns_name))


class ConntrackExpired(Rule):
    """Like a flush, but nothing deleted the entry: it timed out (idle longer than the TCP
    timeout of its state in that namespace), then the next packet drew a RST."""
    cause = "conntrack_expired"
    root_cause = True

    def explain(self, ev, state):
        gone, how, hit = deletion_for(ev, state)
        if gone is None or not gone.expired or (state.trigger_near(gone.netns, gone.when)
                                                and gone.reason != "timeout"):
            return None
        timeout = gone.sysctls.get("nf_conntrack_tcp_timeout_established")
        evidence = [Evidence("expired", f"the entry was deleted with {gone.entry.timeout}s of its timeout "
                             f"left and no address or device event: it expired "
                             f"(established timeout in that namespace: {timeout}s)",
                             {"timeout_left_s": gone.entry.timeout, "tcp_timeout_established_s": timeout})]
        evidence += deletion_evidence(ev, gone, how, hit)
        remedy = Remedy(
            "The connection was idle longer than conntrack keeps an entry. Enable TCP keepalive "
            "below that timeout in the application, or raise the timeout.",
            [f"sysctl -w net.netfilter.nf_conntrack_tcp_timeout_established={max(432000, (timeout or 0) * 2)}",
             "# application: SO_KEEPALIVE with TCP_KEEPIDLE below the conntrack timeout"])
        nat = nat_tuples(gone.entry)
        return Finding(self.cause, f"conntrack entry of {gone.entry.orig} expired after idling past "
                       f"{timeout}s; the next packet drew this RST", "high" if timeout else "medium",
                       evidence, remedy, nat=nat,
                       keys=[gone.entry.orig.endpoints(), gone.entry.reply.endpoints()],
                       router=router_of(gone.netns, gone.netns_name))


# -- incident 2 and the table ----------------------------------------------------------
class SnatPortClash(Rule):
    """Incident 2: two connections got the same NATed source port before either conntrack
    entry was confirmed; the second clashed at confirm and its SYN was dropped (the client
    retransmits after 1 s). No RST at all."""
    cause = "snat_port_clash"
    root_cause = True

    # nf_hook_slow's NF_DROP; nf_reinject's kfree_skb when the clash follows an NFQUEUE verdict
    DROP_REASONS = ("NETFILTER_DROP", "NOT_SPECIFIED")

    def explain(self, ev, state):
        ct = ev.skb_ct
        if not (ev.kind == SKB_DROPPED and ev.reason in self.DROP_REASONS and ev.is_syn and ct is not None
                and ct.status & IPS_SRC_NAT and not ct.status & IPS_CONFIRMED):
            return None
        delta = ev.context.ct_stats_delta
        rules = ev.context.nat_rule or {}
        evidence = [
            Evidence("unconfirmed_nat_drop", f"SYN dropped at {ev.location or 'netfilter'} while its "
                     f"conntrack entry was SNATed but not yet confirmed "
                     f"({'|'.join(ct_status_names(ct.status))})", ct.to_dict()),
            Evidence("nated_source", f"NAT chose {ct.reply.dst} for {ct.orig.src}: another "
                     f"connection already held that tuple", ct.reply.reversed().to_dict()),
            segment_evidence(ev),
        ]
        if delta.get("insert_failed") is not None:
            evidence.append(Evidence("insert_failed_delta", f"conntrack 'insert_failed' rose by "
                                     f"{delta['insert_failed']} since the tracer started watching this "
                                     f"namespace", delta["insert_failed"]))
        if rules.get("rules"):
            evidence.append(Evidence("masquerade_rules", "NAT rules " + ("all use --random-fully" if rules["random_fully"]
                                     else "do not all use --random-fully"), rules))
        winner = state.binding_for(ev.netns, ct.reply)
        if winner is not None and winner.entry.orig != ct.orig:
            evidence.append(Evidence("clash_winner", f"the entry that won the tuple: {winner.entry.orig} "
                                     f"NATed to {winner.entry.reply.dst}", winner.entry.to_dict()))
        random_fully = rules.get("random_fully") or bool(winner and winner.nat_range_flags & 16)
        if random_fully:
            remedy = Remedy("--random-fully is already on: clashes remain possible under very high "
                            "connection rates to one destination; widen the source port range or add "
                            "SNAT addresses.", ["sysctl -w net.ipv4.ip_local_port_range='10240 65535'"])
        else:
            remedy = remedies.random_fully(
                Remedy("Randomise NAT port selection fully (iptables >= 1.6.2; kube-proxy, "
                       "flannel and Cilium have options for it). Reduces, does not eliminate.",
                       ["iptables -t nat -R POSTROUTING <n> -o <if> -j MASQUERADE --random-fully"]),
                state.firewall(ev.netns), ct.orig.src.addr)
        return Finding(self.cause, f"SYN of {ct.orig} dropped: SNAT source port {ct.reply.dst.port} "
                       f"clashed with another connection at conntrack confirm (client waits >= 1 s)",
                       "high", evidence, remedy, nat=nat_tuples(ct),
                       keys=[ct.orig.endpoints()], router=router_of(ev.netns, ev.context.netns_name))


def netfilter_drop(ev: KernelEvent) -> bool:
    return ev.kind == SKB_DROPPED and ev.reason == "NETFILTER_DROP"


# skb->_nfct & 7 of a packet a `-j CT --notrack` / NOTRACK rule exempted from conntrack
# (enum ip_conntrack_info: IP_CT_UNTRACKED = IP_CT_NUMBER = 7)
IP_CT_UNTRACKED = 7
# a dropped SYN is blamed on a full table only when the namespace's table is this full
TABLE_FULL_RATIO = 0.9


def drop_evidence(ev: KernelEvent, text: str, **value) -> Evidence:
    return Evidence("drop", f"kfree_skb NETFILTER_DROP at {ev.location or '?'}: {text}",
                    dict(value, reason=ev.reason, location=ev.location))


class ConntrackTableFull(Rule):
    """New flows dropped because the conntrack table is full: the SYN never got an entry.
    What the kernel does (nf_conntrack_core.c, 6.1-6.18): __nf_conntrack_alloc() refuses a
    new entry when the namespace's count exceeds nf_conntrack_max (host-wide; read-only in
    other namespaces) and early_drop() finds no unassured entry to evict ("table full,
    dropping packet"); nf_conntrack_in() then counts `drop` and drops the SYN. So it shows
    as a `drop` rise with the table at its max. `drop` alone is no proof: a SNAT clash at
    confirm counts `drop` and `insert_failed` together (snat_port_clash), an allocation
    failure or the TCP tracker's own drop count it too, and the counter is a rise since the
    tracer started watching. `early_drop` counts evictions that made room (the packet
    lived): shown, not required."""
    cause = "conntrack_table_full"
    root_cause = True
    REMEDY = Remedy("Raise the conntrack table size (and its hash size), or find what fills it "
                    "(conntrack -S, conntrack -L | sort).",
                    ["sysctl -w net.netfilter.nf_conntrack_max=<2x current>",
                     "echo <max/4> > /sys/module/nf_conntrack/parameters/hashsize"])

    def explain(self, ev, state):
        if not (netfilter_drop(ev) and ev.is_syn and not ev.has_ct and ev.ctinfo != IP_CT_UNTRACKED):
            return None
        ctx, delta = ev.context, ev.context.ct_stats_delta
        refused = delta.get("drop", 0) - delta.get("insert_failed", 0)   # drops that were no clash
        if not (refused > 0 and ctx.ct_count is not None and ctx.ct_max
                and ctx.ct_count >= ctx.ct_max * TABLE_FULL_RATIO):
            return None
        evidence = [segment_evidence(ev),
                    Evidence("no_conntrack", f"SYN dropped by netfilter at {ev.location or '?'} before it "
                             "got a conntrack entry", {"has_ct": False}),
                    Evidence("table", f"conntrack table of this namespace holds {ctx.ct_count} of "
                             f"{ctx.ct_max} entries", {"count": ctx.ct_count, "max": ctx.ct_max}),
                    Evidence("drop_counters", f"conntrack counters of this namespace since the tracer "
                             f"started watching it: drop +{delta['drop']}, insert_failed "
                             f"+{delta.get('insert_failed', 0)} (a SNAT clash counts in both), early_drop "
                             f"+{delta.get('early_drop', 0)}", delta)]
        return Finding(self.cause, f"SYN {ev.flow} dropped: conntrack table full ({ctx.ct_count}/"
                       f"{ctx.ct_max} entries; conntrack's own drops: {refused})", "high",
                       evidence, self.REMEDY, keys=[ev.flow.endpoints()])


class InvalidSegmentDropped(Rule):
    """A netfilter rule dropped a TCP segment conntrack had found INVALID (skb->_nfct 0):
    a DROP INVALID rule (the incident-1 remedy) did its job. Needs conntrack's word for
    it: the `invalid` counter rose in that namespace or (kprobe backend) conntrack's
    INVALID message for this very segment; without it, see FirewallDrop."""
    cause = "conntrack_invalid_dropped"
    REMEDY = Remedy("Nothing to fix: an INVALID segment was dropped instead of drawing a RST. "
                    "Frequent drops mean heavy reordering or loss on the path.")

    def explain(self, ev, state):
        if not (netfilter_drop(ev) and not ev.has_ct and not ev.is_syn and ev.ctinfo != IP_CT_UNTRACKED):
            return None
        delta = ev.context.ct_stats_delta
        verdict = state.invalid_for(ev.netns, ev.flow)
        if not (delta.get("invalid") or verdict):
            return None
        why = f" ({verdict.invalid_reason})" if verdict else ""
        return Finding(self.cause, f"INVALID segment {ev.flow}{why} dropped by a netfilter rule (no RST sent)",
                       "high" if verdict else "medium",
                       [segment_evidence(ev), drop_evidence(ev, "no conntrack reference")]
                       + invalid_delta_evidence(delta, "this namespace") + invalid_verdict_evidence(verdict),
                       self.REMEDY)


class FirewallDrop(Rule):
    """A packet dropped by netfilter that no conntrack cause explains: policy. Either it was
    tracked (a rule dropped a packet of a known flow), or it had no conntrack entry and
    conntrack gave no sign of refusing it (no full table, no INVALID count): a rule ahead of
    conntrack (the raw table, an nft chain with priority below -200) or a rule dropping a
    packet a NOTRACK rule exempted."""
    cause = "firewall_drop"
    REMEDY = Remedy("A firewall rule dropped this packet; check the rules of that namespace.",
                    ["iptables -S; nft list ruleset"])
    REMEDY_UNTRACKED = Remedy("Netfilter dropped this packet before conntrack tracked it: look for a "
                              "DROP in the raw table (or an nft chain hooked before conntrack, priority "
                              "< -200), or a rule dropping untracked packets (NOTRACK / --ctstate UNTRACKED), "
                              "in that namespace.",
                              ["iptables -t raw -S", "iptables -S | grep -i -e untracked -e notrack",
                               "nft list ruleset"])

    def explain(self, ev, state):
        if not netfilter_drop(ev):
            return None
        if ev.has_ct:
            return Finding(self.cause, f"packet {ev.flow} dropped by a netfilter rule", "medium",
                           [segment_evidence(ev),
                            drop_evidence(ev, "a tracked packet", ct_status=ct_status_names(ev.ct_status))],
                           self.REMEDY)
        what = "SYN" if ev.is_syn else "segment"
        evidence = [segment_evidence(ev)]
        if ev.ctinfo == IP_CT_UNTRACKED:
            evidence.append(drop_evidence(ev, "the packet was marked untracked (NOTRACK)", ctinfo=ev.ctinfo))
            return Finding(self.cause, f"{what} {ev.flow} dropped by a netfilter rule; a NOTRACK rule had "
                           f"exempted it from conntrack", "medium", evidence, self.REMEDY_UNTRACKED)
        evidence.append(drop_evidence(ev, "no conntrack reference", ctinfo=ev.ctinfo))
        ctx, delta = ev.context, ev.context.ct_stats_delta
        quiet = bool(delta) and not delta.get("drop") and not delta.get("invalid")
        if delta:
            table = f"{ctx.ct_count} of {ctx.ct_max}" if ctx.ct_max else f"{ctx.ct_count}"
            evidence.append(Evidence("conntrack_counters", f"since the tracer started watching this "
                                     f"namespace, conntrack dropped {delta.get('drop')} packets and found "
                                     f"{delta.get('invalid')} INVALID; its table holds {table} entries",
                                     {"count": ctx.ct_count, "max": ctx.ct_max, "rise": delta}))
        return Finding(self.cause, f"{what} {ev.flow} dropped by netfilter before conntrack tracked it "
                       f"(no conntrack entry{'; conntrack counted no drop and no INVALID packet' if quiet else ''})",
                       "medium" if quiet else "low", evidence, self.REMEDY_UNTRACKED)


# -- ordinary resets -------------------------------------------------------------------
class ListenOverflow(Rule):
    """A handshake that completed while the listener's accept queue was full: its final ACK
    is dropped (kernel >= 6.15 says TCP_LISTEN_OVERFLOW), or, with tcp_abort_on_overflow=1,
    answered with RST (the kernel then gives a generic reason: the queue depth tells)."""
    cause = "listen_overflow"
    root_cause = True   # the listener's RST and the drop of that same segment: one story
    REMEDY = Remedy("The application does not accept() fast enough: raise its listen backlog "
                    "and net.core.somaxconn, or accept faster. With tcp_abort_on_overflow=1 "
                    "clients see resets instead of a retried handshake.",
                    ["sysctl -w net.core.somaxconn=4096", "sysctl -w net.ipv4.tcp_abort_on_overflow=0"])

    def explain(self, ev, state):
        if ev.kind == SKB_DROPPED and ev.reason == "TCP_LISTEN_OVERFLOW":
            related = state.related(ev)
            return Finding(self.cause, f"handshake {ev.flow} dropped: listen queue of {ev.flow.dst} full",
                           "high", [segment_evidence(ev)] + related_evidence(related), self.REMEDY,
                           related=related, keys=[ev.flow.endpoints()])
        if not (unknown_segment(ev) and ev.sk_state == "LISTEN" and ev.accept_queue_max
                and ev.accept_queue > ev.accept_queue_max):
            return None
        queue = Evidence("accept_queue", f"the listener's accept queue held {ev.accept_queue} "
                         f"connections, more than its backlog of {ev.accept_queue_max}: full",
                         {"depth": ev.accept_queue, "backlog": ev.accept_queue_max})
        return Finding(self.cause, f"handshake {ev.flow} reset by the listener on {ev.flow.dst}: "
                       f"accept queue full (tcp_abort_on_overflow=1)", "high",
                       [queue, segment_evidence(ev), reason_evidence(ev, "the listener")], self.REMEDY,
                       keys=[ev.flow.endpoints()])


class NoListener(Rule):
    """A SYN to a port nobody listens on: the ordinary 'connection refused'."""
    cause = "no_listener"
    REMEDY = Remedy("Nothing listens on that port here: start the service or fix the client's "
                    "target address/port. Expected for port scans and health checks of stopped services.")

    def explain(self, ev, state):
        if not (ev.kind == RST_SENT and ev.has_skb and ev.is_syn and not ev.has_sock):
            return None
        return Finding(self.cause, f"SYN to {ev.flow.dst} where nothing listens (connection refused)",
                       "high", [segment_evidence(ev), reason_evidence(ev, "a stack with no socket")],
                       self.REMEDY)


class NoConnection(Rule):
    """A non-SYN segment for a connection this host does not have (any more): no socket at
    all, or only a listener on that port. The other end still believes in a connection that
    was reset, timed out, or whose NAT mapping changed."""
    cause = "no_connection"
    REMEDY = Remedy("The peer still sends on a connection this host no longer has. If a related "
                    "verdict names a root cause, fix that; otherwise look for a restart of the "
                    "local service or a connection idle past a middlebox timeout.")

    def explain(self, ev, state):
        if not unknown_segment(ev):
            return None
        related = state.related(ev)
        summary = f"segment {ev.flow} for a connection this host does not have"
        if related:
            summary += f" (after {related['cause']} on this flow)"
        return Finding(self.cause, summary, "high" if related else "medium",
                       [segment_evidence(ev), reason_evidence(ev, "the listener" if ev.has_sock else "no socket")]
                       + related_evidence(related), self.REMEDY, related=related)


class TimeWait(Rule):
    """A segment hit a TIME_WAIT socket and was answered with RST."""
    cause = "timewait"
    REMEDY = Remedy("A segment arrived for a connection in TIME_WAIT (late retransmission or "
                    "port reuse by the peer). Usually harmless; frequent ones mean aggressive "
                    "source port reuse.")

    def explain(self, ev, state):
        if not (ev.kind == RST_SENT and (ev.sk_state == "TIME_WAIT" or ev.reason == "TCP_TIMEWAIT_SOCKET")):
            return None
        return Finding(self.cause, f"segment {ev.flow} hit a TIME_WAIT socket", "high",
                       ([segment_evidence(ev)] if ev.has_skb else []) + [reason_evidence(ev, "a TIME_WAIT socket")],
                       self.REMEDY)


class KeepaliveTimeout(Rule):
    """The local stack gave up on a connection whose keepalive probes went unanswered. The
    kernel says so (>= 6.10); before, a reset with no segment while keepalive probes were
    outstanding can only come from the keepalive timer."""
    cause = "keepalive_timeout"
    REMEDY = Remedy("The peer stopped answering keepalive probes (peer gone, path broken, or a "
                    "middlebox dropped the flow). Check the path and the peer.")

    def explain(self, ev, state):
        if ev.kind != RST_SENT:
            return None
        if ev.reason == "TCP_KEEPALIVE_TIMEOUT":
            confidence = "high"
        elif no_reason(ev) and ev.has_sock and not ev.has_skb and ev.probes_out:
            confidence = "medium"
        else:
            return None
        evidence = [reason_evidence(ev, "the keepalive timer")]
        if ev.probes_out:
            evidence.append(Evidence("probes_out", f"{ev.probes_out} keepalive probes unanswered",
                                     ev.probes_out))
        return Finding(self.cause, f"keepalive timeout on {ev.flow}: connection reset by this host",
                       confidence, evidence, self.REMEDY)


class AppAbort(Rule):
    """The local application aborted the connection: close() with unread data, SO_LINGER
    with a zero timeout, or memory pressure. The kernel's reason says which (>= 6.10)."""
    cause = "app_abort"
    WHY = {"TCP_ABORT_ON_CLOSE": "close() with unread data in the receive queue",
           "TCP_ABORT_ON_LINGER": "close() with SO_LINGER set to 0",
           "TCP_ABORT_ON_DATA": "data arrived after the application shut the socket",
           "TCP_ABORT_ON_MEMORY": "the socket was aborted under memory pressure",
           "TCP_DISCONNECT_WITH_DATA": "disconnect with unsent/unread data",
           "TCP_STATE": "the application closed or disconnected a connection that needed a reset "
                        "(tcp_disconnect, or a listener closed with connections not yet accepted)"}
    REMEDY = Remedy("The application on this host reset its own connection; usually deliberate. "
                    "If not: read all data before close(), and do not set SO_LINGER 0.")

    def explain(self, ev, state):
        if not (ev.kind == RST_SENT and ev.has_sock and not ev.has_skb and
                (ev.reason in self.WHY or no_reason(ev))):
            return None
        why = self.WHY.get(ev.reason, "an active reset by the local application")
        return Finding(self.cause, f"{ev.comm or 'the application'} reset {ev.flow}: {why}",
                       "high" if ev.reason in self.WHY else "medium",
                       [reason_evidence(ev, f"the application's socket ({ev.comm}, pid {ev.pid})")],
                       self.REMEDY)


class PeerReset(Rule):
    """A RST received on a local socket: the peer (or a middlebox) reset the connection."""
    cause = "peer_reset"
    REMEDY = Remedy("The remote end reset the connection. If a related verdict names a root "
                    "cause on this host, fix that; otherwise look at the peer's own tracer output.")

    def explain(self, ev, state):
        if ev.kind != RST_RECEIVED:
            return None
        related = state.related(ev)
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


class Unexplained(Rule):
    """Anything no rule understands: never dropped, reported with every raw fact."""
    cause = "unexplained"
    REMEDY = Remedy("Not attributed: the raw facts are in the evidence. Please report it with a "
                    "recording (rst-tracer watch --record FILE).")

    def explain(self, ev, state):
        related = state.related(ev)
        facts = ev.to_dict()
        facts["ct_status_names"] = ct_status_names(ev.ct_status)
        return Finding(self.cause, f"{ev.kind} {ev.flow or ''} not attributed", "low",
                       [Evidence("raw_event", "all facts the probes and context gathered", facts)]
                       + related_evidence(related), self.REMEDY, related=related)


RULES = (ConntrackInvalidUnnat(), ConntrackFlushed(), ConntrackExpired(), SnatPortClash(),
         ConntrackTableFull(), InvalidSegmentDropped(), FirewallDrop(), ListenOverflow(),
         NoListener(), NoConnection(), TimeWait(), KeepaliveTimeout(), AppAbort(), PeerReset(),
         Unexplained())
CAUSES = tuple(r.cause for r in RULES)
