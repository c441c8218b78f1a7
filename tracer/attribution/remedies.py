"""Remedies fitted to the firewall they change. A rule's plain remedy is right for a host
whose rules the operator writes; where something else manages them, its commands would be
lost or never reached:
- Docker puts its own FORWARD rules (and its MASQUERADE) back in front at every start:
  forwarded packets are the operator's in DOCKER-USER, which Docker evaluates first and
  leaves alone; a NAT rule of ours goes in front of Docker's (-I ... 1).
- Native nftables NAT (no iptables NAT rule): nft commands, in a table of our own.
- kube-proxy rewrites its chains on every sync: name its setting instead of a raw rule.
The facts come from enrichment (Context.firewall, tracer/enrich.py firewall_facts), read
in the router's namespace; {} (unknown) keeps the plain remedy."""
from __future__ import annotations

import ipaddress
import re

from ..nfrules import nft_invalid_drop_command
from ..schema import Remedy

INVALID_IN = "iptables -I INPUT -m conntrack --ctstate INVALID -j DROP"
BE_LIBERAL = "sysctl -w net.netfilter.nf_conntrack_tcp_be_liberal=1"
KUBE_PROXY_BE_LIBERAL = ("# kube-proxy >= 1.29: KubeProxyConfiguration conntrack.tcpBeLiberal: true "
                         "(flag --conntrack-tcp-be-liberal); it sets nf_conntrack_tcp_be_liberal=1 itself")


def invalid_drop(plain: Remedy, facts: dict) -> Remedy:
    """Incident 1: drop INVALID segments before the host's stack answers them or they are
    forwarded un-NATed (INPUT is nobody's but the operator's)."""
    if facts.get("kube_proxy"):
        return Remedy(
            "kube-proxy manages this host's rules: let it make conntrack's window tracking liberal "
            "(a rule added to its chains is rewritten on its next sync). It drops INVALID forwarded "
            "packets in its own chains, not those addressed to the host: INPUT needs the rule.",
            [KUBE_PROXY_BE_LIBERAL, INVALID_IN])
    if facts.get("docker"):
        return Remedy(
            "Docker manages FORWARD and puts its rules back in front at every start: drop INVALID "
            "forwarded packets in DOCKER-USER, which it evaluates first and leaves alone; INPUT is "
            "not Docker's. Or make conntrack's window tracking liberal.",
            [INVALID_IN, "iptables -I DOCKER-USER -m conntrack --ctstate INVALID -j DROP", BE_LIBERAL])
    if facts.get("nft"):
        return Remedy("NAT here is native nftables: drop INVALID packets in a table of its own, "
                      "ahead of the filter chains; or make conntrack's window tracking liberal.",
                      [nft_invalid_drop_command("inet", "input"), nft_invalid_drop_command("inet", "forward"),
                       BE_LIBERAL])
    return plain


def _masquerade_specs(facts: dict, source: str) -> list:
    """The match part ('-s 172.17.0.0/16 ! -o docker0') of the POSTROUTING MASQUERADE rules
    whose source network holds `source` (the inside address): Docker's, where its chains
    exist (not its hairpin rule for the host's own addresses, which has no -s)."""
    out = []
    for text in facts.get("rules") or ():
        m = re.match(r"-A POSTROUTING (.*) -j MASQUERADE\b", text)
        net = re.search(r"(?:^|\s)-s (\S+)", m.group(1)) if m else None
        if net and "! -s" not in m.group(1):
            try:
                if ipaddress.ip_address(source) in ipaddress.ip_network(net.group(1), strict=False):
                    out.append(m.group(1))
            except ValueError:
                continue
    return out


def random_fully(plain: Remedy, facts: dict, source: str) -> Remedy:
    """Incident 2: fully random source ports for the rule that NATed the clashing SYN."""
    if facts.get("kube_proxy"):
        return Remedy(
            "kube-proxy (>= 1.16) already uses --random-fully for its own MASQUERADE when iptables "
            "supports it (>= 1.6.2): a rule without it belongs to the CNI plugin (flannel, Calico's "
            "natOutgoing, ...) or to kube-proxy on an old iptables. Configure that component; "
            "it rewrites its rules.",
            ["iptables --version   # >= 1.6.2 for kube-proxy to add --random-fully"]
            + [f"# rule without it: {r}" for r in facts.get("rules") or ()][:3])
    specs = _masquerade_specs(facts, source)
    if facts.get("docker") and specs:
        return Remedy(
            "Docker writes its MASQUERADE without --random-fully and puts it back at every start: "
            "insert one with --random-fully in front of it (Docker's then matches nothing).",
            [f"iptables -t nat -I POSTROUTING 1 {spec} -j MASQUERADE --random-fully" for spec in specs])
    if facts.get("nft") and facts.get("fixes"):
        return Remedy("NAT here is native nftables: make its masquerade/snat statements fully-random.",
                      list(facts["fixes"]))
    return plain


def stable_snat(plain: Remedy, facts: dict, source: str) -> Remedy:
    """Incidents 3 and 4: SNAT to a fixed address instead of MASQUERADE (which forgets its
    connections when its address or device goes)."""
    specs = _masquerade_specs(facts, source)
    if facts.get("docker") and specs:
        return Remedy(
            plain.text + " Docker's MASQUERADE comes back at every start: put a SNAT rule in front of it.",
            [f"iptables -t nat -I POSTROUTING 1 {spec} -j SNAT --to-source <stable address>" for spec in specs]
            + [c for c in plain.commands if not c.startswith("iptables -t nat")])
    if facts.get("nft"):
        return Remedy(plain.text + " NAT here is native nftables: replace its masquerade statement.",
                      ["nft -a list ruleset | grep masquerade   # then: nft replace rule <family> <table> "
                       "<chain> handle <h> <the same match> snat to <stable address>"]
                      + [c for c in plain.commands if not c.startswith("iptables -t nat")])
    return plain
