"""A small reader of the kernel's BTF (/sys/kernel/btf/vmlinux).

The running kernel's own type information is the only trustworthy source of struct
offsets and enum values when the installed headers belong to another kernel: BCC would
otherwise compile against the headers' layouts and read wrong fields silently.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from pathlib import Path

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
CACHE_DIR = Path(os.environ.get("RST_TRACER_CACHE", "/var/cache/rst-tracer")) / "btf"

# BTF kinds (include/uapi/linux/btf.h)
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
_MODIFIERS = (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG)
# bytes that follow the 12-byte common header, per kind (fixed part, per-vlen part)
_EXTRA = {INT: (4, 0), ARRAY: (12, 0), STRUCT: (0, 12), UNION: (0, 12), ENUM: (0, 8),
          FUNC_PROTO: (0, 8), VAR: (4, 0), DATASEC: (0, 12), DECL_TAG: (4, 0), ENUM64: (0, 12)}
# kinds whose per-vlen records are members we decode (on demand), and their record size
_MEMBER_SIZE = {k: _EXTRA[k][1] for k in (STRUCT, UNION, ENUM, ENUM64, FUNC_PROTO)}


_VMLINUX = None


class BTFError(Exception):
    """The BTF blob is missing, malformed, or lacks a type we need."""


class _Type:
    """One BTF type. Its members are decoded on first use: a kernel has ~100k types and a
    tracer needs a few dozen (parsing them all up front cost ~0.5 s of start-up)."""
    __slots__ = ("name", "kind", "size_or_type", "_raw", "_members")

    def __init__(self, name: str, kind: int, size_or_type: int, raw=None):
        self.name, self.kind, self.size_or_type = name, kind, size_or_type
        self._raw = raw            # (btf, data, offset, vlen, kflag) of the member records
        self._members = None

    @property
    def members(self) -> list:
        """struct/union: (name, type_id, bit_offset); enum: (name, value); proto: (name, type_id)."""
        if self._members is None:
            self._members = self._raw[0]._decode_members(self.kind, *self._raw[1:]) if self._raw else []
        return self._members


class BTF:
    def __init__(self, path: str = VMLINUX_BTF, base: "BTF" = None):
        """`base`: the vmlinux BTF a module's split BTF (/sys/kernel/btf/<module>) extends:
        its type ids and string offsets continue those of the base."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise BTFError(f"cannot read BTF at {path}: {e.strerror}") from e
        self._parse(data, path, base)

    @classmethod
    def vmlinux(cls) -> "KernelBTF":
        """The running kernel's BTF, as the tracer asks it (answers cached per kernel)."""
        global _VMLINUX
        if _VMLINUX is None:
            _VMLINUX = KernelBTF()
        return _VMLINUX

    def parsed(self) -> "BTF":
        return self

    def release(self) -> None:
        """Nothing to give back: a BTF read directly (tests, modules) is its caller's."""

    @classmethod
    def of_module(cls, module: str, base: "BTF") -> "BTF":
        """A loaded module's BTF (kernels with CONFIG_DEBUG_INFO_BTF_MODULES), over `base`."""
        return cls(os.path.join(os.path.dirname(VMLINUX_BTF), module), base=base)

    def _parse(self, d: bytes, path: str, base: "BTF" = None) -> None:
        if len(d) < 24:
            raise BTFError(f"{path}: too short for a BTF header")
        magic, _ver, _flags, hlen, toff, tlen, soff, slen = struct.unpack_from("<HBBIIIII", d, 0)
        if magic != 0xEB9F:
            raise BTFError(f"{path}: bad BTF magic {magic:#x}")
        self._strs = d[hlen + soff: hlen + soff + slen]
        self.types: list = [None]
        self._by_name: dict = {}
        self._funcs: dict = {}     # function name -> FUNC_PROTO type id
        if base is not None:
            self._strs = base._strs + self._strs
            self.types = list(base.types)
            self._by_name = dict(base._by_name)
            self._funcs = dict(base._funcs)
        p, end = hlen + toff, hlen + toff + tlen
        names = {STRUCT: "struct ", UNION: "union ", ENUM: "enum ", ENUM64: "enum ", TYPEDEF: "typedef "}
        while p < end:
            name_off, info, size = struct.unpack_from("<III", d, p)
            p += 12
            kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
            per = _MEMBER_SIZE.get(kind)
            if per is not None:
                raw = (self, d, p, vlen, kflag)
                p += per * vlen
            else:
                raw = None
                fixed, per = _EXTRA.get(kind, (0, 0))
                p += fixed + per * vlen
            t = _Type(self._str(name_off) if name_off else "", kind, size, raw)
            self.types.append(t)
            if kind == FUNC and t.name:
                self._funcs.setdefault(t.name, size)   # a FUNC's "type" is its FUNC_PROTO
            if t.name:
                key = names.get(kind)
                if key:
                    self._by_name.setdefault(key + t.name, len(self.types) - 1)

    def _decode_members(self, kind: int, d: bytes, p: int, vlen: int, kflag: int) -> list:
        members = []
        if kind in (STRUCT, UNION):
            for i in range(vlen):
                mn, mt, mo = struct.unpack_from("<III", d, p + 12 * i)
                members.append((self._str(mn), mt, (mo & 0xFFFFFF) if kflag else mo))
        elif kind == ENUM:
            for i in range(vlen):
                en, ev = struct.unpack_from("<Ii" if kflag else "<II", d, p + 8 * i)
                members.append((self._str(en), ev))
        elif kind == ENUM64:
            for i in range(vlen):
                en, lo, hi = struct.unpack_from("<III", d, p + 12 * i)
                members.append((self._str(en), lo | hi << 32))
        elif kind == FUNC_PROTO:
            for i in range(vlen):
                an, at = struct.unpack_from("<II", d, p + 8 * i)
                members.append((self._str(an), at))
        return members

    def _str(self, off: int) -> str:
        return self._strs[off:self._strs.index(b"\0", off)].decode()

    def _resolve(self, tid: int) -> int:
        while self.types[tid].kind in _MODIFIERS:
            tid = self.types[tid].size_or_type
        return tid

    def _lookup(self, key: str) -> int:
        try:
            return self._by_name[key]
        except KeyError:
            raise BTFError(f"kernel BTF has no {key}") from None

    def _member(self, tid: int, name: str):
        """(bit offset, type id) of a member, descending into anonymous structs/unions."""
        for mn, mt, mo in self.types[self._resolve(tid)].members:
            if mn == name:
                return mo, mt
            if mn == "":
                found = self._member(mt, name)
                if found is not None:
                    return mo + found[0], found[1]
        return None

    def has_struct(self, name: str) -> bool:
        return "struct " + name in self._by_name

    def offsetof(self, struct_name: str, path: str) -> int:
        """Byte offset of a member; `path` may be dotted through named sub-structs
        (e.g. offsetof("sock", "__sk_common.skc_net"))."""
        tid, bits = self._lookup("struct " + struct_name), 0
        for part in path.split("."):
            found = self._member(tid, part)
            if found is None:
                raise BTFError(f"kernel BTF: struct {struct_name} has no member {path}")
            bits += found[0]
            tid = found[1]
        if bits % 8:
            raise BTFError(f"struct {struct_name}.{path} is a bitfield")
        return bits // 8

    def sizeof(self, struct_name: str) -> int:
        return self.types[self._lookup("struct " + struct_name)].size_or_type

    def has_member(self, struct_name: str, path: str) -> bool:
        try:
            self.offsetof(struct_name, path)
            return True
        except BTFError:
            return False

    def enum(self, name: str) -> dict:
        """{constant: value} of a kernel enum, e.g. enum("skb_drop_reason")."""
        return dict(self.types[self._lookup("enum " + name)].members)

    def has_enum(self, name: str) -> bool:
        return "enum " + name in self._by_name

    def tracepoint_arity(self, tracepoint: str) -> int:
        """Number of arguments of a raw tracepoint, from its `btf_trace_<name>` typedef
        (a pointer to a function whose first argument is the hidden context)."""
        tid = self._resolve(self._lookup("typedef btf_trace_" + tracepoint))
        ptr = self.types[tid]
        proto = self.types[self._resolve(ptr.size_or_type)]
        if proto.kind != FUNC_PROTO:
            raise BTFError(f"btf_trace_{tracepoint} is not a function pointer")
        return len(proto.members) - 1

    def func_params(self, name: str):
        """Parameter names of a kernel function, from its BTF FUNC record; None when BTF
        does not describe it (not in this blob, or pahole left it out)."""
        proto_id = self._funcs.get(name)
        if proto_id is None:
            return None
        proto = self.types[self._resolve(proto_id)]
        if proto.kind != FUNC_PROTO:
            return None
        # a variadic function ends with an unnamed parameter of type 0 ("...")
        return [pname for pname, ptype in proto.members if pname or ptype]

    def func_is_variadic(self, name: str) -> bool:
        proto_id = self._funcs.get(name)
        if proto_id is None:
            return False
        members = self.types[self._resolve(proto_id)].members
        return bool(members) and members[-1] == ("", 0)


class KernelBTF:
    """The running kernel's BTF through the questions the tracer asks it (offsets, sizes,
    enums, tracepoint arities, function parameters). Every answer — an error too — is kept in
    a cache file named by the hash of the BTF blob, so that a start on a kernel seen before
    parses nothing: parsing costs ~0.4 s and ~40 MB of Python objects, which release() gives
    back once the probes are attached."""

    QUESTIONS = ("has_struct", "offsetof", "sizeof", "has_member", "enum", "has_enum", "tracepoint_arity",
                 "func_params", "func_is_variadic")

    def __init__(self, path: str = VMLINUX_BTF, cache_dir: Path = CACHE_DIR):
        self.path = path
        try:
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()[:24]
        except OSError as e:
            raise BTFError(f"cannot read BTF at {path}: {e.strerror}") from e
        self._cache = Path(cache_dir) / f"{digest}.json"
        try:
            self._answers = json.loads(self._cache.read_text())
        except (OSError, ValueError):
            self._answers = {}
        self._btf = None
        self._new = False
        self._lock = threading.RLock()   # the loader asks from its thread, start-up from the main one

    def parsed(self) -> BTF:
        """The BTF itself (parsed now if it was not), e.g. as the base of a module's."""
        with self._lock:
            if self._btf is None:
                self._btf = BTF(self.path)
            return self._btf

    @property
    def was_parsed(self) -> bool:
        return self._btf is not None

    def _ask(self, question: str, *args):
        key = json.dumps([question, *args])
        answer = self._answers.get(key)
        if answer is None:
            with self._lock:
                try:
                    answer = {"value": getattr(self.parsed(), question)(*args)}
                except BTFError as e:
                    answer = {"error": str(e)}
                self._answers[key] = answer
                self._new = True
        if "error" in answer:
            raise BTFError(answer["error"])
        return answer["value"]

    def __getattr__(self, name: str):
        if name in KernelBTF.QUESTIONS:
            return lambda *args: self._ask(name, *args)
        raise AttributeError(name)

    def save(self) -> None:
        """Keep the answers for the next start (best effort: a read-only cache is no error)."""
        if not self._new:
            return
        with self._lock:
            self._write()

    def _write(self) -> None:
        try:
            self._cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self._answers))
            tmp.replace(self._cache)
            self._new = False
        except OSError:
            pass

    def release(self) -> None:
        """Save, and drop the parsed BTF (a later question parses it again)."""
        with self._lock:
            self.save()
            self._btf = None
