"""Check 2: conntrack sysctls of a namespace (pure: takes the values read from
/proc/sys/net/netfilter inside that namespace, or None when conntrack is not loaded)."""
from __future__ import annotations

from typing import Optional

from .findings import INFO, OK, RISK, Finding

USAGE_RISK = 0.80                 # table usage above which new flows are about to be dropped
ESTABLISHED_MIN = 3600            # idle connections (Redis, DB pools) outlive shorter timeouts
ESTABLISHED_DEFAULT = 432000      # the kernel's default (5 days)
TCP_KNOBS = ("nf_conntrack_tcp_be_liberal", "nf_conntrack_tcp_loose", "nf_conntrack_log_invalid",
             "nf_conntrack_tcp_ignore_invalid_rst", "nf_conntrack_tcp_max_retrans")


def check_conntrack(sysctls: Optional[dict], prefix: str = "", host: bool = True) -> list:
    """Findings for the conntrack table and TCP tracking settings of one namespace.
    `prefix` runs a command in that namespace (e.g. "ip netns exec NAME "); `host` is
    whether the namespace is the host's (nf_conntrack_max can only be set there)."""
    if not sysctls or "nf_conntrack_max" not in sysctls:
        return [Finding("conntrack.not_loaded", None, OK, "conntrack not in use",
                        "no /proc/sys/net/netfilter/nf_conntrack_max: the nf_conntrack module is not "
                        "loaded, so nothing is tracked or NATed here and none of the incidents can occur",
                        "")]
    out = []
    count, cmax = sysctls.get("nf_conntrack_count"), sysctls["nf_conntrack_max"]
    if isinstance(count, int) and isinstance(cmax, int) and cmax > 0:
        pct = 100.0 * count / cmax
        scope = ("" if host else " (count of this namespace only; the table and its maximum are "
                 "shared by every namespace of the host)")
        new_max = max(cmax * 2, 262144)
        fix = (f"sysctl -w net.netfilter.nf_conntrack_max={new_max} && echo "
               f"net.netfilter.nf_conntrack_max={new_max} > /etc/sysctl.d/90-rst-tracer-conntrack.conf"
               + ("" if host else "   # in the host namespace"))
        detail = f"nf_conntrack_count={count} of nf_conntrack_max={cmax} ({pct:.1f}%){scope}"
        if pct > USAGE_RISK * 100:
            out.append(Finding("conntrack.table_usage", None, RISK,
                               f"conntrack table {pct:.0f}% full",
                               detail + f"; above {USAGE_RISK:.0%} new flows are about to be dropped "
                                        "and unassured entries evicted", fix))
        else:
            out.append(Finding("conntrack.table_usage", None, OK, f"conntrack table {pct:.1f}% full",
                               detail, ""))
    est = sysctls.get("nf_conntrack_tcp_timeout_established")
    if isinstance(est, int):
        detail = (f"nf_conntrack_tcp_timeout_established={est} s ({est / 3600:.1f} h)")
        if est < ESTABLISHED_MIN:
            out.append(Finding(
                "conntrack.timeout_established", None, RISK,
                f"established TCP entries expire after {est} s idle",
                detail + f", below {ESTABLISHED_MIN} s: idle NATed connections (Redis, database "
                         "pools, keepalive every few minutes) lose their entry; their next packet is not "
                         "de-NATed and draws a RST",
                f"{prefix}sysctl -w net.netfilter.nf_conntrack_tcp_timeout_established={ESTABLISHED_DEFAULT}"))
        else:
            out.append(Finding("conntrack.timeout_established", None, OK,
                               f"established TCP entries live {est} s idle", detail, ""))
    knobs = {k: sysctls[k] for k in TCP_KNOBS if k in sysctls}
    if knobs:
        short = " ".join(f"{k.replace('nf_conntrack_', '').replace('tcp_', '')}={v}" for k, v in knobs.items())
        detail = ", ".join(f"{k}={v}" for k, v in knobs.items())
        notes = []
        if knobs.get("nf_conntrack_tcp_be_liberal") == 1:
            notes.append("be_liberal=1: out-of-window segments are not marked INVALID (incident 1 cannot occur)")
        if knobs.get("nf_conntrack_tcp_loose") == 0:
            notes.append("loose=0: connections already open when tracking began are not picked up")
        fix = ""
        if knobs.get("nf_conntrack_log_invalid", 0) == 0:
            notes.append("log_invalid=0: the kernel does not log why segments are INVALID "
                         "(the fix logs TCP ones to the kernel log, for diagnosis)")
            fix = f"{prefix}sysctl -w net.netfilter.nf_conntrack_log_invalid=6"
        out.append(Finding("conntrack.tcp_settings", None, INFO, f"conntrack TCP: {short}",
                           detail + ("; " + "; ".join(notes) if notes else ""), fix))
    timeouts = {k: v for k, v in sorted(sysctls.items())
                if k.startswith("nf_conntrack_tcp_timeout_") and k != "nf_conntrack_tcp_timeout_established"}
    if timeouts:
        out.append(Finding("conntrack.timeouts", None, INFO, "conntrack TCP timeouts",
                           ", ".join(f"{k.replace('nf_conntrack_tcp_timeout_', '')}={v}s"
                                     for k, v in timeouts.items()), ""))
    return out
