import os

import pytest

from tracer.lab.harness import TracerProcess


@pytest.fixture
def tracer():
    """The real tracer, attached before the test's traffic and detached after it."""
    t = TracerProcess()
    t.start()
    yield t
    t.stop()


# -- stress mode (scripts/stress.sh): the tests marked as load-sensitive, N times each, with the lab's
# namespaces handed to the scenario 0, 0.1 or 1 s after they were created
STRESSED_MARKERS = ("flush", "race", "storm")
STRESS_RUNS = int(os.environ.get("RST_TRACER_STRESS_RUNS") or 0)
SETTLE_DELAYS = (0.0, 0.1, 1.0)


def pytest_generate_tests(metafunc):
    if STRESS_RUNS and any(metafunc.definition.get_closest_marker(m) for m in STRESSED_MARKERS):
        metafunc.fixturenames.append("stress_run")
        metafunc.parametrize("stress_run", range(1, STRESS_RUNS + 1),
                             ids=lambda n: f"run{n}-settle{SETTLE_DELAYS[(n - 1) % len(SETTLE_DELAYS)]}")


@pytest.fixture(autouse=True)
def _lab_settle(request, monkeypatch):
    callspec = getattr(request.node, "callspec", None)
    run = callspec.params.get("stress_run") if callspec else None
    if run:
        monkeypatch.setenv("RST_TRACER_LAB_SETTLE", str(SETTLE_DELAYS[(run - 1) % len(SETTLE_DELAYS)]))
