"""Network namespaces are watched from birth: found from the mount table the moment `ip netns
add` (or a container runtime) mounts them, from the kernel's report of a task in a new
namespace (`unshare -n cmd`), and let go once nothing refers to them."""
import os
import secrets
import subprocess
import time

import pytest

from tracer.lab.harness import TracerProcess
from tracer.sources.namespaces import Namespaces

pytestmark = pytest.mark.root


@pytest.fixture
def netns_name():
    name = f"rstlab-{secrets.token_hex(3)}-ns"
    yield name
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_ip_netns_add_is_found_on_the_next_poll_and_let_go_when_deleted(netns_name):
    ns = Namespaces(walk_interval=3600)
    ns.start()
    ns.take()
    subprocess.run(["ip", "netns", "add", netns_name], check=True)
    inode = os.stat(f"/run/netns/{netns_name}").st_ino
    ns.poll()             # no waiting: the mount is in the table when `ip netns add` returns
    added, _ = ns.take()  # (with whatever other namespaces appeared on the host meanwhile)
    assert inode in added and ns.name(inode) == netns_name and ns.fd(inode) is not None
    subprocess.run(["ip", "netns", "del", netns_name], check=True)
    ns.poll()             # the unmount schedules a walk a second later, not an hourly one
    time.sleep(1.1)
    ns.poll()
    _, removed = ns.take()
    assert inode in removed and ns.fd(inode) is None
    ns.close()


def test_a_namespace_without_a_mount_is_reported_by_the_kernel_at_birth():
    """`unshare -n cmd`: no bind mount, so only the kernel's report of an exec in a namespace
    it had not seen finds it before the 30 s walk."""
    tracer = TracerProcess("-v")
    tracer.start()
    child = subprocess.Popen(["unshare", "--net", "--", "sleep", "30"])
    try:
        while open(f"/proc/{child.pid}/comm").read().strip() != "sleep":   # unshare has exec'd sleep
            time.sleep(0.01)
        inode = os.stat(f"/proc/{child.pid}/ns/net").st_ino
        assert inode != os.stat("/proc/self/ns/net").st_ino
    finally:                     # stopping drains what the kernel reported (long before a walk)
        tracer.stop()
        child.kill()
        child.wait()
    adopted = [line for line in tracer.stderr.splitlines()
               if "watching namespace" in line and f"netns={inode}" in line]
    assert adopted and "found_by=birth" in adopted[0], tracer.stderr[-2000:]
