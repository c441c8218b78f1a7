"""Decoding the kprobe backend's records (struct rst_event with the appended fields) and the
BTF lookups it resolves signatures with. No root, no BPF."""
import os
import socket
import struct

import pytest

from tracer.clock import Clock
from tracer import record
from tracer.decode import KernelNames, decode, format_invalid
from tracer.events import CT_DESTROY, CT_INVALID, NAT_BINDING, SKB_DROPPED
from tracer.probes.btf import BTF

V4 = lambda a: socket.inet_aton(a) + b"\0" * 12  # noqa: E731
# short names used below -> struct rst_event members
ALIASES = {"o_saddr": "ct_orig_saddr", "o_daddr": "ct_orig_daddr", "o_sport": "ct_orig_sport",
           "o_dport": "ct_orig_dport", "r_saddr": "ct_reply_saddr", "r_daddr": "ct_reply_daddr",
           "r_sport": "ct_reply_sport", "r_dport": "ct_reply_dport", "inv_v0": "inv_value_0",
           "inv_v1": "inv_value_1", **{f"w{i}": f"ct_window_{i}" for i in range(8)}}


def raw(**kw) -> bytes:
    return record.pack(**{"sk_state": 0xFF, **{ALIASES.get(k, k): v for k, v in kw.items()}})


def ct_tuples():
    return dict(has_ct=1, ct_family=4, o_saddr=V4("10.200.1.2"), o_daddr=V4("10.200.2.2"), o_sport=40000,
                o_dport=8080, r_saddr=V4("10.200.2.2"), r_daddr=V4("10.200.2.1"), r_sport=8080, r_dport=40000)


NAMES = KernelNames(clock=Clock(offset=0.0))


def test_ct_invalid_gets_the_message_with_its_value_and_the_window():
    ev = decode(raw(kind=5, probe_id=8, family=4, saddr=V4("10.200.2.2"), daddr=V4("10.200.2.1"), sport=8080,
                    dport=40000, seq=7, ack=9, ct_status=414, ct_tcp_state=3, inv_v0=1453621076,
                    inv_msg=b"SEQ is over upper bound %u (over the window of the receiver)",
                    w0=1, w1=2, w2=3, w3=7, w4=5, w5=6, w6=7, w7=0, **ct_tuples()), NAMES)
    assert ev.kind == CT_INVALID and ev.probe == "kprobe:nf_ct_l4proto_log_invalid"
    assert ev.invalid_reason == "SEQ is over upper bound 1453621076 (over the window of the receiver)"
    assert ev.ct_window == {"orig": {"td_end": 1, "td_maxend": 2, "td_maxwin": 3, "td_scale": 7},
                            "reply": {"td_end": 5, "td_maxend": 6, "td_maxwin": 7, "td_scale": 0}}
    assert str(ev.flow) == "10.200.2.2:8080 > 10.200.2.1:40000" and ev.seq == 7
    assert ev.skb_ct.tcp_state == "ESTABLISHED" and ev.reason == ""


def test_nat_binding_and_deletion_carry_the_entry():
    b = decode(raw(kind=6, probe_id=9, ct_status=400, nat_range_flags=16, **ct_tuples()), NAMES)
    assert b.kind == NAT_BINDING and b.nat_range_flags == 16 and b.family == 4 and b.skb_ct is None
    assert str(b.entry.reply) == "10.200.2.2:8080 > 10.200.2.1:40000"
    d = decode(raw(kind=7, probe_id=11, ct_status=414, delete_reason=3, detail_family=4,
                   detail_addr=V4("10.200.2.1"), detail_ifname=b"n2", detail_ifindex=3, ct_timeout_left=9,
                   **ct_tuples()), NAMES)
    assert d.kind == CT_DESTROY and d.probe == "kprobe:nf_ct_delete"
    assert d.delete_reason == "masquerade" and d.entry.timeout == 9
    assert d.delete_detail == {"address": "10.200.2.1", "ifname": "n2", "ifindex": 3}


def test_drops_at_nf_hook_slow_are_netfilter_drops_on_kernels_without_reasons():
    ev = decode(raw(kind=3, probe_id=7, family=4, tcp_flags=2, saddr=V4("10.200.1.2"), daddr=V4("10.200.2.2")),
                NAMES)
    assert ev.kind == SKB_DROPPED and ev.reason == "NETFILTER_DROP" and ev.probe == "skb:kfree_skb"
    # no reason enum on the kernel and none given: no reason, rather than "0"
    sent = decode(raw(kind=1, probe_id=1, family=4), NAMES)
    assert sent.reason == "" and sent.probe == "kprobe:tcp_v4_send_reset"


def test_tracepoint_records_decode_as_before():
    ev = decode(raw(kind=1, family=4, reason=2, window=502), KernelNames(rst_reasons={2: "NO_SOCKET"}))
    assert ev.probe == "tcp:tcp_send_reset" and ev.reason == "NO_SOCKET" and ev.window == 502


@pytest.mark.parametrize("template,values,s,want", [
    ("SEQ is under the lower bound (already ACKed data retransmitted)", (0, 0), None,
     "SEQ is under the lower bound (already ACKed data retransmitted)"),
    ("invalid packet ignored in state %s ", (0xffff8880, 0), "ESTABLISHED", "invalid packet ignored in state ESTABLISHED"),
    ("ACK is under lower bound %u (possible overly delayed ACK) %d%%", (5, 0xFFFFFFFF), None,
     "ACK is under lower bound 5 (possible overly delayed ACK) -1%"),
])
def test_format_invalid(template, values, s, want):
    assert format_invalid(template, values, s) == want


def _split_blob(types: bytes, strings: bytes) -> bytes:
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return hdr + types + strings


def test_func_params_of_a_module_split_btf(tmp_path):
    # base: int (id 1); module: FUNC_PROTO(int a, int b, ...) (id 2), FUNC "f" (id 3)
    base_strs = b"\0int\0"
    base = _split_blob(struct.pack("<III", 1, 1 << 24, 4) + struct.pack("<I", 32), base_strs)
    (tmp_path / "vmlinux").write_bytes(base)
    mod_strs = b"\0a\0b\0f\0"
    off = {c: len(base_strs) + mod_strs.index(c.encode() + b"\0") for c in "abf"}
    t = struct.pack("<III", 0, (13 << 24) | 3, 1) + struct.pack("<II", off["a"], 1) + \
        struct.pack("<II", off["b"], 1) + struct.pack("<II", 0, 0)
    t += struct.pack("<III", off["f"], 12 << 24, 2)
    (tmp_path / "mod").write_bytes(_split_blob(t, mod_strs))
    mod = BTF(str(tmp_path / "mod"), base=BTF(str(tmp_path / "vmlinux")))
    assert mod.func_params("f") == ["a", "b"] and mod.func_is_variadic("f")
    assert mod.func_params("g") is None


@pytest.mark.skipif(not os.path.exists("/sys/kernel/btf/vmlinux"), reason="no kernel BTF")
def test_kernel_btf_func_records():
    btf = BTF()
    assert btf.func_params("tcp_v4_send_reset")[:2] == ["sk", "skb"]
    assert btf.func_params("no_such_function_here") is None


def test_a_listener_reset_carries_its_accept_queue():
    ev = decode(raw(kind=1, family=4, sk=1, sk_state=10, has_skb=1, tcp_flags=0x10, accept_queue=3,
                    accept_queue_max=1, saddr=V4("10.200.2.1"), daddr=V4("10.200.2.2"), sport=40000,
                    dport=8084), NAMES)
    assert ev.sk_state == "LISTEN" and (ev.accept_queue, ev.accept_queue_max) == (3, 1)


@pytest.mark.skipif(not os.path.exists("/sys/kernel/btf/vmlinux"), reason="no kernel BTF")
def test_reset_reason_argument_is_found_by_name():
    """The reason's position comes from BTF's parameter names, not from the source: this
    kernel's tcp_send_active_reset is (sk, reason) (priority is gone), tcp_v4_send_reset
    (sk, skb, reason)."""
    from types import SimpleNamespace
    from tracer.probes.kprobe import KprobeBackend
    btf = BTF.vmlinux()
    fake = SimpleNamespace(_params=btf.func_params, caps=SimpleNamespace(kernel_version=(6, 18, 0)))
    for func in ("tcp_send_active_reset", "tcp_v4_send_reset"):
        params = btf.func_params(func)
        arg, why = KprobeBackend._reason_arg(fake, func, (6, 10, 0))
        assert arg == (params.index("reason") + 1 if "reason" in params else 0) and "BTF" in why
    old = SimpleNamespace(_params=lambda f: None, caps=SimpleNamespace(kernel_version=(6, 1, 0)))
    assert KprobeBackend._reason_arg(old, "tcp_send_active_reset", (6, 10, 0))[0] == 0
