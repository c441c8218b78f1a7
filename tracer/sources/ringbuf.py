"""The probe backend's two ring buffers as a source of typed events, each lane in kernel
order: the root-cause lane (never shed) and the ordinary lane. Records are kept as bytes in
the callback and decoded after the poll, root-cause lane first: a backlog of ordinary
resets never delays the decoding of the record that explains an incident."""
from __future__ import annotations

import structlog

from ..decode import DecodeError, KernelNames, decode

log = structlog.get_logger("rst-tracer.ringbuf")


class RingBuffer:
    def __init__(self, backend, names: KernelNames):
        self.backend, self.names = backend, names
        self.decode_errors = 0
        self._cause: list = []
        self._ordinary: list = []

    def open(self) -> None:
        self.backend.open(self._cause.append, self._ordinary.append)

    def drain(self, timeout_ms: int = 0) -> tuple:
        """(root-cause events, ordinary events) queued now, waiting up to timeout_ms for the
        first record."""
        self.backend.poll(timeout_ms)
        cause, ordinary = self._decode(self._cause), self._decode(self._ordinary)
        self._cause.clear()
        self._ordinary.clear()
        return cause, ordinary

    def _decode(self, raws: list) -> list:
        out = []
        for raw in raws:
            try:
                out.append(decode(raw, self.names))
            except DecodeError as e:
                self.decode_errors += 1
                log.warning("undecodable kernel event", error=str(e))
        return out

    def lost(self) -> int:
        return self.backend.lost()
