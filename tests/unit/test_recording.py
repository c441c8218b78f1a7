import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracer.recording import RecordingError, read_recording


def read_all(path):
    header, events = read_recording(str(path))
    return header, list(events)


def test_good_recording_reads_back(fixtures):
    header, events = read_all(fixtures / "invalid-window.rec")
    assert header["version"] == 1 and header["backend"] == "tracepoint"
    assert [e.kind for e in events if e.kind.startswith("rst")] == \
        ["rst_sent", "rst_received", "rst_sent", "rst_received"]


def test_truncation_names_the_offset_after_the_good_events(fixtures, tmp_path):
    data = (fixtures / "invalid-window.rec").read_bytes()
    p = tmp_path / "t.rec"
    p.write_bytes(data[:-10])
    header, events = read_recording(str(p))
    good = []
    with pytest.raises(RecordingError) as exc:
        for ev in events:
            good.append(ev)
    assert len(good) == len(list(read_recording(str(fixtures / "invalid-window.rec"))[1])) - 1
    assert exc.value.offset > 0 and "truncated" in str(exc.value)


def test_a_wrong_event_shape_is_an_error_not_a_crash(tmp_path):
    p = tmp_path / "w.rec"
    p.write_bytes(msgpack.packb({"format": "rst-tracer-recording", "version": 1}) + msgpack.packb({"kind": "bogus"}))
    with pytest.raises(RecordingError, match="malformed event"):
        read_all(p)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_any_damage_is_a_recording_error(fixtures, tmp_path, data):
    raw = bytearray((fixtures / "invalid-window.rec").read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    p = tmp_path / "f.rec"
    p.write_bytes(bytes(raw[:cut]))
    try:
        read_all(p)   # either it still parses ...
    except RecordingError as e:   # ... or it says where it broke; nothing else escapes
        assert 0 <= e.offset <= cut
