"""JSON lines appended to a file, with size-based rotation like logrotate's: when the next
line would push ``path`` past ``max_bytes``, ``path.{backups-1}`` becomes ``path.{backups}``
(the oldest is removed), ..., ``path`` becomes ``path.1`` and a new ``path`` is started.

Every line is written whole by one write(2) on an O_APPEND descriptor, and rotation only
happens between lines, so no file ever holds a partial line. If something else moves the
file away (an external logrotate without copytruncate), it is reopened within a second."""
from __future__ import annotations

import os
import time

from .queued import QueuedSink, Transport
from .stream import json_line

REOPEN_CHECK = 1.0


class FileTransport(Transport):
    def __init__(self, path: str, max_bytes: int = 0, backups: int = 5, mode: int = 0o640):
        self.path, self.max_bytes, self.backups, self.mode = path, max_bytes, backups, mode
        self.fd = None
        self.size = 0
        self.ino = None
        self._checked = 0.0

    def open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, self.mode)
        st = os.fstat(fd)
        self.fd, self.size, self.ino = fd, st.st_size, (st.st_dev, st.st_ino)
        self._checked = time.monotonic()

    def check(self) -> None:
        if time.monotonic() - self._checked < REOPEN_CHECK:
            return
        self._checked = time.monotonic()
        try:
            st = os.stat(self.path)
            moved = (st.st_dev, st.st_ino) != self.ino
        except FileNotFoundError:
            moved = True
        if moved:
            self.close()
            self.open()

    def send(self, records: list) -> list:
        units = []
        for line in [json_line(r) for r in records]:   # encode everything before writing
            try:
                if self.max_bytes and self.size and self.size + len(line) > self.max_bytes:
                    self.rotate()
                self._write(line)
            except OSError:
                if not units:
                    raise
                return units   # what was written counts; the rest is retried (and fails again)
            units.append((1, len(line)))
        return units

    def _write(self, line: bytes) -> None:
        view, start = memoryview(line), self.size
        try:
            while view:   # a regular file takes the whole line unless the disk is full
                n = os.write(self.fd, view)
                self.size += n
                view = view[n:]
        except OSError:
            if self.size != start:   # never leave half a line behind (ENOSPC mid-line)
                try:
                    os.ftruncate(self.fd, start)
                    self.size = start
                except OSError:
                    pass
            raise

    def rotate(self) -> None:
        self.close()
        if self.backups > 0:
            for i in range(self.backups - 1, 0, -1):
                src = f"{self.path}.{i}"
                if os.path.exists(src):
                    os.replace(src, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        else:
            os.unlink(self.path)
        self.open()

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


class FileSink(QueuedSink):
    def __init__(self, path: str, max_bytes: int = 0, backups: int = 5, name: str = "", **kw):
        super().__init__(FileTransport(path, max_bytes, backups), name or f"file:{path}", **kw)
