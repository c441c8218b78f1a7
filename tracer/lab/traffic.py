"""Small programs run inside lab namespaces (python -m tracer.lab.traffic CMD ...).

Each prints one JSON object per line on stdout so the orchestrator can follow it, and
reads commands from stdin where it must wait for the orchestrator.
"""
from __future__ import annotations

import argparse
import errno
import json
import select
import socket
import struct
import sys
import threading
import time


def say(**fields) -> None:
    print(json.dumps(fields), flush=True)


def family_of(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


# -- server ---------------------------------------------------------------------------
def serve(args) -> None:
    """Accepts connections; answers each request line with `--reply-bytes` of data."""
    ls = socket.socket(family_of(args.addr), socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((args.addr, args.port))
    ls.listen(args.backlog)
    say(event="listening", addr=args.addr, port=args.port)

    def handle(conn, peer):
        say(event="accepted", peer=f"{peer[0]}:{peer[1]}")
        try:
            buf = b""
            while True:
                data = conn.recv(65536)
                if not data:
                    say(event="closed", peer=f"{peer[0]}:{peer[1]}")
                    return
                buf += data
                while b"\n" in buf:
                    _, buf = buf.split(b"\n", 1)
                    conn.sendall(b"D" * (args.reply_bytes - 1) + b"\n")
        except OSError as e:
            say(event="error", peer=f"{peer[0]}:{peer[1]}", errno=errno.errorcode.get(e.errno, str(e.errno)))
        finally:
            conn.close()

    while True:
        conn, peer = ls.accept()
        threading.Thread(target=handle, args=(conn, peer[:2]), daemon=True).start()


# -- client ---------------------------------------------------------------------------
def client(args) -> None:
    """Connects, does one request/response, then one more per `send` line on stdin."""
    s = socket.socket(family_of(args.addr), socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect((args.addr, args.port))
    local = s.getsockname()
    say(event="connected", local=f"{local[0]}:{local[1]}", laddr=local[0], lport=local[1])

    def exchange() -> None:
        try:
            s.sendall(b"request\n")
            got = b""
            while not got.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    say(event="eof")
                    return
                got += chunk
            say(event="response", bytes=len(got))
        except OSError as e:
            say(event="error", errno=errno.errorcode.get(e.errno, str(e.errno)), text=str(e))

    exchange()
    for line in sys.stdin:
        if line.strip() == "send":
            exchange()
        elif line.strip() == "quit":
            break
    s.close()


def connect_many(args) -> None:
    """`--count` sequential connects (e.g. to a closed port): reports the outcome counts."""
    outcomes: dict = {}
    for _ in range(args.count):
        s = socket.socket(family_of(args.addr), socket.SOCK_STREAM)
        s.settimeout(2)
        try:
            s.connect((args.addr, args.port))
            key = "connected"
        except OSError as e:
            key = errno.errorcode.get(e.errno, "timeout") if e.errno else "timeout"
        finally:
            s.close()
        outcomes[key] = outcomes.get(key, 0) + 1
    say(event="done", outcomes=outcomes)


# -- segment injection ----------------------------------------------------------------
ETH_P_ALL, ETH_P_IP = 3, 0x0800


def _checksum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def inject(args) -> None:
    """Learns a flow's snd_nxt/rcv_nxt from the local side's own data segments, then injects
    one PSH|ACK with seq = snd_nxt + offset (an out-of-window segment for the peer's
    conntrack). Only an ETH_P_ALL packet socket sees outgoing packets."""
    ps = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    ps.bind((args.iface, ETH_P_ALL))
    say(event="sniffing", iface=args.iface)
    deadline = time.monotonic() + args.wait
    flow = None
    while time.monotonic() < deadline:
        r, _, _ = select.select([ps], [], [], 0.2)
        if not r:
            if flow and time.monotonic() - flow["seen"] > args.quiet:
                break  # the flow has been quiet long enough: every segment is acked
            continue
        pkt, addr = ps.recvfrom(65535)
        if addr[1] != ETH_P_IP or addr[2] != socket.PACKET_OUTGOING or pkt[9] != 6:
            continue
        ihl = (pkt[0] & 15) * 4
        sport, dport, seq, ack, off = struct.unpack("!HHIIH", pkt[ihl:ihl + 14])
        total = struct.unpack("!H", pkt[2:4])[0]
        plen = total - ihl - (off >> 12) * 4
        if sport == args.sport and plen > 0:
            flow = {"src": pkt[12:16], "dst": pkt[16:20], "sport": sport, "dport": dport,
                    "snd_nxt": (seq + plen) & 0xFFFFFFFF, "rcv_nxt": ack, "seen": time.monotonic()}
        elif flow and sport == args.sport and dport == flow["dport"]:
            flow["rcv_nxt"] = ack
            flow["seen"] = time.monotonic()
    if not flow:
        say(event="error", text="no data segment seen from the flow")
        sys.exit(1)
    seq = (flow["snd_nxt"] + args.offset) & 0xFFFFFFFF
    tcp = struct.pack("!HHIIBBHHH", flow["sport"], flow["dport"], seq, flow["rcv_nxt"],
                      5 << 4, 0x18, 502, 0, 0) + b"X"
    pseudo = flow["src"] + flow["dst"] + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0x1234, 0, 64, 6, 0,
                     flow["src"], flow["dst"])
    rs = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    rs.sendto(ip + tcp, (socket.inet_ntoa(flow["dst"]), 0))
    say(event="injected", src=f"{socket.inet_ntoa(flow['src'])}:{flow['sport']}",
        dst=f"{socket.inet_ntoa(flow['dst'])}:{flow['dport']}", seq=seq,
        snd_nxt=flow["snd_nxt"], ack=flow["rcv_nxt"], offset=args.offset)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m tracer.lab.traffic")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("--addr", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--reply-bytes", type=int, default=4096)
    s.add_argument("--backlog", type=int, default=128)
    c = sub.add_parser("client")
    c.add_argument("--addr", required=True)
    c.add_argument("--port", type=int, required=True)
    m = sub.add_parser("connect-many")
    m.add_argument("--addr", required=True)
    m.add_argument("--port", type=int, required=True)
    m.add_argument("--count", type=int, default=1)
    i = sub.add_parser("inject")
    i.add_argument("--iface", required=True)
    i.add_argument("--sport", type=int, required=True)
    i.add_argument("--offset", type=int, default=1 << 30)
    i.add_argument("--wait", type=float, default=15)
    i.add_argument("--quiet", type=float, default=0.3)
    args = p.parse_args(argv)
    {"server": serve, "client": client, "connect-many": connect_many, "inject": inject}[args.cmd](args)


if __name__ == "__main__":
    main()
