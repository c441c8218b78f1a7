"""Netfilter rule sets read from the host: `iptables-save` / `ip6tables-save` output
(legacy and nft flavours) and `nft -j list ruleset` JSON, normalised into one RuleSet of
NAT rules and INVALID drops. Used by `doctor` (its checks) and by context gathering (the
NAT rule of a clashing SYN). Reading never creates a table.
"""
from __future__ import annotations

import json
import re
import shlex
from collections import deque
from dataclasses import dataclass, field
import shutil
import subprocess
from typing import Optional

V4, V6 = "ipv4", "ipv6"
SOURCE_NAT = ("masquerade", "snat")
NAT_KINDS = {"MASQUERADE": "masquerade", "SNAT": "snat", "DNAT": "dnat", "REDIRECT": "redirect",
             "NETMAP": "netmap"}
# iptables tables whose chains see conntrack's verdict before the stack or forwarding does
# (raw runs before conntrack: ctstate INVALID never matches there), and the hooks they cover.
INVALID_BASE_CHAINS = {"filter": {"INPUT": ("input",), "FORWARD": ("forward",)},
                       "mangle": {"PREROUTING": ("input", "forward"), "INPUT": ("input",),
                                  "FORWARD": ("forward",)},
                       "security": {"INPUT": ("input",), "FORWARD": ("forward",)}}
IPTABLES_BUILTIN = {"INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"}
NF_IP_PRI_CONNTRACK = -200
NFT_FAMILIES = {"ip": (V4,), "ip6": (V6,), "inet": (V4, V6)}
IPTABLES_TABLES = {"filter", "nat", "mangle", "raw", "security"}


@dataclass
class NatRule:
    family: str          # ipv4 | ipv6
    source: str          # iptables-legacy | iptables-nft | iptables | nft
    table: str
    chain: str
    kind: str            # masquerade | snat | dnat | redirect | netmap
    random_fully: bool
    text: str            # the rule as the tool prints it
    fix: str = ""        # the same rule with fully random ports (source NAT only)


@dataclass
class InvalidDrop:
    family: str
    source: str
    hooks: tuple         # of "input", "forward"
    where: str           # table/chain
    text: str


@dataclass
class RuleSet:
    nat: list = field(default_factory=list)
    invalid_drops: list = field(default_factory=list)
    read: list = field(default_factory=list)    # {"source", "status": read|absent|error, "detail"}
    tables: set = field(default_factory=set)    # (source, family, table) seen
    chains: set = field(default_factory=set)    # (source, family, table, chain) seen: who manages the rules

    def extend(self, other: "RuleSet") -> "RuleSet":
        self.nat += other.nat
        self.invalid_drops += other.invalid_drops
        self.read += other.read
        self.tables |= other.tables
        self.chains |= other.chains
        return self


def nft_invalid_drop_command(nft_family: str, hook: str, prefix: str = "") -> str:
    """The nft commands that drop INVALID packets at `hook` (input, forward) in a table of
    our own, ahead of the filter chains (priority -1): where NAT is native nftables."""
    return (f"{prefix}nft add table {nft_family} rst_tracer && {prefix}nft add chain {nft_family} rst_tracer "
            f"{hook} '{{ type filter hook {hook} priority -1; policy accept; }}' && "
            f"{prefix}nft add rule {nft_family} rst_tracer {hook} ct state invalid drop")


# -- iptables-save ----------------------------------------------------------------------------

def _target(tokens: list) -> tuple:
    for flag in ("-j", "--jump", "-g", "--goto"):
        if flag in tokens:
            i = tokens.index(flag)
            if i + 1 < len(tokens):
                return tokens[i + 1], flag in ("-g", "--goto")
    return "", False


def _matches_invalid(tokens: list) -> bool:
    for opt in ("--ctstate", "--state"):
        for i, tok in enumerate(tokens):
            if tok == opt and i + 1 < len(tokens):
                if i > 0 and tokens[i - 1] == "!":
                    continue
                if "INVALID" in tokens[i + 1].split(","):
                    return True
    return False


def _random_fully_spec(spec: str) -> str:
    if re.search(r"(^|\s)--random-fully(\s|$)", spec):
        return spec
    if re.search(r"(^|\s)--random(\s|$)", spec):
        return re.sub(r"(^|\s)--random(?=\s|$)", r"\1--random-fully", spec, count=1)
    return spec + " --random-fully"


def parse_iptables_save(text: str, family: str = V4, source: str = "iptables",
                        tool: str = "iptables", prefix: str = "") -> RuleSet:
    """Rules of every table in an iptables-save dump. `tool` is the command that edits this
    flavour (iptables-nft, ip6tables-legacy, ...), used in the fixes; `prefix` runs it in
    the right namespace."""
    rs = RuleSet()
    table = None
    chains: dict = {}          # table -> {chain: [(tokens, line)]}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            table = line[1:].strip()
            chains.setdefault(table, {})
            rs.tables.add((source, family, table))
            continue
        if table is None or line == "COMMIT":
            continue
        if line.startswith(":"):
            chains[table].setdefault(line[1:].split()[0], [])
            rs.chains.add((source, family, table, line[1:].split()[0]))
            continue
        if line.startswith("[") and "]" in line:       # iptables-save -c counters
            line = line.split("]", 1)[1].strip()
        if not line.startswith("-A "):
            continue
        try:
            tokens = shlex.split(line)
        except ValueError:
            tokens = line.split()
        if len(tokens) < 2:
            continue
        chains[table].setdefault(tokens[1], []).append((tokens, line))

    for tname, tchains in chains.items():
        if tname == "nat":
            for chain, rules in tchains.items():
                for pos, (tokens, line) in enumerate(rules, 1):
                    target, _ = _target(tokens)
                    kind = NAT_KINDS.get(target)
                    if not kind:
                        continue
                    spec = line.split(None, 2)[2] if len(line.split(None, 2)) > 2 else ""
                    rf = "--random-fully" in tokens
                    fix = ""
                    if kind in SOURCE_NAT and not rf:
                        fix = f"{prefix}{tool} -t nat -R {chain} {pos} {_random_fully_spec(spec)}"
                    rs.nat.append(NatRule(family, source, "nat", chain, kind, rf, line, fix))
        bases = INVALID_BASE_CHAINS.get(tname)
        if not bases:
            continue
        # which hooks reach each chain (user chains through -j/-g)
        reach: dict = {}
        for base, hooks in bases.items():
            seen, todo = {base}, deque([base])
            while todo:
                c = todo.popleft()
                for tokens, _ in tchains.get(c, ()):
                    t, _ = _target(tokens)
                    if t in tchains and t not in IPTABLES_BUILTIN and t not in seen:
                        seen.add(t)
                        todo.append(t)
            for c in seen:
                reach.setdefault(c, set()).update(hooks)
        for chain, rules in tchains.items():
            if chain not in reach:
                continue
            for tokens, line in rules:
                if _target(tokens)[0] == "DROP" and _matches_invalid(tokens):
                    rs.invalid_drops.append(InvalidDrop(family, source, tuple(sorted(reach[chain])),
                                                        f"{tname}/{chain}", line))
    return rs


# -- nft -j list ruleset ---------------------------------------------------------------------

def _flatten(v) -> list:
    if isinstance(v, str):
        return [v]
    if isinstance(v, list):
        return [x for item in v for x in _flatten(item)]
    if isinstance(v, dict) and "set" in v:
        return _flatten(v["set"])
    return []


def _is_ct_state(left) -> bool:
    return isinstance(left, dict) and isinstance(left.get("ct"), dict) and left["ct"].get("key") == "state"


def _jump_targets(obj) -> list:
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("jump", "goto") and isinstance(v, dict) and "target" in v:
                out.append(v["target"])
            else:
                out += _jump_targets(v)
    elif isinstance(obj, list):
        for v in obj:
            out += _jump_targets(v)
    return out


def nft_rule_drops_invalid(expr: list) -> bool:
    """`ct state invalid [...] drop`, or `ct state vmap { invalid : drop, ... }`."""
    invalid_match = has_drop = False
    for stmt in expr:
        if not isinstance(stmt, dict):
            continue
        m = stmt.get("match")
        if isinstance(m, dict) and _is_ct_state(m.get("left")) and m.get("op", "==") in ("==", "in") \
                and "invalid" in _flatten(m.get("right")):
            invalid_match = True
        if "drop" in stmt:
            has_drop = True
        vm = stmt.get("vmap")
        if isinstance(vm, dict) and _is_ct_state(vm.get("key")):
            data = vm.get("data")
            entries = data.get("set", []) if isinstance(data, dict) else []
            for entry in entries:
                if isinstance(entry, list) and len(entry) == 2 and "invalid" in _flatten(entry[0]) \
                        and isinstance(entry[1], dict) and "drop" in entry[1]:
                    return True
    return invalid_match and has_drop


def _nat_flags(v) -> list:
    if not isinstance(v, dict):
        return []
    flags = v.get("flags", [])
    return [flags] if isinstance(flags, str) else list(flags or [])


def nft_rule_with_fully_random(text: str) -> str:
    """`oifname "n2" counter packets 5 bytes 300 masquerade` -> `oifname "n2" counter masquerade fully-random`."""
    text = re.sub(r"\bcounter packets \d+ bytes \d+", "counter", text)
    m = re.search(r'\s+comment\s+".*"$', text)
    tail, body = (m.group(0), text[:m.start()]) if m else ("", text)
    flag_re = r"(\s)((?:random|fully-random|persistent)(?:,(?:random|fully-random|persistent))*)$"
    fm = re.search(flag_re, body)
    if fm and re.search(r"\b(masquerade|snat)\b", body[:fm.start()]):
        flags = ["fully-random"] + [f for f in fm.group(2).split(",") if f not in ("random", "fully-random")]
        body = body[:fm.start()] + fm.group(1) + ",".join(flags)
    else:
        body += " fully-random"
    return body + tail


def parse_nft_text_handles(text: str) -> dict:
    """`nft -a list ruleset` -> {(family, table, chain, handle): rule text without the handle}."""
    out, family, table, chain = {}, None, None, None
    for raw in text.splitlines():
        line = raw.strip()
        m = re.match(r"^table\s+(\S+)\s+(\S+)\s*\{", line)
        if m:
            family, table, chain = m.group(1), m.group(2).strip('"'), None
            continue
        m = re.match(r"^chain\s+(\S+)\s*\{", line)
        if m:
            chain = m.group(1).strip('"')
            continue
        if re.match(r"^(set|map|flowtable|counter|quota|limit|ct|secmark|synproxy)\s+\S+.*\{", line) or line == "}":
            chain = None
            continue
        m = re.match(r"^(.*\S)\s+# handle (\d+)$", line)
        if m and chain and not m.group(1).endswith("{"):
            out[(family, table, chain, int(m.group(2)))] = m.group(1)
    return out


def parse_nft_json(text: str, prefix: str = "", handles: Optional[dict] = None,
                   skip_tables: frozenset = frozenset()) -> RuleSet:
    """Native nft rules. Rules holding `xt` expressions were written by iptables-nft and are
    read from iptables-nft-save instead, as are whole tables in `skip_tables`
    ({(family, table)}) when iptables-nft-save already listed them. `handles` (from
    parse_nft_text_handles) gives the rule texts used in fixes."""
    rs = RuleSet()
    doc = json.loads(text) if isinstance(text, str) else text
    items = doc.get("nftables", []) if isinstance(doc, dict) else []
    chains, rules = {}, {}
    for item in items:
        if "chain" in item:
            c = item["chain"]
            chains[(c.get("family"), c.get("table"), c.get("name"))] = c
            for f in NFT_FAMILIES.get(c.get("family"), ()):
                rs.chains.add(("nft", f, c.get("table"), c.get("name")))
        elif "rule" in item:
            r = item["rule"]
            rules.setdefault((r.get("family"), r.get("table"), r.get("chain")), []).append(r)
    handles = handles or {}

    def skipped(fam, table):
        return (fam, table) in skip_tables

    # NAT statements, wherever they are
    for (fam, table, chain), rlist in rules.items():
        if fam not in NFT_FAMILIES or skipped(fam, table):
            continue
        for r in rlist:
            expr = r.get("expr") or []
            if any(isinstance(s, dict) and "xt" in s for s in expr):
                continue
            for stmt in expr:
                if not isinstance(stmt, dict):
                    continue
                for kind in ("masquerade", "snat", "dnat", "redirect"):
                    if kind not in stmt:
                        continue
                    v = stmt[kind]
                    flags = _nat_flags(v)
                    rf = "fully-random" in flags or "random-fully" in flags
                    sfam = v.get("family") if isinstance(v, dict) else None
                    fams = {"ip": (V4,), "ip6": (V6,)}.get(sfam, NFT_FAMILIES[fam])
                    h = r.get("handle")
                    rtext = handles.get((fam, table, chain, h), "")
                    fix = ""
                    if kind in SOURCE_NAT and not rf:
                        if rtext:
                            fix = (f"{prefix}nft replace rule {fam} {table} {chain} handle {h} "
                                   f"{shlex.quote(nft_rule_with_fully_random(rtext))}")
                        else:
                            fix = (f"{prefix}nft -a list chain {fam} {table} {chain}   # then: nft replace "
                                   f"rule {fam} {table} {chain} handle {h} <the same rule with "
                                   f"'{kind} fully-random'>")
                    shown = rtext or f"{fam} {table} {chain} handle {h}: {kind} {json.dumps(v)}"
                    for f in fams:
                        rs.nat.append(NatRule(f, "nft", table, chain, kind, rf,
                                              f"table {fam} {table} chain {chain}: {shown}", fix))
    # INVALID drops reachable from input/forward hooks (or prerouting after conntrack)
    for (fam, table, name), c in chains.items():
        if fam not in NFT_FAMILIES or skipped(fam, table):
            continue
        hook, prio = c.get("hook"), c.get("prio", 0)
        if hook in ("input", "forward"):
            hooks = (hook,)
        elif hook == "prerouting" and isinstance(prio, int) and prio > NF_IP_PRI_CONNTRACK:
            hooks = ("forward", "input")
        else:
            continue
        seen, todo = {name}, deque([name])
        while todo:
            cur = todo.popleft()
            for r in rules.get((fam, table, cur), ()):
                expr = r.get("expr") or []
                if nft_rule_drops_invalid(expr):
                    h = r.get("handle")
                    shown = handles.get((fam, table, cur, h)) or "ct state invalid drop"
                    for f in NFT_FAMILIES[fam]:
                        rs.invalid_drops.append(InvalidDrop(f, "nft", tuple(sorted(hooks)),
                                                            f"{fam} {table}/{cur}", shown))
                for t in _jump_targets(expr):
                    if (fam, table, t) in chains and t not in seen:
                        seen.add(t)
                        todo.append(t)
    return rs


# -- reading the calling thread's namespace -----------------------------------------------

TOOL_TIMEOUT = 15
# (source, family, save command, edit command); a flavour whose tool is missing is skipped
IPTABLES_FLAVOURS = (
    ("iptables-legacy", V4, "iptables-legacy-save", "iptables-legacy"),
    ("iptables-nft", V4, "iptables-nft-save", "iptables-nft"),
    ("iptables-legacy", V6, "ip6tables-legacy-save", "ip6tables-legacy"),
    ("iptables-nft", V6, "ip6tables-nft-save", "ip6tables-nft"),
)
# iptables < 1.8 has neither -legacy nor -nft names
IPTABLES_PLAIN = (("iptables", V4, "iptables-save", "iptables"), ("iptables", V6, "ip6tables-save", "ip6tables"))


def _run(cmd: list) -> tuple:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=TOOL_TIMEOUT)
    except subprocess.TimeoutExpired:
        return None, f"{cmd[0]} timed out after {TOOL_TIMEOUT} s"
    except OSError as e:
        return None, f"{cmd[0]}: {e.strerror}"
    if p.returncode != 0:
        err = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        return None, f"{' '.join(cmd)}: {err}"
    return p.stdout, ""


def read_rules(prefix: str = "", handles: bool = True) -> RuleSet:
    """Every flavour present: iptables legacy and nft (v4 and v6), then native nft. Without
    `-t`, *-save dumps only the tables that exist: reading never creates one. `handles`:
    also list nft rule handles (one more nft run), which only fix commands need."""
    rs = RuleSet()
    flavours = [f for f in IPTABLES_FLAVOURS if shutil.which(f[2])]
    if not any(f[1] == V4 for f in flavours):
        flavours += [f for f in IPTABLES_PLAIN if f[1] == V4 and shutil.which(f[2])]
    if not any(f[1] == V6 for f in flavours):
        flavours += [f for f in IPTABLES_PLAIN if f[1] == V6 and shutil.which(f[2])]
    for source, family, save, tool in flavours:
        text, err = _run([save])
        if text is None:
            rs.read.append({"source": save, "status": "error", "detail": err})
            continue
        rs.extend(parse_iptables_save(text, family, source, tool, prefix))
        rs.read.append({"source": save, "status": "read"})
    for source, family, save, tool in IPTABLES_FLAVOURS:
        if not any(save == f[2] for f in flavours):
            rs.read.append({"source": save, "status": "absent"})
    if shutil.which("nft"):
        text, err = _run(["nft", "-j", "list", "ruleset"])
        if text is None:
            rs.read.append({"source": "nft", "status": "error", "detail": err})
        else:
            listing = _run(["nft", "-a", "list", "ruleset"])[0] if handles else ""
            rule_handles = parse_nft_text_handles(listing or "")
            # tables iptables-nft-save listed are read from there (xt rules are unreadable here)
            skip = frozenset(("ip6" if fam == V6 else "ip", t) for src, fam, t in rs.tables
                             if src == "iptables-nft" and t in IPTABLES_TABLES)
            try:
                rs.extend(parse_nft_json(text, prefix, rule_handles, skip))
                rs.read.append({"source": "nft", "status": "read"})
            except ValueError as e:
                rs.read.append({"source": "nft", "status": "error", "detail": f"bad JSON: {e}"})
    else:
        rs.read.append({"source": "nft", "status": "absent"})
    return rs
