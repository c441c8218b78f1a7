"""The probe backend's ring buffer as a source of typed events, in kernel order."""
from __future__ import annotations

import structlog

from ..decode import DecodeError, KernelNames, decode

log = structlog.get_logger("rst-tracer.ringbuf")


class RingBuffer:
    def __init__(self, backend, names: KernelNames):
        self.backend, self.names = backend, names
        self.decode_errors = 0
        self._pending: list = []

    def open(self) -> None:
        self.backend.open(self._on_raw)

    def _on_raw(self, raw: bytes) -> None:
        try:
            self._pending.append(decode(raw, self.names))
        except DecodeError as e:
            self.decode_errors += 1
            log.warning("undecodable kernel event", error=str(e))

    def drain(self, timeout_ms: int = 0) -> list:
        """Everything queued now (waiting up to timeout_ms for the first record)."""
        self.backend.poll(timeout_ms)
        out, self._pending = self._pending, []
        return out

    def lost(self) -> int:
        return self.backend.lost()
