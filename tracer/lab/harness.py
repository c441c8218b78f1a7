"""Runs the real tracer (`python -m tracer watch --json`) as a separate process around a lab
scenario and collects its records: used by the demo, the integration tests and benchmarks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

from .topology import LabError, _project_root


def effective_verdicts(records, netns=None) -> tuple:
    """(the verdict of each event as it stands after any corrections, the corrections), in
    event order, of the namespaces `netns` (all when None): a correction takes the place of
    the record it supersedes (schema v1, README)."""
    verdicts, corrections, where = [], [], {}
    for r in records:
        if netns is not None and r.get("netns") not in netns:
            continue
        if r.get("type") == "verdict":
            where[r["id"]] = len(verdicts)
            verdicts.append(r)
        elif r.get("type") == "correction":
            corrections.append(r)
            i = where.pop(r["supersedes"], None)
            if i is None:             # what it corrects was filtered out: it stands for itself
                i = len(verdicts)
                verdicts.append(r)
            where[r["id"]] = i
            verdicts[i] = r
    return verdicts, corrections


class TracerProcess:
    detach_timeout = 30.0

    def __init__(self, *extra_args: str, record: str = "", env: dict = None):
        self.args = [sys.executable, "-m", "tracer", "watch", "--json", *extra_args] + \
            (["--backend", os.environ["RST_TRACER_BACKEND"]] if os.environ.get("RST_TRACER_BACKEND") else [])
        if record:
            self.args += ["--record", os.path.abspath(record)]
        self.env = dict(os.environ, **(env or {}))
        self.proc = None
        self.records: list = []
        self.attached: dict = {}
        self.stderr = ""

    def __enter__(self) -> "TracerProcess":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> dict:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=_project_root(), env=self.env)
        # both pipes are read as the tracer writes them: blocked on a full pipe (the host's
        # other namespaces have verdicts too), it would read its context late, after the
        # scenario's state (counters, a lowered sysctl) is gone
        attached, out, err = threading.Event(), [], []

        def read_stdout():
            for line in self.proc.stdout:
                out.append(line)
                if not attached.is_set() and line.strip():
                    rec = json.loads(line)
                    if rec.get("type") == "status" and rec.get("state") == "attached":
                        self.attached = rec
                        attached.set()
        self._readers = [threading.Thread(target=read_stdout, daemon=True),
                         threading.Thread(target=lambda: err.extend(self.proc.stderr), daemon=True)]
        self._out, self._err = out, err
        for t in self._readers:
            t.start()
        deadline = time.monotonic() + timeout
        while not attached.wait(0.5) and self.proc.poll() is None and time.monotonic() < deadline:
            pass
        if attached.is_set():
            return self.attached
        self.stop()
        raise LabError(f"tracer did not attach: {self.stderr.strip() or 'timeout'}")

    def stop(self, settle: float = 0.3) -> list:
        """SIGINT (a clean detach), then every record it printed."""
        if self.proc is None:
            return self.records
        if self.proc.poll() is None:
            time.sleep(settle)  # let the last events cross the ring buffer
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=self.detach_timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for t in self._readers:
            t.join()
        self.stderr = "".join(self._err)
        self.records += [json.loads(line) for line in self._out if line.strip()]
        self.proc = None
        return self.records

    def mark(self) -> int:
        """Where the output is now: wait_for(since=mark()) looks only at what comes after."""
        return len(self._out)

    def wait_for(self, pred, timeout: float, since: int = 0) -> dict:
        """The first record printed (after line `since`), by now or within `timeout` s, for
        which pred() is true."""
        deadline = time.monotonic() + timeout
        seen = since
        while True:
            lines = self._out[:]    # appended by the reader thread
            for line in lines[seen:]:
                if line.strip() and pred(json.loads(line)):
                    return json.loads(line)
            seen = len(lines)
            if time.monotonic() >= deadline or self.proc.poll() is not None:
                raise LabError(f"the tracer printed no such record within {timeout}s")
            time.sleep(0.05)

    def verdicts(self, cause: str = "") -> list:
        """Effective verdicts (corrections applied)."""
        return [r for r in effective_verdicts(self.records)[0] if not cause or r["cause"] == cause]
