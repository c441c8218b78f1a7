"""The process of a reset socket: as the kernel side reports it (decoded from its record),
and, for sockets older than the tracer, as one look at this host's sockets finds it."""
import json
import os
import socket

from tracer import record
from tracer.clock import Clock
from tracer.decode import KernelNames, decode
from tracer.owners import SocketSnapshot, unmapped
from tracer.replay import replay_verdicts
from tracer.sinks.console import format_human
from tracer.summary import Summary

NAMES = KernelNames(clock=Clock(offset=0.0))


def test_the_kernel_sides_owner_is_decoded_with_how_it_was_learnt():
    seen = decode(record.pack(kind=record.Kind.RST_RECEIVED, sk=0xffff8880_0000_1000, sk_state=1, family=4,
                              owner_how=record.Owner.CONNECT, owner_pid=4242, owner_comm=b"redis-cli"), NAMES)
    assert seen.owner == {"pid": 4242, "comm": "redis-cli", "how": "connect"}
    listener = decode(record.pack(kind=record.Kind.RST_SENT, sk=1, sk_state=1, owner_how=record.Owner.LISTEN,
                                  owner_pid=7, owner_comm=b"nginx"), NAMES)
    assert listener.owner["how"] == "listen"
    assert decode(record.pack(kind=record.Kind.RST_RECEIVED, sk=1, sk_state=1, owner_pid=99), NAMES).owner == {}


def test_sockets_that_exist_are_named_by_the_process_holding_them():
    """Real sockets of this process on loopback, looked up as the enricher does: by the
    connection (local, remote), else by the listener on the local port."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    try:
        snapshot = SocketSnapshot()
        own = os.stat("/proc/self/ns/net").st_ino
        snapshot.take({own: None})
        with open("/proc/self/comm") as f:
            me = {"pid": os.getpid(), "comm": f.read().strip()}
        local, remote = client.getsockname(), client.getpeername()
        assert snapshot.owner(own, local, remote) == dict(me, how="open_at_start")
        assert snapshot.owner(own, accepted.getsockname(), accepted.getpeername()) == dict(me, how="open_at_start")
        # a connection accepted after the look: the process listening on its port then
        assert snapshot.owner(own, ("127.0.0.1", port), ("127.0.0.1", 1)) == dict(me, how="listen")
        assert snapshot.owner(own, ("127.0.0.1", 1), ("127.0.0.1", 2)) is None
        assert snapshot.owner(own + 1, local, remote) is None     # another namespace
    finally:
        for s in (client, accepted, listener):
            s.close()


def test_an_ipv4_peer_of_an_ipv6_socket_is_its_ipv4_address():
    assert unmapped("::ffff:10.0.0.7") == "10.0.0.7"
    assert unmapped("::ffff:a00:7") == "::ffff:a00:7" and unmapped("fd00::7") == "fd00::7"


def test_what_is_kept_is_bounded():
    servers = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]
    try:
        snapshot = SocketSnapshot(max_sockets=2)
        snapshot.take({os.stat("/proc/self/ns/net").st_ino: None})
        assert snapshot.sockets == 2
    finally:
        for s in servers:
            s.close()


def test_replayed_resets_name_their_sockets_process_in_lines_and_counts(fixtures):
    """A recording of the lab's app-abort (both ends abort once): each reset socket's
    process, as the kernel side told it live."""
    verdicts = list(replay_verdicts(str(fixtures / "app-abort.rec")))
    facts = json.loads((fixtures / "app-abort.facts.json").read_text())
    how, comm = {"cli": "connect", "srv": "listen"}, {"cli": "lab-client", "srv": "lab-server"}
    for case in facts["cases"]:
        port = case["inside"]["dport"]
        for cause, side in (("app_abort", case["expected_sender"]), ("peer_reset", case["peer"])):
            [v] = [v for v in verdicts if v["cause"] == cause and v["netns"] == facts["netns"][side]
                   and port in (v["flow"]["sport"], v["flow"]["dport"])]
            owner = {"pid": case["pids"][side], "comm": comm[side], "how": how[side]}
            assert v["socket_owner"] == owner
            assert f" {comm[side]}[{owner['pid']}] " in format_human(v)
    summary = Summary()
    for v in verdicts:
        summary.add(v)
    by = summary.to_dict()["by_workload"]
    assert by["process lab-client"] == by["process lab-server"] == {"app_abort": 1, "peer_reset": 1}


def test_ipv6_and_ipv4_mapped_sockets_are_found_by_the_addresses_their_packets_carry():
    listener = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    port = listener.getsockname()[1]
    v6 = socket.create_connection(("::1", port))
    v6_accepted, _ = listener.accept()
    v4 = socket.create_connection(("127.0.0.1", port))
    v4_accepted, _ = listener.accept()      # an IPv6 socket whose peer is IPv4: ::ffff:127.0.0.1
    try:
        snapshot = SocketSnapshot()
        own = os.stat("/proc/self/ns/net").st_ino
        snapshot.take({own: None})
        assert snapshot.owner(own, ("::1", port), v6.getsockname()[:2])["how"] == "open_at_start"
        assert snapshot.owner(own, ("127.0.0.1", port), v4.getsockname())["how"] == "open_at_start"
        assert v4_accepted.getpeername()[0] == "::ffff:127.0.0.1"
    finally:
        for s in (v6, v6_accepted, v4, v4_accepted, listener):
            s.close()
