"""Lab scenarios: each reproduces one incident (or an ordinary reset) deterministically and
returns the facts the tracer is expected to find (the ground truth for tests and demo).

Common facts: `inside` (the flow as the client sees it) and `outside` (after NAT) as
{src, sport, dst, dport}; `netns` inodes; what the client observed; `rsts`: every RST seen
on the wire, with the namespace that sent it (cli, nat or srv: from packet sockets in each
namespace; the router's own RSTs are told apart from the ones it forwards); `duration`.
Timestamps are wall-clock seconds (time.time()).

The programs a scenario starts keep running until the lab is torn down (so that nothing
they do on exit lands in the scenario's window): run each incident scenario in a fresh
NatLab (invalid-window and closed-port can share one, as before).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from .topology import CLI_ADDR, NAT_OUT_ADDR, NAT_OUT_PREFIX, SRV_ADDR, LabError, NatLab

SERVER_PORT = 8080
CLOSED_PORT = 9


@dataclass
class Outcome:
    name: str
    facts: dict = field(default_factory=dict)


class Follow:
    """Every JSON line of a lab program, read by a thread as it comes; wait() for one."""

    def __init__(self, proc, label: str = ""):
        self.proc, self.label = proc, label
        self.lines: list = []
        self.cv = threading.Condition()
        self.eof = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self.cv:
                self.lines.append(msg)
                self.cv.notify_all()
        with self.cv:
            self.eof = True
            self.cv.notify_all()

    def mark(self) -> int:
        with self.cv:
            return len(self.lines)

    def find(self, event: str, since: int = 0):
        with self.cv:
            return next((m for m in self.lines[since:] if m.get("event") == event), None)

    def wait(self, event, timeout: float = 10.0, since: int = 0) -> dict:
        """The first line (from index `since`) whose event is `event` (or one of them)."""
        events = (event,) if isinstance(event, str) else tuple(event)
        deadline = time.monotonic() + timeout
        with self.cv:
            while True:
                for m in self.lines[since:]:
                    if m.get("event") in events:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or self.eof:
                    break
                self.cv.wait(left)
        err = ""
        if self.proc.poll() is not None:
            err = self.proc.stderr.read().strip()
        raise LabError(f"{self.label or 'lab program'} did not report {'/'.join(events)} within {timeout}s "
                       f"(got {[m.get('event') for m in self.lines[since:]]}) {err}")

    def cmd(self, line: str, event, timeout: float = 5.0) -> dict:
        since = self.mark()
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.wait(event, timeout, since)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(2)
            except Exception:
                pass


def follow(lab: NatLab, ns: str, args: list, label: str = "") -> Follow:
    return Follow(lab.spawn(ns, args), label or f"{args[0]} in {ns}")


def start_server(lab: NatLab, port: int = SERVER_PORT, addr: str = SRV_ADDR) -> Follow:
    srv = follow(lab, lab.srv, ["server", "--addr", addr, "--port", str(port)])
    srv.wait("listening")
    return srv


def invalid_window(lab: NatLab, offset: int = 1 << 30) -> Outcome:
    """Incident 1: a segment far above the window is INVALID at the router, is not
    de-NATed, and the router's own stack answers RST; the client then gets ECONNRESET.
    `offset` moves the injected segment (relative to the server's snd_nxt): far below the
    window is INVALID before 6.1 and ignored since. `client_after` says what the client saw."""
    start_server(lab)
    injector = follow(lab, lab.srv, ["inject", "--iface", "s0", "--sport", str(SERVER_PORT),
                                     f"--offset={offset}"])
    injector.wait("sniffing")
    client = follow(lab, lab.cli, ["client", "--addr", SRV_ADDR, "--port", str(SERVER_PORT)])
    conn = client.wait("connected")
    client.wait("response")
    injected = injector.wait("injected")
    time.sleep(0.3)  # let the router's RST reach the server
    after = client.cmd("send", ("error", "response"))
    client.proc.stdin.write("quit\n")
    client.proc.stdin.flush()
    nat_ip, nat_port = injected["dst"].rsplit(":", 1)
    return Outcome("invalid-window", {
        "inside": {"src": CLI_ADDR, "sport": conn["lport"], "dst": SRV_ADDR, "dport": SERVER_PORT},
        "outside": {"src": nat_ip, "sport": int(nat_port), "dst": SRV_ADDR, "dport": SERVER_PORT},
        "injected_seq": injected["seq"],
        "client_after": after.get("errno") or after.get("event"),
        "netns": {"cli": lab.netns_inode(lab.cli), "nat": lab.netns_inode(lab.nat),
                  "srv": lab.netns_inode(lab.srv)},
    })


def closed_port(lab: NatLab, count: int = 50) -> Outcome:
    """Ordinary resets: SYNs to a port nobody listens on, straight to the server's stack."""
    proc = follow(lab, lab.cli, ["connect-many", "--addr", SRV_ADDR, "--port", str(CLOSED_PORT),
                                 "--count", str(count)])
    done = proc.wait("done", timeout=30 + count * 0.01)
    return Outcome("closed-port", {"count": count, "outcomes": done["outcomes"],
                                   "port": CLOSED_PORT, "netns": {"srv": lab.netns_inode(lab.srv)}})


# -- helpers for the scenarios below -----------------------------------------------------
class ScenarioSkipped(LabError):
    """The scenario cannot or may not run here (e.g. it needs an opt-in): skip, not fail."""


RACE_SRC_BASE = 10          # snat-race clients: 10.200.1.10 (loser), .11 (winner), /32s on c0
APP_ABORT_PORTS = (8081, 8082)
VIP_MOVE_VIP = "10.200.2.100"
ALLOW_GLOBAL_SYSCTL = "RST_TRACER_ALLOW_GLOBAL_SYSCTL"


def tup(src: str, sport: int, dst: str, dport: int) -> dict:
    return {"src": src, "sport": int(sport), "dst": dst, "dport": int(dport)}


def netns_facts(lab: NatLab) -> dict:
    return {"cli": lab.netns_inode(lab.cli), "nat": lab.netns_inode(lab.nat), "srv": lab.netns_inode(lab.srv)}


class Sniffers:
    """A packet socket in each lab namespace (all its interfaces, both directions): the wire
    as each namespace saw it. `rsts()` says which namespace sent each RST."""

    def __init__(self, lab: NatLab, flags: str = "", port: int = 0):
        self.lab, self.flags, self.port = lab, flags, port
        self.procs: dict = {}

    def __enter__(self) -> "Sniffers":
        for name, ns in (("cli", self.lab.cli), ("nat", self.lab.nat), ("srv", self.lab.srv)):
            args = ["sniff", "--iface", "any", "--wait", "120"]
            if self.flags:
                args += ["--flags", self.flags]
            if self.port:
                args += ["--port", str(self.port)]
            self.procs[name] = follow(self.lab, ns, args, f"sniffer in {name}")
        for f in self.procs.values():
            f.wait("sniffing")
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, settle: float = 0.2) -> None:
        if any(f.proc.poll() is None for f in self.procs.values()):
            time.sleep(settle)
        for f in self.procs.values():
            f.stop()

    def segments(self, ns: str = "") -> list:
        out = []
        for name, f in self.procs.items():
            if not ns or ns == name:
                with f.cv:
                    out += [dict(m, ns=name) for m in f.lines if m.get("event") == "segment"]
        return sorted(out, key=lambda m: m["ts"])

    def rsts(self) -> list:
        """Every distinct RST, as it left the namespace that sent it. An endpoint's RST is
        one it transmits; the router's own is one it transmits without having received the
        same (seq, ack) RST on its other interface just before (that would be forwarding)."""
        segs = self.segments()
        out = []
        for s in segs:
            if "RST" not in s["flags"] or s["dir"] != "out" or s["iface"] == "lo":
                continue
            if s["ns"] == "nat" and any(
                    o["ns"] == "nat" and o["dir"] == "in" and "RST" in o["flags"] and o["iface"] != s["iface"]
                    and (o["seq"], o["ack"]) == (s["seq"], s["ack"]) and 0 <= s["ts"] - o["ts"] < 0.5
                    for o in segs):
                continue
            out.append({"sender": s["ns"], "ts": s["ts"], "iface": s["iface"],
                        **tup(s["src"], s["sport"], s["dst"], s["dport"]),
                        "seq": s["seq"], "ack": s["ack"], "flags": s["flags"]})
        return out


def wait_until(pred, timeout: float, interval: float = 0.1):
    """pred()'s first truthy value within `timeout` s (else None)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(interval)


def find_entry(lab: NatLab, src: str, sport: int, dport: int = 0, entries: list = None):
    """The router's conntrack entry whose original direction starts at src:sport."""
    for e in entries if entries is not None else lab.conntrack():
        o = e["orig"]
        if o.get("src") == src and o.get("sport") == sport and (not dport or o.get("dport") == dport):
            return e
    return None


def _masquerade(lab: NatLab, random_fully) -> bool:
    """Makes the router's MASQUERADE match `random_fully` (None: as the lab was built)."""
    if random_fully is not None:
        opts = [o for o in lab.masquerade_opts if o != "--random-fully"]
        lab.set_masquerade(opts + ["--random-fully"] if random_fully else opts)
    return "--random-fully" in lab.masquerade_opts


def idle_connection(lab: NatLab, port: int = SERVER_PORT):
    """A connection cli -> srv through the router, one small exchange each way (so the
    router's entry is ESTABLISHED and ASSURED), then idle. Both ends are `peer` programs
    driven from stdin; their monitors report an RST as it lands."""
    server = follow(lab, lab.srv, ["peer", "--listen", "--addr", SRV_ADDR, "--port", str(port)], "server")
    server.wait("listening")
    client = follow(lab, lab.cli, ["peer", "--addr", SRV_ADDR, "--port", str(port)], "client")
    conn = client.wait("connected")
    acc = server.wait("accepted")
    client.cmd("send 16", "sent")
    server.cmd("read 2", "received")
    server.cmd("send 16", "sent")
    client.cmd("read 2", "received")
    inside = tup(CLI_ADDR, conn["local"]["port"], SRV_ADDR, port)
    outside = tup(acc["peer"]["addr"], acc["peer"]["port"], SRV_ADDR, port)
    return client, server, inside, outside


def _pids(client: Follow, server: Follow) -> dict:
    """The processes of an idle_connection's two sockets, as they reported themselves."""
    return {"cli": client.find("connected")["pid"], "srv": server.find("listening")["pid"]}


def _readdress(lab: NatLab) -> dict:
    """What a DHCP client or a keepalived failover does to the router's outside interface:
    the address MASQUERADE uses is removed, then added back."""
    ts = {"removed": time.time()}
    lab.del_address(lab.nat, "n2", NAT_OUT_ADDR, NAT_OUT_PREFIX)
    ts["removed_done"] = time.time()
    lab.add_address(lab.nat, "n2", NAT_OUT_ADDR, NAT_OUT_PREFIX)
    ts["readded"] = time.time()
    return ts


def _server_speaks_first(lab: NatLab, client: Follow, server: Follow, outside: dict, probe: str,
                         client_after: bool) -> dict:
    """The router has no entry for the flow any more: the server's next segment (a keepalive
    probe or data) is not de-NATed, reaches the router's own stack (a new entry without NAT)
    and the router answers RST (no socket); the server's socket is reset. Then, if asked,
    the client sends on its connection and learns it is dead (ECONNRESET)."""
    if probe not in ("keepalive", "data"):
        raise LabError(f"probe must be keepalive or data, not {probe!r}")
    facts: dict = {"probe": probe}
    since = server.mark()
    facts["probe_sent"] = time.time()
    if probe == "keepalive":  # SO_KEEPALIVE idle=1 intvl=1: the first probe ~1 s from now
        server.cmd("keepalive 1 1 5", "keepalive")
    else:
        server.cmd("send 8", "sent")
    err = server.wait("error", timeout=5, since=since)
    facts["server_after"] = err.get("errno")
    facts["server_reset_at"] = err["ts"]
    # the server's segment made a new entry (srv -> router address, no NAT), but one whose
    # only reply is an RST is deleted at once: normally nothing is left of it
    facts["router_entry"] = find_entry(lab, SRV_ADDR, outside["dport"], outside["sport"])
    if client_after:
        since = client.mark()
        facts["client_sent"] = time.time()
        client.cmd("send 8", "sent")
        err = client.wait("error", timeout=5, since=since)
        facts["client_after"] = err.get("errno")
        facts["client_reset_at"] = err["ts"]
    return facts


def _gone(lab: NatLab, src: str, sport: int, timeout: float):
    """Seconds until the router's entry for src:sport is gone (None if it stayed)."""
    t0 = time.monotonic()
    if not wait_until(lambda: find_entry(lab, src, sport) is None, timeout, 0.05):
        return None
    return time.monotonic() - t0


# -- incident 1 in the service (DNAT) direction ------------------------------------------
def invalid_dnat(lab: NatLab, offset: int = 1 << 30) -> Outcome:
    """Incident 1, service direction: the backend's reply is INVALID at the router, is not
    un-DNATed, and the client (no socket for backend:port) answers RST; the client then gets
    ECONNRESET from the backend's listener."""
    t_start = time.monotonic()
    if not lab.dnat:
        lab.add_dnat()
    vip, vport, backend, bport = lab.dnat
    with Sniffers(lab) as sn:
        server = follow(lab, lab.srv, ["server", "--addr", backend, "--port", str(bport)], "backend")
        server.wait("listening")
        injector = follow(lab, lab.srv, ["inject", "--iface", "s0", "--sport", str(bport),
                                         "--offset", str(offset)], "injector")
        injector.wait("sniffing")
        client = follow(lab, lab.cli, ["client", "--addr", vip, "--port", str(vport)], "client")
        conn = client.wait("connected")
        client.wait("response")
        injected = injector.wait("injected")
        backend_err = wait_until(lambda: server.find("error"), 1.0, 0.05)  # the cli's RST reset it
        since = client.mark()
        client.proc.stdin.write("send\n")
        client.proc.stdin.flush()
        after = client.wait(("error", "response", "eof"), timeout=5, since=since)
        client.proc.stdin.write("quit\n")
        client.proc.stdin.flush()
    cport = conn["lport"]
    rsts = sn.rsts()
    # the injected segment as the client's namespace received it (source not un-DNATed)
    arrived = next((s for s in sn.segments("cli") if s["dir"] == "in" and s["seq"] == injected["seq"]), None)
    first = next((r for r in rsts if r["ts"] >= injected["ts"] - 0.05), None)
    return Outcome("invalid-dnat", {
        "inside": tup(CLI_ADDR, cport, vip, vport),
        "outside": tup(CLI_ADDR, cport, backend, bport),
        "vip": {"addr": vip, "port": vport},
        "backend": {"addr": backend, "port": bport},
        "client": {"addr": CLI_ADDR, "port": cport},
        "masquerade": False,  # DNATed flows are exempt from MASQUERADE in this lab
        "injected_seq": injected["seq"],
        "injected": {"seq": injected["seq"], "ack": injected["ack"], "offset": offset, "ts": injected["ts"],
                     **tup(backend, bport, CLI_ADDR, cport)},  # as the backend sent it
        "injected_at_client": tup(arrived["src"], arrived["sport"], arrived["dst"], arrived["dport"])
        if arrived else None,
        "rst_sender": first["sender"] if first else None,
        "rsts": rsts,
        "backend_after": backend_err.get("errno") if backend_err else None,
        "client_after": after.get("errno") or after.get("event"),
        "netns": netns_facts(lab),
        "duration": time.monotonic() - t_start,
    })


# -- incident 2 -------------------------------------------------------------------------
CLASH_QUEUES = (7, 8)        # NFQUEUE numbers of the winner's and the loser's SYN


def hold_racing_syns(lab: NatLab, winner: str, loser: str, port: int) -> Follow:
    """Rules in the router and the `nat-clash` program (tracer/lab/traffic.py) that make the
    race of incident 2 certain between the SYNs to `port` from `winner` and `loser` (their
    original source addresses): both are queued after NAT, before conntrack's confirm, so NAT
    gives both the same port (an entry not yet confirmed does not hold it); `nat-clash` lets
    the winner go, whose entry is confirmed, then the loser, which clashes with it at confirm
    (insert_failed +1) and is dropped. No timing is involved: when each SYN came does not
    matter, only the order they are let go in. This kernel has no nft `queue`
    (CONFIG_NFT_QUEUE): iptables' NFQUEUE target, in chains of iptables-nft's mangle table
    that an nft base chain after srcnat (priority 200) jumps to."""
    syn = f"tcp dport {port} tcp flags & (syn | ack) == syn"
    chains = (("RSTLAB_WIN", CLASH_QUEUES[0], winner), ("RSTLAB_LOSE", CLASH_QUEUES[1], loser))
    for chain, queue, _ in chains:
        lab.exec(lab.nat, ["iptables-nft", "-t", "mangle", "-N", chain])
        lab.exec(lab.nat, ["iptables-nft", "-t", "mangle", "-A", chain, "-j", "NFQUEUE", "--queue-num", str(queue),
                           "--queue-bypass"])
    jumps = "".join(f"    ct original ip saddr {addr} {syn} jump {chain}\n" for chain, _, addr in chains)
    lab.exec(lab.nat, ["nft", "-f", "-"], input=(
        "table ip mangle {\n  chain rstlab_post {\n"
        f"    type filter hook postrouting priority 200; policy accept;\n{jumps}  }}\n}}\n"))
    clash = follow(lab, lab.nat, ["nat-clash", "--winner-queue", str(CLASH_QUEUES[0]),
                                  "--loser-queue", str(CLASH_QUEUES[1])], "nat-clash")
    clash.wait("holding")
    return clash


def snat_race(lab: NatLab, random_fully=None, sport: int = 20000) -> Outcome:
    """Incident 2: two clients with their own addresses connect at the same instant with the
    same source port to one server through MASQUERADE. NAT gives both that port (neither
    entry is confirmed yet); the winner's is confirmed first, the loser's fails to confirm
    (insert_failed), its SYN is dropped and retransmitted 1 s later, through another port.
    The router holds both SYNs between NAT and confirm and lets the winner go first
    (hold_racing_syns), so the race that two CPUs win only sometimes, and under load hardly
    ever, happens every time. With --random-fully the two get different ports and nothing
    clashes."""
    t_start = time.monotonic()
    rf = _masquerade(lab, random_fully)
    net = CLI_ADDR.rsplit(".", 1)[0]
    winner, loser = f"{net}.{RACE_SRC_BASE + 1}", f"{net}.{RACE_SRC_BASE}"
    for addr in (loser, winner):  # /32s in the client's namespace only
        lab.add_address(lab.cli, "c0", addr, 32, exist_ok=True)
    sink = follow(lab, lab.srv, ["sink", "--addr", SRV_ADDR, "--port", str(SERVER_PORT), "--hold"], "sink")
    sink.wait("listening")
    clash = hold_racing_syns(lab, winner, loser, SERVER_PORT)
    before = lab.conntrack_stats()
    race = follow(lab, lab.cli, ["race", "--addr", SRV_ADDR, "--port", str(SERVER_PORT), "--src-base", loser,
                                 "--procs", "2", "--rounds", "1", "--base", str(sport)], "race")
    clash.wait("released", timeout=15)
    done = race.wait("done", timeout=15)
    after = lab.conntrack_stats()
    entries = lab.conntrack()
    by_port = {e["reply"].get("dport"): e for e in entries if e["reply"].get("dst") == NAT_OUT_ADDR}
    retransmitted = []
    # connects whose SYN went again (the first to be held waits for the other to come, which
    # under load can take long enough to count as slow without losing anything)
    for r in done["resent"]:
        entry = find_entry(lab, r["src"], r["sport"], SERVER_PORT, entries)
        holder = by_port.get(r["sport"]) if not rf else None  # who got the port it asked for
        retransmitted.append({
            "inside": tup(r["src"], r["sport"], SRV_ADDR, SERVER_PORT),
            "outside": tup(entry["reply"]["dst"], entry["reply"]["dport"], SRV_ADDR, SERVER_PORT)
            if entry else None,
            "latency": r["latency"], "ok": r["ok"], "errno": r["errno"], "retrans": r["retrans"],
            "port_taken_by": tup(holder["orig"]["src"], holder["orig"]["sport"], SRV_ADDR, SERVER_PORT)
            if holder and holder["orig"].get("src") != r["src"] else None,
        })
    return Outcome("snat-race", {
        "random_fully": rf, "winner": winner, "loser": loser, "sport": sport,
        "connects": done["connects"], "connected": done["ok"],
        "insert_failed": after.get("insert_failed", 0) - before.get("insert_failed", 0),
        "drop": after.get("drop", 0) - before.get("drop", 0),
        "retransmitted": retransmitted,
        "server": {"addr": SRV_ADDR, "port": SERVER_PORT},
        "clients": [loser, winner],
        "netns": netns_facts(lab),
        "duration": time.monotonic() - t_start,
    })


# -- incident 3 -------------------------------------------------------------------------
def _flush_then_client_sends(lab: NatLab, name: str, random_fully, flush) -> Outcome:
    """An idle connection through the router; `flush(inside, ts)` makes the router lose its
    entry (and returns its own facts); then the client sends on that connection: the
    segment is SNATed by a new entry (a new port with --random-fully), the server's
    listener answers RST and the client gets ECONNRESET. The new binding's facts come from
    both captures."""
    t_start = time.monotonic()
    rf = _masquerade(lab, random_fully)
    ts: dict = {}
    with Sniffers(lab, port=SERVER_PORT) as sn:
        client, server, inside, outside = idle_connection(lab)
        flush_facts = flush(inside, ts)
        flushed_after = _gone(lab, CLI_ADDR, inside["sport"], 3.0)
        ts["flush_seen"] = time.time() if flushed_after is not None else None
        since = client.mark()
        ts["client_sent"] = time.time()
        client.cmd("send 8", "sent")
        err = wait_until(lambda: client.find("error", since), 1.5, 0.02)
        ts["reset"] = err["ts"] if err else None
        entry = find_entry(lab, CLI_ADDR, inside["sport"])
        # same port again (possible without --random-fully): the old server socket takes it
        got = server.cmd("read 0.3", ("received", "eof", "cmd-error")) if not err else {}
    new = [s for s in sn.segments("srv") if s["dir"] == "in" and s["dport"] == SERVER_PORT and s["len"] > 0
           and s["src"] == outside["src"] and s["ts"] >= ts["client_sent"] - 0.01]
    new_port = new[0]["sport"] if new else None
    # the router's view of the same segment: in on n1 from the inside tuple, out on n2 NATed
    seqs = {s["seq"] for s in sn.segments("nat") if s["dir"] == "in" and s["src"] == CLI_ADDR
            and s["sport"] == inside["sport"] and s["len"] > 0 and s["ts"] >= ts["client_sent"] - 0.01}
    natted = [s for s in sn.segments("nat") if s["dir"] == "out" and s["iface"] == "n2" and s["seq"] in seqs
              and s["len"] > 0 and s["ts"] >= ts["client_sent"] - 0.01]
    return Outcome(name, {
        "random_fully": rf,
        **flush_facts,
        "inside": inside,
        "outside": outside,
        "new_outside": tup(outside["src"], new_port, SRV_ADDR, SERVER_PORT) if new_port else None,
        "old_port": outside["sport"], "new_port": new_port,
        "port_changed": new_port is not None and new_port != outside["sport"],
        "new_port_router": natted[0]["sport"] if natted else None,
        # the new entry saw only the RST as reply: conntrack deletes such an entry at once
        "new_entry_left": entry,
        "device": "n2",
        "flushed": flushed_after is not None, "flush_delay": flushed_after,
        "client_after": err.get("errno") if err else None,
        "survived": not err and got.get("bytes", 0) > 0,
        "rsts": sn.rsts(),
        "timestamps": ts,
        "netns": netns_facts(lab),
        "duration": time.monotonic() - t_start,
    })


def vip_move(lab: NatLab, random_fully=True, vip: str = VIP_MOVE_VIP) -> Outcome:
    """Incident 3: a VIP comes and goes on the router's outside interface, then the address
    MASQUERADE used is removed and re-added: the idle connection's entry is flushed, the
    client's next segment is SNATed to a new port and the server's listener answers RST."""
    def flush(inside: dict, ts: dict) -> dict:
        # keepalived: the VIP arrives on n2, then leaves (on 6.18 this alone flushes nothing)
        ts["vip_added"] = time.time()
        lab.add_address(lab.nat, "n2", vip, 32)
        time.sleep(0.2)
        ts["vip_removed"] = time.time()
        lab.del_address(lab.nat, "n2", vip, 32)
        time.sleep(0.5)  # the masquerade cleanup runs from a work queue
        vip_flushed = find_entry(lab, CLI_ADDR, inside["sport"]) is None
        ts.update(_readdress(lab))
        return {"vip": f"{vip}/32", "vip_removal_flushed": vip_flushed,
                "address_removed": f"{NAT_OUT_ADDR}/{NAT_OUT_PREFIX}"}
    return _flush_then_client_sends(lab, "vip-move", random_fully, flush)


def device_down(lab: NatLab, random_fully=True) -> Outcome:
    """The masquerading interface goes down and comes back (link flap, NIC reset, a network
    manager reconfiguring it): the masquerade device notifier flushes every entry NATed out
    of it, addresses untouched; as in vip-move, the client's next segment gets a new port
    and the server's listener answers RST."""
    def flush(inside: dict, ts: dict) -> dict:
        ts["down"] = time.time()
        lab.set_link(lab.nat, "n2", up=False)
        ts["down_done"] = time.time()
        lab.set_link(lab.nat, "n2", up=True)
        ts["up"] = time.time()
        return {}
    return _flush_then_client_sends(lab, "device-down", random_fully, flush)


def ct_flush(lab: NatLab, random_fully=True, how: str = "flush") -> Outcome:
    """Someone deletes the router's entries over ctnetlink — `conntrack -F` (how="flush"), or
    `conntrack -D` of the one flow (how="delete"), as an operator, kube-proxy or a CNI does:
    as in vip-move, the client's next segment gets a new port and the server's listener
    answers RST. The deleting process is known: its pid is the ground truth."""
    if how not in ("flush", "delete"):
        raise LabError(f"how must be flush or delete, not {how!r}")

    def flush(inside: dict, ts: dict) -> dict:
        cmd = ["conntrack", "-F"] if how == "flush" else \
            ["conntrack", "-D", "-p", "tcp", "--orig-src", inside["src"], "--sport", str(inside["sport"])]
        ts["deleted"] = time.time()
        # `ip netns exec` execs the command: the pid is conntrack's own
        p = subprocess.Popen(["ip", "netns", "exec", lab.nat, *cmd], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        _, err = p.communicate(timeout=10)
        if p.returncode != 0:
            raise LabError(f"{' '.join(cmd)} failed: {err.strip()}")
        return {"how": how, "command": " ".join(cmd), "deleter_pid": p.pid, "deleter_comm": "conntrack"}
    return _flush_then_client_sends(lab, "ct-flush", random_fully, flush)


# -- incident 4 -------------------------------------------------------------------------
def dhcp_renew(lab: NatLab, probe: str = "keepalive", client_after: bool = True) -> Outcome:
    """Incident 4: a DHCP renewal removes and re-adds the router's address; the idle
    connection's entry goes with it; the server's keepalive (or data) is not de-NATed and the
    router answers RST; the client learns on its next send (ECONNRESET)."""
    t_start = time.monotonic()
    with Sniffers(lab, port=SERVER_PORT) as sn:
        client, server, inside, outside = idle_connection(lab)
        ts = _readdress(lab)
        flushed_after = _gone(lab, CLI_ADDR, inside["sport"], 3.0)
        ts["flush_seen"] = time.time() if flushed_after is not None else None
        after = _server_speaks_first(lab, client, server, outside, probe, client_after)
    rsts = sn.rsts()
    router = next((r for r in rsts if r["sender"] == "nat"), None)
    return Outcome("dhcp-renew", {
        "inside": inside, "outside": outside,
        "address_removed": f"{NAT_OUT_ADDR}/{NAT_OUT_PREFIX}", "device": "n2",
        "flushed": flushed_after is not None, "flush_delay": flushed_after,
        **after,
        "router_rst": router,
        "rsts": rsts,
        "timestamps": {**ts, "probe_sent": after["probe_sent"], "server_reset": after["server_reset_at"],
                       "router_rst": router["ts"] if router else None,
                       "client_reset": after.get("client_reset_at")},
        "netns": netns_facts(lab),
        "duration": time.monotonic() - t_start,
    })


# -- conntrack entry timed out ------------------------------------------------------------
def ct_expire(lab: NatLab, timeout: int = 3, probe: str = "data", client_after: bool = True,
              wait: float = 5.0, evict: str = "listing") -> Outcome:
    """The router's entry of an idle connection times out (nf_conntrack_tcp_timeout_established
    lowered in the router's namespace to `timeout` s); the server then speaks first and the
    router answers RST, as in dhcp-renew."""
    if evict not in ("listing", "lookup"):
        raise LabError(f"evict must be listing or lookup, not {evict!r}")
    t_start = time.monotonic()
    key = "net.netfilter.nf_conntrack_tcp_timeout_established"
    lab.sysctl(lab.nat, key, timeout)
    with Sniffers(lab, port=SERVER_PORT) as sn:
        client, server, inside, outside = idle_connection(lab)
        t_idle = time.time()
        entry = find_entry(lab, CLI_ADDR, inside["sport"])
        count = lab.conntrack_count()
        removed_by, deadline = None, time.monotonic() + timeout + wait
        if evict == "listing":
            # poll the table until the entry is gone. Listing it evicts an expired entry (as
            # the kernel's GC or the next packet's lookup would, whichever comes first); the
            # GC's period is up to a minute, so normally the listing does it, right at expiry
            time.sleep(max(0.0, timeout - 0.5))
            while time.monotonic() < deadline:
                dropped = lab.conntrack_count() < count  # read without evicting anything
                if find_entry(lab, CLI_ADDR, inside["sport"]) is None:
                    removed_by = "gc" if dropped else "ctnetlink-dump"
                    break
                time.sleep(0.1)
        else:
            # nobody looks at the table: the expired entry stays allocated until the GC or
            # the server's segment (its lookup finds it expired and deletes it) removes it
            time.sleep(timeout + 1.0)
            removed_by = "gc" if lab.conntrack_count() < count else "lookup"
        t_gone = time.time()
        if evict == "listing":
            gone = find_entry(lab, CLI_ADDR, inside["sport"]) is None
        after = _server_speaks_first(lab, client, server, outside, probe, client_after)
        if evict == "lookup":  # the original (ASSURED) entry is not there any more
            gone = not any(e["orig"].get("src") == CLI_ADDR and e["orig"].get("sport") == inside["sport"]
                           and "ASSURED" in e["flags"] for e in lab.conntrack())
    rsts = sn.rsts()
    router = next((r for r in rsts if r["sender"] == "nat"), None)
    return Outcome("ct-expire", {
        "inside": inside, "outside": outside,
        "timeout": timeout, "sysctl": key,
        "entry_timeout_at_start": entry["timeout"] if entry else None,
        "entry_gone": gone, "removed_by": removed_by, "evict": evict,
        "idle_seconds": after["probe_sent"] - t_idle,
        "gone_after": t_gone - t_idle if evict == "listing" else None,  # lookup: seen gone only after
        **after,
        "router_rst": router,
        "rsts": rsts,
        "timestamps": {"idle_since": t_idle, "gone_seen": t_gone if evict == "listing" else None,
                       "probe_sent": after["probe_sent"],
                       "server_reset": after["server_reset_at"], "router_rst": router["ts"] if router else None,
                       "client_reset": after.get("client_reset_at")},
        "netns": netns_facts(lab),
        "duration": time.monotonic() - t_start,
    })


# -- conntrack table full (global sysctl: opt-in) -----------------------------------------
CT_MAX_PATH = "/proc/sys/net/netfilter/nf_conntrack_max"
CT_MAX_LOCK = "/run/rst-tracer-conntrack-max.lock"
CT_MAX_SAVED = "/run/rst-tracer-conntrack-max.saved"


def _write(path: str, value) -> None:
    with open(path, "w") as f:
        f.write(f"{value}\n")


# run by a guardian process in its own session: when its stdin closes (our process ended,
# even by SIGKILL), it puts the original back if the value is still the one we set
_GUARDIAN = """
import os, sys
path, saved, original, lowered = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
while sys.stdin.buffer.read(1):
    pass
with open(path) as f:
    current = f.read().strip()
if current == lowered:
    with open(path, "w") as f:
        f.write(original + "\\n")
    try:
        os.unlink(saved)
    except FileNotFoundError:
        pass
"""


@contextlib.contextmanager
def lowered_conntrack_max(value: int):
    """Sets the host-wide nf_conntrack_max (it cannot be set per namespace) and always puts
    the original back: finally; on SIGTERM/SIGINT (restored, then the previous handler runs);
    if this process is killed outright, by a guardian process in its own session that waits
    for our end; and, should that fail too, at the next run (the original is saved in /run
    first). One run at a time on a host (a lock). Yields the original value."""
    lock = open(CT_MAX_LOCK, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise ScenarioSkipped("another run holds nf_conntrack_max lowered (lock " + CT_MAX_LOCK + ")")
    state = {"restored": False}
    prev: dict = {}
    try:
        if os.path.exists(CT_MAX_SAVED):  # a run died before restoring: its saved value is the original
            with open(CT_MAX_SAVED) as f:
                original = int(f.read().strip())
            _write(CT_MAX_PATH, original)
        else:
            with open(CT_MAX_PATH) as f:
                original = int(f.read().strip())
        with open(CT_MAX_SAVED, "w") as f:
            f.write(f"{original}\n")
            f.flush()
            os.fsync(f.fileno())

        def restore() -> None:
            if not state["restored"]:
                _write(CT_MAX_PATH, original)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(CT_MAX_SAVED)
                state["restored"] = True

        def on_signal(signum, frame):
            restore()
            old = prev.get(signum)
            if callable(old):
                return old(signum, frame)
            if old == signal.SIG_IGN:
                return None
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                if signal.getsignal(sig) != signal.SIG_IGN:  # an ignored signal stays ignored
                    prev[sig] = signal.signal(sig, on_signal)
        guardian = subprocess.Popen([sys.executable, "-c", _GUARDIAN, CT_MAX_PATH, CT_MAX_SAVED, str(original),
                                     str(value)], stdin=subprocess.PIPE, start_new_session=True)
        try:
            _write(CT_MAX_PATH, value)
            yield original
        finally:
            restore()
            guardian.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                guardian.wait(5)
    finally:
        for sig, old in prev.items():
            signal.signal(sig, old)
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def table_full(lab: NatLab, headroom: int = 4, failures: int = 2, connect_timeout: float = 1.5,
               max_fill: int = 2000) -> Outcome:
    """Conntrack table full (opt-in, RST_TRACER_ALLOW_GLOBAL_SYSCTL=1: lowers the host-wide
    nf_conntrack_max for a few seconds): the router cannot create entries for new flows,
    their SYNs are dropped and retransmitted, the connects time out. No RST."""
    if os.environ.get(ALLOW_GLOBAL_SYSCTL) != "1":
        raise ScenarioSkipped(f"table-full lowers the host-wide net.netfilter.nf_conntrack_max; "
                              f"set {ALLOW_GLOBAL_SYSCTL}=1 to allow it")
    t_start = time.monotonic()
    sink = follow(lab, lab.srv, ["sink", "--addr", SRV_ADDR, "--port", str(SERVER_PORT), "--hold"], "sink")
    sink.wait("listening")
    with open("/proc/sys/net/netfilter/nf_conntrack_count") as f:
        root_count = int(f.read().strip())  # the root namespace is limited by the same max
    nat_count = lab.conntrack_count()
    limit = max(nat_count, root_count) + headroom
    to_fill = limit - nat_count
    if to_fill > max_fill:
        raise ScenarioSkipped(f"the root namespace has {root_count} conntrack entries: lowering "
                              f"nf_conntrack_max to {limit} would starve it")
    before = lab.conntrack_stats()
    with Sniffers(lab, flags="SYN", port=SERVER_PORT) as sn:
        with lowered_conntrack_max(limit) as original:
            ts_lowered = time.time()
            hold = follow(lab, lab.cli, ["hold", "--addr", SRV_ADDR, "--port", str(SERVER_PORT),
                                         "--bind", CLI_ADDR, "--count", str(to_fill + failures + 5),
                                         "--failures", str(failures), "--timeout", str(connect_timeout)],
                          "hold")
            done = hold.wait("done", timeout=10 + to_fill * 0.05 + failures * (connect_timeout + 1))
            count_full = lab.conntrack_count()
            stats = lab.conntrack_stats()
        ts_restored = time.time()
        with open(CT_MAX_PATH) as f:
            max_after = int(f.read().strip())
    attempts = [m for m in hold.lines if m.get("event") == "attempt"]
    failed = [m for m in attempts if not m["ok"]]
    syns = sn.segments("nat")
    dropped = []
    for m in failed:
        inn = [s for s in syns if s["dir"] == "in" and s["src"] == m["src"] and s["sport"] == m["sport"]]
        out = [s for s in syns if s["dir"] == "out" and s["sport"] == m["sport"] and s["dst"] == SRV_ADDR]
        dropped.append({"inside": tup(m["src"], m["sport"], SRV_ADDR, SERVER_PORT), "latency": m["latency"],
                        "errno": m["errno"], "syns_in": len(inn), "syns_forwarded": len(out)})
    return Outcome("table-full", {
        "max_before": original, "max_during": limit, "max_after": max_after,
        "count_before": nat_count, "count_full": count_full, "root_count": root_count,
        "connected": done["held"], "failed_connects": len(failed),
        "dropped_syns": sum(d["syns_in"] - d["syns_forwarded"] for d in dropped),
        "conntrack_drop": stats.get("drop", 0) - before.get("drop", 0),
        "early_drop": stats.get("early_drop", 0) - before.get("early_drop", 0),
        "failed": dropped,
        "inside": dropped[0]["inside"] if dropped else None,
        "connect_timeout": connect_timeout,
        "timestamps": {"lowered": ts_lowered, "restored": ts_restored},
        "netns": netns_facts(lab),
        "duration": time.monotonic() - t_start,
    })


# -- ordinary resets from applications ----------------------------------------------------
def app_abort(lab: NatLab) -> Outcome:
    """Ordinary resets from applications, through the router: (a) the server closes with
    unread data in its receive buffer, (b) the client sets SO_LINGER {on, 0} and closes."""
    t_start = time.monotonic()
    cases = []
    with Sniffers(lab) as sn:
        # (a) close() with unread data: the server's stack sends the RST
        port = APP_ABORT_PORTS[0]
        client, server, inside, outside = idle_connection(lab, port)
        client.cmd("send 100", "sent")
        wait_until(lambda: server.cmd("pending", "pending")["bytes"] >= 100, 2.0, 0.05)
        since = client.mark()
        closed = server.cmd("close", "closed")
        err = client.wait("error", 3, since)
        cases.append({"kind": "unread_data", "inside": inside, "outside": outside, "expected_sender": "srv",
                      "unread": closed["unread"], "closed_at": closed["ts"], "peer_after": err.get("errno"),
                      "peer": "cli", "pids": _pids(client, server)})
        # (b) SO_LINGER {on, 0}: the client's stack sends the RST
        port = APP_ABORT_PORTS[1]
        client, server, inside, outside = idle_connection(lab, port)
        since = server.mark()
        closed = client.cmd("abort", "closed")
        err = server.wait("error", 3, since)
        cases.append({"kind": "linger_zero", "inside": inside, "outside": outside, "expected_sender": "cli",
                      "unread": closed["unread"], "closed_at": closed["ts"], "peer_after": err.get("errno"),
                      "peer": "srv", "pids": _pids(client, server)})
    rsts = sn.rsts()
    for c in cases:
        port = c["inside"]["dport"]
        mine = [r for r in rsts if port in (r["sport"], r["dport"])]
        c["rsts"] = mine
        c["sender"] = mine[0]["sender"] if mine else None
    return Outcome("app-abort", {"cases": cases, "rsts": rsts, "netns": netns_facts(lab),
                                 "duration": time.monotonic() - t_start})


KEEPALIVE_PORT, LISTEN_OVERFLOW_PORT, TIMEWAIT_PORT = 8083, 8084, 8085


def keepalive_timeout(lab: NatLab) -> Outcome:
    """Ordinary reset: the path breaks under an idle connection (the router drops its
    packets); the client's keepalive probes go unanswered and its stack gives up with RST."""
    t_start = time.monotonic()
    with Sniffers(lab) as sn:
        client, server, inside, outside = idle_connection(lab, KEEPALIVE_PORT)
        for opt in ("--dport", "--sport"):   # the broken path, in the router's namespace only
            lab.exec(lab.nat, ["iptables", "-I", "FORWARD", "-p", "tcp", opt, str(KEEPALIVE_PORT), "-j", "DROP"])
        since = client.mark()
        ka = client.cmd("keepalive 1 1 2", "keepalive")
        err = client.wait("error", 10, since)
    return Outcome("keepalive-timeout", {
        "inside": inside, "outside": outside, "keepalive": {k: ka[k] for k in ("idle", "intvl", "cnt")},
        "client_after": err.get("errno"), "gave_up_after": err["ts"] - ka["ts"],
        "rsts": sn.rsts(), "netns": netns_facts(lab), "duration": time.monotonic() - t_start})


def listen_overflow(lab: NatLab, count: int = 8, backlog: int = 1, abort: bool = True) -> Outcome:
    """Ordinary reset: more handshakes complete at once than the listener's accept queue
    holds (the server accepts one, then stops accepting; TCP_DEFER_ACCEPT holds every
    handshake until the clients' first bytes, which they send together). With
    tcp_abort_on_overflow=1 (in the server's namespace) the listener resets the overflowing
    ones; without it, it drops their segment (the client believes it is connected)."""
    t_start = time.monotonic()
    lab.sysctl(lab.srv, "net.ipv4.tcp_abort_on_overflow", int(abort))
    with Sniffers(lab) as sn:
        server = follow(lab, lab.srv, ["peer", "--listen", "--addr", SRV_ADDR, "--port",
                                       str(LISTEN_OVERFLOW_PORT), "--backlog", str(backlog),
                                       "--defer-accept", "5"], "server")
        server.wait("listening")
        clients = follow(lab, lab.cli, ["connect-many", "--together", "--addr", SRV_ADDR, "--port",
                                        str(LISTEN_OVERFLOW_PORT), "--count", str(count), "--send",
                                        "--hold", "1"])
        done = clients.wait("done", 15)
    nstat = lab.exec(lab.srv, ["nstat", "-az", "TcpExtListenOverflows"]).stdout.split()
    return Outcome("listen-overflow", {
        "abort_on_overflow": abort, "backlog": backlog, "count": count, "outcomes": done["outcomes"],
        "reset": [tup(CLI_ADDR, c["local"]["port"], SRV_ADDR, LISTEN_OVERFLOW_PORT)
                  for c in done["connections"] if c["outcome"] == "reset"],
        "listen_overflows": int(nstat[nstat.index("TcpExtListenOverflows") + 1]),
        "rsts": sn.rsts(), "netns": netns_facts(lab), "duration": time.monotonic() - t_start})


def timewait(lab: NatLab) -> Outcome:
    """Ordinary reset: the server closes its socket (FIN); the client, which has not closed
    its side, sends more data, which meets the server's timewait socket (FIN_WAIT2
    substate) and is answered with RST."""
    t_start = time.monotonic()
    with Sniffers(lab) as sn:
        client, server, inside, outside = idle_connection(lab, TIMEWAIT_PORT)
        server.cmd("close", "closed")
        # the FIN was acked: the closed socket lives on as a timewait socket
        state = wait_until(lambda: lab.exec(lab.srv, ["ss", "-tanH", "state", "fin-wait-2", "sport",
                                                       f"= :{TIMEWAIT_PORT}"]).stdout.strip(), 3.0, 0.05)
        since = client.mark()
        client.cmd("send 10", ("sent", "cmd-error"))
        err = client.wait("error", 3, since)
    return Outcome("timewait", {
        "inside": inside, "outside": outside, "server_timewait": bool(state),
        "client_after": err.get("errno"), "rsts": sn.rsts(), "netns": netns_facts(lab),
        "duration": time.monotonic() - t_start})


RAW_DROP_SYN_PORT, RAW_DROP_DATA_PORT, RAW_DROP_NOTRACK_PORT = 8086, 8087, 8088


def _router_dropped(sn: Sniffers, inside: dict, since: float) -> int:
    """Segments of `inside` the router received from the client since `since` and did not
    forward to the server."""
    segs = [s for s in sn.segments("nat") if s["ts"] >= since and s["dport"] == inside["dport"]]
    came = [s for s in segs if s["iface"] == "n1" and s["dir"] == "in" and s["src"] == inside["src"]
            and s["sport"] == inside["sport"]]
    left = {(s["seq"], s["len"]) for s in segs if s["iface"] == "n2" and s["dir"] == "out"}
    return sum((s["seq"], s["len"]) not in left for s in came)


def raw_drop(lab: NatLab, connect_timeout: float = 1.5, data_drops: int = 2) -> Outcome:
    """Ordinary drops that conntrack has no part in: the router's firewall drops packets it
    never tracked. (a) A raw-table DROP (ahead of conntrack) of new connections' SYNs;
    (b) the same of an established connection's data segments (retransmitted, dropped
    again); (c) SYNs a raw-table NOTRACK rule exempted from conntrack, dropped in FORWARD as
    UNTRACKED. The table is far from full and conntrack counts neither a drop nor an
    INVALID packet: never conntrack_table_full nor conntrack_invalid_dropped."""
    t_start = time.monotonic()
    before = lab.conntrack_stats()
    rules = [["-t", "raw", "-A", "PREROUTING", "-i", "n1", "-p", "tcp", "--dport", str(RAW_DROP_SYN_PORT),
              "-j", "DROP"],
             ["-t", "raw", "-A", "PREROUTING", "-i", "n1", "-p", "tcp", "--dport", str(RAW_DROP_NOTRACK_PORT),
              "-j", "CT", "--notrack"],
             ["-A", "FORWARD", "-p", "tcp", "--dport", str(RAW_DROP_NOTRACK_PORT), "-m", "conntrack",
              "--ctstate", "UNTRACKED", "-j", "DROP"]]
    data_rule = ["-t", "raw", "-A", "PREROUTING", "-i", "n1", "-p", "tcp", "--dport", str(RAW_DROP_DATA_PORT),
                 "-j", "DROP"]
    cases = []
    with Sniffers(lab) as sn:
        for rule in rules:   # the router's namespace only
            lab.exec(lab.nat, ["iptables", *rule])
        since = time.time()
        # (a) and (c): each connect times out; its SYN and the retransmission 1 s later are dropped
        clients = [(kind, port, follow(lab, lab.cli, ["peer", "--addr", SRV_ADDR, "--port", str(port), "--timeout",
                                                      str(connect_timeout)], f"client to {port}"))
                   for kind, port in (("syn", RAW_DROP_SYN_PORT), ("notrack", RAW_DROP_NOTRACK_PORT))]
        for kind, port, client in clients:
            failed = client.wait("connect-failed", timeout=connect_timeout + 5)
            inside = tup(CLI_ADDR, failed["local"]["port"], SRV_ADDR, port)
            cases.append({"kind": kind, "inside": inside, "client_after": failed["errno"],
                          "dropped": _router_dropped(sn, inside, since)})
        # (b): an established connection whose client data the router then drops
        client, server, inside, outside = idle_connection(lab, RAW_DROP_DATA_PORT)
        lab.exec(lab.nat, ["iptables", *data_rule])
        since = time.time()
        client.cmd("send 8", "sent")
        wait_until(lambda: _router_dropped(sn, inside, since) >= data_drops, 5.0, 0.05)
        cases.append({"kind": "data", "inside": inside, "outside": outside,
                      "dropped": _router_dropped(sn, inside, since)})
    after = lab.conntrack_stats()
    return Outcome("raw-drop", {
        "cases": cases, "rules": [" ".join(r) for r in rules + [data_rule]],
        "conntrack_rise": {k: after.get(k, 0) - before.get(k, 0) for k in ("drop", "invalid", "insert_failed",
                                                                          "early_drop")},
        "conntrack_count": lab.conntrack_count(), "netns": netns_facts(lab),
        "duration": time.monotonic() - t_start})


SCENARIOS = {"invalid-window": invalid_window, "closed-port": closed_port, "invalid-dnat": invalid_dnat,
             "snat-race": snat_race, "vip-move": vip_move, "device-down": device_down, "ct-flush": ct_flush, "dhcp-renew": dhcp_renew, "ct-expire": ct_expire,
             "table-full": table_full, "app-abort": app_abort, "keepalive-timeout": keepalive_timeout,
             "listen-overflow": listen_overflow, "timewait": timewait, "raw-drop": raw_drop}
