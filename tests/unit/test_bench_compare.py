"""The side-by-side benchmark's storm accounting (bench/compare.py), on the tracer's output
as it is written: per-event verdicts and aggregate counts add up; records it does not know
are counted, never fatal."""
import importlib.util
import json
import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
spec = importlib.util.spec_from_file_location("bench_compare", os.path.join(ROOT, "bench", "compare.py"))
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)

NAT, SRV, OTHER = 4026531001, 4026531002, 4026531003


def verdict(netns, cause, dport=9, **kw):
    return {"type": "verdict", "schema_version": 1, "id": f"h-1-{id(kw)}", "ts_unix": 100.0, "netns": netns,
            "cause": cause, "flow": {"proto": "tcp", "src": "10.200.3.1", "sport": 20000, "dst": "10.200.3.2",
                                      "dport": dport}, **kw}


def aggregate(netns, cause, count, port=9):
    return {"type": "aggregate", "schema_version": 1, "ts_unix": 101.0, "interval_s": 1.0, "netns": netns,
            "netns_name": "rstlab-x-srv", "cause": cause, "port": port, "count": count, "why": "storm"}


def summary_of(tmp_path, records, garbage=b""):
    path = tmp_path / "tracer.out"
    path.write_bytes(b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records) + garbage)
    return compare.records_summary(str(path))


def test_storm_totals_add_verdicts_and_aggregates_of_the_server_only(tmp_path):
    records = [
        {"type": "status", "state": "attached", "since_process_start_s": 0.9},
        *[verdict(SRV, "no_listener") for _ in range(3)],
        {"type": "status", "state": "storm", "ordinary_per_s": 50000},
        aggregate(SRV, "no_listener", 1000),
        aggregate(SRV, "no_listener", 996),
        aggregate(OTHER, "no_listener", 7),            # another lab's storm: not ours
        verdict(OTHER, "no_listener"),
        aggregate(SRV, "app_abort", 5),                # another cause: not the closed port's
        {"type": "loss", "source": "kernel_ringbuf", "lost": 4, "lost_total": 4},
        {"type": "hologram", "anything": [1, 2]},      # a record type this script does not know
        {"type": "status", "state": "storm_end", "shed_total": 1996},
    ]
    notes = summary_of(tmp_path, records, garbage=b"{not json\n")
    acc = compare.storm_accounting({"nat": NAT, "srv": SRV}, dict(notes, noted=[]), {"wire": 2000})
    assert (acc["verdicts"], acc["aggregated"], acc["missing"]) == (3, 1996, 1)
    assert acc["aggregate_ports"] == {9: 1996}
    assert acc["loss"] == {"kernel_ringbuf": 4}
    assert acc["states"] == {"attached": 1, "storm": 1, "storm_end": 1}
    assert notes["types"]["hologram"] == 1 and notes["unparsable"] == 1


def test_incident_latency_is_from_the_verdicts_event_time_to_its_arrival_on_stdout(tmp_path):
    notes = summary_of(tmp_path, [])
    root_cause = verdict(NAT, "conntrack_invalid_unnat", dport=40000)
    root_cause["ts_unix"] = 1000.0
    elsewhere = verdict(OTHER, "conntrack_invalid_unnat", dport=40000)   # another lab's incident
    other_flow = verdict(NAT, "conntrack_invalid_unnat", dport=40001)
    noted = [(1000.5, elsewhere), (1000.6, other_flow), (1000.012, root_cause)]
    extra = {"wire": 0, "incident": {"outside": {"src": "10.200.2.1", "sport": 40000}}}
    acc = compare.storm_accounting({"nat": NAT, "srv": SRV}, dict(notes, noted=noted), extra)
    assert round(acc["latency_ms"], 3) == 12.0
    acc = compare.storm_accounting({"nat": NAT, "srv": SRV}, dict(notes, noted=noted[:2]), extra)
    assert acc["latency_ms"] is None


def test_drain_notes_marked_lines_split_across_reads_with_their_arrival(tmp_path):
    r, w = os.pipe()
    line = json.dumps(verdict(NAT, "conntrack_invalid_unnat")).encode() + b"\n"
    with os.fdopen(r, "rb") as rf:
        drain = compare.Drain(rf, str(tmp_path / "out"), (b"conntrack_invalid_unnat",))
        first = b'{"type":"status","state":"attached"}\n' + line[:40]
        os.write(w, first)
        while drain.bytes < len(first):   # the second write is a second read
            time.sleep(0.01)
        os.write(w, line[40:] + b"partial")
        os.close(w)
        drain.join(5)
    assert [rec["cause"] for _, rec in drain.noted] == ["conntrack_invalid_unnat"]
    assert drain.lines == 2 and (tmp_path / "out").read_bytes().endswith(b"partial")
