#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine of our kind (run as root):
# OS packages (BCC, lab tools), the header fallback tree, and a venv in .venv that sees
# Debian's python3-bpfcc. Re-running only installs what is missing.
# Inside the bundled VM (no network) RST_TRACER_VENV names a venv provisioned in the image.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS=(python3-bpfcc python3-venv python3-pip linux-headers-amd64 iproute2 iptables
          nftables conntrack iperf3 ethtool tcpdump tshark rsyslog)
# what only the side-by-side benchmark runs (bench/compare.py asks with --bench): not in the
# VM images, which have no network
if [ "${1:-}" = "--bench" ]; then
    APT_PKGS+=(nginx-light wrk bpftrace gcc libc6-dev)
fi

# the Docker lab (tests/integration/test_docker.py: its own dockerd, confined to a lab
# namespace, and a busybox image): not in the VM images (no network; the kprobe suite
# does not use it)
[ -n "${RST_TRACER_VENV:-}" ] || APT_PKGS+=(docker.io busybox-static)

log() { printf '[setup] %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
    echo "setup: must run as root (loads BPF programs, creates network namespaces)" >&2
    exit 1
fi

missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing OS packages: ${missing[*]}"
    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    # docker.io's own daemon must not start in the root namespace (a bridge, iptables rules):
    # the lab runs its own. Services stay off during the install, and off after it.
    no_start=""
    if [[ " ${missing[*]} " == *" docker.io "* ]] && [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
        no_start=1
    fi
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    if [[ " ${missing[*]} " == *" docker.io "* ]]; then
        [ -z "$no_start" ] || rm -f /usr/sbin/policy-rc.d
        if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
            systemctl disable --now docker.socket docker.service containerd.service >/dev/null 2>&1 || true
        fi
    fi
fi

if [ -n "${RST_TRACER_VENV:-}" ]; then
    VENV=$RST_TRACER_VENV
else
    VENV=.venv
    stamp="$VENV/.rst-tracer-deps"
    want=$(sha256sum pyproject.toml | cut -c1-16)
    if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        log "creating venv $VENV (system site packages: Debian's BCC)"
        /usr/bin/python3 -m venv --system-site-packages "$VENV"
        "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test]'
        echo "$want" > "$stamp"
    fi
fi
"$VENV/bin/python" -c 'import bcc, click, structlog, msgpack, pyroute2' || {
    echo "setup: the venv $VENV cannot import its dependencies" >&2; exit 1; }
echo "$VENV"
