"""Record/replay: the enriched kernel events of a run as a msgpack stream.

File layout: a header map {"format": "rst-tracer-recording", "version": 1, ...} followed
by one map per event (KernelEvent.to_dict()). Everything attribution needs is in the
events, so `replay` re-runs it offline, without root, and gives the live verdicts.
"""
from __future__ import annotations

import os
import platform
import socket
import time

import msgpack

from .events import KernelEvent

FORMAT, VERSION = "rst-tracer-recording", 1


class RecordingError(Exception):
    """A recording could not be read past `offset`; events before it were good."""

    def __init__(self, message: str, offset: int):
        super().__init__(f"{message} at byte offset {offset}")
        self.offset = offset


class Recorder:
    def __init__(self, path: str, backend: str, id_prefix: str):
        self._f = open(path, "wb")
        self._pack = msgpack.Packer(use_bin_type=True)
        self._f.write(self._pack.pack({"format": FORMAT, "version": VERSION, "backend": backend,
                                       "host": socket.gethostname(), "kernel": platform.release(),
                                       "id_prefix": id_prefix,
                                       "created": time.time()}))
        self._f.flush()

    @classmethod
    def from_header(cls, path: str, header: dict) -> "Recorder":
        rec = cls.__new__(cls)
        rec._f = open(path, "wb")
        rec._pack = msgpack.Packer(use_bin_type=True)
        rec._f.write(rec._pack.pack(header))
        return rec

    def write(self, ev: KernelEvent) -> None:
        self._f.write(self._pack.pack(ev.to_dict()))
        self._f.flush()  # a crash loses nothing already seen

    def close(self) -> None:
        self._f.close()


def read_recording(path: str):
    """(header, iterator of KernelEvent). The iterator raises RecordingError at the first
    bad byte, after yielding every good event before it."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise RecordingError(f"cannot open {path}: {e.strerror}", 0) from None
    size = os.fstat(f.fileno()).st_size
    unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False, max_buffer_size=16 << 20)

    def next_obj(what: str):
        offset = unpacker.tell()
        try:
            return unpacker.unpack(), offset
        except msgpack.OutOfData:
            if offset >= size:
                raise StopIteration from None
            raise RecordingError(f"{path}: truncated {what}", offset) from None
        except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as e:
            raise RecordingError(f"{path}: corrupt {what} ({e.__class__.__name__})", offset) from None

    try:
        header, _ = next_obj("header")
    except StopIteration:
        f.close()
        raise RecordingError(f"{path}: empty file, not a recording", 0) from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        f.close()
        raise RecordingError(f"{path}: not an rst-tracer recording", 0)
    if header.get("version") != VERSION:
        f.close()
        raise RecordingError(f"{path}: unsupported recording version {header.get('version')!r}", 0)

    def events():
        try:
            while True:
                try:
                    obj, offset = next_obj("event")
                except StopIteration:
                    return
                try:
                    if not isinstance(obj, dict):
                        raise TypeError("not a map")
                    yield KernelEvent.from_dict(obj)
                except (TypeError, ValueError, KeyError, AttributeError) as e:
                    raise RecordingError(f"{path}: malformed event ({e})", offset) from None
        finally:
            f.close()

    return header, events()


def keep_only(path: str, keep) -> int:
    """Rewrite a recording with only the events for which keep(event) is true (e.g. one
    lab's namespaces, for a test fixture). Returns the number of events kept."""
    header, events = read_recording(path)
    kept = [ev for ev in events if keep(ev)]
    rec = Recorder.from_header(path, header)
    for ev in kept:
        rec.write(ev)
    rec.close()
    return len(kept)
