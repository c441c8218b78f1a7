"""Kernel symbols and loaded modules: the one reader of /proc/kallsyms and /proc/modules.

Netfilter is often built as modules that load lazily (the first NAT rule, the first
conntrack user): symbols read at start go stale, so readers ask `Kallsyms.current()`, which
reads kallsyms again whenever the module list changed (reading it costs ~0.05 s, indexing
every address ~0.15 s more, done only when an address must be named; the module list a few µs)."""
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
        # kept raw: a lookup by name is a search of these bytes (~5 MB, read in ~0.05 s);
        # the address index (~0.15 s to build) is made on the first address -> name query,
        # which start-up never makes
        try:
            with open(path, "rb") as f:
                self._raw = f.read()
        except OSError:
            self._raw = b""
        self._by_name: dict = {}
        self._index: Optional[tuple] = None

    def _addresses(self) -> tuple:
        if self._index is None:
            pairs = []
            for line in self._raw.decode(errors="replace").splitlines():
                parts = line.split()
                if len(parts) >= 3 and parts[1] in "tTwW":
                    pairs.append((int(parts[0], 16), parts[2]))
            pairs.sort()
            self._index = ([a for a, _ in pairs], [n for _, n in pairs])
        return self._index

    def _lookup(self, name: str) -> Optional[int]:
        if name not in self._by_name:
            self._by_name[name] = self._search(name.encode())
        return self._by_name[name]

    def _search(self, name: bytes) -> Optional[int]:
        """Lines "ADDR T name" or "ADDR t name\t[module]": found by the name (a substring
        search, ~1 ms, where a regex over 120k lines takes ~60), then checked."""
        raw, found, at = self._raw, [], 0
        while (at := raw.find(b" " + name, at)) >= 0:
            end = at + 1 + len(name)
            whole_name = raw[end:end + 1] in (b"\t", b"\n", b"")
            text_symbol = raw[at - 2:at] in (b" t", b" T", b" w", b" W")
            if whole_name and text_symbol:
                start = raw.rfind(b"\n", 0, at) + 1
                found.append(int(raw[start:at - 2], 16))
            at = end
        return min(found) if found else None

    def __contains__(self, name: str) -> bool:
        return self._lookup(name) is not None

    def resolve(self, addr: int) -> str:
        addrs, names = self._addresses()
        i = bisect.bisect_right(addrs, addr) - 1
        if i < 0 or not addr or not addrs[i]:
            return hex(addr) if addr else ""
        return names[i]

    def address(self, name: str) -> int:
        """The lowest address of text symbol `name` (0 if absent or hidden by kptr_restrict)."""
        return self._lookup(name) or 0

    def end(self, name: str) -> int:
        """Where the function `name` ends: the address of the next symbol."""
        start = self.address(name)
        if not start:
            return 0
        addrs, _ = self._addresses()
        i = bisect.bisect_right(addrs, start)
        return addrs[i] if i < len(addrs) else 0
