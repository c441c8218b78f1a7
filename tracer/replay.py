"""Offline attribution of a recording: the same verdicts as the live run that made it."""
from __future__ import annotations

from .attribution import Attributor
from .recording import read_recording


def replay_verdicts(path: str):
    """Verdict records of a recording, in order. Raises RecordingError where the file
    breaks, after yielding the verdicts of its good part."""
    header, events = read_recording(path)
    attributor = Attributor(header.get("backend", "replay"), header.get("host"),
                            id_prefix=header.get("id_prefix"))
    for ev in events:
        verdict = attributor.feed(ev)
        if verdict is not None:
            yield verdict.to_dict()
