#!/bin/bash
# build-image.sh SUITE - build (or reuse) a bootable Debian test image for rst-tracer.
#
#   SUITE: bullseye (5.10) | bookworm (6.1) | trixie (6.12)
#
# The image has Debian's stock kernel (kprobes enabled, unlike our 6.18 CI kernel), BCC and
# the python deps in /opt/rst-tracer/venv: vagrant/provision.sh is run inside the
# debootstrap chroot. Its PID 1 is a small runner (/usr/local/sbin/vm-run) that mounts the
# 9p share "host" on /mnt/host and, if present, the share "repo" on /work/rst-tracer, runs
# /mnt/host/run.sh as root, writes /mnt/host/out.log and /mnt/host/rc and powers off.
# scripts/vm/run-in-vm.sh boots it.
#
# Output: ${RST_VM_CACHE:-/var/cache/rst-tracer/vm}/SUITE-HASH/{disk.img,vmlinuz,initrd.img,stamp}
# where HASH is the first 12 hex digits of sha256(build-image.sh, provision.sh, python deps).
# A complete image (stamp present) is reused as is. Downloaded .debs and pip wheels are kept
# in the cache root (debs/SUITE, pip/) to speed up rebuilds. Older images of the same suite
# are removed after a successful build.
#
# Logs go to stderr; the image directory is printed on stdout (last and only line).
# Needs root; installs debootstrap, qemu-system-x86 and e2fsprogs with apt-get if missing.
#
# Env: RST_VM_CACHE  cache root (default /var/cache/rst-tracer/vm)
#      MIRROR        Debian mirror (default: the first non-security one configured in apt)
#      VM_DISK_MB    disk size in MiB (default: max(4096, 1.5 x rootfs + 512))
set -euo pipefail

usage() { echo "usage: $0 bullseye|bookworm|trixie" >&2; exit 2; }
log() { echo "build-image: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

SUITE=${1:-}
case $SUITE in bullseye|bookworm|trixie) ;; *) usage ;; esac
[ $# -eq 1 ] || usage
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot, mounts)"

exec 3>&1 1>&2 # stdout is for the result path only

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF=$HERE/$(basename "${BASH_SOURCE[0]}")
PROVISION=$(cd "$HERE/../../vagrant" && pwd)/provision.sh
[ -f "$PROVISION" ] || die "missing $PROVISION"
CACHE_ROOT=${RST_VM_CACHE:-/var/cache/rst-tracer/vm}
mkdir -p "$CACHE_ROOT"
CACHE_ROOT=$(cd "$CACHE_ROOT" && pwd -P)

# Never build inside the checkout.
if top=$(git -C "$HERE" rev-parse --show-toplevel 2>/dev/null); then
  top=$(cd "$top" && pwd -P)
  case $CACHE_ROOT/ in "$top"/*) die "RST_VM_CACHE ($CACHE_ROOT) is inside the checkout $top" ;; esac
fi

# --- host tools -----------------------------------------------------------------------
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
if [ ${#need[@]} -gt 0 ]; then
  log "installing host packages: ${need[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
fi

# --- cache key ------------------------------------------------------------------------
DEPS=$(bash "$PROVISION" --print-deps)
[ -n "$DEPS" ] || die "no python deps from $PROVISION --print-deps"
HASH=$({ cat "$SELF" "$PROVISION"; printf '%s\n' "$DEPS"; } | sha256sum | cut -c1-12)
OUT=$CACHE_ROOT/$SUITE-$HASH

image_complete() {
  [ -f "$1/stamp" ] && [ -s "$1/disk.img" ] && [ -s "$1/vmlinuz" ] && [ -s "$1/initrd.img" ]
}

if image_complete "$OUT"; then
  log "image up to date: $OUT"
  echo "$OUT" >&3
  exit 0
fi

# One build per suite at a time; a second caller waits and then reuses the result.
exec 9>"$CACHE_ROOT/.lock-$SUITE"
if ! flock -n 9; then
  log "another build of $SUITE is running; waiting for it"
  flock 9
fi
if image_complete "$OUT"; then
  log "image up to date: $OUT"
  echo "$OUT" >&3
  exit 0
fi

# Unmount everything mounted at or below $1 (deepest first).
umount_under() {
  local m
  for m in $(findmnt -rn -o TARGET | grep -E "^$1(/|$)" | sort -r); do
    umount "$m" 2>/dev/null || umount -l "$m" || true
  done
  ! findmnt -rn -o TARGET | grep -qE "^$1(/|$)"
}

# Remove a build dir, but never while something is still mounted inside it
# (a bind-mounted /dev or deb cache would be wiped).
remove_build_dir() {
  if umount_under "$1"; then
    rm -rf --one-file-system "$1"
  else
    log "WARNING: mounts remain under $1; not removing it"
  fi
}

# Leftovers of builds that were killed (no trap ran).
for d in "$CACHE_ROOT"/.build-"$SUITE".*; do
  [ -d "$d" ] && { log "removing stale $d"; remove_build_dir "$d"; }
done

MIRROR=${MIRROR:-}
if [ -z "$MIRROR" ]; then
  MIRROR=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
fi
if [ -z "$MIRROR" ]; then
  MIRROR=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' \
    /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
fi
MIRROR=${MIRROR:-http://deb.debian.org/debian}

START=$(date +%s)
WORK=$(mktemp -d "$CACHE_ROOT/.build-$SUITE.XXXXXX")
ROOTFS=$WORK/rootfs
cleanup() {
  local rc=$?
  remove_build_dir "$WORK"
  [ $rc -eq 0 ] || log "FAILED (rc=$rc) after $(($(date +%s) - START)) s"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

DEBCACHE=$CACHE_ROOT/debs/$SUITE
PIPCACHE=$CACHE_ROOT/pip
mkdir -p "$DEBCACHE/partial" "$PIPCACHE"

log "debootstrap $SUITE from $MIRROR into $ROOTFS"
debootstrap --variant=minbase --cache-dir="$DEBCACHE" "$SUITE" "$ROOTFS" "$MIRROR"

# --- provision inside the chroot ------------------------------------------------------
mount -t proc proc "$ROOTFS/proc"
mount --bind /sys "$ROOTFS/sys"
mount --bind /dev "$ROOTFS/dev"
mount --bind /dev/pts "$ROOTFS/dev/pts"
mkdir -p "$ROOTFS/var/cache/apt/archives" "$ROOTFS/root/.cache/pip"
mount --bind "$DEBCACHE" "$ROOTFS/var/cache/apt/archives"
mount --bind "$PIPCACHE" "$ROOTFS/root/.cache/pip"

# Build-time only: no daemons started in the chroot, DNS of the host, and the host's apt
# leniency about Release dates (the mirror may be a snapshot).
printf '#!/bin/sh\nexit 101\n' >"$ROOTFS/usr/sbin/policy-rc.d"
chmod 755 "$ROOTFS/usr/sbin/policy-rc.d"
printf 'Acquire::Check-Valid-Until "false";\n' >"$ROOTFS/etc/apt/apt.conf.d/99rst-build"
rm -f "$ROOTFS/etc/resolv.conf"
cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
install -m 755 "$PROVISION" "$ROOTFS/root/provision.sh"

env_args=(
  PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
  TERM=dumb DEBIAN_FRONTEND=noninteractive RST_PROVISION_CONTEXT=image
  "RST_PY_DEPS=$(echo $DEPS)"
)
for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY PIP_DEFAULT_TIMEOUT; do
  [ -n "${!v:-}" ] && env_args+=("$v=${!v}")
done
case ${PIP_INDEX_URL:-} in http://*|https://*) env_args+=("PIP_INDEX_URL=$PIP_INDEX_URL") ;; esac
if [ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ]; then
  cp -L "$PIP_CERT" "$ROOTFS/root/build-ca.crt"
  env_args+=(PIP_CERT=/root/build-ca.crt)
fi

log "running vagrant/provision.sh in the chroot"
chroot "$ROOTFS" /usr/bin/env -i "${env_args[@]}" /bin/bash /root/provision.sh

KVER=$(cd "$ROOTFS/boot" && ls -1v vmlinuz-* | tail -n1 | sed 's/^vmlinuz-//')
[ -n "$KVER" ] && [ -f "$ROOTFS/boot/initrd.img-$KVER" ] || die "no kernel/initrd in $ROOTFS/boot"
BPFCC=$(chroot "$ROOTFS" dpkg-query -W -f '${Version}' python3-bpfcc)
PYVER=$(chroot "$ROOTFS" python3 -c 'import platform; print(platform.python_version())')
PIPFREEZE=$(chroot "$ROOTFS" /opt/rst-tracer/venv/bin/python -m pip freeze --local 2>/dev/null | tr '\n' ' ')

umount_under "$ROOTFS" || die "could not unmount everything under $ROOTFS"
rm -f "$ROOTFS/usr/sbin/policy-rc.d" "$ROOTFS/etc/apt/apt.conf.d/99rst-build" \
  "$ROOTFS/root/provision.sh" "$ROOTFS/root/build-ca.crt"
: >"$ROOTFS/etc/resolv.conf" # the guest has no network
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin
rm -f "$ROOTFS"/var/cache/apt/archives/*.deb # (the .debs went to the bind-mounted cache)

# --- PID 1 runner ---------------------------------------------------------------------
cat >"$ROOTFS/usr/local/sbin/vm-run" <<'INIT'
#!/bin/bash
# PID 1 of the rst-tracer test VM (kernel cmdline: init=/usr/local/sbin/vm-run).
# Mounts the 9p share "host" on /mnt/host and the share "repo" (if given) on
# /work/rst-tracer, runs /mnt/host/run.sh as root with cwd /mnt/host; its stdout+stderr go
# to /mnt/host/out.log and the serial console, its exit code to /mnt/host/rc. Powers off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=dumb
say() { echo "VMRUN: $*" >/dev/console; }
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sys /sys
mountpoint -q /dev || mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
stty -F /dev/console -onlcr 2>/dev/null # no CR added to guest output
ip link set lo up
echo rst-vm >/proc/sys/kernel/hostname
say "init up at $(cut -d' ' -f1 /proc/uptime)s uptime, kernel $(uname -r)"
opts=trans=virtio,version=9p2000.L,msize=262144
modprobe 9pnet_virtio 2>/dev/null; modprobe 9p 2>/dev/null
mkdir -p /mnt/host /work/rst-tracer
if mount -t 9p -o "$opts" host /mnt/host; then
  if mount -t 9p -o "$opts" repo /work/rst-tracer 2>/dev/null; then
    say "checkout mounted on /work/rst-tracer"
  else
    say "no checkout share (tag repo)"
  fi
  if [ -f /mnt/host/run.sh ]; then
    cd /mnt/host
    bash ./run.sh 2>&1 </dev/null | tee /mnt/host/out.log >/dev/console
    echo "${PIPESTATUS[0]}" >/mnt/host/rc
    cd /
    say "run.sh exited rc=$(cat /mnt/host/rc) at $(cut -d' ' -f1 /proc/uptime)s uptime"
  else
    say "no /mnt/host/run.sh"
  fi
  sync
  umount /work/rst-tracer 2>/dev/null
  umount /mnt/host
else
  say "9p mount of the host share failed"
fi
sync
echo o >/proc/sysrq-trigger # immediate power-off: qemu exits
sleep 10                    # if that failed, PID 1 exits -> panic -> reboot -> qemu -no-reboot exits
INIT
chmod 755 "$ROOTFS/usr/local/sbin/vm-run"
echo rst-vm >"$ROOTFS/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 rst-vm\n::1 localhost ip6-localhost ip6-loopback\n' >"$ROOTFS/etc/hosts"
[ -e "$ROOTFS/etc/mtab" ] || [ -L "$ROOTFS/etc/mtab" ] || ln -s ../proc/self/mounts "$ROOTFS/etc/mtab"

# --- disk image -----------------------------------------------------------------------
mkdir -p "$WORK/img"
cp "$ROOTFS/boot/vmlinuz-$KVER" "$WORK/img/vmlinuz"
cp "$ROOTFS/boot/initrd.img-$KVER" "$WORK/img/initrd.img"
used_mb=$(du -sm "$ROOTFS" | cut -f1)
size_mb=${VM_DISK_MB:-$((used_mb * 3 / 2 + 512))}
[ -n "${VM_DISK_MB:-}" ] || [ "$size_mb" -ge 4096 ] || size_mb=4096
mkfs_opts=()
if [ "$SUITE" = bullseye ]; then
  # ext4 features newer than the 5.10 kernel, if this mke2fs enables them by default.
  for f in orphan_file metadata_csum_seed; do
    grep -qw "$f" /etc/mke2fs.conf 2>/dev/null && mkfs_opts+=(-O "^$f")
  done
fi
log "rootfs ${used_mb} MiB -> disk.img ${size_mb} MiB (sparse)"
mkfs.ext4 -q -F -L rst-root "${mkfs_opts[@]}" -d "$ROOTFS" "$WORK/img/disk.img" "${size_mb}M"

SECS=$(($(date +%s) - START))
cat >"$WORK/img/stamp" <<STAMP
suite=$SUITE
hash=$HASH
built=$(date -u +%FT%TZ)
build_seconds=$SECS
kernel=$KVER
python=$PYVER
python3-bpfcc=$BPFCC
mirror=$MIRROR
rootfs_mb=$used_mb
venv=/opt/rst-tracer/venv
pip_freeze=$PIPFREEZE
STAMP

rm -rf "$OUT" # an incomplete leftover
mv "$WORK/img" "$OUT"
for d in "$CACHE_ROOT/$SUITE"-*; do
  [ "$d" = "$OUT" ] || [ ! -d "$d" ] || { log "removing old image $d"; rm -rf "$d"; }
done
log "built $SUITE image (kernel $KVER, python $PYVER, bpfcc $BPFCC) in $SECS s: $OUT"
echo "$OUT" >&3
