"""`rst-tracer doctor`: is this host (or a given network namespace) exposed to the
incidents of docs/incidents.md, and will the tracer run here?

    kernel.py     check 1  window handling of the running kernel          (pure)
    conntrack.py  check 2  conntrack sysctls of the namespace             (pure)
    rules.py      checks 3, 4  NAT without --random-fully, INVALID not dropped, MASQUERADE
                  flushes; parsers of iptables-save and `nft -j` output   (pure)
    networkd.py   check 5  systemd-networkd DHCP without KeepConfiguration= (parsing pure)
    host.py       the reading: target namespace, sysctls, rule tools, setns()
Check 6 (probe backend) reuses tracer.probes.capabilities.
"""
from __future__ import annotations

from .conntrack import check_conntrack
from .findings import INFO, OK, RISK, Finding, exposed_incidents
from .kernel import check_kernel
from .networkd import check_networkd, load_networks
from .rules import check_rules

__all__ = ["Finding", "RISK", "INFO", "OK", "run", "format_text", "check_backend"]


def check_backend(caps) -> Finding:
    c = caps.to_dict() if hasattr(caps, "to_dict") else dict(caps)
    tps = ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in c.get("tracepoints", {}).items())
    headers = c.get("matching_headers") or ("none for this kernel; fallback: "
                                            + (", ".join(c.get("fallback_headers") or []) or "none"))
    detail = (f"kernel {c.get('kernel_release')}; BTF {'yes' if c.get('btf') else 'no: ' + c.get('btf_error', '')}; "
              f"tracepoints {tps}; kprobes {'yes' if c.get('kprobes') else 'no'} ({c.get('kprobes_why')}); "
              f"headers {headers}; privileged {'yes' if c.get('privileged') else 'no'}")
    backend, why = c.get("backend"), c.get("backend_why", "")
    if backend:
        fix = "" if c.get("privileged") else "run as root (or with CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN)"
        return Finding("probes.backend", None, OK, f"probe backend: {backend} ({why})", detail, fix)
    if "BTF" in why:
        fix = "boot a kernel built with CONFIG_DEBUG_INFO_BTF=y (Debian's kernels since bullseye are)"
    elif "headers" in why:
        fix = "apt-get install linux-headers-amd64 python3-bpfcc"
    else:
        fix = ""
    return Finding("probes.backend", None, RISK, f"no probe backend can run: {why}",
                   detail + " — `rst-tracer watch` cannot attach on this host", fix)


def run(netns=None, networkd_dirs=None, caps=None) -> dict:
    """The whole report as a dict (the JSON of `doctor --json`). Raises
    host.TargetError when `netns` names no network namespace."""
    from ..probes import capabilities
    from .host import read_namespace, resolve_target

    target = resolve_target(netns)
    caps = caps or capabilities.detect()
    state = read_namespace(target)
    be_liberal = (state.sysctls or {}).get("nf_conntrack_tcp_be_liberal")
    findings = [check_kernel(caps.kernel_release, caps.kernel_version)]
    findings += check_conntrack(state.sysctls, target.prefix, target.host)
    findings += check_rules(state.rules, be_liberal, caps.kernel_version, target.prefix)
    if target.host or networkd_dirs is not None:
        networks, dirs = load_networks(networkd_dirs)
        # on the host, only files whose [Match] Name= selects an interface that exists
        ifaces = state.interfaces if target.host else None
        findings += check_networkd(networks, dirs, ifaces)
    else:
        findings += check_networkd([], [], applicable=False,
                                   why_not=f"namespace {target.name or target.inode} is not the host's: "
                                           "systemd-networkd configures the host namespace only")
    findings.append(check_backend(caps))
    return {
        "capabilities": caps.to_dict(),
        "backend": caps.backend or None,
        "backend_why": caps.backend_why,
        "netns": target.to_dict(),
        "findings": [f.to_dict() for f in findings],
        "exposed_incidents": exposed_incidents(findings),
        "sources": state.rules.read,
    }


LABEL = {RISK: "RISK", INFO: "info", OK: "ok"}


def format_text(report: dict, verbose: bool = False) -> str:
    ns = report["netns"]
    lines = [f"rst-tracer doctor: namespace {ns['name'] or ns['path']} ({ns['inode']}), "
             f"kernel {report['capabilities']['kernel_release']}"]
    for f in report["findings"]:
        inc = f"#{f['incident']}" if f["incident"] else "- "
        line = f"{LABEL[f['severity']]:<4}  {inc}  {f['title']}"
        if f["fix"]:
            line += f" — fix: {f['fix']}"
        lines.append(line)
        if verbose and f["detail"]:
            lines.append(f"            {f['detail']}")
    exp = report["exposed_incidents"]
    risks = sum(1 for f in report["findings"] if f["severity"] == RISK)
    if risks:
        lines.append(f"{risks} risk(s)" + (f"; exposed to incident(s) {', '.join(map(str, exp))} "
                                          "(see docs/incidents.md)" if exp else ""))
    else:
        lines.append("no risk found")
    return "\n".join(lines)
