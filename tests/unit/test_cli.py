"""The CLI as an operator meets it: one-line errors, exit codes, nothing lost."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rst(*args, user=None):
    cmd = [sys.executable, "-m", "tracer", *args]
    if user:
        cmd = ["setpriv", f"--reuid={user}", "--regid=65534", "--clear-groups",
               "--inh-caps=-all", "--bounding-set=-all", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)


@pytest.mark.parametrize("args, needle", [
    (["watch", "--port", "0"], "--port"),
    (["watch", "--port", "http"], "--port"),
    (["watch", "--host", "10.0.0.300"], "--host"),
    (["watch", "--netns", "a/b"], "--netns"),
    (["watch", "--netns", "0"], "--netns"),
    (["watch", "--backend", "magic"], "--backend"),
    (["watch", "--duration", "-1"], "--duration"),
    (["nosuchcommand"], "nosuchcommand"),
])
def test_bad_values_are_one_line_and_exit_2(args, needle):
    p = rst(*args)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rst-tracer: error:") and needle in lines[0]
    assert "Traceback" not in p.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to drop to nobody")
def test_watch_without_privileges_is_a_clear_error():
    p = rst("watch", user="nobody")
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [p.stderr.strip()]
    assert "must run as root" in p.stderr


def test_replay_of_a_broken_file_keeps_the_good_part(fixtures, tmp_path):
    data = (fixtures / "invalid-window.rec").read_bytes()
    broken = tmp_path / "cut.rec"
    broken.write_bytes(data[: len(data) - 40])
    p = rst("replay", "--json", str(broken))
    assert p.returncode == 1
    assert p.stdout.count('"type":"verdict"') == 3          # 4 resets recorded, the last one cut
    assert len(p.stderr.strip().splitlines()) == 1 and "offset" in p.stderr and "Traceback" not in p.stderr


def test_replay_of_a_foreign_file(tmp_path):
    f = tmp_path / "x.rec"
    f.write_text("hello world\n")
    p = rst("replay", str(f))
    assert p.returncode == 1 and "not an rst-tracer recording" in p.stderr and p.stdout == ""


def test_help_has_examples():
    p = rst("watch", "--help")
    assert p.returncode == 0 and "Examples:" in p.stdout and "--port" in p.stdout


# -- summary: every bad input is one line, after the summary of the good ones ----------------

GOOD = ('{"type":"verdict","schema_version":1,"id":"h-1-1","cause":"no_listener","netns":1,'
        '"netns_name":"a","direction":"sent"}\n')


def bad_inputs(tmp_path) -> dict:
    (tmp_path / "garbled.jsonl").write_text(GOOD + '{"type":"verdict"\n')
    (tmp_path / "array.jsonl").write_text("[1, 2]\n")
    (tmp_path / "foreign.jsonl").write_text('{"hello": "world"}\n')
    (tmp_path / "binary.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" * 8)
    (tmp_path / "verdict-without-cause.jsonl").write_text('{"type":"verdict","schema_version":1}\n')
    (tmp_path / "adir").mkdir()
    return {"missing": str(tmp_path / "nonexistent"), "directory": str(tmp_path / "adir"),
            **{p.stem: str(p) for p in tmp_path.glob("*.jsonl")}}


@pytest.mark.parametrize("kind", ["missing", "directory", "garbled", "array", "foreign", "binary",
                                  "verdict-without-cause"])
def test_summary_of_a_bad_input_is_one_line_and_exit_1(tmp_path, kind):
    path = bad_inputs(tmp_path)[kind]
    p = rst("summary", path)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rst-tracer: error:") and path in lines[0], p.stderr
    assert "Traceback" not in p.stderr


def test_summary_prints_the_good_inputs_then_one_line_per_bad_one(tmp_path):
    inputs = bad_inputs(tmp_path)
    good = tmp_path / "good.jsonl"
    good.write_text(GOOD * 3)
    p = rst("summary", "--json", str(good), inputs["missing"], inputs["garbled"], inputs["directory"])
    assert p.returncode == 1
    # the three good records, and the good line before the garbled one
    assert json.loads(p.stdout)["verdicts"] == 4
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("rst-tracer: error:") for line in lines), p.stderr
    assert inputs["missing"] in lines[0] and f"{inputs['garbled']}:2" in lines[1] and inputs["directory"] in lines[2]


def test_summary_of_a_truncated_recording_keeps_its_good_part(fixtures, tmp_path):
    data = (fixtures / "invalid-window.rec").read_bytes()
    cut = tmp_path / "cut.rec"
    cut.write_bytes(data[: len(data) - 40])
    p = rst("summary", "--json", str(cut))
    assert p.returncode == 1 and json.loads(p.stdout)["verdicts"] == 3
    assert len(p.stderr.strip().splitlines()) == 1 and "offset" in p.stderr and "Traceback" not in p.stderr


# -- watch --netns: the namespace is checked before anything is attached ----------------------

def unused_inode() -> int:
    used = {os.stat(p).st_ino for p in glob.glob("/proc/[0-9]*/ns/net") + glob.glob("/run/netns/*")
            if os.path.exists(p)}
    return next(n for n in range(4026539999, 4026530000, -1) if n not in used)


@pytest.mark.root
def test_watch_netns_inode_of_no_namespace_is_a_usage_error():
    inode = unused_inode()
    p = rst("watch", "--json", "--netns", str(inode), "--duration", "1")
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rst-tracer: error:") and "--netns" in lines[0]
    assert str(inode) in lines[0] and p.stdout == ""     # refused before attaching: no status record
