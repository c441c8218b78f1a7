"""Operator filters on verdicts (--netns, --port, --host, --container, --pod). A verdict
matches when any of its tuples (the flow as seen, the NAT inside and outside tuples) matches,
and any of its endpoints' workloads (local, client, router, server, peer) for --container
and --pod."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from .corrections import Chains

# the name verdicts give the host's (PID 1's) namespace; not a file under /run/netns
HOST_NETNS_NAME = "host"


def check_netns(specs) -> list:
    """Checks --netns values before anything is attached: an inode must name a namespace
    that exists (ValueError otherwise: a typo would watch nothing, silently); a name is
    matched against each verdict's netns_name, which follows /run/netns as namespaces come
    and go, so one that does not exist yet only gets a warning. Returns the warnings."""
    from .doctor.host import TargetError, resolve_target

    warnings = []
    for spec in specs:
        try:
            resolve_target(str(spec))
        except TargetError as e:
            if isinstance(spec, int):
                raise ValueError(str(e)) from None
            if spec != HOST_NETNS_NAME:
                warnings.append(f"namespace {spec!r} does not exist yet: verdicts in it will be "
                                "shown if it appears under /run/netns")
    return warnings


@dataclass
class VerdictFilter:
    """A correction is judged like a verdict (its own namespace and tuples), and is also
    shown when the record it supersedes was: a consumer must never be left with a verdict
    that was corrected. One whose superseded record was not shown is, for its consumer, the
    first verdict of its event."""
    netns: set = field(default_factory=set)     # inode numbers (int) or names (str)
    ports: set = field(default_factory=set)
    hosts: set = field(default_factory=set)     # ipaddress objects
    containers: set = field(default_factory=set)  # names, or ids (a prefix of 4 or more hex digits)
    pods: set = field(default_factory=set)      # "namespace/name"
    _shown: Chains = field(default_factory=Chains, repr=False)   # ids of the records shown

    def _tuples(self, record: dict) -> list:
        out = [record["flow"]] if record.get("flow") else []
        nat = record.get("nat") or {}
        out += [t for t in (nat.get("inside"), nat.get("outside")) if t]
        return out

    def matches(self, record: dict) -> bool:
        if record.get("type") not in ("verdict", "correction") or \
                not (self.netns or self.ports or self.hosts or self.containers or self.pods):
            return True
        show = self._shown.superseded(record) is not None or self._criteria(record)
        if show:
            self._shown.remember(record, True)
        return show

    def _criteria(self, record: dict) -> bool:
        if self.netns and not ({record.get("netns"), record.get("netns_name")} & self.netns):
            return False
        tuples = self._tuples(record)
        if self.ports and not any({t["sport"], t["dport"]} & self.ports for t in tuples):
            return False
        if self.hosts:
            addrs = {ipaddress.ip_address(a) for t in tuples for a in (t["src"], t["dst"])}
            if not addrs & self.hosts:
                return False
        roles = (record.get("workloads") or {}).values()
        if self.pods and not any(w.get("pod") and f"{w['pod']['namespace']}/{w['pod']['name']}" in self.pods
                                 for w in roles):
            return False
        if self.containers and not any(self._container_matches(c) for w in roles for c in w.get("containers") or ()):
            return False
        return True

    def _container_matches(self, c: dict) -> bool:
        return bool({c.get("name"), c.get("k8s_container")} & self.containers) or \
            any(len(x) >= 4 and c.get("id", "").startswith(x) for x in self.containers)
