"""Compile and load the BPF C in bpf/ with BCC, with offsets taken from BTF.

On a kernel whose headers are not installed, BCC still needs *a* header tree for its
helper definitions: we point it at a merged copy of a Debian linux-headers package
(common + arch, symlinked) and never let it compute struct layouts from those headers —
every offset the C code uses is an OFF_* define read from the running kernel's BTF.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

from .. import record
from .btf import BTF, BTFError
from .capabilities import Capabilities



def bpf_dir() -> Path:
    """Where the BPF C is: the package tracer.bpf when installed (a wheel carries bpf/ under
    that name; an editable install maps it to the checkout's bpf/), else the checkout's."""
    try:
        spec = importlib.util.find_spec("tracer.bpf")
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parents[2] / "bpf"


BPF_DIR = bpf_dir()
HEADER_CACHE = Path(os.environ.get("RST_TRACER_CACHE", "/var/cache/rst-tracer")) / "kernel-headers"

# define name -> (struct, member path); resolved per kernel from BTF
OFFSETS = {
    "OFF_SKB_HEAD": ("sk_buff", "head"),
    "OFF_SKB_NETWORK_HEADER": ("sk_buff", "network_header"),
    "OFF_SKB_TRANSPORT_HEADER": ("sk_buff", "transport_header"),
    "OFF_SKB_NFCT": ("sk_buff", "_nfct"),
    "OFF_SKB_DEV": ("sk_buff", "dev"),
    "OFF_SKB_SKB_IIF": ("sk_buff", "skb_iif"),
    "OFF_NET_DEVICE_IFINDEX": ("net_device", "ifindex"),
    "OFF_NET_DEVICE_ND_NET": ("net_device", "nd_net"),
    "OFF_NET_NS_INUM": ("net", "ns.inum"),
    "OFF_NF_CONN_STATUS": ("nf_conn", "status"),
    "OFF_SOCK_SKC_NET": ("sock", "__sk_common.skc_net"),
    "OFF_SOCK_SKC_STATE": ("sock", "__sk_common.skc_state"),
    "OFF_SOCK_SKC_FAMILY": ("sock", "__sk_common.skc_family"),
    "OFF_SOCK_SKC_DADDR": ("sock", "__sk_common.skc_daddr"),
    "OFF_SOCK_SKC_RCV_SADDR": ("sock", "__sk_common.skc_rcv_saddr"),
    "OFF_SOCK_SKC_DPORT": ("sock", "__sk_common.skc_dport"),
    "OFF_SOCK_SKC_NUM": ("sock", "__sk_common.skc_num"),
    "OFF_SOCK_SK_ACK_BACKLOG": ("sock", "sk_ack_backlog"),
    "OFF_SOCK_SK_MAX_ACK_BACKLOG": ("sock", "sk_max_ack_backlog"),
    "OFF_ICSK_PROBES_OUT": ("inet_connection_sock", "icsk_probes_out"),
    "OFF_SOCK_SKC_V6_DADDR": ("sock", "__sk_common.skc_v6_daddr"),
    "OFF_SOCK_SKC_V6_RCV_SADDR": ("sock", "__sk_common.skc_v6_rcv_saddr"),
    "OFF_INET_SOCK_INET_SPORT": ("inet_sock", "inet_sport"),
    "OFF_NF_CONN_TUPLEHASH": ("nf_conn", "tuplehash"),
    "OFF_TUPLE_HASH_TUPLE": ("nf_conntrack_tuple_hash", "tuple"),
    "OFF_TUPLE_SRC_U3": ("nf_conntrack_tuple", "src.u3"),
    "OFF_TUPLE_SRC_PORT": ("nf_conntrack_tuple", "src.u.all"),
    "OFF_TUPLE_DST_U3": ("nf_conntrack_tuple", "dst.u3"),
    "OFF_TUPLE_DST_PORT": ("nf_conntrack_tuple", "dst.u.all"),
    "OFF_TASK_NSPROXY": ("task_struct", "nsproxy"),
    "OFF_TASK_TGID": ("task_struct", "tgid"),
    "OFF_NSPROXY_NET_NS": ("nsproxy", "net_ns"),
}
SIZES = {"SIZEOF_TUPLE_HASH": "nf_conntrack_tuple_hash"}
RINGBUF_PAGES = 512          # root-cause lane, 2 MiB: ~5k records of slack before one is lost
ORDINARY_RINGBUF_PAGES = 512  # ordinary lane: what does not fit is counted (shed), not lost
SHED_ENTRIES = 4096          # (netns, class, port) counters of shed ordinary events
STORMING_ENTRIES = 1024      # namespaces in a storm at once (more: the rest are not shed)
# the process of each socket (bpf/common.h): LRU, ~80 bytes of kernel memory an entry (5 MiB);
# past this many live connections the oldest sockets' processes are forgotten
OWNER_ENTRIES = 65536
LISTENER_ENTRIES = 4096


class LoadError(Exception):
    """The BPF program could not be built or attached; the message is for the operator."""


def kernel_defines(btf: BTF) -> dict:
    """Every per-kernel value the C code needs, from BTF."""
    try:
        defines = {name: btf.offsetof(s, m) for name, (s, m) in OFFSETS.items()}
        defines.update({name: btf.sizeof(s) for name, s in SIZES.items()})
        defines["TCP_SEND_RESET_ARITY"] = btf.tracepoint_arity("tcp_send_reset")
    except BTFError as e:
        raise LoadError(str(e)) from e
    defines["RINGBUF_PAGES"] = RINGBUF_PAGES
    defines["ORDINARY_RINGBUF_PAGES"] = ORDINARY_RINGBUF_PAGES
    defines["SHED_ENTRIES"] = SHED_ENTRIES
    defines["STORMING_ENTRIES"] = STORMING_ENTRIES
    defines["OWNER_ENTRIES"] = OWNER_ENTRIES
    defines["LISTENER_ENTRIES"] = LISTENER_ENTRIES
    defines.update(record.c_defines())
    return defines


def header_tree(caps: Capabilities) -> str:
    """Directory for BCC_KERNEL_SOURCE, or "" when the running kernel's headers exist."""
    if caps.matching_headers:
        return ""
    if not caps.fallback_headers:
        raise LoadError("no kernel headers: install linux-headers-amd64 (scripts/setup.sh does)")
    arch_dir = Path(caps.fallback_headers[0])
    common = Path(str(arch_dir)[: -len("-amd64")] + "-common")
    merged = HEADER_CACHE / arch_dir.name
    if (merged / ".complete").exists():
        return str(merged)
    tmp = merged.with_name(merged.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    # a symlink farm: common first, then the arch tree's generated files over it
    for src in (common, arch_dir):
        subprocess.run(["cp", "-as", "--remove-destination", f"{src}/.", str(tmp)], check=True)
    (tmp / ".complete").write_text(f"{common}\n{arch_dir}\n")
    shutil.rmtree(merged, ignore_errors=True)
    tmp.rename(merged)
    return str(merged)


def import_bcc():
    try:
        import bcc  # noqa: F401  (Debian's python3-bpfcc)
    except ImportError as e:
        raise LoadError("BCC is not importable: install python3-bpfcc and use a venv made with "
                        "--system-site-packages (scripts/setup.sh does)") from e
    return bcc


# headers generated from Python rather than read from bpf/
GENERATED = {"record.h": record.c_header}


def expand_local_includes(source: str, seen=None) -> str:
    """Inline `#include "x.h"` from bpf/ (or generated): BCC rewrites map calls
    (events.ringbuf_reserve, map.lookup) only in the main translation unit, not in included
    files."""
    seen = set() if seen is None else seen
    text = GENERATED[source]() if source in GENERATED else (BPF_DIR / source).read_text()
    out = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith('#include "') and stripped.endswith('"'):
            name = stripped[len('#include "'):-1]
            if name not in seen:
                seen.add(name)
                out.append(expand_local_includes(name, seen))
            continue
        out.append(line)
    return "\n".join(out) + "\n"


MADV_PAGEOUT = 21   # 5.4+; older kernels refuse it and keep the pages: harmless
COMPILER_LIBRARIES = ("libLLVM", "libclang", "libbcc")


def release_compiler_memory() -> None:
    """Once the programs are loaded, give back what compiling them took: the heap LLVM freed
    (glibc keeps it unless trimmed: ~40 MB) and the compiler's code pages (~75 MB of
    libLLVM/libclang text, reclaimed; faulted back in only if something compiles again).
    Only read-only executable mappings are paged out: they hold nothing of ours."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.malloc_trim(0)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    try:
        with open("/proc/self/maps") as f:
            maps = f.read().splitlines()
    except OSError:
        return
    for line in maps:
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "r-xp" and any(lib in parts[5] for lib in COMPILER_LIBRARIES):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            libc.madvise(start, end - start, MADV_PAGEOUT)


def compile_program(source: str, defines: dict, caps: Capabilities):
    """Build and load bpf/<source>; BCC auto-attaches RAW_TRACEPOINT_PROBE/kprobe__ functions."""
    bcc = import_bcc()
    tree = header_tree(caps)
    if tree:
        os.environ["BCC_KERNEL_SOURCE"] = tree
    cflags = [f"-D{k}={v}" for k, v in sorted(defines.items())]
    try:
        return bcc.BPF(text=expand_local_includes(source).encode(), cflags=cflags)
    except Exception as e:  # BCC raises bare Exception for compile and attach failures
        raise LoadError(f"loading bpf/{source} failed: {e}") from e
