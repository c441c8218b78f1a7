"""What the running kernel lets us probe, and which backend that selects.

Pure reads of /proc, /sys and /lib/modules: no BCC import, so `doctor` answers even on a
host where BCC is missing or broken.
"""
from __future__ import annotations

import glob
import gzip
import importlib.util
import os
import platform
from dataclasses import asdict, dataclass, field

from .btf import VMLINUX_BTF, BTF, BTFError
from ..kallsyms import Kallsyms, loaded_modules

TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
# Raw tracepoints the tracepoint backend attaches to; all must exist.
REQUIRED_TRACEPOINTS = ("tcp_send_reset", "tcp_receive_reset", "kfree_skb")
# Functions the kprobe backend needs (present once netfilter modules are loaded).
KPROBE_FUNCTIONS = ("tcp_v4_send_reset", "tcp_send_active_reset")
# Every function the kprobe backend probes, and the module that holds it on stock kernels
# (netfilter modules load lazily: their functions appear once conntrack/NAT is in use).
KPROBE_POINTS = {
    "tcp_v4_send_reset": "", "tcp_v6_send_reset": "", "tcp_send_active_reset": "",
    "nf_ct_l4proto_log_invalid": "nf_conntrack", "__nf_conntrack_confirm": "nf_conntrack",
    "nf_ct_resolve_clash": "nf_conntrack", "nf_ct_delete": "nf_conntrack", "early_drop": "nf_conntrack",
    "nf_nat_setup_info": "nf_nat", "masq_inet_event": "nf_nat", "masq_inet6_event": "nf_nat",
    "masq_device_event": "nf_nat", "iterate_cleanup_work": "nf_nat",
}
# Linux capability bits (include/uapi/linux/capability.h)
CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 12, 21, 38, 39
IMPLEMENTED_BACKENDS = ("tracepoint", "kprobe")


@dataclass
class Capabilities:
    kernel_release: str
    kernel_version: tuple
    btf: bool
    btf_error: str = ""
    tracefs: str = ""
    tracepoints: dict = field(default_factory=dict)
    kprobes: bool = False
    kprobes_why: str = ""
    # function -> {"present": bool, "why": str}: what the kprobe backend can probe now
    kprobe_points: dict = field(default_factory=dict)
    matching_headers: str = ""
    fallback_headers: list = field(default_factory=list)
    bcc: str = ""
    privileged: bool = False
    backend: str = ""
    backend_why: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kernel_version"] = ".".join(map(str, self.kernel_version))
        return d


def parse_kernel_version(release: str) -> tuple:
    parts = []
    for piece in release.split("-")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


def _kernel_config(release: str) -> dict:
    text = ""
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            text = f.read()
    except OSError:
        try:
            with open(f"/boot/config-{release}") as f:
                text = f.read()
        except OSError:
            return {}
    conf = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            k, v = line.split("=", 1)
            conf[k] = v
    return conf


def _effective_caps() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def is_privileged() -> bool:
    caps = _effective_caps()
    has = lambda bit: bool(caps >> bit & 1)  # noqa: E731
    return has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON) and has(CAP_NET_ADMIN))


def kallsyms_has(names) -> dict:
    symbols = Kallsyms.current()
    return {name: name in symbols for name in names}


def kprobe_points(found: dict) -> dict:
    """Which functions of the kprobe backend are in kallsyms now, and why not."""
    modules = loaded_modules() or frozenset()
    points = {}
    for fn, module in KPROBE_POINTS.items():
        if found.get(fn):
            why = f"in kallsyms{f' (module {module})' if module and module in modules else ''}"
        elif module and module not in modules:
            why = f"module {module} not loaded yet: the backend attaches it when it loads"
        else:
            why = "not in kallsyms (inlined or absent on this kernel): skipped"
        points[fn] = {"present": bool(found.get(fn)), "why": why}
    return points


def _kprobes_usable(tracefs: str, conf: dict, found: dict = None) -> tuple:
    if conf and conf.get("CONFIG_KPROBES") != "y":
        return False, "kernel built without CONFIG_KPROBES"
    if tracefs and not os.path.exists(os.path.join(tracefs, "kprobe_events")):
        return False, f"no {tracefs}/kprobe_events (CONFIG_KPROBE_EVENTS off)"
    if not tracefs and not conf:
        return False, "no tracefs and no kernel config to tell"
    found = found if found is not None else kallsyms_has(KPROBE_FUNCTIONS)
    missing = [n for n in KPROBE_FUNCTIONS if not found.get(n)]
    if missing:
        return False, "kallsyms lacks " + ", ".join(sorted(missing))
    return True, "CONFIG_KPROBES=y, kprobe_events present, probe functions in kallsyms"


def fallback_header_trees() -> list:
    """Debian linux-headers packages (common + arch) usable when the running kernel's own
    headers are absent: only their uapi/compiler parts are used, offsets come from BTF."""
    trees = []
    for arch_dir in sorted(glob.glob("/usr/src/linux-headers-*-amd64"), reverse=True):
        common = arch_dir[: -len("-amd64")] + "-common"
        if os.path.isdir(common):
            trees.append(arch_dir)
    return trees


def _bcc_version() -> str:
    """BCC's version if this Python can import it ("" if not: doctor and watch must agree)."""
    try:
        spec = importlib.util.find_spec("bcc")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return ""
    try:
        with open(os.path.join(list(spec.submodule_search_locations)[0], "version.py")) as f:
            for line in f:
                if "__version__" in line:
                    return line.split("=")[1].strip().strip("'\"")
    except OSError:
        pass
    return "unknown"


def detect() -> Capabilities:
    release = platform.release()
    conf = _kernel_config(release)
    caps = Capabilities(kernel_release=release, kernel_version=parse_kernel_version(release),
                        btf=False, privileged=is_privileged(), bcc=_bcc_version())
    btf = None
    if os.path.exists(VMLINUX_BTF):
        try:
            btf = BTF.vmlinux()
            caps.btf = True
        except BTFError as e:
            caps.btf_error = str(e)
    else:
        caps.btf_error = f"{VMLINUX_BTF} absent (CONFIG_DEBUG_INFO_BTF off)"
    caps.tracefs = next((d for d in TRACEFS_DIRS if os.path.exists(os.path.join(d, "events"))), "")
    for tp in REQUIRED_TRACEPOINTS:
        present = False
        if btf is not None:
            try:
                btf.tracepoint_arity(tp)
                present = True
            except BTFError:
                pass
        if not present and caps.tracefs:
            present = bool(glob.glob(os.path.join(caps.tracefs, "events", "*", tp)))
        caps.tracepoints[tp] = present
    found = kallsyms_has(set(KPROBE_FUNCTIONS) | set(KPROBE_POINTS))
    caps.kprobes, caps.kprobes_why = _kprobes_usable(caps.tracefs, conf, found)
    caps.kprobe_points = kprobe_points(found)
    build = f"/lib/modules/{release}/build"
    if os.path.exists(os.path.join(build, "include")):
        caps.matching_headers = build
    caps.fallback_headers = fallback_header_trees()
    caps.backend, caps.backend_why = choose_backend(caps)
    return caps


def choose_backend(caps: Capabilities, wanted: str = "auto") -> tuple:
    """(backend, reason); backend is "" when nothing can run. The one decision: `watch` runs
    the backend it returns, `doctor` reports it."""
    if not caps.btf:
        # every backend takes struct offsets, tracepoint arities and reason names from BTF
        # (tracer/probes/loader.py): headers alone do not do
        return "", (f"no BTF ({caps.btf_error or VMLINUX_BTF + ' unreadable'}): struct offsets and "
                    "reason names come from it")
    if not caps.bcc:
        return "", ("BCC is not importable from this Python: install python3-bpfcc and run /usr/bin/python3 "
                    "or a venv made with --system-site-packages (scripts/setup.sh does)")
    if not (caps.matching_headers or caps.fallback_headers):
        return "", "no kernel headers for BCC (install linux-headers-amd64)"
    tp_ok = all(caps.tracepoints.values())
    missing_tp = [t for t, ok in caps.tracepoints.items() if not ok]
    if wanted in ("auto", "kprobe") and caps.kprobes and "kprobe" in IMPLEMENTED_BACKENDS:
        return "kprobe", "kprobes usable: " + caps.kprobes_why
    if wanted == "kprobe":
        return "", "kprobe backend unavailable: " + (caps.kprobes_why if not caps.kprobes
                                                      else "not built into this version")
    if tp_ok:
        why = "tracepoints present; kprobes unusable: " + caps.kprobes_why if not caps.kprobes \
            else "tracepoints present"
        return "tracepoint", why
    return "", "missing tracepoints: " + ", ".join(missing_tp)
