"""The CLI as an operator meets it: one-line errors, exit codes, nothing lost."""
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
