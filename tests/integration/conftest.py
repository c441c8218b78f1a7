import pytest

from tracer.lab.harness import TracerProcess


@pytest.fixture
def tracer():
    """The real tracer, attached before the test's traffic and detached after it."""
    t = TracerProcess()
    t.start()
    yield t
    t.stop()
