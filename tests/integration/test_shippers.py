"""Outputs against a REAL shipper: Debian's rsyslogd with imtcp, started by the test on
127.0.0.1 with its own configuration, work directory and pid file in tmp (the system's
rsyslog, if any, is not touched). mmjsonparse parses every line we send and omfile writes
it back as JSON, so what arrives is compared record by record with what was sent.

Also the CLI end to end (root: real probes): several outputs at once, one of them
unreachable, and the metrics endpoint."""
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request

import pytest

from tracer.sinks.outputs import parse_output

RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
pytestmark = pytest.mark.skipif(not os.access(RSYSLOGD, os.X_OK),
                                reason="rsyslogd not installed (scripts/setup.sh installs it)")

RSYSLOG_CONF = """\
global(workDirectory="{work}" maxMessageSize="64k")
module(load="imtcp")
module(load="mmjsonparse")
template(name="rst_json" type="list") {{
  property(name="$!all-json-plain")
  constant(value="\\n")
}}
ruleset(name="rst") {{
  action(type="mmjsonparse" cookie="" useRawMsg="on")
  if $parsesuccess == "OK" then {{
    action(type="omfile" file="{out}" template="rst_json")
  }} else {{
    action(type="omfile" file="{bad}")
  }}
}}
input(type="imtcp" address="127.0.0.1" port="{port}" ruleset="rst")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond, timeout, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


class Rsyslog:
    def __init__(self, tmp):
        self.port = free_port()
        self.work = tmp / "rsyslog"
        self.work.mkdir()
        self.out, self.bad = self.work / "out.jsonl", self.work / "bad.log"
        self.conf, self.pid = self.work / "rsyslog.conf", self.work / "rsyslogd.pid"
        self.conf.write_text(RSYSLOG_CONF.format(work=self.work, out=self.out, bad=self.bad, port=self.port))
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(self.pid)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        def listening():
            if self.proc.poll() is not None:
                raise AssertionError(f"rsyslogd exited: {self.proc.stdout.read()}")
            with socket.socket() as s:   # an empty connection: rsyslog logs nothing for it
                return s.connect_ex(("127.0.0.1", self.port)) == 0
        assert wait_until(listening, 20), "rsyslogd did not listen"

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def records(self) -> list:
        if not self.out.exists():
            return []
        data = self.out.read_bytes()
        return [json.loads(line) for line in data[: data.rfind(b"\n") + 1].splitlines()]


@pytest.fixture
def rsyslog(tmp_path):
    r = Rsyslog(tmp_path)
    r.start()
    yield r
    r.stop()
    assert not r.bad.exists() or not r.bad.read_text(), f"rsyslog could not parse: {r.bad.read_text()[:500]}"


def verdict_like(n: int, pad: int = 0) -> dict:
    """Shaped like a real verdict (tracer/schema.py), with nesting, lists, nulls, unicode."""
    return {
        "type": "verdict", "schema_version": 1, "id": f"testhost-65a1b2c3-{n}",
        "ts": "2024-01-01T00:00:00.000000Z", "ts_unix": 1704067200 + n / 1024, "host": "testhost",
        "netns": 4026532246, "netns_name": "rstlab-acc9d9-nat", "interface": "n2", "direction": "sent",
        "flow": {"proto": "tcp", "family": 4, "src": "10.200.2.2", "sport": 8080, "dst": "10.200.2.1", "dport": 35294},
        "packet": {"flags": ["ACK", "PSH"], "seq": 123456789 + n, "ack": 987654321, "len": 100},
        "nat": {"inside": {"src": "10.200.1.2", "sport": 35294, "dst": "10.200.2.2", "dport": 8080},
                "outside": {"src": "10.200.2.1", "sport": 35294, "dst": "10.200.2.2", "dport": 8080}},
        "cause": "conntrack_invalid_unnat", "confidence": "high",
        "summary": f"conntrack marked a segment INVALID — it was not de-NATed #{n}",
        "evidence": [{"key": "segment_conntrack", "text": "no conntrack entry: “INVALID”", "value": None},
                     {"key": "pad", "text": "x" * pad, "value": [1, 2.5, True]}],
        "remedy": {"text": "drop INVALID", "commands": ["iptables -I INPUT -m conntrack --ctstate INVALID -j DROP"]},
        "backend": "tracepoint", "kernel": {"probe": "tcp_send_reset", "reason": "NO_SOCKET", "has_ct": False},
        "related": None, "process": {"pid": 0, "comm": "swapper/1"}, "seq": n,
    }


def test_rsyslog_receives_every_record_parsed_in_order(rsyslog):
    sink = parse_output(f"tcp:127.0.0.1:{rsyslog.port}")
    sent = [verdict_like(n, pad=12_000 if n == 500 else 0) for n in range(1000)]
    for rec in sent:
        sink.emit(rec)
    sink.close()
    stats = sink.stats()
    assert stats["delivered"] == 1000 and stats["dropped"] == 0 and stats["errors"] == 0
    assert wait_until(lambda: len(rsyslog.records()) >= 1000, 30)
    got = rsyslog.records()
    assert [r["seq"] for r in got] == list(range(1000))
    assert got == sent          # every field, parsed back by rsyslog's JSON parser


@pytest.mark.slow
def test_rsyslog_down_for_30s_loses_nothing_and_keeps_order(rsyslog):
    t0 = time.monotonic()
    sink = parse_output(f"tcp:127.0.0.1:{rsyslog.port}")
    n = 0
    for _ in range(200):
        sink.emit(verdict_like(n))
        n += 1
    assert wait_until(lambda: len(rsyslog.records()) == 200, 30)

    rsyslog.stop()                                   # the shipper is down for 30 s...
    down_from, down_until = n, time.monotonic() + 30
    while time.monotonic() < down_until:             # ...while verdicts keep coming
        sink.emit(verdict_like(n))
        n += 1
        time.sleep(0.1)
    stats = sink.stats()
    assert not stats["connected"] and stats["errors"] >= 3
    assert stats["queued"] == n - down_from and stats["dropped"] == 0
    assert len(rsyslog.records()) == 200

    rsyslog.start()                                  # back on the same port
    for _ in range(200):
        sink.emit(verdict_like(n))
        n += 1
    assert wait_until(lambda: len(rsyslog.records()) >= n, 30), \
        f"{len(rsyslog.records())} of {n} arrived; sink {sink.stats()}"
    sink.close()
    got = [r["seq"] for r in rsyslog.records()]
    assert got == list(range(n)), "lost, duplicated or reordered records"
    stats = sink.stats()
    assert stats["delivered"] == n and stats["dropped"] == 0 and stats["queued"] == 0 and stats["connected"] is False
    print(f"\n{n} records, {n - down_from - 200} sent while rsyslog was down; "
          f"test took {time.monotonic() - t0:.1f} s")


class Receiver:
    """JSON lines on 127.0.0.1 (the test's own collector for the CLI test)."""

    def __init__(self):
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(4)
        self.port = self.srv.getsockname()[1]
        self.records: list = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        conn, _ = self.srv.accept()
        buf = b""
        while True:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
            *lines, buf = buf.split(b"\n")
            self.records += [json.loads(x) for x in lines]


@pytest.mark.root
def test_watch_with_several_outputs_one_down_and_metrics(tmp_path):
    from tracer.lab.harness import TracerProcess

    receiver = Receiver()
    dead, metrics_port = free_port(), free_port()
    jsonl = tmp_path / "verdicts.jsonl"
    t = TracerProcess("--output", "stdout", "--output", f"tcp:127.0.0.1:{receiver.port}",
                      "--output", f"tcp:127.0.0.1:{dead}", "--output", f"file:{jsonl}?max_bytes=1M",
                      "--metrics", f"127.0.0.1:{metrics_port}")
    attached = t.start()
    proc = t.proc
    try:
        assert wait_until(lambda: any(r.get("state") == "attached" for r in receiver.records), 10)
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        probe = attached["probes"][0]
        assert f'rst_tracer_probe_attached{{backend="{attached["backend"]}",probe="{probe}"}} 1.0' in body
        assert f'rst_tracer_sink_connected{{sink="tcp:127.0.0.1:{dead}"}} 0.0' in body
        assert f'rst_tracer_sink_connected{{sink="tcp:127.0.0.1:{receiver.port}"}} 1.0' in body
    finally:
        t.stop()
    assert proc.returncode == 0 and "Traceback" not in t.stderr, t.stderr
    assert [r.get("state") for r in t.records if r["type"] == "status"] == ["attached", "detached"]
    assert "output unreachable" in t.stderr and f"tcp:127.0.0.1:{dead}" in t.stderr
    states = [r.get("state") for r in receiver.records if r["type"] == "status"]
    assert states == ["attached", "detached"]          # flushed at exit
    in_file = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert [r.get("state") for r in in_file if r["type"] == "status"] == ["attached", "detached"]
