"""Checks 3 and 4: NAT rules without fully random source ports (incident 2), INVALID
packets that are not dropped before they reach the host stack (incident 1), MASQUERADE
flushes on address removal (incident 3).

The checks only see RuleSets (tracer/nfrules.py reads and parses the rule sets).
"""
from __future__ import annotations

import re
from typing import Optional

from ..nfrules import SOURCE_NAT, V6, RuleSet, nft_invalid_drop_command
from .findings import INFO, OK, RISK, Finding


# -- the checks ------------------------------------------------------------------------------

def _iptables_tool(source: str, family: str) -> str:
    base = "ip6tables" if family == V6 else "iptables"
    return {"iptables-legacy": f"{base}-legacy", "iptables-nft": f"{base}-nft"}.get(source, base)


def _manager_note(rules: list) -> str:
    text = " ".join(r.text + " " + r.chain for r in rules)
    managers = [m for m, pat in (("kube-proxy", r"KUBE-"), ("Docker", r"DOCKER|docker0"),
                                 ("flannel", r"FLANNEL|flannel"), ("Calico", r"cali-"),
                                 ("Cilium", r"CILIUM|cilium")) if re.search(pat, text)]
    if not managers:
        return ""
    return (f"; rules written by {', '.join(managers)} are rewritten by it: configure it instead "
            f"(kube-proxy >= 1.16 and flannel add --random-fully themselves when iptables supports it)")


def check_random_fully(rs: RuleSet) -> Finding:
    snat = [r for r in rs.nat if r.kind in SOURCE_NAT]
    if not snat:
        return Finding("nat.random_fully", 2, OK, "no MASQUERADE/SNAT rules",
                       "no source NAT: connections are not funnelled through NAT port selection", "")
    bad = [r for r in snat if not r.random_fully]
    if not bad:
        return Finding("nat.random_fully", 2, OK,
                       f"all {len(snat)} MASQUERADE/SNAT rules use --random-fully",
                       "; ".join(f"{r.source}: {r.text}" for r in snat[:10]), "")
    fixes = list(dict.fromkeys(r.fix for r in bad if r.fix))
    return Finding("nat.random_fully", 2, RISK,
                   f"{len(bad)} of {len(snat)} MASQUERADE/SNAT rules without --random-fully",
                   "source NAT picks ports without full randomisation, so concurrent connections to the "
                   "same destination can get the same port, clash at confirm and lose their SYN (1 s+ "
                   "connect delays, insert_failed rises): "
                   + "; ".join(f"{r.source} ({r.family}): {r.text}" for r in bad[:10])
                   + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "") + _manager_note(bad),
                   "; ".join(fixes))


def _invalid_drop_fix(family: str, hook: str, nat_rules: list, prefix: str) -> str:
    chain = hook.upper()
    ipt = [r for r in nat_rules if r.family == family and r.source != "nft"]
    if ipt or not any(r.source == "nft" for r in nat_rules if r.family == family):
        tool = _iptables_tool(ipt[0].source if ipt else "iptables", family)
        return f"{prefix}{tool} -I {chain} -m conntrack --ctstate INVALID -j DROP"
    return nft_invalid_drop_command("ip6" if family == V6 else "ip", hook, prefix)


def check_invalid_drop(rs: RuleSet, be_liberal: Optional[int], kernel_version: tuple = (),
                       prefix: str = "") -> Finding:
    from .kernel import below_window_is_invalid
    which = ("segments far below or above the window" if kernel_version and below_window_is_invalid(kernel_version)
             else "segments above the window")
    drops_seen = ("; INVALID DROP rules: " + "; ".join(f"{d.family} {d.source} {d.where}: {d.text}"
                                                       for d in rs.invalid_drops[:6])) if rs.invalid_drops else ""
    if be_liberal == 1:
        return Finding("nat.invalid_drop", 1, OK, "nf_conntrack_tcp_be_liberal=1",
                       "conntrack does not mark out-of-window TCP segments INVALID: they keep their NAT "
                       "and never reach this host's stack un-NATed" + drops_seen, "")
    if not rs.nat:
        return Finding("nat.invalid_drop", 1, OK, "no NAT rules",
                       "without NAT an INVALID segment has no translation to miss" + drops_seen, "")
    families = sorted({r.family for r in rs.nat})
    missing, present = [], []
    for fam in families:
        for hook in ("input", "forward"):
            drops = [d for d in rs.invalid_drops if d.family == fam and hook in d.hooks]
            if drops:
                present.append(f"{fam} {hook}: {drops[0].source} {drops[0].where}: {drops[0].text}")
            else:
                missing.append((fam, hook))
    be = f"nf_conntrack_tcp_be_liberal={be_liberal}" if be_liberal is not None else "be_liberal unknown"
    seen = f"NAT rules for {', '.join(families)}; {be}"
    if present:
        seen += "; INVALID DROP: " + "; ".join(present)
    input_missing = [(f, h) for f, h in missing if h == "input"]
    if not missing:
        return Finding("nat.invalid_drop", 1, OK, "INVALID packets are dropped in INPUT and FORWARD",
                       seen, "")
    fixes = "; ".join(_invalid_drop_fix(f, h, rs.nat, prefix) for f, h in missing)
    if input_missing:
        where = ", ".join(f"{f} {h.upper()}" for f, h in missing)
        return Finding("nat.invalid_drop", 1, RISK,
                       f"INVALID packets are not dropped ({where}) and NAT is in use",
                       f"{seen}. Conntrack marks {which} INVALID; such a packet keeps no NAT, reaches "
                       f"this host's stack at the NAT address and draws a RST that kills the NATed "
                       f"connection. Alternative fix: {prefix}sysctl -w "
                       f"net.netfilter.nf_conntrack_tcp_be_liberal=1", fixes)
    return Finding("nat.invalid_drop", 1, INFO,
                   "INVALID packets are dropped in INPUT but not in FORWARD",
                   f"{seen}. The SNAT side is covered; on the DNAT side an INVALID reply from a backend "
                   f"is forwarded un-NATed to the client, which answers RST", fixes)


def check_masquerade_flush(rs: RuleSet, prefix: str = "") -> Finding:
    masq = [r for r in rs.nat if r.kind == "masquerade"]
    if not masq:
        return Finding("nat.masquerade_flush", 3, OK, "no MASQUERADE rules",
                       "address removals do not flush NAT entries (SNAT --to-source entries survive them)", "")
    return Finding("nat.masquerade_flush", 3, INFO,
                   f"{len(masq)} MASQUERADE rules: address removal flushes their connections",
                   "when an address is removed from the outgoing interface (VIP failover, DHCP renewal), "
                   "the masquerade notifier deletes the conntrack entries of that interface; the next "
                   "packet of an idle connection is NATed to another port or not de-NATed, and draws a "
                   "RST. Rules: " + "; ".join(r.text for r in masq[:5])
                   + ". Where the outgoing address is stable, SNAT to it is not flushed",
                   (f"{prefix}nft replace rule <family> <table> <chain> handle <h> <same match> snat to "
                    f"<stable address> fully-random" if masq[0].source == "nft" else
                    f"{prefix}{_iptables_tool(masq[0].source, masq[0].family)} -t nat -R {masq[0].chain} "
                    f"<n> <same match> -j SNAT --to-source <stable address> --random-fully"))


def check_rules(rs: RuleSet, be_liberal: Optional[int], kernel_version: tuple = (),
                prefix: str = "") -> list:
    out = [check_random_fully(rs), check_invalid_drop(rs, be_liberal, kernel_version, prefix),
           check_masquerade_flush(rs, prefix)]
    errors = [r for r in rs.read if r.get("status") == "error"]
    if errors:
        for f in out:       # "no risk" is not established by rules we could not read
            if f.severity == OK and not (f.id == "nat.invalid_drop" and be_liberal == 1):
                f.severity = INFO
                f.title += " (in the rule sets that could be read)"
        out.append(Finding("nat.unreadable", None, INFO, "some rule sets could not be read",
                           "; ".join(r.get("detail") or r["source"] for r in errors)
                           + " — the NAT checks above may miss rules",
                           "run doctor as root" if any("ermission" in r.get("detail", "") for r in errors)
                           else ""))
    return out
