"""Kprobe backend (stock distro kernels): kprobes on the TCP reset and conntrack/NAT
functions give the exact evidence — conntrack's INVALID reason and window, the NAT binding
and its rule flags, the entry a clashing SYN lost to, who deleted an entry and why — in
the same records as the tracepoint backend (bpf/kprobes.c).

Per kernel, resolved at start: which functions exist (kallsyms), their signatures (BTF
FUNC records, of vmlinux or of the module once loaded; the kernel version otherwise),
whether kfree_skb carries a drop reason. Netfilter modules load lazily on stock kernels:
probes on functions that are not there yet are retried from refresh() when the module list
changes. Every probe, attached or not, is listed with the reason by probe_report().
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from ..kallsyms import Kallsyms, loaded_modules
from .base import COMMON_PROBES, WANTED_DROP_REASONS, Backend
from .btf import BTF, BTFError
from .capabilities import Capabilities, _kernel_config
from .loader import LoadError, kernel_defines

# define name -> (struct, member path), all from the running kernel's BTF
KPROBE_OFFSETS = {
    "OFF_TUPLE_DST_PROTONUM": ("nf_conntrack_tuple", "dst.protonum"),
    "OFF_TUPLE_DST_DIR": ("nf_conntrack_tuple", "dst.dir"),
    "OFF_TUPLE_SRC_L3NUM": ("nf_conntrack_tuple", "src.l3num"),
    "OFF_NF_CONN_TIMEOUT": ("nf_conn", "timeout"),
    "OFF_NF_CONN_CT_NET": ("nf_conn", "ct_net"),
    "OFF_NF_CONN_TCP_SEEN": ("nf_conn", "proto.tcp.seen"),
    "OFF_NF_CONN_TCP_STATE": ("nf_conn", "proto.tcp.state"),
    "OFF_TCP_STATE_TD_END": ("ip_ct_tcp_state", "td_end"),
    "OFF_TCP_STATE_TD_MAXEND": ("ip_ct_tcp_state", "td_maxend"),
    "OFF_TCP_STATE_TD_MAXWIN": ("ip_ct_tcp_state", "td_maxwin"),
    "OFF_TCP_STATE_TD_SCALE": ("ip_ct_tcp_state", "td_scale"),
    "OFF_VA_FORMAT_FMT": ("va_format", "fmt"),
    "OFF_VA_FORMAT_VA": ("va_format", "va"),
    "OFF_IN_IFADDR_IFA_ADDRESS": ("in_ifaddr", "ifa_address"),
    "OFF_IN_IFADDR_IFA_DEV": ("in_ifaddr", "ifa_dev"),
    "OFF_IN_DEVICE_DEV": ("in_device", "dev"),
    "OFF_INET6_IFADDR_ADDR": ("inet6_ifaddr", "addr"),
    "OFF_INET6_IFADDR_IDEV": ("inet6_ifaddr", "idev"),
    "OFF_INET6_DEV_DEV": ("inet6_dev", "dev"),
    "OFF_NET_DEVICE_NAME": ("net_device", "name"),
    "OFF_NETDEV_NOTIFIER_INFO_DEV": ("netdev_notifier_info", "dev"),
}
KPROBE_SIZES = {"SIZEOF_TCP_STATE": "ip_ct_tcp_state"}
CFG_LOG_INVALID_FMT_ARG, CFG_DELETE_AFTER_DYING = 0, 1
# kretprobe instances per probe: the walks they pair with are rare, a few suffice
MAXACTIVE = 64


@dataclass
class Probe:
    """One attachment. `target`: function or tracepoint; `fn`: the BPF function."""
    name: str
    kind: str                     # kprobe | kretprobe | raw_tracepoint
    target: str
    fn: str
    module: str = ""              # module that holds the function ("" = the kernel itself)
    what: str = ""                # what it gives
    attached: bool = False
    why: str = ""
    prepare: object = None        # callable(probe) -> "" or why it cannot attach (yet)
    candidates: tuple = ()        # symbols to probe instead of `target`, the first present wins
    note: str = ""                # how it was resolved on this kernel

    def report(self) -> dict:
        return {"probe": self.name, "attached": self.attached, "why": self.why}


def kernel_hz(release: str) -> int:
    try:
        return int(_kernel_config(release).get("CONFIG_HZ", "250"))
    except ValueError:
        return 250


def tracepoint_exists(btf: BTF, caps: Capabilities, name: str) -> bool:
    try:
        btf.tracepoint_arity(name)
        return True
    except BTFError:
        return bool(caps.tracepoints.get(name))


def _nth(arg: int) -> str:
    return f"argument {arg}" if arg else "none"


class KprobeBackend(Backend):
    name = "kprobe"
    source = "kprobes.c"

    def __init__(self, caps: Capabilities, btf: BTF):
        super().__init__(caps, btf)
        self.resolved: dict = {}      # the defines this kernel resolved to
        self._probes: list = []
        self._modules = None
        self._module_btf: dict = {}
        self._kallsyms = Kallsyms.current()

    # -- per-kernel resolution ---------------------------------------------------------
    def _params(self, func: str, module: str = ""):
        """Parameter names of `func` from BTF (the module's split BTF when it has one)."""
        params = self.btf.func_params(func)
        if params is None and module:
            mod = self._module_btf.get(module)
            if mod is None and os.path.exists(f"/sys/kernel/btf/{module}"):
                try:
                    mod = self._module_btf[module] = BTF.of_module(module, self.btf.parsed())
                except BTFError:
                    mod = None
            if mod is not None:
                params = mod.func_params(func)
        return params

    def _reason_arg(self, func: str, since: tuple) -> tuple:
        """Which argument (1-based, 0: none) carries enum sk_rst_reason. From BTF's parameter
        names where it has them: the compiler may drop an argument from the real signature
        (trixie's tcp_send_active_reset is (sk, reason), priority gone), so position 3 of the
        source is not a safe guess. Without BTF: argument 3 from 6.10 on."""
        params = self._params(func)
        if params is not None:
            arg = params.index("reason") + 1 if "reason" in params else 0
            return arg, f"BTF: {func}({', '.join(params)})"
        arg = 3 if self.caps.kernel_version >= since else 0
        return arg, f"no BTF record of {func}: by kernel version ({'>=' if arg else '<'} " \
                    f"{'.'.join(map(str, since))})"

    def defines(self) -> dict:
        d = kernel_defines(self.btf)
        missing = []
        for name, (s, m) in KPROBE_OFFSETS.items():
            try:
                d[name] = self.btf.offsetof(s, m)
            except BTFError:
                missing.append(f"{s}.{m}")
                d[name] = 0
        for name, s in KPROBE_SIZES.items():
            try:
                d[name] = self.btf.sizeof(s)
            except BTFError:
                missing.append(s)
                d[name] = 0
        self._missing_offsets = missing
        arg, self._send_reset_why = self._reason_arg("tcp_v4_send_reset", (6, 10, 0))
        d["SEND_RESET_REASON_ARG"] = arg
        arg6, why6 = self._reason_arg("tcp_v6_send_reset", (6, 10, 0))
        if arg6 != arg:
            raise LoadError(f"tcp_v4_send_reset and tcp_v6_send_reset disagree on the reason argument: "
                            f"{self._send_reset_why}; {why6}")
        self._send_reset_why += "; " + why6
        d["ACTIVE_RESET_REASON_ARG"], self._active_reset_why = \
            self._reason_arg("tcp_send_active_reset", (6, 10, 0))
        try:
            kfree_arity = self.btf.tracepoint_arity("kfree_skb")
        except BTFError:
            kfree_arity = 3 if self.caps.kernel_version >= (5, 17, 0) else 2
        d["KFREE_SKB_HAS_REASON"] = int(kfree_arity >= 3 and self.btf.has_enum("skb_drop_reason"))
        d["KERNEL_HZ"] = kernel_hz(self.caps.kernel_release)
        self.resolved = d
        return d

    def _needs_offsets(self, *structs) -> str:
        lacking = [m for m in getattr(self, "_missing_offsets", []) if m.split(".")[0] in structs]
        return "kernel BTF lacks " + ", ".join(lacking) if lacking else ""

    def _prepare_ct_delete(self, p: Probe) -> str:
        why = self._needs_offsets("nf_conn", "nf_conntrack_tuple")
        if why:
            return why
        split = p.target != "nf_ct_delete"
        self.bpf["config"][ctypes.c_int(CFG_DELETE_AFTER_DYING)] = ctypes.c_uint32(int(split))
        p.note = (f"the compiler split nf_ct_delete on this kernel: its body {p.target} (reached by every "
                  f"deletion, after IPS_DYING is set) is probed") if split else ""
        return ""

    def _prepare_log_invalid(self, p: Probe) -> str:
        why = self._needs_offsets("nf_conn", "ip_ct_tcp_state", "va_format", "nf_conntrack_tuple")
        if why:
            return why
        params = self._params("nf_ct_l4proto_log_invalid", "nf_conntrack")
        if params is not None and "fmt" in params:
            arg = params.index("fmt") + 1
            src = f"BTF: ({', '.join(params)}, ...)"
        else:
            arg = 4 if self.caps.kernel_version >= (5, 14, 0) else 3
            src = f"no BTF record: kernel {'>=' if arg == 4 else '<'} 5.14"
        if arg not in (3, 4):
            return f"unexpected signature of nf_ct_l4proto_log_invalid: {params}"
        self.bpf["config"][ctypes.c_int(CFG_LOG_INVALID_FMT_ARG)] = ctypes.c_uint32(arg)
        p.note = f"format is argument {arg} ({src})"
        return ""

    def _probe_list(self) -> list:
        k = self.resolved
        rst = "resets sent (the segment that drew them)"
        probes = [
            Probe("kprobe:tcp_v4_send_reset", "kprobe", "tcp_v4_send_reset", "kp_tcp_v4_send_reset",
                  what=rst),
            Probe("kprobe:tcp_v6_send_reset", "kprobe", "tcp_v6_send_reset", "kp_tcp_v6_send_reset",
                  what=rst),
            Probe("kprobe:tcp_send_active_reset", "kprobe", "tcp_send_active_reset",
                  "kp_tcp_send_active_reset", what="resets of application aborts"),
        ]
        if tracepoint_exists(self.btf, self.caps, "tcp_receive_reset"):
            probes.append(Probe("tcp:tcp_receive_reset", "raw_tracepoint", "tcp_receive_reset",
                                "tp_tcp_receive_reset", what="resets received"))
        else:
            probes.append(Probe("kprobe:tcp_reset", "kprobe", "tcp_reset", "kp_tcp_reset",
                                what="resets received (no tcp_receive_reset tracepoint)"))
        probes.append(Probe("skb:kfree_skb", "raw_tracepoint", "kfree_skb", "tp_kfree_skb",
                            what="drops: " + ("reasons " + ", ".join(WANTED_DROP_REASONS)
                                              if k["KFREE_SKB_HAS_REASON"] else
                                              "no drop reason on this kernel: packets freed in "
                                              "nf_hook_slow (netfilter drops) only; listen "
                                              "overflows are not seen")))
        ct, nat = "nf_conntrack", "nf_nat"
        tuple_offsets = lambda p: self._needs_offsets("nf_conn", "nf_conntrack_tuple")  # noqa: E731
        masq_offsets = lambda p: self._needs_offsets("net_device", "in_ifaddr", "in_device",  # noqa: E731
                                                     "inet6_ifaddr", "inet6_dev", "netdev_notifier_info")
        probes += [
            Probe("kprobe:nf_ct_l4proto_log_invalid", "kprobe", "nf_ct_l4proto_log_invalid",
                  "kp_log_invalid", ct, "conntrack's INVALID/IGNORE reason and window",
                  prepare=self._prepare_log_invalid),
            Probe("kprobe:nf_nat_setup_info", "kprobe", "nf_nat_setup_info", "kp_nat_setup_info", nat,
                  "NAT range flags of new SNAT bindings", prepare=tuple_offsets),
            Probe("kprobe:__nf_conntrack_confirm", "kprobe", "__nf_conntrack_confirm",
                  "kp_conntrack_confirm", ct, "the tuple SNAT chose, at confirm", prepare=tuple_offsets),
            Probe("kprobe:nf_ct_resolve_clash", "kprobe", "nf_ct_resolve_clash", "kp_resolve_clash", ct,
                  "the entry a clashing SYN lost to", prepare=tuple_offsets),
            Probe("kprobe:nf_ct_delete", "kprobe", "nf_ct_delete", "kp_ct_delete", ct,
                  "deletions of NATed entries, with the reason", prepare=self._prepare_ct_delete,
                  candidates=("nf_ct_delete.part.0", "nf_ct_delete")),
            Probe("kprobe:early_drop", "kprobe", "early_drop", "kp_early_drop", ct,
                  "deletions by early_drop (table full)"),
            Probe("kretprobe:early_drop", "kretprobe", "early_drop", "kr_early_drop", ct,
                  "end of early_drop"),
            Probe("kprobe:masq_inet_event", "kprobe", "masq_inet_event", "kp_masq_inet_event", nat,
                  "masquerade flush on IPv4 address removal", prepare=masq_offsets),
            Probe("kprobe:masq_inet6_event", "kprobe", "masq_inet6_event", "kp_masq_inet6_event", nat,
                  "masquerade flush on IPv6 address removal", prepare=masq_offsets),
            Probe("kprobe:masq_device_event", "kprobe", "masq_device_event", "kp_masq_device_event", nat,
                  "masquerade flush on device down", prepare=masq_offsets),
            Probe("kprobe:iterate_cleanup_work", "kprobe", "iterate_cleanup_work", "kp_masq_walk_begin",
                  nat, "deferred masquerade walk"),
        ]
        for fn in ("masq_inet_event", "masq_inet6_event", "masq_device_event", "iterate_cleanup_work"):
            probes.append(Probe(f"kretprobe:{fn}", "kretprobe", fn, "kr_masq_walk_end", nat,
                                "end of a masquerade walk"))
        return probes

    # -- life cycle ------------------------------------------------------------------------
    def attach_probes(self) -> None:
        self._probes = self._probe_list()
        self._kallsyms = Kallsyms.current()
        if self.resolved["KFREE_SKB_HAS_REASON"]:
            self.filter_drop_reasons()
        else:
            start, end = self._kallsyms.address("nf_hook_slow"), self._kallsyms.end("nf_hook_slow")
            table = self.bpf["nf_hook_slow_range"]
            table[ctypes.c_int(0)] = ctypes.c_uint64(start)
            table[ctypes.c_int(1)] = ctypes.c_uint64(end)
            if not start:
                kfree = next(p for p in self._probes if p.target == "kfree_skb")
                kfree.why = "no nf_hook_slow in kallsyms: no drop would pass the filter"
        self._modules = loaded_modules()
        self._attach_pending()
        if not any(p.attached for p in self._probes):
            raise LoadError("kprobe backend: no probe could be attached: " +
                            "; ".join(f"{p.name}: {p.why}" for p in self._probes))

    def _attach_pending(self) -> int:
        attached = 0
        for p in self._probes:
            if p.attached:
                continue
            if p.candidates:
                p.target = next((c for c in p.candidates if c in self._kallsyms), p.candidates[-1])
            if p.kind != "raw_tracepoint" and p.target not in self._kallsyms:
                p.why = (f"{p.target} not in kallsyms: module {p.module} not loaded yet (retried when it loads)"
                         if p.module and p.module not in (self._modules or ()) else
                         f"{p.target} not in kallsyms (inlined or absent on {self.caps.kernel_release})")
                continue
            if p.prepare is not None:
                why = p.prepare(p)
                if why:
                    p.why = why
                    continue
            try:
                if p.kind == "kprobe":
                    self.bpf.attach_kprobe(event=p.target.encode(), fn_name=p.fn.encode())
                elif p.kind == "kretprobe":
                    self.bpf.attach_kretprobe(event=p.target.encode(), fn_name=p.fn.encode(), maxactive=MAXACTIVE)
                else:
                    self.bpf.attach_raw_tracepoint(tp=p.target.encode(), fn_name=p.fn.encode())
            except Exception as e:  # BCC raises bare Exception on attach failures
                p.why = f"attach failed: {e}"
                continue
            p.attached = True
            p.why = self._attached_why(p)
            attached += 1
        return attached

    def _attached_why(self, p: Probe) -> str:
        where = f"{p.kind} on {p.target}" + (f" [{p.module}]" if p.module else "")
        extra = ""
        if p.target in ("tcp_v4_send_reset", "tcp_v6_send_reset"):
            extra = "; reason argument: " + _nth(self.resolved["SEND_RESET_REASON_ARG"]) + \
                f" ({self._send_reset_why})"
        elif p.target == "tcp_send_active_reset":
            extra = "; reason argument: " + _nth(self.resolved["ACTIVE_RESET_REASON_ARG"]) + \
                f" ({self._active_reset_why})"
        if p.note:
            extra += "; " + p.note
        return f"{where}: {p.what}{extra}"

    def refresh(self) -> None:
        """Attach probes of modules loaded since the last look (cheap when nothing changed:
        one read of /proc/modules)."""
        if self.bpf is None or all(p.attached or not p.module for p in self._probes):
            return
        modules = loaded_modules()
        if modules == self._modules:
            return
        self._modules = modules
        self._kallsyms = Kallsyms.current()
        self._attach_pending()

    def probes(self) -> list:
        """Names of the attached probes."""
        return [p.name for p in self._probes if p.attached] + COMMON_PROBES

    def probe_report(self) -> list:
        """Every probe this kernel was considered for: {probe, attached, why}."""
        return [p.report() for p in self._probes]
