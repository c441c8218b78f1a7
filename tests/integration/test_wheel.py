"""A built wheel carries the BPF C and works away from the checkout: `pip install .` from a
plain (non-editable) checkout gives the same."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.root, pytest.mark.slow]


def test_the_wheel_carries_bpf_and_attaches_from_where_it_is_installed(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(ROOT)], check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("rst_tracer-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, cwd=tmp_path)
    assert {p.name for p in (target / "tracer" / "bpf").iterdir()} >= {"common.h", "kprobes.c", "tracepoints.c"}
    env = {"PYTHONPATH": str(target), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    where = subprocess.run([sys.executable, "-c", "from tracer.probes.loader import BPF_DIR; print(BPF_DIR)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    assert Path(where.stdout.strip()) == target / "tracer" / "bpf"
    watch = subprocess.run([sys.executable, "-m", "tracer", "watch", "--json", "--duration", "0.5"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert watch.returncode == 0, watch.stderr
    attached = json.loads(watch.stdout.splitlines()[0])
    assert attached["state"] == "attached" and "tcp:tcp_send_reset" in attached["probes"]
