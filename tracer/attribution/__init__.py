"""Attribution core: pure Python, no BCC, no I/O. Kernel events (with their context) in,
one verdict per event out. Fed by live probes, by a recording, or by tests."""
from .engine import Attributor  # noqa: F401
