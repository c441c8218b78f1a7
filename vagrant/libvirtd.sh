#!/bin/bash
# vagrant/libvirtd.sh start | stop [--force] | status
#
# The libvirtd the bundled VM runs under, confined so that nothing is added to the host's
# network namespace or its /etc, /var/lib, /run:
#   * its own network namespace ($RST_LIBVIRT_NETNS, local.env): the bridge, dnsmasq and the
#     iptables rules of the network vagrant-libvirt creates, and every qemu, live there. The
#     host reaches the guest only through `ip netns exec` (the Vagrantfile's ssh ProxyCommand);
#   * its own mount namespace, where /etc/libvirt, /var/lib/libvirt, /var/log/libvirt,
#     /var/cache/libvirt (from $RST_LIBVIRT_STATE) and /run/libvirt (from $RST_LIBVIRT_RUN) are
#     bind mounts: our qemu.conf (qemu as root, no virtlogd, no cgroups, no security driver),
#     and domains, networks, the storage pool and logs under /var/cache/rst-tracer;
#   * a pid file ($RST_LIBVIRT_RUN/libvirtd.pid), by which it is stopped.
# Clients connect with qemu:///system?socket=$RST_LIBVIRT_RUN/libvirt/libvirt-sock.
#
# start   start it unless it runs (the Vagrantfile's trigger before up/reload/resume/provision)
# stop    when no domain is defined (the trigger after destroy): stop the daemon, remove the
#         namespace, the pool's volumes and every definition; otherwise leave it running
# stop --force   the same, destroying and undefining the domains first (and killing anything
#         left in the namespace): the cleanup of tests/integration/test_vagrant.py
# status  exit 0 if it runs (prints pid, netns, URI), 3 if not
#
# Needs root. libvirtd itself is installed by scripts/vm/vagrant-box.sh.
set -euo pipefail

log() { echo "libvirtd.sh: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
usage() { echo "usage: $0 start | stop [--force] | status" >&2; exit 2; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=local.env
. "$HERE/local.env"
NS=$RST_LIBVIRT_NETNS
RUN=$RST_LIBVIRT_RUN
STATE=$RST_LIBVIRT_STATE
PIDFILE=$RUN/libvirtd.pid
SOCK=$RUN/libvirt/libvirt-sock
URI="qemu:///system?socket=$SOCK"
CREATED_MOUNTPOINTS=$RUN/created-mountpoints
QEMU_ID=64055 # uid/gid of libvirt-qemu in the daemon's private passwd (qemu itself runs as root)
# what libvirtd sees where (source:target bind mounts)
BINDS=("$STATE/etc:/etc/libvirt" "$STATE/lib:/var/lib/libvirt" "$STATE/log:/var/log/libvirt"
       "$STATE/cache:/var/cache/libvirt" "$RUN/libvirt:/run/libvirt")

running_pid() {
  local pid
  pid=$(cat "$PIDFILE" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$(command -v libvirtd)" ] || return 1
  echo "$pid"
}

virsh_() { virsh -q -c "$URI" "$@"; }

write_config() {
  mkdir -p "$STATE"/{etc,lib,log,cache}
  # Only root may connect (socket mode), so no polkit; logs to the state dir.
  cat >"$STATE/etc/libvirtd.conf" <<'CONF'
unix_sock_rw_perms = "0700"
unix_sock_ro_perms = "0700"
unix_sock_admin_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
CONF
  # qemu runs as root like scripts/vm/run-in-vm.sh's (it reads the box's disk and kernel under
  # /var/cache/rst-tracer); no virtlogd daemon (guest logs go straight to files), no cgroup or
  # /dev namespace set-up (this host has no systemd; nothing to isolate from but ourselves).
  cat >"$STATE/etc/qemu.conf" <<'CONF'
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "file"
cgroup_controllers = [ ]
namespaces = [ ]
CONF
}

start() {
  local pid
  if pid=$(running_pid); then
    log "running (pid $pid, netns $NS)"
    return 0
  fi
  command -v libvirtd >/dev/null && command -v virsh >/dev/null ||
    die "libvirtd/virsh not installed: run scripts/vm/vagrant-box.sh SUITE first"
  mkdir -p "$RUN/libvirt"
  exec 8>"$RUN/.lock"
  flock 8
  if pid=$(running_pid); then
    log "running (pid $pid, netns $NS)"
    return 0
  fi
  # a start that fails half way leaves nothing behind
  trap 'rc=$?; [ $rc -eq 0 ] || { log "start failed: cleaning up"; stop --force; }' EXIT
  [ -e "/run/netns/$NS" ] || ip netns add "$NS"
  ip -n "$NS" link set lo up
  rm -rf "$STATE/log" # the logs (daemon, qemu, guest console) are of this daemon's life
  write_config
  # The qemu driver resolves its built-in user and group (libvirt-qemu, which Debian's
  # libvirt-daemon-system would add to the host) even when qemu.conf names root: the daemon
  # gets copies of passwd and group with them, instead of the host getting a new user.
  cp /etc/passwd "$RUN/passwd"
  cp /etc/group "$RUN/group"
  getent passwd libvirt-qemu >/dev/null ||
    echo "libvirt-qemu:x:$QEMU_ID:$QEMU_ID:libvirt qemu (confined libvirtd only):/var/lib/libvirt:/usr/sbin/nologin" >>"$RUN/passwd"
  getent group libvirt-qemu >/dev/null || echo "libvirt-qemu:x:$QEMU_ID:" >>"$RUN/group"
  local b target binds=("$RUN/passwd" /etc/passwd "$RUN/group" /etc/group)
  for b in "${BINDS[@]}"; do
    target=${b#*:}
    # bind mounts need a mount point; the ones we create here are removed by stop
    if [ ! -d "$target" ]; then
      mkdir -p "$target"
      echo "$target" >>"$CREATED_MOUNTPOINTS"
    fi
    binds+=("${b%%:*}" "$target")
  done
  # ip netns exec: the namespace; unshare: a private mount namespace for the bind mounts
  # (they vanish with the daemon). --daemon returns once the daemon listens.
  ip netns exec "$NS" unshare --mount --propagation private -- \
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
    /bin/sh -c 'pidfile=$1; shift
      while [ $# -gt 0 ]; do mount --bind "$1" "$2"; shift 2; done
      exec libvirtd --daemon --pid-file "$pidfile"' sh "$PIDFILE" "${binds[@]}"
  pid=$(running_pid) || die "libvirtd did not start (see $STATE/log/libvirtd.log)"
  virsh_ version >/dev/null || die "libvirtd (pid $pid) does not answer on $SOCK"
  trap - EXIT
  log "started (pid $pid, netns $NS, $URI)"
}

# Every definition, volume and network of the confined daemon, then the daemon.
remove_everything() {
  local d p v n
  for d in $(virsh_ list --all --name); do
    virsh_ destroy "$d" >/dev/null 2>&1 || true
    virsh_ undefine --remove-all-storage "$d" >/dev/null || virsh_ undefine "$d" >/dev/null || true
  done
  for p in $(virsh_ pool-list --all --name); do
    virsh_ pool-refresh "$p" >/dev/null 2>&1 || true
    for v in $(virsh_ vol-list "$p" | awk '{print $1}'); do
      virsh_ vol-delete --pool "$p" "$v" >/dev/null || true
    done
    virsh_ pool-destroy "$p" >/dev/null 2>&1 || true
    virsh_ pool-undefine "$p" >/dev/null || true
  done
  for n in $(virsh_ net-list --all --name); do
    virsh_ net-destroy "$n" >/dev/null 2>&1 || true
    virsh_ net-undefine "$n" >/dev/null || true
  done
}

stop() {
  local force=${1:-} pid domains i
  if pid=$(running_pid); then
    domains=$(virsh_ list --all --name | xargs)
    if [ -n "$domains" ] && [ "$force" != --force ]; then
      log "domains still defined ($domains): left running (pid $pid)"
      return 0
    fi
    remove_everything
    kill -TERM "$pid"
    for i in $(seq 100); do [ -d "/proc/$pid" ] || break; sleep 0.2; done
    [ ! -d "/proc/$pid" ] || { log "libvirtd (pid $pid) ignored TERM: KILL"; kill -KILL "$pid"; }
  elif [ "$force" != --force ] && compgen -G "$STATE/etc/qemu/*.xml" >/dev/null; then
    # e.g. after a reboot of the host: the definitions wait for the next `vagrant up`
    log "not running; domains are defined in $STATE/etc/qemu: kept"
    return 0
  fi
  if [ -e "/run/netns/$NS" ]; then
    # whatever is left in the namespace is ours: a qemu or dnsmasq of a daemon that died
    for pid in $(ip netns pids "$NS"); do
      log "killing pid $pid left in $NS ($(cat "/proc/$pid/comm" 2>/dev/null))"
      kill -KILL "$pid" 2>/dev/null || true
    done
    ip netns del "$NS"
  fi
  rm -rf "$STATE/etc" "$STATE/lib"
  if [ -f "$CREATED_MOUNTPOINTS" ]; then
    while read -r d; do rmdir "$d" 2>/dev/null || true; done <"$CREATED_MOUNTPOINTS"
  fi
  rm -rf "$RUN"
  log "stopped; namespace $NS removed"
}

[ "$(id -u)" = 0 ] || die "must run as root"
case ${1:-} in
  start) [ $# -eq 1 ] || usage; start ;;
  stop) [ $# -le 2 ] || usage; case ${2:-} in ""|--force) stop "${2:-}" ;; *) usage ;; esac ;;
  status)
    [ $# -eq 1 ] || usage
    if pid=$(running_pid); then echo "running pid=$pid netns=$NS uri=$URI"; else echo "not running"; exit 3; fi ;;
  *) usage ;;
esac
