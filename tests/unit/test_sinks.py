"""Outputs (tracer/sinks): the file, socket and Fluentd sinks behind their bounded queues,
the --output spec parser, Prometheus metrics and in-band reports of sink drops. No root:
every destination is a file in tmp_path or a server on 127.0.0.1 run by the test."""
import glob
import json
import math
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import msgpack
import pytest

from tracer.schema import loss_record, status_record
from tracer.sinks.files import FileSink
from tracer.sinks.fluent import FluentSink
from tracer.sinks.metrics import MetricsSink, parse_listen
from tracer.sinks.outputs import parse_output, parse_spec
from tracer.sinks.stream import TcpSink, UnixSink

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def verdict(n: int, **extra) -> dict:
    return {"type": "verdict", "schema_version": 1, "id": f"h-1-{n}", "ts": "2024-01-01T00:00:00Z",
            "ts_unix": 1704067200.0 + n / 1000, "host": "h", "netns": 4026531840, "netns_name": "host",
            "direction": "sent", "cause": "no_listener", "summary": "SYN to a closed port — “x”",
            "seq": n, **extra}


def wait_until(cond, timeout=10.0, step=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LineServer:
    """A JSON-lines receiver on 127.0.0.1 (or a Unix path) that can be stopped and started
    again on the same address. Stopping reads what the peer sent first, like a collector
    shutting down gracefully."""

    def __init__(self, unix_path: str = ""):
        self.unix_path = unix_path
        self.port = 0
        self.lines: list = []
        self.connections = 0
        self._srv = None
        self._threads: list = []
        self._stop = threading.Event()

    def start(self):
        if self.unix_path:
            if os.path.exists(self.unix_path):
                os.unlink(self.unix_path)
            srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            srv.bind(self.unix_path)
        else:
            srv = socket.socket()
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind(("127.0.0.1", self.port))
            self.port = srv.getsockname()[1]
        srv.listen(16)
        srv.settimeout(0.05)
        self._srv, self._stop = srv, threading.Event()
        t = threading.Thread(target=self._accept, args=(srv, self._stop), daemon=True)
        t.start()
        self._threads = [t]
        return self

    def _accept(self, srv, stop):
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections += 1
            t = threading.Thread(target=self._read, args=(conn, stop), daemon=True)
            t.start()
            self._threads.append(t)
        srv.close()

    def _read(self, conn, stop):
        conn.settimeout(0.05)
        buf = b""
        while True:
            try:
                data = conn.recv(65536)
            except socket.timeout:
                if stop.is_set():
                    break
                continue
            if not data:
                break
            buf += data
            *complete, buf = buf.split(b"\n")
            self.lines.extend(json.loads(x) for x in complete)
        conn.close()

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(5)

    def seqs(self) -> list:
        return [r["seq"] for r in self.lines]


# -- file ------------------------------------------------------------------------------

def read_rotated(path) -> list:
    """Every line of path.K ... path.1, path (oldest first), each parsed."""
    files = sorted(glob.glob(f"{path}.*"), key=lambda p: -int(p.rsplit(".", 1)[1])) + [str(path)]
    records = []
    for f in files:
        with open(f, "rb") as fh:
            data = fh.read()
        assert data.endswith(b"\n"), f"{f} ends in the middle of a line"
        records += [json.loads(line) for line in data.splitlines()]
    return records


def test_file_rotation_never_splits_lines(tmp_path):
    path = tmp_path / "rst.jsonl"
    max_bytes, threads, per_thread = 64_000, 8, 1500
    # every record is delivered however slow the machine: what is checked is where lines break,
    # not how fast a loaded host writes 12 000 of them (close() would otherwise give up at 5 s)
    sink = FileSink(str(path), max_bytes=max_bytes, backups=10_000, queue_size=threads * per_thread,
                    flush_timeout=math.inf)

    def writer(t):
        for i in range(per_thread):
            # sizes vary so that lines straddle every possible rotation point
            sink.emit(verdict(i, thread=t, pad="x" * ((i * 37 + t) % 300)))

    ws = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for w in ws:
        w.start()
    for w in ws:
        w.join()
    sink.close()
    stats = sink.stats()
    assert stats["dropped"] == 0 and stats["delivered"] == threads * per_thread and stats["queued"] == 0
    records = read_rotated(path)
    assert len(records) == threads * per_thread
    for t in range(threads):   # each writer's records in the order it emitted them
        assert [r["seq"] for r in records if r["thread"] == t] == list(range(per_thread))
    rotated = glob.glob(f"{path}.*")
    assert len(rotated) > 10
    assert all(os.path.getsize(f) <= max_bytes for f in rotated + [str(path)])


def test_file_rotation_keeps_only_backups(tmp_path):
    path = tmp_path / "rst.jsonl"
    sink = FileSink(str(path), max_bytes=2000, backups=2)
    for i in range(200):
        sink.emit(verdict(i))
    sink.close()
    assert sorted(os.listdir(tmp_path)) == ["rst.jsonl", "rst.jsonl.1", "rst.jsonl.2"]
    seqs = [r["seq"] for r in read_rotated(path)]
    assert seqs == list(range(200 - len(seqs), 200))   # the newest, contiguous, in order


def test_file_appends_and_follows_an_external_rotation(tmp_path):
    path = tmp_path / "rst.jsonl"
    path.write_text('{"old":true}\n')
    sink = FileSink(str(path))
    sink.emit(verdict(0))
    assert wait_until(lambda: sink.stats()["delivered"] == 1)
    os.rename(path, f"{path}.moved")          # logrotate without copytruncate
    time.sleep(1.2)                            # the sink notices within a second
    sink.emit(verdict(1))
    sink.close()
    assert [json.loads(x).get("seq") for x in open(f"{path}.moved")] == [None, 0]
    assert [json.loads(x)["seq"] for x in open(path)] == [1]


def test_unwritable_file_is_retried_not_fatal(tmp_path):
    path = tmp_path / "later" / "rst.jsonl"
    sink = FileSink(str(path), backoff_max=0.2)
    sink.emit(verdict(0))
    assert wait_until(lambda: sink.stats()["errors"] >= 2)
    assert sink.stats()["connected"] is False and sink.stats()["queued"] == 1
    (tmp_path / "later").mkdir()
    assert wait_until(lambda: sink.stats()["delivered"] == 1)
    sink.close()
    assert json.loads(path.read_text())["seq"] == 0


@pytest.mark.parametrize("kind", ["file", "tcp"])
def test_a_record_that_cannot_be_encoded_is_dropped_alone(kind, tmp_path):
    server = LineServer().start() if kind == "tcp" else None
    sink = (FileSink(str(tmp_path / "r.jsonl")) if kind == "file"
            else TcpSink("127.0.0.1", server.port))
    for i in range(30):
        sink.emit(verdict(i, bad={(1, 2): "tuple keys are not JSON"}) if i == 17 else verdict(i))
    assert wait_until(lambda: sink.stats()["delivered"] == 29)
    sink.close()
    if kind == "file":
        seqs = [json.loads(x)["seq"] for x in open(tmp_path / "r.jsonl")]
    else:
        assert wait_until(lambda: len(server.lines) == 29)
        server.stop()
        seqs = server.seqs()
    assert seqs == [i for i in range(30) if i != 17]
    assert sink.stats()["dropped"] == 1 and sink.stats()["errors"] == 1


# -- bounded queue, reconnection ------------------------------------------------------------

def test_bounded_queue_drops_and_counts_when_nothing_accepts():
    port = free_port()   # nobody listens: every connection attempt is refused
    sink = TcpSink("127.0.0.1", port, queue_size=100)
    slowest = 0.0
    for i in range(1000):
        t0 = time.perf_counter()
        sink.emit(verdict(i))
        slowest = max(slowest, time.perf_counter() - t0)
    assert slowest < 0.2, "emit() blocked"
    assert wait_until(lambda: sink.stats()["errors"] >= 2)
    stats = sink.stats()
    assert stats["queued"] == 100 and stats["dropped"] == 900 and stats["delivered"] == 0
    assert stats["connected"] is False and stats["name"] == f"tcp:127.0.0.1:{port}"
    t0 = time.monotonic()
    sink.close(timeout=0.3)
    assert time.monotonic() - t0 < 2
    assert sink.stats()["dropped"] == 1000 and sink.stats()["queued"] == 0   # left behind: counted


def test_emit_never_blocks_on_a_server_that_never_reads():
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)            # never accept()ed, never read: the kernel buffers fill up
    sink = TcpSink("127.0.0.1", srv.getsockname()[1], queue_size=500)
    slowest = 0.0
    for i in range(20_000):
        t0 = time.perf_counter()
        sink.emit(verdict(i, pad="y" * 500))
        slowest = max(slowest, time.perf_counter() - t0)
    assert slowest < 0.2, "emit() blocked"
    stats = sink.stats()
    assert stats["dropped"] > 0 and stats["queued"] <= 500
    assert stats["delivered"] + stats["queued"] + stats["dropped"] == 20_000
    sink.close(timeout=0.3)
    srv.close()


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_order_preserved_after_the_server_restarts(kind, tmp_path):
    server = LineServer(str(tmp_path / "s.sock") if kind == "unix" else "").start()
    sink = (UnixSink(server.unix_path, backoff_max=0.5) if kind == "unix"
            else TcpSink("127.0.0.1", server.port, backoff_max=0.5))
    for i in range(100):
        sink.emit(verdict(i))
    assert wait_until(lambda: len(server.lines) == 100)
    server.stop()                            # the collector goes away...
    for i in range(100, 400):                # ...while verdicts keep coming
        sink.emit(verdict(i))
        time.sleep(0.002)
    assert wait_until(lambda: not sink.stats()["connected"])
    assert sink.stats()["queued"] >= 299     # held, not lost (the first may sit unacked)
    server.start()                           # back, same address
    for i in range(400, 500):
        sink.emit(verdict(i))
    assert wait_until(lambda: len(server.lines) >= 500, timeout=15)
    sink.close()
    server.stop()
    assert server.seqs() == list(range(500))
    stats = sink.stats()
    assert stats["delivered"] == 500 and stats["dropped"] == 0 and stats["errors"] >= 1
    assert server.connections == 2


def test_records_queued_before_the_server_first_comes_up_are_delivered_in_order():
    server = LineServer()
    server.port = free_port()
    sink = TcpSink("127.0.0.1", server.port, backoff_max=0.2)
    for i in range(50):
        sink.emit(verdict(i))
    assert wait_until(lambda: sink.stats()["errors"] >= 1)
    server.start()
    assert wait_until(lambda: len(server.lines) == 50)
    sink.close()
    server.stop()
    assert server.seqs() == list(range(50))


# -- Fluentd Forward protocol ------------------------------------------------------------------

def _ext(code, data):
    assert code == 0 and len(data) == 8   # EventTime
    return struct.unpack(">II", data)


class ForwardServer:
    """A tiny Forward-protocol receiver. ``ack_from``: the connection number (1-based) from
    which chunks are acknowledged; earlier connections read but never answer."""

    def __init__(self, ack_from=1):
        self.ack_from = ack_from
        self.messages: dict = {}      # connection number -> decoded messages
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(4)
        self.port = self.srv.getsockname()[1]
        self.done = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        n = 0
        self.srv.settimeout(0.05)
        while not self.done.is_set():
            try:
                conn, _ = self.srv.accept()
            except socket.timeout:
                continue
            n += 1
            threading.Thread(target=self._serve, args=(conn, n), daemon=True).start()

    def _serve(self, conn, n):
        unpacker = msgpack.Unpacker(raw=False, ext_hook=_ext)
        conn.settimeout(0.05)
        self.messages[n] = []
        while not self.done.is_set():
            try:
                data = conn.recv(65536)
            except socket.timeout:
                continue
            if not data:
                break
            unpacker.feed(data)
            for msg in unpacker:
                self.messages[n].append(msg)
                option = msg[-1] if isinstance(msg[-1], dict) else {}
                if "chunk" in option and n >= self.ack_from:
                    conn.sendall(msgpack.packb({"ack": option["chunk"]}))
        conn.close()

    def records(self, n) -> list:
        out = []
        for msg in self.messages.get(n, []):
            if isinstance(msg[1], list):          # Forward mode
                out += [(t, r) for t, r in msg[1]]
            else:                                 # Message mode
                out.append((msg[1], msg[2]))
        return out

    def close(self):
        self.done.set()
        self.srv.close()


def test_fluent_forward_with_ack():
    server = ForwardServer()
    sink = FluentSink("127.0.0.1", server.port, tag="rst.test", ack=True, ack_timeout=5)
    for i in range(450):
        sink.emit(verdict(i))
    assert wait_until(lambda: sink.stats()["delivered"] == 450)
    sink.close()
    server.close()
    msgs = server.messages[1]
    assert all(m[0] == "rst.test" and isinstance(m[1], list) and len(m) == 3 for m in msgs)
    assert all(isinstance(m[2]["chunk"], str) and m[2]["size"] == len(m[1]) for m in msgs)
    assert len({m[2]["chunk"] for m in msgs}) == len(msgs) > 1     # batched, unique chunk ids
    recs = server.records(1)
    assert [r["seq"] for _, r in recs] == list(range(450))
    sec, nsec = recs[7][0]
    assert abs(sec + nsec / 1e9 - recs[7][1]["ts_unix"]) < 1e-6
    assert sink.stats()["errors"] == 0


def test_fluent_resends_when_the_ack_does_not_come():
    server = ForwardServer(ack_from=2)    # the first connection never acknowledges
    sink = FluentSink("127.0.0.1", server.port, ack=True, ack_timeout=0.3, backoff_max=0.2)
    for i in range(20):
        sink.emit(verdict(i))
    assert wait_until(lambda: sink.stats()["delivered"] == 20)
    sink.close()
    server.close()
    first = [r["seq"] for _, r in server.records(1)]
    assert first and first == list(range(len(first)))               # sent, never acknowledged
    assert [r["seq"] for _, r in server.records(2)] == list(range(20))  # all again, in order
    assert sink.stats()["errors"] >= 1 and sink.stats()["dropped"] == 0


def test_fluent_message_mode_without_ack():
    server = ForwardServer()
    sink = FluentSink("127.0.0.1", server.port, mode="message")
    for i in range(5):
        sink.emit(verdict(i))
    assert wait_until(lambda: len(server.messages.get(1, [])) == 5)
    sink.close()
    server.close()
    assert all(len(m) == 3 and m[0] == "rst-tracer" for m in server.messages[1])
    assert [m[2]["seq"] for m in server.messages[1]] == list(range(5))


# -- metrics ------------------------------------------------------------------------------------

class FakeOutput:
    def __init__(self, name, **stats):
        self._stats = {"name": name, "queued": 0, "delivered": 0, "dropped": 0, "errors": 0,
                       "connected": True, **stats}

    def stats(self):
        return dict(self._stats)


def test_metrics_after_a_stream_of_records():
    out = FakeOutput("tcp:127.0.0.1:5170", queued=7, dropped=3, errors=2, delivered=11, connected=False)
    m = MetricsSink(outputs=[out])
    other = MetricsSink()            # its own registry: both coexist
    m.emit(status_record(1.0, "h", "attached", backend="tracepoint", probes=["tcp:tcp_send_reset", "skb:kfree_skb"]))
    for i in range(5):
        m.emit(verdict(i))
    m.emit(verdict(5, cause="peer_reset", direction="received", netns=42))
    m.emit(loss_record(2.0, "h", "kernel_ringbuf", 4, 4))
    m.emit(loss_record(3.0, "h", "kernel_ringbuf", 2, 6))
    m.emit(loss_record(3.0, "h", "sink:tcp:127.0.0.1:5170", 3, 3))
    get = m.registry.get_sample_value
    assert get("rst_tracer_verdicts_total", {"cause": "no_listener", "netns": "4026531840", "direction": "sent"}) == 5
    assert get("rst_tracer_verdicts_total", {"cause": "peer_reset", "netns": "42", "direction": "received"}) == 1
    assert get("rst_tracer_lost_events_total", {"source": "kernel_ringbuf"}) == 6
    assert get("rst_tracer_lost_events_total", {"source": "sink:tcp:127.0.0.1:5170"}) == 3
    assert get("rst_tracer_probe_attached", {"backend": "tracepoint", "probe": "skb:kfree_skb"}) == 1
    sink_label = {"sink": "tcp:127.0.0.1:5170"}
    assert get("rst_tracer_sink_dropped_total", sink_label) == 3
    assert get("rst_tracer_sink_errors_total", sink_label) == 2
    assert get("rst_tracer_sink_queue", sink_label) == 7
    assert get("rst_tracer_sink_delivered_total", sink_label) == 11
    assert get("rst_tracer_sink_connected", sink_label) == 0
    out._stats["dropped"] = 10       # read at scrape time
    assert get("rst_tracer_sink_dropped_total", sink_label) == 10
    m.emit(status_record(4.0, "h", "detached", verdicts=6))
    assert get("rst_tracer_probe_attached", {"backend": "tracepoint", "probe": "skb:kfree_skb"}) == 0
    assert other.registry.get_sample_value("rst_tracer_verdicts_total",
                                           {"cause": "no_listener", "netns": "4026531840", "direction": "sent"}) is None


def test_metrics_http_exporter():
    import urllib.request
    m = MetricsSink()
    m.emit(verdict(0))
    port = free_port()
    m.serve("127.0.0.1", port)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        m.close()
    assert 'rst_tracer_verdicts_total{cause="no_listener",direction="sent",netns="4026531840"} 1.0' in body


# -- in-band reports of sink drops (Watch.report_losses) -------------------------------------

class ListSink:
    def __init__(self):
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def flush(self):
        pass

    def close(self):
        pass


def make_watch(sinks):
    """A Watch with every source idle: only its output side is exercised."""
    import types

    from tracer.attribution import Attributor
    from tracer.filters import VerdictFilter
    from tracer.watch import Watch
    ring = types.SimpleNamespace(lost=lambda: 0, decode_errors=0)
    monitor = types.SimpleNamespace(overruns=0, failed=0)
    return Watch(None, ring, None, monitor, None, Attributor("tracepoint", "h"), sinks, VerdictFilter(),
                 host="h")


def test_sink_drops_are_reported_in_band_to_the_working_sinks():
    down_a = TcpSink("127.0.0.1", free_port(), queue_size=3, name="a")
    down_b = TcpSink("127.0.0.1", free_port(), queue_size=3, name="b")
    working, metrics = ListSink(), MetricsSink()
    w = make_watch([down_a, down_b, working, metrics])
    for i in range(10):
        w.emit(verdict(i))
    w.report_losses()
    losses = [r for r in working.records if r["type"] == "loss"]
    assert sorted((r["source"], r["lost"], r["lost_total"]) for r in losses) == [
        ("sink:a", 7, 7), ("sink:b", 7, 7)]
    for _ in range(3):                 # no new drops: no new reports, and the reports
        w.report_losses()              # themselves did not count as drops (no feedback loop)
    assert len([r for r in working.records if r["type"] == "loss"]) == 2
    assert down_a.stats()["dropped"] == 7 and down_b.stats()["dropped"] == 7
    assert metrics.registry.get_sample_value("rst_tracer_lost_events_total", {"source": "sink:a"}) == 7
    w.emit(verdict(10))
    w.report_losses()
    assert [(r["source"], r["lost"], r["lost_total"]) for r in working.records if r["type"] == "loss"][2:] == [
        ("sink:a", 1, 8), ("sink:b", 1, 8)]
    assert w.summary.to_dict()["lost"] == {"sink:a": 8, "sink:b": 8}
    down_a.close(timeout=0.1)
    down_b.close(timeout=0.1)


# -- output specs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, needle", [
    ("udp:127.0.0.1:514", "unknown output"),
    ("syslog", "unknown output"),
    ("tcp:localhost", "tcp:HOST:PORT"),
    ("tcp::5170", "tcp:HOST:PORT"),
    ("tcp:127.0.0.1:0", "port"),
    ("tcp:127.0.0.1:70000", "port"),
    ("tcp:127.0.0.1:http", "port"),
    ("tcp:::1:5170", "brackets"),
    ("tcp:[nope]:5170", "IPv6"),
    ("tcp:bad host:5170", "host"),
    ("tcp:127.0.0.1:5170?tag=x", "unknown option"),
    ("file:", "path"),
    ("file:/tmp", "directory"),
    ("file:/tmp/x.jsonl?max_bytes=lots", "max_bytes"),
    ("file:/tmp/x.jsonl?backups=3", "max_bytes"),
    ("file:/tmp/x.jsonl?max_bytes=1M&backups=-1", "backups"),
    ("file:/tmp/x.jsonl?queue=0", "queue"),
    ("file:/tmp/x.jsonl?max_bytes", "needs a value"),
    ("unix:", "path"),
    ("unix:/" + "x" * 200, "longer"),
    ("fluent:127.0.0.1:24224?ack=perhaps", "ack"),
    ("fluent:127.0.0.1:24224?tag=a b", "tag"),
    ("fluent:127.0.0.1:24224?ack_timeout=0", "ack_timeout"),
    ("fluent:127.0.0.1:24224?mode=packed", "mode"),
    ("fluent:127.0.0.1:24224?tag=a&tag=b", "twice"),
    ("stdout:x", "stdout"),
])
def test_bad_output_specs_are_one_line_errors(spec, needle):
    with pytest.raises(ValueError) as e:
        parse_output(spec)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_good_output_specs(tmp_path):
    s = parse_spec(f"file:{tmp_path}/r.jsonl?max_bytes=10M&backups=3&queue=50")
    assert (s.scheme, s.target, s.params) == ("file", f"{tmp_path}/r.jsonl",
                                              {"max_bytes": 10 << 20, "backups": 3, "queue_size": 50})
    assert parse_spec("tcp:[::1]:5170").target == ("::1", 5170)
    assert parse_spec("tcp:logs.example.com:5170").name == "tcp:logs.example.com:5170"
    s = parse_spec("fluent:127.0.0.1:24224?tag=k8s.rst&ack=true")
    assert s.params == {"tag": "k8s.rst", "ack": True}
    assert parse_spec("unix:rel.sock").target == os.path.abspath("rel.sock")
    import io
    out = io.StringIO()
    sink = parse_output("stdout", stream=out)          # not a TTY: JSON lines, as before
    sink.emit(verdict(1))
    sink.flush() if hasattr(sink, "flush") else None
    assert json.loads(out.getvalue())["seq"] == 1
    fsink = parse_output(f"file:{tmp_path}/x.jsonl?queue=5")
    assert fsink.queue_size == 5 and fsink.stats()["name"] == f"file:{tmp_path}/x.jsonl"
    fsink.close()


@pytest.mark.parametrize("text, want", [("127.0.0.1:9464", ("127.0.0.1", 9464)),
                                        (":9464", ("0.0.0.0", 9464)),
                                        ("[::1]:9464", ("::1", 9464))])
def test_metrics_listen_address(text, want):
    assert parse_listen(text) == want


def rst(*args):
    return subprocess.run([sys.executable, "-m", "tracer", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


@pytest.mark.parametrize("args, needle", [
    (["watch", "--output", "udp:127.0.0.1:514"], "--output"),
    (["watch", "--output", "stdout", "--output", "tcp:127.0.0.1"], "--output"),
    (["watch", "--output", "file:/tmp/x?max_bytes=big"], "max_bytes"),
    (["watch", "--metrics", "9464"], "--metrics"),
    (["watch", "--metrics", "127.0.0.1:0"], "--metrics"),
    (["watch", "--metrics", "::1:9464"], "brackets"),
])
def test_cli_rejects_bad_outputs_and_metrics_in_one_line(args, needle):
    p = rst(*args)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rst-tracer: error:") and needle in lines[0]
    assert "Traceback" not in p.stderr


def test_cli_help_documents_outputs():
    p = rst("watch", "--help")
    assert p.returncode == 0 and "--output SPEC" in p.stdout and "--metrics ADDR:PORT" in p.stdout
    assert "fluent:" in p.stdout


# -- correction records ---------------------------------------------------------------------------

def test_human_line_of_a_correction_says_which_line_it_corrects(fixtures):
    import io

    from test_wire_and_summary import vip_move_with_a_late_deletion
    from tracer.sinks import HumanSink
    records, _ = vip_move_with_a_late_deletion(fixtures)
    first, fixed = records[0], records[1]
    out = io.StringIO()
    sink = HumanSink(out)
    for r in (first, fixed):
        sink.emit(r)
    line_first, line_fixed = out.getvalue().splitlines()
    ts = first["ts"][11:23]
    assert line_first.startswith(f"{ts} no_connection [")
    # the same event time: the operator finds the line it replaces
    assert line_fixed.startswith(f"{ts} correction of {first['id']} (was no_connection): conntrack_flushed [high] sent ")
    assert fixed["summary"] in line_fixed
    verbose = HumanSink(io.StringIO(), verbose=True)
    verbose.emit(fixed)
    assert f"\n    correction: {fixed['correction']}" in verbose.stream.getvalue()


def test_metrics_count_corrections_without_counting_the_event_twice(fixtures):
    from test_wire_and_summary import vip_move_with_a_late_deletion
    records, facts = vip_move_with_a_late_deletion(fixtures)
    m = MetricsSink()
    for r in records:
        m.emit(r)
    get = m.registry.get_sample_value
    srv = str(facts["netns"]["srv"])
    assert get("rst_tracer_corrections_total",
               {"from_cause": "no_connection", "to_cause": "conntrack_flushed", "netns": srv}) == 1
    # the first verdict stays counted (counters never go down); the correction is not a verdict
    assert get("rst_tracer_verdicts_total", {"cause": "no_connection", "netns": srv, "direction": "sent"}) == 1
    assert get("rst_tracer_verdicts_total", {"cause": "conntrack_flushed", "netns": srv, "direction": "sent"}) is None
    # the correction of a verdict this exporter never saw (filtered out) is that event's verdict
    m.emit(dict(records[1], id="h-9-2", supersedes="h-9-1"))
    assert get("rst_tracer_verdicts_total", {"cause": "conntrack_flushed", "netns": srv, "direction": "sent"}) == 1
    assert get("rst_tracer_corrections_total",
               {"from_cause": "no_connection", "to_cause": "conntrack_flushed", "netns": srv}) == 1
