import json

import pytest

from tracer.schema import SCHEMA_VERSION, Evidence, Remedy, SchemaError, Verdict


def sample() -> Verdict:
    return Verdict(id="h-1", ts=1795335742.25, host="h", netns=4026531840, netns_name="host",
                   interface="eth0", direction="sent",
                   flow={"proto": "tcp", "family": 4, "src": "192.0.2.1", "sport": 80, "dst": "192.0.2.2", "dport": 5000},
                   packet={"flags": ["ACK"], "seq": 1, "ack": 2, "len": 0},
                   nat={"inside": {"src": "10.0.0.2", "sport": 5000, "dst": "192.0.2.1", "dport": 80},
                        "outside": {"src": "192.0.2.2", "sport": 5000, "dst": "192.0.2.1", "dport": 80}},
                   cause="conntrack_invalid_unnat", summary="s", confidence="high",
                   evidence=[Evidence("k", "t", {"x": 1})], remedy=Remedy("r", ["cmd"]),
                   backend="tracepoint", kernel={"probe": "tcp:tcp_send_reset"},
                   related={"id": "h-0", "cause": "c"}, process={"pid": 1, "comm": "x"})


def test_round_trip_through_json():
    d = sample().to_dict()
    assert d["type"] == "verdict" and d["schema_version"] == SCHEMA_VERSION
    assert d["ts"] == "2026-11-22T08:22:22.250000Z"
    back = Verdict.from_dict(json.loads(json.dumps(d)))
    assert back == sample()


def test_documented_fields_are_all_there():
    # the README's schema table lists exactly these top-level fields
    assert set(sample().to_dict()) == {
        "type", "schema_version", "id", "ts", "ts_unix", "host", "netns", "netns_name", "interface",
        "direction", "flow", "packet", "nat", "cause", "summary", "confidence", "evidence", "remedy",
        "backend", "kernel", "related", "process", "socket_owner", "workloads"}


@pytest.mark.parametrize("change", [{"schema_version": 2}, {"type": "loss"}, {"direction": "up"},
                                    {"confidence": "sure"}])
def test_rejects_what_it_does_not_understand(change):
    d = dict(sample().to_dict(), **change)
    with pytest.raises(SchemaError):
        Verdict.from_dict(d)


def test_every_evidence_key_is_documented():
    """Evidence keys are part of schema v1: each one the rules can emit is in the README."""
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    keys = set(re.findall(r'Evidence\("([a-z_]+)"', (root / "tracer/attribution/rules.py").read_text()))
    readme = root.joinpath("README.md").read_text()
    assert keys and not {k for k in keys if f"`{k}`" not in readme}
