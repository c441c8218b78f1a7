import os
import struct

import pytest

from tracer.probes.btf import BTF, BTFError

KERNEL_BTF = "/sys/kernel/btf/vmlinux"
needs_kernel_btf = pytest.mark.skipif(not os.path.exists(KERNEL_BTF), reason="no kernel BTF")


@needs_kernel_btf
def test_kernel_btf_offsets_of_fixed_abi_structs():
    # wire-format structs have offsets fixed by the protocols: a real read must agree
    btf = BTF()
    assert btf.offsetof("iphdr", "protocol") == 9
    assert btf.offsetof("iphdr", "daddr") == 16
    assert btf.offsetof("tcphdr", "seq") == 4
    assert btf.offsetof("ipv6hdr", "saddr") == 8


@needs_kernel_btf
def test_kernel_btf_has_what_the_tracepoint_backend_needs():
    from tracer.probes.loader import kernel_defines
    btf = BTF()
    defines = kernel_defines(btf)
    # sk_buff.head comes after the list/rb node, dev, cb... never at 0, always 8-aligned
    assert defines["OFF_SKB_HEAD"] > 0 and defines["OFF_SKB_HEAD"] % 8 == 0
    # sock_common: skc_daddr is the very first member on every kernel since 2.6.x
    assert defines["OFF_SOCK_SKC_DADDR"] == 0
    assert defines["OFF_SOCK_SKC_RCV_SADDR"] == 4
    assert btf.enum("skb_drop_reason")["SKB_DROP_REASON_NOT_SPECIFIED"] == 2
    assert defines["TCP_SEND_RESET_ARITY"] in (2, 3)


def _blob(types: bytes, strings: bytes) -> bytes:
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return hdr + types + strings


def test_synthetic_btf_struct_anonymous_union_and_enum(tmp_path):
    # strings: "", "int", "outer", "a", "b", "color", "RED", "BLUE", "inner"
    strs = b"\0int\0outer\0a\0b\0color\0RED\0BLUE\0inner\0"
    off = {s: strs.index(s.encode() + b"\0") for s in ("int", "outer", "a", "b", "color", "RED", "BLUE", "inner")}
    t = b""
    t += struct.pack("<III", off["int"], 1 << 24, 4) + struct.pack("<I", 32)          # 1: int
    t += struct.pack("<III", 0, (5 << 24) | 1, 4) + struct.pack("<III", off["b"], 1, 0)  # 2: anon union {int b}
    t += struct.pack("<III", off["outer"], (4 << 24) | 2, 16)                            # 3: struct outer
    t += struct.pack("<III", off["a"], 1, 0) + struct.pack("<III", 0, 2, 64)            #    a@0, anon@8
    t += struct.pack("<III", off["color"], (6 << 24) | 2, 4)                             # 4: enum color
    t += struct.pack("<Ii", off["RED"], 0) + struct.pack("<Ii", off["BLUE"], 7)
    p = tmp_path / "btf"
    p.write_bytes(_blob(t, strs))
    btf = BTF(str(p))
    assert btf.offsetof("outer", "a") == 0
    assert btf.offsetof("outer", "b") == 8       # found through the anonymous union
    assert btf.enum("color") == {"RED": 0, "BLUE": 7}
    with pytest.raises(BTFError):
        btf.offsetof("outer", "missing")


def test_bad_btf_is_a_clear_error(tmp_path):
    p = tmp_path / "btf"
    p.write_bytes(b"\x00" * 64)
    with pytest.raises(BTFError, match="bad BTF magic"):
        BTF(str(p))
    with pytest.raises(BTFError, match="cannot read"):
        BTF(str(tmp_path / "absent"))


def test_answers_are_kept_per_kernel_so_a_second_start_parses_nothing(tmp_path):
    from tracer.probes.btf import KernelBTF
    first = KernelBTF(cache_dir=tmp_path)
    head = first.offsetof("sk_buff", "head")
    with pytest.raises(BTFError):
        first.offsetof("sk_buff", "no_such_member")
    assert first.was_parsed
    first.release()
    assert not first.was_parsed
    second = KernelBTF(cache_dir=tmp_path)
    assert second.offsetof("sk_buff", "head") == head
    with pytest.raises(BTFError):                 # errors are answers too
        second.offsetof("sk_buff", "no_such_member")
    assert not second.was_parsed
    for cached in tmp_path.iterdir():             # a damaged cache is only a slower start
        cached.write_text("{not json")
    third = KernelBTF(cache_dir=tmp_path)
    assert third.offsetof("sk_buff", "head") == head and third.was_parsed
