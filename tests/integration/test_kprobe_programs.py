"""The kprobe backend's programs compile with this kernel's BTF offsets and pass its
verifier, also where kprobes cannot be attached (this CI kernel): a kernel-side mistake
fails here in seconds, before the VM suite runs them for real."""
import re

import pytest

from tracer.probes import capabilities
from tracer.probes.btf import BTF
from tracer.probes.kprobe import KprobeBackend
from tracer.probes.loader import compile_program, expand_local_includes

pytestmark = pytest.mark.root


def test_every_kprobe_program_passes_the_verifier():
    from bcc import BPF
    caps = capabilities.detect()
    backend = KprobeBackend(caps, BTF.vmlinux())
    bpf = compile_program(backend.source, backend.defines(), caps)
    programs = re.findall(r"^int ((?:kp|kr|tp)_\w+)\(", expand_local_includes(backend.source), re.M)
    assert {"kp_ct_delete", "kp_masq_device_event", "kp_conntrack_confirm", "kp_tcp_v4_send_reset"} <= set(programs)
    for name in programs:
        bpf.load_func(name, BPF.RAW_TRACEPOINT if name.startswith("tp_") else BPF.KPROBE)
