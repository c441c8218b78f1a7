#!/bin/bash
# provision.sh - install what rst-tracer needs on a Debian machine (bullseye, bookworm, trixie).
#
# One script, two callers:
#   * vagrant/Vagrantfile runs it as root inside a debian/*64 box;
#   * scripts/vm/build-image.sh runs it inside the debootstrap chroot of a test image
#     (with RST_PROVISION_CONTEXT=image and the python deps in RST_PY_DEPS).
# It is idempotent: running it again only installs what is missing.
#
# What it does:
#   1. apt packages: stock kernel + headers, BCC (python3-bpfcc), python3 + venv, the
#      network tools the tests and labs use (tshark without the setuid question);
#   2. a venv at $RST_VENV (default /opt/rst-tracer/venv) made with --system-site-packages
#      (BCC comes from python3-bpfcc; PyPI's "bcc" is an unrelated package), with the
#      python deps pip-installed: [project].dependencies + [project.optional-dependencies].test
#      of the repo's pyproject.toml, or a built-in list when no checkout is at hand.
#
# Env:
#   REPO                    checkout holding pyproject.toml (default: this script's ../)
#   RST_PY_DEPS             pip requirements, whitespace separated (overrides pyproject.toml)
#   RST_VENV                venv path (default /opt/rst-tracer/venv)
#   RST_PROVISION_CONTEXT   image | vagrant | host (default: vagrant if /vagrant exists, else host)
#
# Usage: provision.sh               provision this machine (as root)
#        provision.sh --print-deps  print the python deps it would install, one per line
set -euo pipefail

VENV=${RST_VENV:-/opt/rst-tracer/venv}
APT_PKGS=(
  linux-image-amd64 linux-headers-amd64
  python3 python3-bpfcc python3-venv python3-pip
  iproute2 iptables nftables conntrack iperf3 ethtool tcpdump tshark
  kmod procps rsyslog
)
# Used only when no pyproject.toml can be found (keep in step with pyproject.toml).
FALLBACK_PY_DEPS="click>=7.1 structlog>=20.1 msgpack>=1.0 pyroute2>=0.7 prometheus-client>=0.9 pytest>=7 hypothesis>=6"

log() { echo "provision: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

find_pyproject() {
  local d
  for d in "${REPO:-}" "$script_dir/.."; do
    [ -n "$d" ] && [ -f "$d/pyproject.toml" ] && { echo "$d/pyproject.toml"; return 0; }
  done
  return 1
}

# Python deps, one per line. Needs python3 only when a pyproject.toml is used.
py_deps() {
  if [ -n "${RST_PY_DEPS:-}" ]; then
    printf '%s\n' $RST_PY_DEPS
    return
  fi
  local pp
  if pp=$(find_pyproject) && command -v python3 >/dev/null; then
    python3 - "$pp" <<'PY'
import re, sys
text = open(sys.argv[1], encoding="utf-8").read()
try:
    import tomllib  # python >= 3.11
    project = tomllib.loads(text).get("project", {})
    deps = list(project.get("dependencies", []))
    deps += list(project.get("optional-dependencies", {}).get("test", []))
except ImportError:
    # python 3.9/3.10 (bullseye): a minimal reader for the two arrays we need.
    def section(name):
        m = re.search(r"^\[" + re.escape(name) + r"\][ \t]*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
        return re.sub(r"#[^\n]*", "", m.group(1)) if m else ""
    def array(body, key):
        m = re.search(r"^[ \t]*" + re.escape(key) + r"[ \t]*=[ \t]*\[(.*?)\]", body, re.M | re.S)
        return [a or b for a, b in re.findall(r'"([^"]*)"|\'([^\']*)\'', m.group(1))] if m else []
    deps = array(section("project"), "dependencies")
    deps += array(section("project.optional-dependencies"), "test")
print("\n".join(d.replace(" ", "") for d in deps))
PY
  else
    printf '%s\n' $FALLBACK_PY_DEPS
  fi
}

if [ "${1:-}" = "--print-deps" ]; then
  py_deps
  exit 0
fi
[ $# -eq 0 ] || die "usage: $0 [--print-deps]"
[ "$(id -u)" = 0 ] || die "must run as root"
[ -r /etc/debian_version ] || die "not a Debian system"

context=${RST_PROVISION_CONTEXT:-}
if [ -z "$context" ]; then
  if [ -d /vagrant ]; then context=vagrant; else context=host; fi
fi
. /etc/os-release
log "Debian ${VERSION_CODENAME:-?} (${VERSION_ID:-?}), context=$context"
# The image is also the local Vagrant box (scripts/vm/vagrant-box.sh), which boots on its own
# (Vagrant's public boxes have these): init, sshd and sudo for vagrant, rsync for the synced
# folder, dbus for hostnamectl.
[ "$context" != image ] || APT_PKGS+=(systemd-sysv dbus openssh-server sudo rsync)

export DEBIAN_FRONTEND=noninteractive
# tshark: answer "should non-superusers be able to capture packets?" with no, silently.
echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections

apt_updated=
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  apt-get update -q
  apt_updated=1
  # No recommends: they would add build-essential, firmware, GUI bits; nothing here needs them.
  apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  log "apt packages already installed"
fi

if [ "$context" != image ]; then
  # BCC compiles against the headers of the *running* kernel. linux-headers-amd64 follows
  # the newest kernel; get the running one's too when the archive still has them.
  running=$(uname -r)
  if [ ! -e "/lib/modules/$running/build" ]; then
    [ -n "$apt_updated" ] || apt-get update -q
    apt-get install -y -q --no-install-recommends "linux-headers-$running" ||
      log "WARNING: no headers for the running kernel $running: reboot into the newest kernel (vagrant reload)"
  fi
fi

# --- venv with the python deps -------------------------------------------------------
sys_ver=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ -x "$VENV/bin/python" ] &&
   [ "$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$sys_ver" ] &&
   grep -q '^include-system-site-packages *= *true' "$VENV/pyvenv.cfg" 2>/dev/null; then
  log "venv $VENV exists (python $sys_ver)"
else
  log "creating venv $VENV (python $sys_ver, --system-site-packages)"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv --system-site-packages "$VENV"
fi
mapfile -t deps < <(py_deps)
[ ${#deps[@]} -gt 0 ] || die "empty python deps list"
log "pip install ${deps[*]}"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${deps[@]}"

# Import check (BCC from the system, the rest from the venv).
mods=()
for d in "${deps[@]}"; do
  name=${d%%[<>=!~;\[ ]*}
  case $name in
    prometheus-client|prometheus_client) mods+=(prometheus_client) ;;
    pyroute2|click|structlog|msgpack|pytest|hypothesis) mods+=("$name") ;;
  esac
done
"$VENV/bin/python" - "${mods[@]}" <<'PY'
import importlib, sys
import bcc
for m in sys.argv[1:]:
    importlib.import_module(m)
print("provision: venv imports ok: bcc", *sys.argv[1:], file=sys.stderr)
PY

if [ "$context" = vagrant ]; then
  # Same path as in the qemu test VMs (scripts/vm/run-in-vm.sh).
  if [ -f /vagrant/pyproject.toml ] && [ ! -e /work/rst-tracer ]; then
    mkdir -p /work
    ln -s /vagrant /work/rst-tracer
  fi
  # `sudo rst-tracer ...` runs the synced checkout with this venv; the checkout's scripts
  # (setup.sh, demo.sh) find the venv in RST_TRACER_VENV: set by pam_env for ssh logins from
  # /etc/environment, and kept by sudo (Debian's sudo does not read /etc/environment).
  cat >/usr/local/bin/rst-tracer <<WRAPPER
#!/bin/sh
# installed by vagrant/provision.sh: the rst-tracer CLI of the checkout in /work/rst-tracer
PYTHONPATH=/work/rst-tracer exec $VENV/bin/python -m tracer "\$@"
WRAPPER
  chmod 755 /usr/local/bin/rst-tracer
  grep -q '^RST_TRACER_VENV=' /etc/environment 2>/dev/null || echo "RST_TRACER_VENV=$VENV" >>/etc/environment
  echo 'Defaults env_keep += "RST_TRACER_VENV"' >/etc/sudoers.d/rst-tracer
  chmod 440 /etc/sudoers.d/rst-tracer
  newest=$(ls -1v /boot/vmlinuz-* 2>/dev/null | tail -n1 | sed 's|.*/vmlinuz-||')
  if [ -n "$newest" ] && [ "$newest" != "$(uname -r)" ]; then
    log "NOTE: running kernel $(uname -r), newest installed $newest: 'vagrant reload' to boot it"
  fi
  cat >&2 <<MSG
provision: done. The checkout is at /work/rst-tracer (-> /vagrant). Try:
  vagrant ssh -c 'sudo rst-tracer watch'                              (one terminal)
  vagrant ssh -c 'sudo /vagrant/scripts/demo.sh invalid-window'       (another)
  vagrant ssh -c 'cd /work/rst-tracer && sudo $VENV/bin/python -m pytest tests/integration/test_kprobe.py'
MSG
else
  log "done (venv: $VENV)"
fi
