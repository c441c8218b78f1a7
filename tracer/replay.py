"""Offline attribution of a recording: the same verdicts as the live run that made it."""
from __future__ import annotations

from .attribution import Attributor
from .recording import read_recording


def replay_verdicts(path: str):
    """Verdict and correction records of a recording, in order. Raises RecordingError where
    the file breaks, after yielding the records of its good part."""
    header, events = read_recording(path)
    attributor = Attributor(header.get("backend", "replay"), header.get("host"),
                            id_prefix=header.get("id_prefix"))
    for ev in events:
        for verdict in attributor.feed(ev):
            yield verdict.to_dict()
