"""The Fluentd Forward protocol (v1), as Fluentd's and Fluent Bit's ``forward`` inputs
speak it, over TCP:

- Forward mode (default): one msgpack array per batch,
  ``[tag, [[time, record], ...], {"size": n[, "chunk": id]}]``;
- Message mode (``mode=message``): ``[tag, time, record[, {"chunk": id}]]`` per record.

``time`` is an EventTime (msgpack ext type 0: big-endian uint32 seconds, uint32
nanoseconds) taken from the record's ``ts_unix``. With ``ack=True`` each message carries a
``chunk`` option (a base64 string of 16 random bytes) and counts as delivered only when the
server answered ``{"ack": chunk}``; no answer within ``ack_timeout`` seconds drops the
connection and the batch is sent again on the next one (at-least-once). Without ack, a
batch is delivered once the server's TCP stack acknowledged it, as for the ``tcp`` sink.
Not implemented: the handshake (shared_key), TLS, PackedForward and compression."""
from __future__ import annotations

import base64
import os
import select
import struct
import time

import msgpack

from .queued import QueuedSink
from ..events import format_endpoint
from .stream import TcpTransport

DEFAULT_TAG = "rst-tracer"
DEFAULT_ACK_TIMEOUT = 10.0
MODES = ("forward", "message")


def event_time(ts: float) -> msgpack.ExtType:
    sec = int(ts)
    nsec = min(int(round((ts - sec) * 1e9)), 999_999_999)
    return msgpack.ExtType(0, struct.pack(">II", sec, nsec))


def _time_of(record: dict) -> msgpack.ExtType:
    ts = record.get("ts_unix")
    return event_time(ts if isinstance(ts, (int, float)) and ts >= 0 else time.time())


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, default=str)


def new_chunk_id() -> str:
    return base64.b64encode(os.urandom(16)).decode()


class FluentTransport(TcpTransport):
    max_batch = 200

    def __init__(self, host: str, port: int, tag: str = DEFAULT_TAG, ack: bool = False,
                 ack_timeout: float = DEFAULT_ACK_TIMEOUT, mode: str = "forward"):
        super().__init__(host, port)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        self.tag, self.ack, self.ack_timeout, self.mode = tag, ack, ack_timeout, mode
        self._unpacker = None

    def open(self) -> None:
        super().open()
        self._unpacker = msgpack.Unpacker(raw=False)

    def send(self, records: list) -> list:
        if self.mode == "forward":
            option = {"size": len(records)}
            messages = [(len(records), option,
                         [self.tag, [[_time_of(r), r] for r in records], option])]
        else:
            messages = []
            for r in records:
                option = {}
                messages.append((1, option, [self.tag, _time_of(r), r, option]))
        chunks = []
        if self.ack:
            for _, option, _ in messages:
                option["chunk"] = new_chunk_id()
                chunks.append(option["chunk"])
        elif self.mode == "message":   # no option map at all: the plain 3-element form
            messages = [(n, o, m[:3]) for n, o, m in messages]
        packed = [(n, _pack(m)) for n, _, m in messages]
        self.sock.sendall(b"".join(data for _, data in packed))
        if self.ack:
            self._wait_acks(chunks)
        return [(n, len(data)) for n, data in packed]

    def _wait_acks(self, chunks: list) -> None:
        pending = list(chunks)
        deadline = time.monotonic() + self.ack_timeout
        while pending:
            for obj in self._unpacker:
                if isinstance(obj, dict) and obj.get("ack") in pending:
                    pending.remove(obj["ack"])   # Fluentd answers in order; accept any order
            if not pending:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no ack for {len(pending)} chunk(s) within {self.ack_timeout:g} s")
            p = select.poll()
            p.register(self.sock, select.POLLIN | select.POLLERR | select.POLLHUP)
            if not p.poll(left * 1000):
                continue
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionResetError("connection closed by the server before it acknowledged")
            self._unpacker.feed(data)

    def on_data(self, data: bytes) -> None:
        if self._unpacker is not None:
            self._unpacker.feed(data)   # late acks of an earlier connection's chunks: ignored
            for _ in self._unpacker:
                pass

    def unacked(self) -> int:
        return 0 if self.ack else super().unacked()


class FluentSink(QueuedSink):
    def __init__(self, host: str, port: int, tag: str = DEFAULT_TAG, ack: bool = False,
                 ack_timeout: float = DEFAULT_ACK_TIMEOUT, mode: str = "forward", name: str = "", **kw):
        super().__init__(FluentTransport(host, port, tag, ack, ack_timeout, mode),
                         name or f"fluent:{format_endpoint(host, port)}", **kw)
