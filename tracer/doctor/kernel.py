"""Check 1: how the running kernel's conntrack treats TCP segments outside the window."""
from __future__ import annotations

from .findings import INFO, Finding

# "netfilter: conntrack: ignore overly delayed tcp packets" (6.1): segments under the
# window's lower bound are IGNOREd (still de-NATed, no RST); above the upper bound stay INVALID.
IGNORE_DELAYED = (6, 1)


def below_window_is_invalid(version: tuple) -> bool:
    return tuple(version[:2]) < IGNORE_DELAYED


def check_kernel(release: str, version: tuple) -> Finding:
    v = ".".join(map(str, version))
    if below_window_is_invalid(version):
        return Finding(
            "kernel.invalid_window", 1, INFO,
            f"kernel {v}: segments far below AND above the TCP window are INVALID",
            f"kernel {release} (< 6.1) lacks \"netfilter: conntrack: ignore overly delayed tcp "
            f"packets\": a late retransmission or duplicate ACK far behind the stream, as well as a "
            f"segment beyond the window, is marked INVALID, escapes NAT and draws a RST from this host "
            f"where INVALID packets are not dropped (incident 1: larger exposure than on >= 6.1)",
            "")
    return Finding(
        "kernel.invalid_window", 1, INFO,
        f"kernel {v}: only segments above the TCP window are INVALID",
        f"kernel {release} (>= 6.1) IGNOREs segments under the window's lower bound (they are "
        f"still de-NATed, no RST); segments or ACKs over the upper bound are still INVALID, escape "
        f"NAT and draw a RST where INVALID packets are not dropped (incident 1)",
        "")
