#!/bin/bash
# run-in-vm.sh SUITE -- COMMAND [ARG...]
#
# Runs COMMAND as root inside a throwaway qemu VM with Debian SUITE's stock kernel
# (bullseye 5.10 | bookworm 6.1 | trixie 6.12), e.g. to test the kprobe backend, which
# our own kernel cannot run. The image is built on first use (scripts/vm/build-image.sh)
# and never modified (snapshot=on).
#
# In the guest: cwd /work/rst-tracer = this checkout (9p, read-write), env
# RST_TRACER_VENV=/opt/rst-tracer/venv, CI (from ours), PATH starting with the venv's bin.
# No network (-nic none). Guest output is streamed to our stdout (serial console); the exit
# status is COMMAND's, or 125 when the guest produced none (boot failure, timeout).
#
# Env: VM_ACCEL   tcg (default: /dev/kvm here cannot run a stock kernel) | kvm
#      VM_CPU     qemu -cpu (default: max with tcg, host with kvm)
#      VM_MEM     MiB (default 2048)      VM_SMP  vCPUs (default 2)
#      VM_TIMEOUT seconds (default 3000)  VM_APPEND  extra kernel command line
#      VM_DIAG_AFTER  seconds after which a run still going prints its processes and their
#                 kernel stacks on the console, then every 10 min (default 1500)
#      VM_KEEP=1  keep the control dir (run.sh, out.log, rc) and print its path
#      RST_VM_CACHE  image cache root (see build-image.sh)
set -euo pipefail

usage() { echo "usage: $0 bullseye|bookworm|trixie -- COMMAND [ARG...]" >&2; exit 2; }
log() { echo "run-in-vm: $*" >&2; }

[ $# -ge 1 ] || usage
SUITE=$1
shift
case $SUITE in bullseye|bookworm|trixie) ;; *) usage ;; esac
[ "${1:-}" = -- ] && shift
[ $# -ge 1 ] || usage

T0=$(date +%s)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(git -C "$HERE" rev-parse --show-toplevel 2>/dev/null || (cd "$HERE/../.." && pwd))

IMG=$("$HERE/build-image.sh" "$SUITE")
[ -f "$IMG/stamp" ] || { log "no image for $SUITE"; exit 125; }

CTL=$(mktemp -d "${TMPDIR:-/tmp}/rst-vm-$SUITE.XXXXXX")
if [ "${VM_KEEP:-}" = 1 ]; then
  trap 'log "control dir kept: $CTL"' EXIT
else
  trap 'rm -rf "$CTL"' EXIT
fi

{
  echo '#!/bin/bash'
  echo 'export RST_TRACER_VENV=/opt/rst-tracer/venv'
  printf 'export CI=%q\n' "${CI:-}"
  echo 'export PATH=/opt/rst-tracer/venv/bin:$PATH'
  echo 'cd /work/rst-tracer || { echo "run-in-vm: no /work/rst-tracer in the guest" >&2; exit 125; }'
  # A run still going after VM_DIAG_AFTER s (the kprobe suite takes 10-15 min) shows, straight
  # on the console (not through the output pipe, which may be what is stuck), every process,
  # what it waits on in the kernel, and the kernel's last messages; again every 10 min.
  printf 'diag_after=%q\n' "${VM_DIAG_AFTER:-1500}"
  cat <<'DIAG'
( sleep "$diag_after"; while :; do
    { echo "run-in-vm: still running after $(cut -d. -f1 /proc/uptime) s of uptime: processes, kernel stacks"
      ps -eo pid,ppid,stat,etime,time,wchan:32,args
      for d in /proc/[0-9]*; do
        cmd=$(tr '\0' ' ' <"$d/cmdline" 2>/dev/null | cut -c1-120)
        [ -n "$cmd" ] || continue   # kernel threads
        echo "--- ${d#/proc/} $cmd"
        cat "$d/stack" 2>/dev/null | head -12
      done
      dmesg | tail -30; } >/dev/console 2>&1
    sleep 600
  done ) </dev/null >/dev/null 2>&1 &
diag=$!
DIAG
  printf '%q ' "$@"
  echo
  echo 'rc=$?; kill "$diag" 2>/dev/null; exit $rc'
} >"$CTL/run.sh"

case ${VM_ACCEL:-tcg} in
  tcg) accel=(-accel tcg,thread=multi -cpu "${VM_CPU:-max}") ;;
  kvm) accel=(-accel kvm -cpu "${VM_CPU:-host}") ;;
  *) accel=(-accel "$VM_ACCEL" -cpu "${VM_CPU:-max}") ;;
esac

log "booting $SUITE ($(sed -n 's/^kernel=//p' "$IMG/stamp"), ${VM_ACCEL:-tcg}) to run: $*"
T1=$(date +%s)
set +e
timeout -k 10 "${VM_TIMEOUT:-3000}" qemu-system-x86_64 "${accel[@]}" \
  -m "${VM_MEM:-2048}" -smp "${VM_SMP:-2}" \
  -kernel "$IMG/vmlinuz" -initrd "$IMG/initrd.img" \
  -append "root=/dev/vda rw console=ttyS0 init=/usr/local/sbin/vm-run panic=-1 quiet ${VM_APPEND:-}" \
  -drive file="$IMG/disk.img",format=raw,if=virtio,snapshot=on \
  -virtfs local,path="$CTL",mount_tag=host,security_model=none,id=host \
  -virtfs local,path="$REPO",mount_tag=repo,security_model=none,multidevs=remap,id=repo \
  -device virtio-rng-pci \
  -nic none -display none -serial stdio -monitor none -no-reboot </dev/null
qrc=$?
set -e
T2=$(date +%s)

rc=125
if [ -f "$CTL/rc" ] && grep -qE '^[0-9]+$' "$CTL/rc"; then
  rc=$(cat "$CTL/rc")
elif [ $qrc -eq 124 ] || [ $qrc -eq 137 ]; then
  log "timed out after ${VM_TIMEOUT:-3000} s"
else
  log "no exit status from the guest (qemu rc=$qrc)"
fi
log "$SUITE: rc=$rc, boot+run $((T2 - T1)) s (total $((T2 - T0)) s)"
exit "$rc"
