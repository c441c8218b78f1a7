"""Operator filters on verdicts (--netns, --port, --host). A verdict matches when any of
its tuples (the flow as seen, the NAT inside and outside tuples) matches."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field


@dataclass
class VerdictFilter:
    netns: set = field(default_factory=set)     # inode numbers (int) or names (str)
    ports: set = field(default_factory=set)
    hosts: set = field(default_factory=set)     # ipaddress objects

    def _tuples(self, record: dict) -> list:
        out = [record["flow"]] if record.get("flow") else []
        nat = record.get("nat") or {}
        out += [t for t in (nat.get("inside"), nat.get("outside")) if t]
        return out

    def matches(self, record: dict) -> bool:
        if record.get("type") != "verdict":
            return True
        if self.netns and not ({record.get("netns"), record.get("netns_name")} & self.netns):
            return False
        tuples = self._tuples(record)
        if self.ports and not any({t["sport"], t["dport"]} & self.ports for t in tuples):
            return False
        if self.hosts:
            addrs = {ipaddress.ip_address(a) for t in tuples for a in (t["src"], t["dst"])}
            if not addrs & self.hosts:
                return False
        return True
