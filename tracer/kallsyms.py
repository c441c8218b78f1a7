"""Kernel symbols and loaded modules: the one reader of /proc/kallsyms and /proc/modules.

Netfilter is often built as modules that load lazily (the first NAT rule, the first
conntrack user): symbols read at start go stale, so readers ask `Kallsyms.current()`, which
reads kallsyms again whenever the module list changed (reading it costs ~0.25 s; the module
list a few µs)."""
from __future__ import annotations

import bisect
from typing import Optional

KALLSYMS, MODULES = "/proc/kallsyms", "/proc/modules"


def loaded_modules(path: str = MODULES) -> Optional[frozenset]:
    """Names of the loaded modules; None where the kernel has no module support."""
    try:
        with open(path) as f:
            return frozenset(line.split()[0] for line in f if line.strip())
    except OSError:
        return None


class Kallsyms:
    """Text symbols: address -> name (call sites), name -> address, where a function ends."""

    _current: tuple = (None, None, None)   # (kallsyms path, modules seen, instance)

    @classmethod
    def current(cls, path: str = KALLSYMS, modules_path: str = MODULES) -> "Kallsyms":
        modules = loaded_modules(modules_path)
        seen_path, seen_modules, instance = cls._current
        if instance is None or seen_path != path or seen_modules != modules:
            instance = cls(path)
            cls._current = (path, modules, instance)
        return instance

    def __init__(self, path: str = KALLSYMS):
        pairs = []
        try:
            with open(path) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 3 and parts[1] in "tTwW":
                        pairs.append((int(parts[0], 16), parts[2]))
        except OSError:
            pass
        pairs.sort()
        self._addrs = [a for a, _ in pairs]
        self._names = [n for _, n in pairs]
        self._by_name: dict = {}
        for a, n in pairs:
            self._by_name.setdefault(n, a)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def resolve(self, addr: int) -> str:
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i < 0 or not addr or not self._addrs[i]:
            return hex(addr) if addr else ""
        return self._names[i]

    def address(self, name: str) -> int:
        return self._by_name.get(name, 0)

    def end(self, name: str) -> int:
        """Where the function `name` ends: the address of the next symbol."""
        start = self._by_name.get(name, 0)
        if not start:
            return 0
        i = bisect.bisect_right(self._addrs, start)
        return self._addrs[i] if i < len(self._addrs) else 0
