"""Lab scenarios: each reproduces one incident (or an ordinary reset) deterministically and
returns the facts the tracer is expected to find (the ground truth for tests and demo)."""
from __future__ import annotations

import json
import select
import time
from dataclasses import dataclass, field

from .topology import CLI_ADDR, SRV_ADDR, LabError, NatLab

SERVER_PORT = 8080
CLOSED_PORT = 9


@dataclass
class Outcome:
    name: str
    facts: dict = field(default_factory=dict)


def expect_line(proc, event: str, timeout: float = 10.0) -> dict:
    """Next JSON line of a lab program whose `event` is `event` (or raise with its stderr)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        line = proc.stdout.readline()
        if not line:
            break
        msg = json.loads(line)
        if msg.get("event") == event:
            return msg
        if msg.get("event") == "error" and event != "error":
            raise LabError(f"lab program reported an error waiting for {event!r}: {msg}")
    err = proc.stderr.read() if proc.poll() is not None else ""
    raise LabError(f"lab program did not report {event!r} within {timeout}s {err.strip()}")


def start_server(lab: NatLab, port: int = SERVER_PORT):
    srv = lab.spawn(lab.srv, ["server", "--addr", SRV_ADDR, "--port", str(port)])
    expect_line(srv, "listening")
    return srv


def invalid_window(lab: NatLab) -> Outcome:
    """Incident 1: a segment far above the window is INVALID at the router, is not
    de-NATed, and the router's own stack answers RST; the client then gets ECONNRESET."""
    start_server(lab)
    injector = lab.spawn(lab.srv, ["inject", "--iface", "s0", "--sport", str(SERVER_PORT)])
    expect_line(injector, "sniffing")
    client = lab.spawn(lab.cli, ["client", "--addr", SRV_ADDR, "--port", str(SERVER_PORT)])
    conn = expect_line(client, "connected")
    expect_line(client, "response")
    injected = expect_line(injector, "injected")
    time.sleep(0.3)  # let the router's RST reach the server
    client.stdin.write("send\n")
    client.stdin.flush()
    after = expect_line(client, "error", timeout=5) if not lab.drop_invalid else \
        expect_line(client, "response", timeout=5)
    client.stdin.write("quit\n")
    client.stdin.flush()
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
    proc = lab.spawn(lab.cli, ["connect-many", "--addr", SRV_ADDR, "--port", str(CLOSED_PORT),
                               "--count", str(count)])
    done = expect_line(proc, "done", timeout=30 + count * 0.01)
    return Outcome("closed-port", {"count": count, "outcomes": done["outcomes"],
                                   "port": CLOSED_PORT, "netns": {"srv": lab.netns_inode(lab.srv)}})


SCENARIOS = {"invalid-window": invalid_window, "closed-port": closed_port}
