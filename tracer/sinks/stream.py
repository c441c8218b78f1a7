"""Newline-delimited JSON over a stream socket: TCP (what Vector's ``socket`` source,
Fluent Bit's ``tcp`` input and rsyslog's imtcp ingest) or a Unix stream socket.

A record counts as delivered once the peer's kernel acknowledged its bytes (SIOCOUTQ):
bytes written into a connection the peer had already closed are never acknowledged, so
they are sent again on the next connection instead of vanishing."""
from __future__ import annotations

import fcntl
import json
import select
import socket
import struct
import termios

from ..events import format_endpoint
from .queued import QueuedSink, Transport

CONNECT_TIMEOUT = 5.0
USER_TIMEOUT_MS = 30000    # a peer that acknowledges nothing for this long is dead
_POLL_GONE = select.POLLIN | select.POLLERR | select.POLLHUP | getattr(select, "POLLRDHUP", 0)


def json_line(record: dict) -> bytes:
    """Same encoding as `watch --json` on stdout: one line, ASCII, no embedded newline."""
    return json.dumps(record, separators=(",", ":"), default=str).encode() + b"\n"


class SocketTransport(Transport):
    """A connected stream socket; subclasses say how to connect and what to write."""

    def __init__(self):
        self.sock = None

    def connect(self) -> socket.socket:
        raise NotImplementedError

    def open(self) -> None:
        self.sock = self.connect()
        self.sock.settimeout(None)   # blocking writes; a dead peer is caught by TCP_USER_TIMEOUT

    def check(self) -> None:
        """A peer that closed (rsyslog stopped, collector restarted) shows up as readable
        with nothing to read: catch it *before* writing records into the void."""
        p = select.poll()
        p.register(self.sock, _POLL_GONE)
        if not p.poll(0):
            return
        try:
            data = self.sock.recv(65536, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            raise ConnectionResetError("connection closed by the peer")
        self.on_data(data)

    def on_data(self, data: bytes) -> None:
        """Bytes the peer sent unasked: plain JSON-lines receivers send none; ignored."""

    def send(self, records: list) -> list:
        lines = [json_line(r) for r in records]
        self.sock.sendall(b"".join(lines))
        return [(1, len(line)) for line in lines]

    def unacked(self) -> int:
        # TCP: bytes not yet acknowledged by the peer; Unix: bytes (with overhead) the
        # peer has not read yet. Either way, 0 means everything arrived.
        buf = fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        return struct.unpack("i", buf)[0]

    def interrupt(self) -> None:
        sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        if self.sock is not None:
            sock, self.sock = self.sock, None
            sock.close()


class TcpTransport(SocketTransport):
    def __init__(self, host: str, port: int, connect_timeout: float = CONNECT_TIMEOUT):
        super().__init__()
        self.host, self.port, self.connect_timeout = host, port, connect_timeout

    def connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
        return sock


class UnixTransport(SocketTransport):
    def __init__(self, path: str, connect_timeout: float = CONNECT_TIMEOUT):
        super().__init__()
        self.path, self.connect_timeout = path, connect_timeout

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.connect_timeout)
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        return sock


class TcpSink(QueuedSink):
    def __init__(self, host: str, port: int, name: str = "", **kw):
        super().__init__(TcpTransport(host, port), name or f"tcp:{format_endpoint(host, port)}", **kw)


class UnixSink(QueuedSink):
    def __init__(self, path: str, name: str = "", **kw):
        super().__init__(UnixTransport(path), name or f"unix:{path}", **kw)
