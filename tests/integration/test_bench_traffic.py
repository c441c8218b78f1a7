"""Real namespaces, real packets: the lab programs the side-by-side benchmark (bench/compare.py)
drives its UDP churn with."""
import pytest

from tracer.lab.scenarios import follow
from tracer.lab.topology import NAT_OUT_ADDR, SRV_ADDR, NatLab

pytestmark = pytest.mark.root


def test_udp_churn_makes_every_query_a_new_nated_flow_and_gets_every_answer():
    with NatLab() as lab:
        follow(lab, lab.srv, ["udp-responder", "--addr", SRV_ADDR, "--port", "53"]).wait("listening")
        done = follow(lab, lab.cli, ["udp-churn", "--addr", SRV_ADDR, "--port", "53", "--rate", "1000",
                                     "--seconds", "1", "--sport-lo", "20000", "--sport-hi", "29999",
                                     "--procs", "2"]).wait(("done", "error"), timeout=30)
        entries = [e for e in lab.conntrack(proto="udp") if e["orig"].get("dport") == 53]
    assert done["event"] == "done" and done["errors"] == 0 and done["timeouts"] == 0
    assert done["answered"] == done["sent"] >= 900
    # one router entry per query (the default UDP timeout outlives the run), each from its own
    # source port, masqueraded, and answered (the reply went back through the same entry)
    assert len(entries) == done["sent"]
    assert len({e["orig"]["sport"] for e in entries}) == done["sent"]
    assert all(e["reply"]["dst"] == NAT_OUT_ADDR and "UNREPLIED" not in e["flags"] for e in entries)
