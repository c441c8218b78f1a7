"""`rst-tracer doctor --netns` on the lab's router namespace, set up exposed and fixed.
Only namespaces the lab creates are changed; the root namespace is only read."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tracer.lab.topology import NatLab

pytestmark = pytest.mark.root

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def doctor(*args):
    p = subprocess.run([sys.executable, "-m", "tracer", "doctor", *args], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def doctor_json(netns):
    p = doctor("--json", "--netns", str(netns))
    report = json.loads(p.stdout)
    return p.returncode, report, {f["id"]: f for f in report["findings"]}


def risks(report):
    return [f for f in report["findings"] if f["severity"] == "risk"]


def legacy_tables(lab):
    return lab.exec(lab.nat, ["cat", "/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"],
                    check=False).stdout


def test_exposed_router_namespace():
    with NatLab() as lab:
        before = legacy_tables(lab)
        rc, report, by_id = doctor_json(lab.nat)
        assert rc == 1
        assert {1, 2} <= set(report["exposed_incidents"])
        assert report["netns"]["name"] == lab.nat and report["netns"]["host"] is False
        assert report["netns"]["inode"] == lab.netns_inode(lab.nat)
        # the keys of the old doctor --json are still there
        assert report["backend"] and report["capabilities"]["kernel_release"] and report["backend_why"]

        rf = by_id["nat.random_fully"]
        assert rf["severity"] == "risk" and rf["incident"] == 2
        assert "-o n2 -j MASQUERADE" in rf["detail"] and "ipv6" in rf["detail"]
        inv = by_id["nat.invalid_drop"]
        assert inv["severity"] == "risk" and inv["incident"] == 1
        assert "nf_conntrack_tcp_be_liberal=0" in inv["detail"]
        assert by_id["nat.masquerade_flush"]["incident"] == 3
        assert by_id["kernel.invalid_window"]["incident"] == 1
        assert by_id["conntrack.table_usage"]["severity"] == "ok"
        assert by_id["networkd.dhcp"]["severity"] == "info"       # not the host's namespace
        for f in report["findings"]:
            assert set(f) == {"id", "incident", "severity", "title", "detail", "fix"}
        assert {"source": "nft", "status": "read"} in report["sources"]
        # reading the rules created no (legacy) table
        assert legacy_tables(lab) == before

        # the fixes paste as they are, and only touch the lab's namespace
        for f in (rf, inv):
            for cmd in f["fix"].split("; "):
                assert cmd.startswith(f"ip netns exec {lab.nat} "), cmd
            subprocess.run(f["fix"], shell=True, check=True, capture_output=True)
        rc, report, by_id = doctor_json(lab.nat)
        assert by_id["nat.random_fully"]["severity"] == "ok"
        assert by_id["nat.invalid_drop"]["severity"] == "ok"
        assert not {1, 2} & set(report["exposed_incidents"])


def test_fixed_router_namespace():
    with NatLab(masquerade_opts=("--random-fully",), drop_invalid=True) as lab:
        rc, report, by_id = doctor_json(lab.nat)
        assert by_id["nat.random_fully"]["severity"] == "ok"
        inv = by_id["nat.invalid_drop"]
        assert inv["severity"] == "ok" and "INPUT and FORWARD" in inv["title"]
        assert "INVALID DROP" in inv["detail"]
        assert not {1, 2} & set(report["exposed_incidents"])
        assert rc == (1 if risks(report) else 0)
        assert [f["id"] for f in risks(report)] in ([], ["probes.backend"])

        lab.sysctl(lab.nat, "net.netfilter.nf_conntrack_tcp_be_liberal", 1)
        lab.sysctl(lab.nat, "net.netfilter.nf_conntrack_tcp_timeout_established", 300)
        rc, report, by_id = doctor_json(lab.nat)
        assert by_id["nat.invalid_drop"]["title"] == "nf_conntrack_tcp_be_liberal=1"
        t = by_id["conntrack.timeout_established"]
        assert t["severity"] == "risk" and t["fix"].startswith(f"ip netns exec {lab.nat} sysctl -w")
        assert rc == 1


def test_be_liberal_alone_covers_incident_1_only():
    with NatLab() as lab:
        lab.sysctl(lab.nat, "net.netfilter.nf_conntrack_tcp_be_liberal", 1)
        rc, report, by_id = doctor_json(lab.nat)
        assert by_id["nat.invalid_drop"]["severity"] == "ok"
        assert by_id["nat.random_fully"]["severity"] == "risk"
        assert 1 not in report["exposed_incidents"] and 2 in report["exposed_incidents"] and rc == 1


def test_native_nft_rules():
    with NatLab() as lab:
        lab.exec(lab.nat, ["iptables", "-t", "nat", "-F", "POSTROUTING"])
        lab.exec(lab.nat, ["ip6tables", "-t", "nat", "-F", "POSTROUTING"])
        script = ("table inet rstdoc {\n"
                  " chain post { type nat hook postrouting priority srcnat; oifname \"n2\" counter masquerade random; }\n"
                  " chain input { type filter hook input priority 0; ct state invalid drop; }\n"
                  "}\n")
        lab.exec(lab.nat, ["nft", "-f", "-"], input=script)
        rc, report, by_id = doctor_json(lab.nat)
        rf = by_id["nat.random_fully"]
        assert rf["severity"] == "risk" and "2 of 2" in rf["title"]     # inet: IPv4 and IPv6
        assert rf["fix"].startswith(f"ip netns exec {lab.nat} nft replace rule inet rstdoc post handle ")
        assert rf["fix"].endswith("'oifname \"n2\" counter masquerade fully-random'")
        inv = by_id["nat.invalid_drop"]
        assert inv["severity"] == "info" and "FORWARD" in inv["title"]   # input covered, forward not
        subprocess.run(rf["fix"].split("; ")[0], shell=True, check=True, capture_output=True)
        rc, report, by_id = doctor_json(lab.nat)
        assert by_id["nat.random_fully"]["severity"] == "ok"


@pytest.mark.skipif(not shutil.which("iptables-legacy"), reason="no iptables-legacy")
def test_legacy_iptables_rules():
    with NatLab(masquerade_opts=("--random-fully",)) as lab:
        p = lab.exec(lab.nat, ["iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-o", "n2",
                               "-s", "10.200.9.0/24", "-j", "SNAT", "--to-source", "10.200.2.1"], check=False)
        if p.returncode != 0:
            pytest.skip(f"iptables-legacy unusable here: {p.stderr.strip()}")
        lab.exec(lab.nat, ["iptables-legacy", "-I", "INPUT", "-m", "conntrack", "--ctstate", "INVALID",
                           "-j", "DROP"])
        rc, report, by_id = doctor_json(lab.nat)
        rf = by_id["nat.random_fully"]
        assert rf["severity"] == "risk" and "1 of 3" in rf["title"] and "iptables-legacy" in rf["detail"]
        assert rf["fix"] == (f"ip netns exec {lab.nat} iptables-legacy -t nat -R POSTROUTING 1 "
                             "-s 10.200.9.0/24 -o n2 -j SNAT --to-source 10.200.2.1 --random-fully")
        inv = by_id["nat.invalid_drop"]
        assert inv["severity"] == "risk" and "ipv6 INPUT" in inv["title"] and "ipv4 INPUT" not in inv["title"]


def test_netns_by_inode_and_path_and_text_output():
    with NatLab() as lab:
        ino = lab.netns_inode(lab.nat)
        _, by_name, _ = doctor_json(lab.nat)
        _, by_ino, _ = doctor_json(ino)
        _, by_path, _ = doctor_json(f"/run/netns/{lab.nat}")
        assert by_name["netns"]["inode"] == by_ino["netns"]["inode"] == by_path["netns"]["inode"] == ino
        assert by_ino["netns"]["name"] == lab.nat
        assert by_name["findings"] == by_ino["findings"]
        p = doctor("--netns", lab.nat)
        assert p.returncode == 1
        lines = p.stdout.splitlines()
        assert any(line.startswith("RISK  #1  ") and " — fix: " in line for line in lines)
        assert any(line.startswith("RISK  #2  ") and "--random-fully" in line for line in lines)
        assert "exposed to incident(s) 1, 2" in lines[-1]


def _root_state():
    out = []
    for cmd in (["iptables-nft-save"], ["ip6tables-nft-save"], ["nft", "list", "ruleset"],
                ["cat", "/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"]):
        if shutil.which(cmd[0]):
            p = subprocess.run(cmd, capture_output=True, text=True)
            out.append([line for line in p.stdout.splitlines() if not line.startswith("#")])
    return out


def test_host_namespace_is_only_read(tmp_path):
    (tmp_path / "10-uplink.network").write_text("[Match]\nName=lo\n[Network]\nDHCP=yes\n")
    (tmp_path / "20-absent.network").write_text("[Match]\nName=rstlab-absent0\n[Network]\nDHCP=yes\n")
    before = _root_state()
    env = dict(os.environ, RST_TRACER_NETWORKD_DIRS=str(tmp_path))
    p = subprocess.run([sys.executable, "-m", "tracer", "doctor", "--json"], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=120)
    report = json.loads(p.stdout)
    assert report["netns"]["host"] is True and report["netns"]["name"] == "host"
    nd = [f for f in report["findings"] if f["id"] == "networkd.dhcp"]
    assert [(f["severity"], f["title"].split(":")[0]) for f in nd] == [("risk", "10-uplink.network")]
    assert "matches interface lo" in nd[0]["detail"]
    assert 4 in report["exposed_incidents"] and p.returncode == 1
    assert _root_state() == before


# -- watch --netns agrees with doctor --netns -----------------------------------------------------

def connect_to_closed_port(ns: str) -> None:
    """A SYN to a port nobody listens on, over the namespace's loopback: one no_listener."""
    subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
    code = ("import socket\ntry:\n socket.create_connection(('127.0.0.1', 9), timeout=2)\n"
            "except ConnectionRefusedError:\n pass\nelse:\n raise SystemExit('port 9 answered')\n")
    subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], check=True, timeout=30)


def test_watch_netns_name_created_after_start_is_watched_when_it_appears():
    from tracer.lab.harness import TracerProcess

    with NatLab() as lab:
        late = f"rstlab-{lab.lab_id}-late"
        tracer = TracerProcess("--netns", lab.cli, "--netns", late)
        try:
            tracer.start()
            subprocess.run(["ip", "netns", "add", late], check=True)
            for ns in (late, lab.cli, lab.srv):      # srv is not asked for
                connect_to_closed_port(ns)
        finally:
            tracer.stop()
            subprocess.run(["ip", "netns", "del", late], capture_output=True)
        warnings = [line for line in tracer.stderr.splitlines() if "warning" in line]
        assert warnings == [f"rst-tracer: warning: namespace {late!r} does not exist yet: verdicts in it "
                            "will be shown if it appears under /run/netns"], tracer.stderr
        shown = {(r["netns_name"], r["cause"]) for r in tracer.records if r["type"] in ("verdict", "correction")}
        assert {ns for ns, _ in shown} == {lab.cli, late}, shown
        assert {(lab.cli, "no_listener"), (late, "no_listener")} <= shown
