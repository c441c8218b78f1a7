"""struct rst_event is defined once (tracer/record.py): the C header the probes compile with
and the decoder's format come from the same table."""
import ctypes

import pytest

from tracer import record
from tracer.clock import Clock
from tracer.decode import KernelNames, decode
from tracer.events import CT_DESTROY

C_TYPES = {"u64": ctypes.c_uint64, "u32": ctypes.c_uint32, "u16": ctypes.c_uint16, "u8": ctypes.c_uint8,
           "char": ctypes.c_char}


def as_ctypes(fields):
    """The struct a C compiler makes of these members (ctypes follows the C ABI)."""
    return type("rst_event", (ctypes.Structure,),
                {"_fields_": [(n, C_TYPES[t] * c if c else C_TYPES[t]) for n, t, c, _ in fields]})


def test_the_decoders_format_is_the_c_layout():
    assert record.FORMAT.size == record.SIZE == ctypes.sizeof(as_ctypes(record.FIELDS))
    assert record.layout_mismatches(as_ctypes(record.FIELDS)) == []


def test_a_moved_field_is_found():
    fields = list(record.FIELDS)
    i = next(i for i, f in enumerate(fields) if f[0] == "seq")
    fields[i], fields[i + 1] = fields[i + 1], fields[i]      # swap seq and ack: same size
    mismatches = record.layout_mismatches(as_ctypes(fields))
    assert any(m.startswith("seq:") for m in mismatches) and any(m.startswith("ack:") for m in mismatches)


def test_the_header_declares_every_member_and_the_defines_every_number():
    header = record.c_header()
    for name, ctype, count, _ in record.FIELDS:
        assert f"{ctype} {name}{f'[{count}]' if count else ''};" in header
    defines = record.c_defines()
    assert defines["KIND_CT_DELETE"] == 7 and defines["PROBE_CT_DELETE"] == 11
    assert defines["DEL_CTNETLINK"] == 1 and defines["RST_EVENT_SIZE"] == record.SIZE


def test_pack_and_decode_round_trip():
    raw = record.pack(kind=record.Kind.CT_DELETE, probe_id=record.Probe.CT_DELETE, has_ct=1, ct_family=4,
                      ct_orig_saddr=bytes([10, 0, 0, 2]), ct_orig_daddr=bytes([10, 0, 0, 9]), ct_orig_sport=5,
                      ct_orig_dport=80, ct_reply_saddr=bytes([10, 0, 0, 9]), ct_reply_daddr=bytes([10, 0, 0, 1]),
                      ct_reply_sport=80, ct_reply_dport=6, delete_reason=record.DeleteReason.CTNETLINK,
                      portid=4242, pid=4242, comm=b"conntrack")
    ev = decode(raw, KernelNames(clock=Clock(offset=0.0)))
    assert ev.kind == CT_DESTROY and ev.delete_reason == "ctnetlink" and ev.portid == 4242
    assert str(ev.entry.orig) == "10.0.0.2:5 > 10.0.0.9:80" and ev.comm == "conntrack"
    with pytest.raises(KeyError):
        record.pack(no_such_field=1)
