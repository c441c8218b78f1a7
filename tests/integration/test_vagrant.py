"""The bundled Vagrant VM end to end, as the README's Vagrant section tells it:
`scripts/vm/vagrant-box.sh bookworm`, `vagrant up` (libvirt, the confined libvirtd of
vagrant/libvirtd.sh), then its two terminals — `sudo rst-tracer watch` and
`sudo /vagrant/scripts/demo.sh invalid-window` — and `vagrant destroy -f`. The verdict is the
kprobe backend's conntrack_invalid_unnat with conntrack's own INVALID message, and, for the
demo's second run (DROP INVALID in the router), conntrack_invalid_dropped. Meanwhile nothing
of libvirt's appears in the host's network namespace: its bridge is in the daemon's.

Opt-in (RST_TRACER_VAGRANT=1): a cold run takes minutes (README, Vagrant). Prints its times."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VAGRANT_DIR = REPO / "vagrant"
LIBVIRTD = VAGRANT_DIR / "libvirtd.sh"
LOCAL = dict(line.strip().split("=", 1) for line in (VAGRANT_DIR / "local.env").read_text().splitlines()
             if line[:1].isupper())
NETNS = LOCAL["RST_LIBVIRT_NETNS"]
LIBVIRT_LOGS = Path(LOCAL["RST_LIBVIRT_STATE"]) / "log"
ENV = dict(os.environ, RST_BOX="bookworm")

pytestmark = [pytest.mark.root, pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("RST_TRACER_VAGRANT") != "1",
                                 reason="opt-in: RST_TRACER_VAGRANT=1 (boots the Vagrant VM, minutes)")]


def run(*cmd, timeout: float, check: bool = True) -> tuple:
    """(seconds, output) of cmd run in vagrant/; output is stdout and stderr together."""
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=VAGRANT_DIR, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    took = time.monotonic() - t0
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)}: exit {proc.returncode} after {took:.0f} s\n{proc.stdout[-6000:]}"
                    + guest_logs())
    return took, proc.stdout


def guest_logs() -> str:
    """The tails of the guest's console and of its qemu log (how qemu ended, e.g. killed)."""
    logs = sorted(LIBVIRT_LOGS.glob("console-*.log")) + sorted(LIBVIRT_LOGS.glob("qemu/*.log"))
    return "".join(f"\n--- {log} (tail) ---\n{log.read_text(errors='replace')[-2500:]}" for log in logs)


def guest(command: str, timeout: float) -> tuple:
    return run("vagrant", "ssh", "--no-tty", "-c", command, timeout=timeout)


def host_network_state() -> dict:
    """What libvirt would add to the host's network namespace: links and firewall rules."""
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    if shutil.which("nft"):
        rules += subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
    names = {line.split(":")[1].strip().split("@")[0] for line in links.splitlines()}
    return {"libvirt_links": {n for n in names if n.startswith(("virbr", "vnet"))},
            "libvirt_rules": [line for line in rules.splitlines() if "LIBVIRT" in line or "192.168.121." in line]}


def report(times: dict) -> None:
    print("vagrant timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()), file=sys.stderr)


@pytest.fixture
def vagrant_vm():
    if subprocess.run([str(LIBVIRTD), "status"], capture_output=True).returncode == 0:
        pytest.fail("the confined libvirtd already runs (a Vagrant VM is up): `vagrant destroy -f` it first")
    before = host_network_state()
    times: dict = {}
    try:
        times["box"], _ = run(str(REPO / "scripts/vm/vagrant-box.sh"), "bookworm", timeout=1800)
        times["vagrant up"], _ = run("vagrant", "up", timeout=1800)
        yield before, times
    finally:
        t0 = time.monotonic()
        destroyed = subprocess.run(["vagrant", "destroy", "-f"], cwd=VAGRANT_DIR, env=ENV, timeout=600,
                                   stdin=subprocess.DEVNULL, capture_output=True, text=True)
        times["vagrant destroy"] = time.monotonic() - t0
        # whatever destroy left (it failed, or the test died half way): domains, volumes, daemon
        subprocess.run([str(LIBVIRTD), "stop", "--force"], timeout=300, check=True)
        report(times)
    assert destroyed.returncode == 0, destroyed.stdout + destroyed.stderr
    assert "stopped; namespace" in destroyed.stdout, destroyed.stdout  # the trigger after destroy
    assert not Path("/run/netns", NETNS).exists()
    assert host_network_state() == before


def test_vagrant_up_watch_demo_destroy(vagrant_vm):
    before, times = vagrant_vm
    # libvirt's network is in its own namespace; the host's got nothing
    assert host_network_state() == before
    in_netns = subprocess.run(["ip", "-n", NETNS, "-o", "link", "show", "type", "bridge"],
                              capture_output=True, text=True, check=True).stdout
    assert "virbr" in in_netns

    # terminal 1: the tracer, as root, its pid kept so that it can be stopped by it
    t0 = time.monotonic()
    watch = subprocess.Popen(
        ["vagrant", "ssh", "--no-tty", "-c",
         "sudo sh -c 'echo $$ >/run/rst-watch.pid; exec rst-tracer watch --json'"],
        cwd=VAGRANT_DIR, env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        records = []
        for line in watch.stdout:
            if line.startswith("{"):
                records.append(json.loads(line))
                if records[-1].get("state") == "attached":
                    break
        assert records and records[-1].get("state") == "attached", watch.stderr.read()
        assert records[-1]["backend"] == "kprobe"
        times["watch attached"] = time.monotonic() - t0

        # terminal 2: the demo
        times["demo invalid-window"], demo = guest("sudo /vagrant/scripts/demo.sh invalid-window", timeout=1200)
        assert "conntrack_invalid_unnat [high] sent" in demo, demo
        guest("sudo sh -c 'kill -INT $(cat /run/rst-watch.pid)'", timeout=120)
        out, err = watch.communicate(timeout=120)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.communicate()
    records += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert records[-1].get("state") == "detached", err

    verdicts = [r for r in records if r.get("type") == "verdict"]
    unnat = [v for v in verdicts if v["cause"] == "conntrack_invalid_unnat" and v["direction"] == "sent"]
    assert unnat, [v["cause"] for v in verdicts]
    v = unnat[0]
    assert v["backend"] == "kprobe" and v["netns_name"].endswith("-nat")
    invalid = {e["key"]: e for e in v["evidence"]}["invalid_reason"]  # conntrack's own message: kprobes only
    assert "over the window" in invalid["text"] or "over upper bound" in invalid["text"], invalid
    dropped = [v for v in verdicts if v["cause"] == "conntrack_invalid_dropped"]
    assert dropped and dropped[0]["netns_name"].endswith("-nat"), [v["cause"] for v in verdicts]
