"""Small programs run inside lab namespaces (python -m tracer.lab.traffic CMD ...).

Each prints one JSON object per line on stdout so the orchestrator can follow it, and
reads commands from stdin where it must wait for the orchestrator.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import select
import socket
import struct
import sys
import threading
import time


_say_lock = threading.Lock()


def say(**fields) -> None:
    fields.setdefault("ts", time.time())  # wall clock, comparable with the tracer's and tcpdump's
    line = json.dumps(fields) + "\n"
    with _say_lock:  # one write per line: threads must not interleave their lines
        sys.stdout.write(line)
        sys.stdout.flush()


def name_process(name: bytes) -> None:
    """prctl(PR_SET_NAME): what /proc/PID/comm and the kernel's current->comm show."""
    import ctypes
    ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name[:15]), 0, 0, 0)


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
    """`--count` sequential connects (e.g. to a closed port): reports the outcome counts.
    With `--together`, all SYNs leave at once (non-blocking connects); each connection is then
    held `--hold` s and reported as connected, reset (an RST after the handshake) or failed."""
    if args.together:
        return _connect_together(args)
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


def _connect_together(args) -> None:
    socks = []
    for _ in range(args.count):
        s = socket.socket(family_of(args.addr), socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex((args.addr, args.port))
        socks.append(s)
    deadline = time.monotonic() + 3
    pending = set(socks)
    while pending and time.monotonic() < deadline:
        _, w, _ = select.select([], list(pending), [], 0.1)
        pending -= set(w)
    if args.send:   # one byte on each, back to back (a TCP_DEFER_ACCEPT listener waits for it)
        for s in socks:
            if s not in pending:
                try:
                    s.send(b"x")
                except OSError:
                    pass
    time.sleep(args.hold)
    conns, outcomes = [], {}
    for s in socks:
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if s in pending:
            key = "timeout"
        elif err:
            key = "reset" if err == errno.ECONNRESET else errno.errorcode.get(err, str(err))
        else:
            try:   # an RST after the handshake shows on the next read
                key = "closed" if s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"" else "connected"
            except BlockingIOError:
                key = "connected"
            except ConnectionResetError:
                key = "reset"
        outcomes[key] = outcomes.get(key, 0) + 1
        conns.append({"local": _endpoint(s.getsockname()), "outcome": key})
    say(event="done", outcomes=outcomes, connections=conns)
    for s in socks:
        s.close()


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


# -- one connection driven from stdin (both ends) -------------------------------------
def _errname(e: int) -> str:
    return errno.errorcode.get(e, str(e))


def _endpoint(addr) -> dict:
    return {"addr": addr[0], "port": addr[1]}


class _Monitor(threading.Thread):
    """Reports, without reading any data, the moment the socket gets an error (an RST:
    ECONNRESET, a keepalive/retransmit timeout: ETIMEDOUT) or hangs up."""

    def __init__(self, sock):
        super().__init__(daemon=True)
        self.sock, self.stopping, self.fired = sock, threading.Event(), threading.Event()

    def run(self) -> None:
        p = select.poll()
        p.register(self.sock.fileno(), select.POLLERR | select.POLLHUP)
        while not self.stopping.is_set():
            for _, ev in p.poll(100):
                if self.stopping.is_set() or ev & select.POLLNVAL:
                    return
                err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                say(event="error", source="monitor", errno=_errname(err) if err else None,
                    hangup=bool(ev & select.POLLHUP))
                self.fired.set()
                return

    def stop(self) -> None:
        self.stopping.set()
        self.join(1)


def peer(args) -> None:
    """One TCP connection, either end (`--listen` accepts one and keeps listening; else
    connects), then one stdin command per line, each answered by one JSON line:
      send [N]            N bytes of data (default 1)
      read [T]            whatever arrives within T s (default 1)
      keepalive I N C     SO_KEEPALIVE with TCP_KEEPIDLE=I TCP_KEEPINTVL=N TCP_KEEPCNT=C
      pending             bytes received and not read (FIONREAD)
      close               close() (an RST if data is unread)
      abort               SO_LINGER {on, 0} then close(): an RST
      quit
    Errors the socket gets on its own (an RST, a timeout) are reported as they happen by
    {"event": "error", "source": "monitor", "errno": ...}."""
    import fcntl
    import termios
    fam = family_of(args.addr)
    # a process name of its own, as a real server or client has: the tracer names the
    # process of a reset socket (tests compare with the pid reported here)
    name_process(b"lab-server" if args.listen else b"lab-client")
    if args.listen:
        ls = socket.socket(fam, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((args.addr, args.port))
        if args.defer_accept:   # handshakes complete only when data arrives
            ls.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, args.defer_accept)
        ls.listen(args.backlog)
        say(event="listening", addr=args.addr, port=args.port, pid=os.getpid())
        s, _ = ls.accept()  # the listener stays open: later strays meet a listener
        say(event="accepted", local=_endpoint(s.getsockname()), peer=_endpoint(s.getpeername()))
    else:
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((args.bind or ("::" if fam == socket.AF_INET6 else "0.0.0.0"), args.bind_port))
        s.settimeout(args.timeout)
        t0 = time.monotonic()
        try:
            s.connect((args.addr, args.port))
        except OSError as e:
            say(event="connect-failed", local=_endpoint(s.getsockname()),
                errno=_errname(e.errno) if e.errno else "timeout", latency=time.monotonic() - t0)
            return
        say(event="connected", local=_endpoint(s.getsockname()), peer=_endpoint(s.getpeername()),
            latency=time.monotonic() - t0, pid=os.getpid())
    s.settimeout(None)
    mon = _Monitor(s)
    mon.start()
    for line in sys.stdin:
        cmd, *rest = line.split() or [""]
        try:
            if cmd == "send":
                n = int(rest[0]) if rest else 1
                s.sendall(b"x" * n)
                say(event="sent", bytes=n)
            elif cmd == "read":
                s.settimeout(float(rest[0]) if rest else 1.0)
                try:
                    data = s.recv(65536)
                    say(event="eof") if not data else say(event="received", bytes=len(data))
                except socket.timeout:
                    say(event="received", bytes=0)
                finally:
                    s.settimeout(None)
            elif cmd == "keepalive":
                idle, intvl, cnt = (int(x) for x in rest)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, intvl)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, cnt)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                say(event="keepalive", idle=idle, intvl=intvl, cnt=cnt)
            elif cmd == "pending":
                n = struct.unpack("i", fcntl.ioctl(s.fileno(), termios.FIONREAD, b"\0" * 4))[0]
                say(event="pending", bytes=n)
            elif cmd in ("close", "abort"):
                n = struct.unpack("i", fcntl.ioctl(s.fileno(), termios.FIONREAD, b"\0" * 4))[0]
                mon.stop()
                if cmd == "abort":
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
                say(event="closed", how=cmd, unread=n)
            elif cmd == "quit":
                break
            else:
                say(event="cmd-error", cmd=cmd, text="unknown command")
        except OSError as e:
            say(event="cmd-error", cmd=cmd, errno=_errname(e.errno) if e.errno else str(e))
    mon.stop()


# -- packet watcher -------------------------------------------------------------------
def _exit_with_stdin() -> None:
    """For programs that never read stdin: end when it closes (the orchestrator is gone)."""
    import os

    def watch():
        while sys.stdin.buffer.read1(4096):
            pass
        os._exit(0)
    threading.Thread(target=watch, daemon=True).start()


ETH_P_IPV6 = 0x86DD
SO_TIMESTAMPNS = 35
TCP_FLAGS = ("FIN", "SYN", "RST", "PSH", "ACK", "URG")


def _flag_names(f: int) -> list:
    return [n for i, n in enumerate(TCP_FLAGS) if f & (1 << i)]


def sniff(args) -> None:
    """Every TCP segment seen on an interface (or all of this namespace's: --iface any),
    in and out, one JSON line each with the kernel's timestamp. --port keeps only segments
    from/to that port, --flags only those with one of the flags set (e.g. RST,SYN)."""
    ps = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    if args.iface != "any":
        ps.bind((args.iface, ETH_P_ALL))
    ps.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    _exit_with_stdin()
    want = 0
    for name in filter(None, (args.flags or "").upper().split(",")):
        want |= 1 << TCP_FLAGS.index(name)
    say(event="sniffing", iface=args.iface)
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        r, _, _ = select.select([ps], [], [], 0.2)
        if not r:
            continue
        pkt, anc, _, addr = ps.recvmsg(65535, 64)
        ts = time.time()
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = struct.unpack("qq", data[:16])
                ts = sec + nsec / 1e9
        if addr[1] == ETH_P_IP and len(pkt) >= 20 and pkt[9] == 6:
            hl, total = (pkt[0] & 15) * 4, struct.unpack("!H", pkt[2:4])[0]
            src, dst = socket.inet_ntop(socket.AF_INET, pkt[12:16]), socket.inet_ntop(socket.AF_INET, pkt[16:20])
        elif addr[1] == ETH_P_IPV6 and len(pkt) >= 40 and pkt[6] == 6:
            hl, total = 40, 40 + struct.unpack("!H", pkt[4:6])[0]
            src, dst = socket.inet_ntop(socket.AF_INET6, pkt[8:24]), socket.inet_ntop(socket.AF_INET6, pkt[24:40])
        else:
            continue
        if len(pkt) < hl + 20:
            continue
        sport, dport, seq, ack, off = struct.unpack("!HHIIH", pkt[hl:hl + 14])
        flags = off & 0x3F
        if args.port and args.port not in (sport, dport):
            continue
        if want and not flags & want:
            continue
        say(event="segment", ts=ts, iface=addr[0], dir="out" if addr[2] == socket.PACKET_OUTGOING else "in",
            src=src, sport=sport, dst=dst, dport=dport, seq=seq, ack=ack, flags=_flag_names(flags),
            len=total - hl - (off >> 12) * 4)


# -- many connections -----------------------------------------------------------------
def _raise_nofile() -> None:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def sink(args) -> None:
    """A listener that accepts as fast as it can (SYNs are never refused), then closes each
    connection, or with --hold keeps them all open (it never reads nor sends)."""
    _raise_nofile()
    _exit_with_stdin()
    ls = socket.socket(family_of(args.addr), socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((args.addr, args.port))
    ls.listen(args.backlog)
    say(event="listening", addr=args.addr, port=args.port)
    held = []
    while True:
        conn, _ = ls.accept()
        if args.hold:
            held.append(conn)
        else:
            conn.close()


def hold(args) -> None:
    """Sequential connects from --bind, each with a short timeout, every established one held
    open; stops after --failures failed connects or --count attempts, then waits for `quit`."""
    held, failed = [], 0
    for i in range(args.count):
        s = socket.socket(family_of(args.addr), socket.SOCK_STREAM)
        s.bind((args.bind, 0))
        local = s.getsockname()
        s.settimeout(args.timeout)
        t0 = time.monotonic()
        try:
            s.connect((args.addr, args.port))
            held.append(s)
            say(event="attempt", i=i, ok=True, src=local[0], sport=local[1], latency=time.monotonic() - t0)
        except OSError as e:
            failed += 1
            say(event="attempt", i=i, ok=False, src=local[0], sport=local[1], latency=time.monotonic() - t0,
                errno=_errname(e.errno) if e.errno else "timeout")
            s.close()
            if failed >= args.failures:
                break
    say(event="done", held=len(held), failed=failed)
    for line in sys.stdin:
        if line.strip() == "quit":
            break


TCP_INFO_TOTAL_RETRANS = 100  # offset of tcpi_total_retrans in struct tcp_info


def _race_worker(k, args, t0, q) -> None:
    try:
        q.put(_race(k, args, t0))
    except BaseException as e:  # the parent must hear from every worker
        q.put({"error": f"worker {k}: {e!r}"})


def _race(k, args, t0) -> list:
    import os
    os.sched_setaffinity(0, {(k + args.cpu_offset) % os.cpu_count()})
    src = args.src_base.rsplit(".", 1)
    src = f"{src[0]}.{int(src[1]) + k}"
    _raise_nofile()
    ep = select.epoll()
    pending, results, held = {}, [], []

    def reap(timeout: float) -> None:
        for fd, ev in ep.poll(timeout):
            s, r, start = pending.pop(fd)
            ep.unregister(fd)
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
            results.append({"src": src, "sport": args.base + r, "round": r, "latency": time.monotonic() - start,
                            "ok": not err, "errno": _errname(err) if err else None,
                            "retrans": struct.unpack_from("I", info, TCP_INFO_TOTAL_RETRANS)[0]})
            held.append(s)  # closed only at the end: no closing handshakes during the race

    for r in range(args.rounds):
        target = t0 + r * args.spacing
        while time.monotonic() < target:  # spin: every process sends its SYN at the same instant
            pass
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((src, args.base + r))
        s.setblocking(False)
        start = time.monotonic()
        s.connect_ex((args.addr, args.port))
        pending[s.fileno()] = (s, r, start)
        ep.register(s.fileno(), select.EPOLLOUT | select.EPOLLERR)
        reap(0)
    deadline = time.monotonic() + args.timeout
    while pending and time.monotonic() < deadline:
        reap(0.05)
    for s, r, start in pending.values():
        results.append({"src": src, "sport": args.base + r, "round": r, "latency": time.monotonic() - start,
                        "ok": False, "errno": "timeout", "retrans": None})
        s.close()
    for s in held:
        s.close()
    return results


def race(args) -> None:
    """The SNAT port race (incident 2): --procs processes, each with its own source address
    (--src-base + k), connect at the same instant to one --addr:--port with the same source
    port (--base + round), for --rounds rounds --spacing s apart, non-blocking, so that a SYN
    dropped by a clash is retransmitted while the other rounds go on. Reports every connect
    that took >= --slow s (the SYN was retransmitted: the first RTO is 1 s) or failed.
    Established connections stay open until the end (use `sink --hold`): no closing
    handshakes, hence no stray RSTs, during the race."""
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    # CLOCK_MONOTONIC is the same in every process (and container): --at starts racers of
    # several containers together
    t0 = args.at or time.monotonic() + args.lead
    say(event="racing", start=time.time() + t0 - time.monotonic(), procs=args.procs, rounds=args.rounds)
    ps = [ctx.Process(target=_race_worker, args=(k, args, t0, q)) for k in range(args.procs)]
    for p in ps:
        p.start()
    results, errors, heard = [], [], 0
    deadline = time.monotonic() + args.lead + args.rounds * args.spacing + args.timeout + 10
    while heard < len(ps) and time.monotonic() < deadline:
        try:
            got = q.get(timeout=0.5)
        except Exception:  # queue.Empty: is anybody still working?
            if all(not p.is_alive() for p in ps) and q.empty():
                break
            continue
        heard += 1
        if isinstance(got, dict):
            errors.append(got["error"])
        else:
            results += got
    for p in ps:
        p.join(1)
        if p.is_alive():
            p.kill()
    if errors or heard < len(ps):
        say(event="error", text="race workers failed", errors=errors, heard=heard,
            exitcodes=[p.exitcode for p in ps])
        sys.exit(1)
    lat = [r["latency"] for r in results if r["ok"]]
    slow = sorted((r for r in results if not r["ok"] or r["latency"] >= args.slow),
                  key=lambda r: (r["round"], r["src"]))
    # `resent`: the connects whose SYN went again or that failed (a lost race's signature)
    say(event="done", connects=len(results), ok=len(lat), failed=sum(not r["ok"] for r in results),
        slow=slow, resent=[r for r in slow if r["retrans"] or not r["ok"]],
        max_latency=max(lat) if lat else None, median_latency=sorted(lat)[len(lat) // 2] if lat else None)


# -- UDP churn (DNS-like) -------------------------------------------------------------
DNS_TTL = 60


def _dns_query(name: str) -> bytes:
    """A standard query (id 0, recursion desired) for the A record of `name`."""
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", 0, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)


def udp_responder(args) -> None:
    """Answers every DNS-like query with one A record (--answer), whoever sends it."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((args.addr, args.port))
    answer = struct.pack("!HHHIH", 0xC00C, 1, 1, DNS_TTL, 4) + socket.inet_aton(args.answer)
    _exit_with_stdin()
    say(event="listening", addr=args.addr, port=args.port)
    while True:
        q, peer = s.recvfrom(512)
        if len(q) >= 12:  # id, then flags: response, recursion desired/available; one answer
            s.sendto(q[:2] + b"\x81\x80" + q[4:6] + b"\x00\x01" + q[8:] + answer, peer)


def _udp_churn(args, rate: float, lo: int, hi: int) -> dict:
    import collections
    _raise_nofile()
    ep = select.epoll()
    waiting: dict = {}   # fd -> socket awaiting its answer
    expiry = collections.deque()   # (deadline, fd, socket), in sending order
    query = _dns_query(args.name)
    nports = hi - lo + 1
    sent = answered = timeouts = errors = attempts = 0

    def reap(timeout: float) -> None:
        nonlocal answered, timeouts
        for fd, _ in ep.poll(timeout):
            s = waiting.pop(fd)
            try:
                s.recv(512)
                answered += 1
            except OSError:   # ICMP unreachable and the like
                timeouts += 1
            s.close()         # closing removes it from the epoll set
        now = time.monotonic()
        while expiry and expiry[0][0] <= now:
            _, fd, s = expiry.popleft()
            if waiting.get(fd) is s:  # not answered (an answered one's fd may be reused)
                del waiting[fd]
                s.close()
                timeouts += 1

    start = time.monotonic()
    end = start + args.seconds
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = int((now - start) * rate) - sent
        for _ in range(min(due, 256)):
            port = lo + attempts % nports
            attempts += 1
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setblocking(False)
            try:
                s.bind((args.bind, port))
                s.sendto(struct.pack("!H", attempts & 0xFFFF) + query[2:], (args.addr, args.port))
            except OSError:
                errors += 1
                s.close()
                continue
            waiting[s.fileno()] = s
            ep.register(s.fileno(), select.EPOLLIN)
            expiry.append((now + args.timeout, s.fileno(), s))
            sent += 1
        reap(0 if due > 256 else min(0.001, max(0.0, start + (sent + 1) / rate - time.monotonic())))
    elapsed = time.monotonic() - start
    deadline = time.monotonic() + args.timeout
    while waiting and time.monotonic() < deadline:
        reap(0.01)
    timeouts += len(waiting)
    return {"sent": sent, "answered": answered, "timeouts": timeouts, "errors": errors, "seconds": elapsed}


def _udp_churn_worker(k, args, q) -> None:
    span = (args.sport_hi - args.sport_lo + 1) // args.procs
    lo = args.sport_lo + k * span
    try:
        q.put(_udp_churn(args, args.rate / args.procs, lo, lo + span - 1))
    except BaseException as e:  # the parent must hear from every worker
        q.put({"error": f"worker {k}: {e!r}"})


def udp_churn(args) -> None:
    """DNS-like queries at --rate per second for --seconds, each from a new socket bound to
    the next source port of --sport-lo..--sport-hi (a port comes back only after
    (hi - lo + 1) / rate s: with a shorter conntrack UDP timeout on the way, every query is
    a new flow); each answer is awaited --timeout s. --procs processes share the rate and
    the port range. Reports {"event": "done", sent, answered, timeouts, errors, seconds}."""
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    ps = [ctx.Process(target=_udp_churn_worker, args=(k, args, q)) for k in range(args.procs)]
    for p in ps:
        p.start()
    results = [q.get(timeout=args.seconds + args.timeout + 30) for _ in ps]
    for p in ps:
        p.join(5)
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        say(event="error", text="udp-churn workers failed", errors=errors)
        sys.exit(1)
    say(event="done", **{key: sum(r[key] for r in results) for key in ("sent", "answered", "timeouts", "errors")},
        seconds=max(r["seconds"] for r in results))


# -- NFQUEUE: hold packets between NAT and conntrack's confirm ------------------------------
NETLINK_NETFILTER, NFNL_SUBSYS_QUEUE = 12, 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2, 1, 2
NFQNL_CFG_CMD_BIND, NFQNL_COPY_META, NF_ACCEPT = 1, 1, 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4


def _nfq_message(kind: int, queue: int, attrs: list, flags: int = NLM_F_REQUEST) -> bytes:
    body = struct.pack("!BBH", socket.AF_UNSPEC, 0, queue)       # nfgenmsg: res_id is big-endian
    for atype, payload in attrs:
        body += struct.pack("HH", 4 + len(payload), atype) + payload + b"\0" * (-len(payload) % 4)
    return struct.pack("IHHII", 16 + len(body), NFNL_SUBSYS_QUEUE << 8 | kind, flags, 0, 0) + body


def _nfq_packets(data: bytes) -> list:
    """(queue, packet id) of the NFQNL_MSG_PACKET messages in one netlink read."""
    out, off = [], 0
    while off + 20 <= len(data):
        length, kind = struct.unpack_from("IH", data, off)
        if kind == NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_PACKET:
            queue = struct.unpack_from("!H", data, off + 18)[0]
            a = off + 20
            while a + 4 <= off + length:
                alen, atype = struct.unpack_from("HH", data, a)
                if atype & 0x7fff == NFQA_PACKET_HDR:
                    out.append((queue, struct.unpack_from("!I", data, a + 4)[0]))
                a += max(4, (alen + 3) & ~3)
        off += max(20, (length + 3) & ~3)
    return out


def _nfq_bind(s, queue: int) -> None:
    s.send(_nfq_message(NFQNL_MSG_CONFIG, queue, [(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0))],
                        NLM_F_REQUEST | NLM_F_ACK))
    s.send(_nfq_message(NFQNL_MSG_CONFIG, queue, [(NFQA_CFG_PARAMS, struct.pack("!IBxxx", 0, NFQNL_COPY_META))],
                        NLM_F_REQUEST | NLM_F_ACK))
    for _ in range(2):   # the acks: an error (errno < 0) means the queue could not be bound
        err = struct.unpack_from("i", s.recv(65536), 16)[0]
        if err:
            say(event="error", errno=_errname(-err))
            sys.exit(1)


def _nfq_accept(s, queue: int, packet: int) -> None:
    s.send(_nfq_message(NFQNL_MSG_VERDICT, queue, [(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet))]))


def nat_clash(args) -> None:
    """Makes incident 2 certain, on the kernel's own path, with no timing in it. Rules of the
    router queue both racing SYNs after NAT, before conntrack's confirm (--winner-queue,
    --loser-queue): an entry not yet confirmed does not hold its port, so NAT gave both the
    same one. Once both are held, the winner is let go (the verdict returns once its entry
    is confirmed and its SYN sent), then the loser, which meets the winner's entry at
    confirm: a clash (insert_failed +1), and nf_reinject frees the SYN. Then it exits: the
    rules' bypass lets the loser's retransmission through."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    s.bind((0, 0))
    for q in (args.winner_queue, args.loser_queue):
        _nfq_bind(s, q)
    say(event="holding", queues=[args.winner_queue, args.loser_queue])
    held: dict = {}
    deadline = time.monotonic() + args.wait
    while len(held) < 2 and time.monotonic() < deadline:
        r, _, _ = select.select([s], [], [], max(0.0, deadline - time.monotonic()))
        if r:
            for queue, packet in _nfq_packets(s.recv(65536)):
                held.setdefault(queue, packet)
    for queue in (args.winner_queue, args.loser_queue):
        if queue in held:
            _nfq_accept(s, queue, held[queue])
    if len(held) < 2:
        say(event="error", text="not both SYNs came", held=sorted(held))
        sys.exit(1)
    say(event="released")
    s.close()


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
    m.add_argument("--together", action="store_true")
    m.add_argument("--hold", type=float, default=0.5)
    m.add_argument("--send", action="store_true")
    i = sub.add_parser("inject")
    i.add_argument("--iface", required=True)
    i.add_argument("--sport", type=int, required=True)
    i.add_argument("--offset", type=int, default=1 << 30)
    i.add_argument("--wait", type=float, default=15)
    i.add_argument("--quiet", type=float, default=0.3)
    e = sub.add_parser("peer")
    e.add_argument("--addr", required=True)
    e.add_argument("--port", type=int, required=True)
    e.add_argument("--listen", action="store_true")
    e.add_argument("--bind", default="")
    e.add_argument("--bind-port", type=int, default=0)
    e.add_argument("--timeout", type=float, default=5)
    e.add_argument("--backlog", type=int, default=16)
    e.add_argument("--defer-accept", type=int, default=0)
    w = sub.add_parser("sniff")
    w.add_argument("--iface", default="any")
    w.add_argument("--port", type=int, default=0)
    w.add_argument("--flags", default="")
    w.add_argument("--wait", type=float, default=60)
    k = sub.add_parser("sink")
    k.add_argument("--addr", required=True)
    k.add_argument("--port", type=int, required=True)
    k.add_argument("--backlog", type=int, default=4096)
    k.add_argument("--hold", action="store_true")
    h = sub.add_parser("hold")
    h.add_argument("--addr", required=True)
    h.add_argument("--port", type=int, required=True)
    h.add_argument("--bind", required=True)
    h.add_argument("--count", type=int, default=100)
    h.add_argument("--failures", type=int, default=3)
    h.add_argument("--timeout", type=float, default=1.5)
    r = sub.add_parser("race")
    r.add_argument("--addr", required=True)
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--src-base", required=True)
    r.add_argument("--procs", type=int, default=8)
    r.add_argument("--rounds", type=int, default=250)
    r.add_argument("--base", type=int, default=20000)
    r.add_argument("--spacing", type=float, default=0.004)
    r.add_argument("--lead", type=float, default=0.5)
    r.add_argument("--timeout", type=float, default=3.5)
    r.add_argument("--slow", type=float, default=0.5)
    r.add_argument("--at", type=float, default=0.0)
    r.add_argument("--cpu-offset", type=int, default=0)
    u = sub.add_parser("udp-responder")
    u.add_argument("--addr", required=True)
    u.add_argument("--port", type=int, default=53)
    u.add_argument("--answer", default="192.0.2.1")
    g = sub.add_parser("udp-churn")
    g.add_argument("--addr", required=True)
    g.add_argument("--port", type=int, default=53)
    g.add_argument("--bind", default="0.0.0.0")
    g.add_argument("--rate", type=float, default=20000)
    g.add_argument("--seconds", type=float, default=5)
    g.add_argument("--timeout", type=float, default=0.5)
    g.add_argument("--sport-lo", type=int, default=10000)
    g.add_argument("--sport-hi", type=int, default=60999)
    g.add_argument("--procs", type=int, default=1)
    g.add_argument("--name", default="churn.bench.lab")
    q = sub.add_parser("nat-clash")
    q.add_argument("--winner-queue", type=int, required=True)
    q.add_argument("--loser-queue", type=int, required=True)
    q.add_argument("--wait", type=float, default=10.0)
    args = p.parse_args(argv)
    name_process(f"lab-{args.cmd}".encode())   # what the tracer shows for its sockets (peer: its role)
    {"server": serve, "client": client, "connect-many": connect_many, "inject": inject, "peer": peer,
     "sniff": sniff, "sink": sink, "hold": hold, "nat-clash": nat_clash, "race": race, "udp-responder": udp_responder,
     "udp-churn": udp_churn}[args.cmd](args)


if __name__ == "__main__":
    main()
