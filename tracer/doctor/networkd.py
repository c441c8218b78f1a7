"""Check 5: systemd-networkd DHCP that drops and re-adds the address on renewal (incident 4).

Pure parsing of `.network` files (and their `.network.d/*.conf` drop-ins) given as text;
`load_networks()` does the reading, from the directories in RST_TRACER_NETWORKD_DIRS
(colon-separated) or systemd's own search path."""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from typing import Optional

from .findings import INFO, OK, RISK, Finding

DEFAULT_DIRS = ("/etc/systemd/network", "/run/systemd/network", "/usr/local/lib/systemd/network",
                "/usr/lib/systemd/network", "/lib/systemd/network")
ENV_DIRS = "RST_TRACER_NETWORKD_DIRS"
TRUE = {"yes", "true", "on", "1"}
DHCP4_ON = TRUE | {"ipv4", "both"}          # "both" is the pre-219 spelling
KEEP_OK = TRUE | {"dhcp", "dhcp-on-stop"}   # systemd >= 243; CriticalConnection=yes before


def parse_unit(text: str) -> dict:
    """systemd unit syntax -> {section: [(key, value), ...]} (repeated keys kept in order)."""
    out: dict = {}
    section = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            out.setdefault(section, [])
            continue
        if section is None or "=" not in line:
            continue
        key, value = line.split("=", 1)
        out[section].append((key.strip(), value.strip()))
    return out


def merge_units(parsed: list) -> dict:
    """A main file followed by its drop-ins, in order."""
    merged: dict = {}
    for p in parsed:
        for section, items in p.items():
            merged.setdefault(section, []).extend(items)
    return merged


def _last(unit: dict, section: str, key: str) -> Optional[str]:
    vals = [v for k, v in unit.get(section, []) if k == key]
    return vals[-1] if vals else None


def _static_addresses(unit: dict) -> list:
    addrs = [v for k, v in unit.get("Network", []) if k == "Address" and v]
    addrs += [v for sec, items in unit.items() if sec == "Address" for k, v in items if k == "Address" and v]
    # 0.0.0.0/N and ::/N ask networkd to pick a free range: not a stable host address
    return [a for a in addrs if not a.split("/")[0] in ("0.0.0.0", "::")]


@dataclass
class NetworkFile:
    name: str                       # e.g. 10-eth0.network
    path: str
    unit: dict
    dropins: list = field(default_factory=list)

    @property
    def match_names(self) -> list:
        names = []
        for k, v in self.unit.get("Match", []):
            if k == "Name":
                names += v.split() if v else []
        return names


def matches_interfaces(patterns: list, interfaces) -> list:
    """Interfaces a [Match] Name= list selects (globs, a leading ! negates the whole list)."""
    if not patterns:
        return list(interfaces)
    neg = patterns[0].startswith("!")
    pats = [p.lstrip("!") for p in patterns]
    hit = [i for i in interfaces if any(fnmatch.fnmatchcase(i, p) for p in pats)]
    return [i for i in interfaces if i not in hit] if neg else hit


def evaluate_network(nf: NetworkFile) -> Optional[Finding]:
    """A finding for one .network file that enables DHCPv4; None when it does not."""
    u = nf.unit
    dhcp = (_last(u, "Network", "DHCP") or "").lower()
    if dhcp not in DHCP4_ON:
        return None
    where = nf.path + (" + " + ", ".join(nf.dropins) if nf.dropins else "")
    keep = _last(u, "Network", "KeepConfiguration")
    critical = _last(u, "DHCPv4", "CriticalConnection") or _last(u, "DHCP", "CriticalConnection")
    static = _static_addresses(u)
    seen = f"{where}: [Network] DHCP={_last(u, 'Network', 'DHCP')}"
    if keep is not None:
        seen += f", KeepConfiguration={keep}"
    if critical is not None:
        seen += f", CriticalConnection={critical}"
    if keep is not None and keep.lower() in KEEP_OK:
        return Finding("networkd.dhcp", 4, OK, f"{nf.name}: DHCP with KeepConfiguration={keep}",
                       seen + " — networkd keeps the DHCP address over renewals and restarts", "")
    if critical is not None and critical.lower() in TRUE:
        return Finding("networkd.dhcp", 4, OK, f"{nf.name}: DHCP with CriticalConnection={critical}",
                       seen + " — networkd never drops the DHCP address (pre-243 spelling)", "")
    if static:
        return Finding("networkd.dhcp", 4, OK, f"{nf.name}: DHCP plus static address {static[0]}",
                       seen + f", static Address={', '.join(static)}: NAT through the static "
                              "address survives DHCP renewals", "")
    note = ""
    if keep is not None and keep.lower() == "static":
        note = " (KeepConfiguration=static keeps static addresses only, not the DHCP lease)"
    dropin_dir = os.path.join("/etc/systemd/network", nf.name + ".d")
    fix = (f"mkdir -p {dropin_dir} && printf '[Network]\\nKeepConfiguration=dhcp\\n' > "
           f"{dropin_dir}/50-keep-configuration.conf && (networkctl reload || systemctl restart "
           f"systemd-networkd)   # systemd < 243: [DHCPv4] CriticalConnection=yes")
    return Finding("networkd.dhcp", 4, RISK,
                   f"{nf.name}: DHCP without KeepConfiguration= or a static address",
                   seen + note + " — a DHCP renewal or a networkd restart can remove and re-add the "
                   "address; MASQUERADE then flushes the conntrack entries of every NATed connection "
                   "through it, and their next packet draws a RST", fix)


def load_networks(dirs=None) -> tuple:
    """([NetworkFile], dirs used). systemd's rules: the same file name in an earlier directory
    overrides later ones; a symlink to /dev/null or an empty file masks it; drop-ins from
    every directory apply in file-name order."""
    if dirs is None:
        env = os.environ.get(ENV_DIRS)
        dirs = [d for d in env.split(":") if d] if env else list(DEFAULT_DIRS)
    mains: dict = {}
    dropins: dict = {}
    for d in dirs:
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for n in names:
            p = os.path.join(d, n)
            if n.endswith(".network") and n not in mains:
                mains[n] = p
            elif n.endswith(".network.d") and os.path.isdir(p):
                for c in sorted(os.listdir(p)):
                    if c.endswith(".conf"):
                        dropins.setdefault(n[:-2], {}).setdefault(c, os.path.join(p, c))
    out = []
    for n in sorted(mains):
        p = mains[n]
        try:
            if os.path.realpath(p) == "/dev/null":
                continue
            with open(p) as f:
                text = f.read()
        except OSError:
            continue
        if not text.strip():
            continue
        parts = [parse_unit(text)]
        used = []
        for c, cp in sorted(dropins.get(n, {}).items()):
            try:
                with open(cp) as f:
                    parts.append(parse_unit(f.read()))
                used.append(cp)
            except OSError:
                pass
        out.append(NetworkFile(n, p, merge_units(parts), used))
    return out, list(dirs)


def check_networkd(networks: list, dirs: list, interfaces=None, applicable: bool = True,
                   why_not: str = "") -> list:
    """Findings for the DHCP .network files. `interfaces`, when given, limits the check to
    files whose [Match] Name= selects an existing interface."""
    if not applicable:
        return [Finding("networkd.dhcp", 4, INFO, "systemd-networkd not checked", why_not, "")]
    out = []
    skipped = []
    for nf in networks:
        f = evaluate_network(nf)
        if f is None:
            continue
        if interfaces is not None:
            hit = matches_interfaces(nf.match_names, interfaces)
            if not hit:
                skipped.append(nf.name)
                continue
            f.detail += f" (matches interface {', '.join(hit)})"
        out.append(f)
    if not out:
        detail = f"no .network file in {', '.join(dirs)} enables DHCPv4"
        if skipped:
            detail += f" for an existing interface ({', '.join(skipped)}: no interface matches)"
        out.append(Finding("networkd.dhcp", 4, OK, "no systemd-networkd DHCP", detail, ""))
    return out
