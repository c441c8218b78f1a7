"""Every network namespace of the host, found when it is born, not by a periodic walk.

Why it matters: conntrack reports a deletion only to listeners that were subscribed in that
namespace when the entry was created (nf_conntrack_events=2, the default since 6.0, adds the
event extension only while someone listens), and only to sockets that exist when it is
deleted. A namespace noticed a second late loses exactly the flushes we explain.

How namespaces are found, fastest first:
- bind mounts in the netns directories of `ip netns`, containerd/CRI-O/podman (/run/netns)
  and Docker (/run/docker/netns): the mount table of our mount namespace is polled for
  changes (POLLPRI on /proc/self/mountinfo) every loop iteration, and a change rescans those
  few directories (the file `ip netns add` creates is a namespace only once it is mounted,
  which inotify does not tell);
- births reported by the kernel side (`born()`): a task created with CLONE_NEWNET, or an
  exec in a namespace the BPF program had not seen (`unshare -n cmd`, services with
  PrivateNetwork=); its /proc/PID/ns/net (or a thread's) is opened at once;
- a walk of /proc/*/ns/net at start, then every WALK_INTERVAL_S as a safety net (a namespace
  made by unshare() with neither a mount nor an exec) and to notice namespaces that died.

Each namespace is held open by a descriptor: setns() needs no path lookup and the inode
cannot be reused while we watch it. Our netlink sockets in it keep it alive too, so a
namespace is let go only when neither a process nor a mount refers to it any more (the walk).
"""
from __future__ import annotations

import os
import re
import resource
import select
import time
from dataclasses import dataclass
from typing import Optional

import structlog

log = structlog.get_logger("rst-tracer.namespaces")

# directory -> prefix of the names of namespaces mounted there ("" = as `ip netns` shows them)
NETNS_DIRS = {"/run/netns": "", "/run/docker/netns": "docker:"}
# more of them, e.g. a Docker engine with its own --exec-root: /DIR[=PREFIX][:/DIR[=PREFIX]]...
NETNS_DIRS_ENV = "RST_TRACER_NETNS_DIRS"
WALK_INTERVAL_S = 30.0
# a birth whose task is already gone is looked for by a walk, at most this often
BIRTH_WALK_MIN_INTERVAL_S = 1.0


@dataclass
class Netns:
    inode: int
    fd: int
    name: str
    found_by: str      # self | dir | proc | birth


def _stat(path: str):
    try:
        return os.stat(path)
    except OSError:
        return None


def netns_dirs(extra: Optional[str] = None) -> dict:
    """NETNS_DIRS plus the directories of RST_TRACER_NETNS_DIRS (or `extra`): absolute paths,
    each /DIR or /DIR=PREFIX (the prefix of the names of the namespaces found there, none by
    default; it may end with ':', as 'docker:'), separated by ':'."""
    dirs = dict(NETNS_DIRS)
    spec = os.environ.get(NETNS_DIRS_ENV, "") if extra is None else extra
    for item in filter(None, re.split(r":(?=/)", spec)):
        path, _, prefix = item.partition("=")
        dirs[os.path.normpath(path)] = prefix
    return dirs


class Namespaces:
    def __init__(self, dirs: Optional[dict] = None, proc: str = "/proc",
                 walk_interval: float = WALK_INTERVAL_S):
        self.dirs = netns_dirs() if dirs is None else dirs
        self.proc = proc
        self.walk_interval = walk_interval
        self._by_inode: dict = {}
        self._names: dict = {}          # inode -> name, kept after a namespace goes (late events)
        self._dir_paths: dict = {}      # mounted netns path -> inode, as of the last rescan
        self._pending: list = []        # (inode, pid) births not resolved yet
        self._added: list = []
        self._removed: list = []
        self._last_walk = 0.0
        self._last_birth_walk = 0.0
        own = os.open(f"{proc}/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(own)
        self.nsfs_dev = st.st_dev
        self.own_inode = st.st_ino
        self._by_inode[self.own_inode] = Netns(self.own_inode, own, "", "self")
        root = _stat(f"{proc}/1/ns/net")
        self.root_inode = root.st_ino if root else self.own_inode
        self._names[self.root_inode] = "host"
        self._mounts = open(f"{proc}/self/mountinfo", "rb")
        self._mount_poll = select.poll()
        self._mount_poll.register(self._mounts.fileno(), select.POLLPRI | select.POLLERR)
        self._mount_poll.poll(0)        # arm: only changes from now on count
        _raise_fd_limit()

    # -- what the rest of the tracer asks ------------------------------------------------
    def fd(self, inode: int) -> Optional[int]:
        ns = self._by_inode.get(inode)
        return ns.fd if ns else None

    def name(self, inode: int) -> str:
        return self._names.get(inode, "")

    def known(self) -> list:
        return list(self._by_inode)

    # -- discovery -----------------------------------------------------------------------
    def start(self) -> list:
        """Everything that exists now; returns the inodes found (our own one included)."""
        self._rescan_dirs()
        self.walk()
        self._added.insert(0, self.own_inode)
        return self.take()[0]

    def born(self, inode: int, pid: int) -> None:
        """The kernel saw task `pid` in namespace `inode`, new to it."""
        if inode in self._by_inode:
            return
        for path in self._task_paths(pid):
            if self._adopt(inode, path, "birth"):
                return
        self._pending.append((inode, pid))

    def poll(self) -> None:
        """Cheap, every loop iteration: mount changes, births not resolved, the walk."""
        mounts_changed = bool(self._mount_poll.poll(0))
        if mounts_changed:
            self._rescan_dirs()
        now = time.monotonic()
        self._pending = [(i, p) for i, p in self._pending if i not in self._by_inode]
        if self._pending and now - self._last_birth_walk >= BIRTH_WALK_MIN_INTERVAL_S:
            # the task that made it is gone: a child of it, or a mount, may still hold it
            self._last_birth_walk = now
            self.walk()
            unresolved = [i for i, _ in self._pending if i not in self._by_inode]
            if unresolved:
                log.debug("namespaces born and gone before they could be opened", netns=unresolved)
            self._pending = []
        elif now - self._last_walk >= self.walk_interval:
            self.walk()

    def take(self) -> tuple:
        """(inodes added, inodes removed) since the last call."""
        added, removed = self._added, self._removed
        self._added, self._removed = [], []
        return added, removed

    def _adopt(self, inode: int, path: str, how: str, name: str = "") -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        st = os.fstat(fd)
        if st.st_dev != self.nsfs_dev or (inode and st.st_ino != inode) or st.st_ino in self._by_inode:
            os.close(fd)
            return False
        self._by_inode[st.st_ino] = Netns(st.st_ino, fd, name, how)
        if name or st.st_ino not in self._names:
            self._names[st.st_ino] = name or self._names.get(st.st_ino, "")
        self._added.append(st.st_ino)
        log.debug("watching namespace", netns=st.st_ino, found_by=how, name=name, path=path)
        return True

    def _task_paths(self, pid: int) -> list:
        """/proc paths of pid's namespace: the process's, then each thread's (unshare() in
        one thread, as Go programs do, moves only that thread)."""
        paths = [f"{self.proc}/{pid}/ns/net"]
        try:
            paths += [f"{self.proc}/{pid}/task/{t}/ns/net" for t in os.listdir(f"{self.proc}/{pid}/task")]
        except OSError:
            pass
        return paths

    def _rescan_dirs(self) -> None:
        seen: dict = {}
        for directory, prefix in self.dirs.items():
            try:
                entries = os.listdir(directory)
            except OSError:
                continue
            for entry in entries:
                path = os.path.join(directory, entry)
                st = _stat(path)
                if st is None or st.st_dev != self.nsfs_dev:
                    continue    # not mounted (yet): the mount will change the table again
                seen[path] = st.st_ino
                name = prefix + entry
                if st.st_ino in self._by_inode:
                    self._names[st.st_ino] = self._by_inode[st.st_ino].name = name
                else:
                    self._adopt(st.st_ino, path, "dir", name)
        gone = set(self._dir_paths) - set(seen)
        self._dir_paths = seen
        if gone:   # `ip netns del`: the namespace may live on in its processes; the walk tells
            self._last_walk = min(self._last_walk, time.monotonic() - self.walk_interval + 1.0)

    def walk(self) -> None:
        """/proc/*/ns/net: adopt what is new, let go of what nothing refers to any more."""
        self._last_walk = time.monotonic()
        alive = {self.own_inode} | set(self._dir_paths.values())
        try:
            pids = [p for p in os.listdir(self.proc) if p.isdigit()]
        except OSError:
            pids = []
        for pid in pids:
            path = f"{self.proc}/{pid}/ns/net"
            st = _stat(path)
            if st is None:
                continue
            alive.add(st.st_ino)
            if st.st_ino not in self._by_inode:
                self._adopt(st.st_ino, path, "proc")
        for inode in [i for i in self._by_inode if i not in alive]:
            os.close(self._by_inode.pop(inode).fd)
            self._removed.append(inode)
            log.debug("namespace gone", netns=inode)
        if len(self._names) > 4096:   # forget names of long-gone namespaces
            self._names = {i: n for i, n in self._names.items() if i in self._by_inode}

    def close(self) -> None:
        for ns in self._by_inode.values():
            os.close(ns.fd)
        self._by_inode.clear()
        self._mounts.close()


def _raise_fd_limit() -> None:
    """Five descriptors per namespace (the namespace, two monitors, two conntrack query
    sockets): a node with hundreds of pods outgrows the default soft limit of 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass
