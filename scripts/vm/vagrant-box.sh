#!/bin/bash
# vagrant-box.sh SUITE - the test image of scripts/vm/build-image.sh as a local Vagrant box
# for the libvirt provider, added to Vagrant as rst-tracer/SUITE; nothing is downloaded but
# Debian packages.
#
#   SUITE: bullseye (5.10) | bookworm (6.1) | trixie (6.12)
#
# 1. Installs what is missing on this host: vagrant, vagrant-libvirt, libvirtd and its qemu
#    driver, virsh, dnsmasq, qemu, qemu-img, nc. Never libvirt-daemon-system: its service
#    would start libvirtd in the host's network namespace with the default network
#    autostarted (a bridge, dnsmasq and NAT rules); vagrant/libvirtd.sh runs a confined one.
# 2. Builds or reuses the image (build-image.sh: provisioned by vagrant/provision.sh, with
#    init, sshd, sudo and rsync in it).
# 3. Makes the box in $RST_VAGRANT_CACHE/SUITE-HASH (vagrant/local.env; HASH covers the image
#    and this script): disk.raw, a copy of the image's disk with what Vagrant expects (user
#    vagrant with Vagrant's insecure key and password-less sudo, DHCP on the NIC with
#    systemd-networkd, an fstab); vmlinuz and initrd.img; and SUITE.box holding
#      metadata.json  {"provider": "libvirt", "format": "qcow2", "virtual_size": GB}
#      box.img        a qcow2 overlay whose backing file is disk.raw: the box is a few
#                     hundred KiB, and neither Vagrant's box store nor libvirt's pool gets a
#                     copy of the disk
#      Vagrantfile    direct kernel boot of vmlinuz/initrd.img (the disk is a bare ext4
#                     filesystem, no boot loader), root=/dev/vda; its console goes to
#                     the serial port (vagrant/Vagrantfile logs it to a file)
#    and the catalog $RST_VAGRANT_CACHE/SUITE.json (version = time the box was made), which
#    vagrant/Vagrantfile names as box_url.
# 4. `vagrant box add`s the catalog unless that version is in, then removes the older versions
#    of rst-tracer/SUITE (and their directories) that no machine uses.
#
# Logs go to stderr; the box directory is printed on stdout. Needs root.
# Env: RST_VM_CACHE (image cache, see build-image.sh), VAGRANT_HOME (Vagrant's box store).
set -euo pipefail

usage() { echo "usage: $0 bullseye|bookworm|trixie" >&2; exit 2; }
log() { echo "vagrant-box: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

SUITE=${1:-}
case $SUITE in bullseye|bookworm|trixie) ;; *) usage ;; esac
[ $# -eq 1 ] || usage
[ "$(id -u)" = 0 ] || die "must run as root (packages, loop mount of the disk)"
exec 3>&1 1>&2 # stdout is for the result path only

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF=$HERE/$(basename "${BASH_SOURCE[0]}")
VAGRANT_DIR=$(cd "$HERE/../../vagrant" && pwd)
# shellcheck source=../../vagrant/local.env
. "$VAGRANT_DIR/local.env"
CACHE=$RST_VAGRANT_CACHE
BOX_NAME=rst-tracer/$SUITE

# --- host packages ----------------------------------------------------------------------
HOST_PKGS=(vagrant vagrant-libvirt libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
           dnsmasq-base qemu-system-x86 qemu-utils netcat-openbsd iproute2 iptables)
missing=()
for p in "${HOST_PKGS[@]}"; do
  dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing host packages: ${missing[*]}"
  apt-get update -q
  # no recommends: they would pull nfs-kernel-server and libguestfs (services, an appliance)
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
INSECURE_KEY=$(dpkg -L vagrant | grep '/keys/vagrant\.pub$' | head -n1)
[ -f "$INSECURE_KEY" ] || die "Vagrant's insecure public key not found in the vagrant package"

# --- image and box directory ---------------------------------------------------------------
IMG=$("$HERE/build-image.sh" "$SUITE")
IMG_HASH=$(sed -n 's/^hash=//p' "$IMG/stamp")
HASH=$({ echo "$IMG_HASH"; cat "$SELF"; } | sha256sum | cut -c1-12)
OUT=$CACHE/$SUITE-$HASH
CATALOG=$CACHE/$SUITE.json
mkdir -p "$CACHE"

box_complete() { [ -f "$1/stamp" ] && [ -s "$1/$SUITE.box" ] && [ -s "$1/disk.raw" ]; }

exec 9>"$CACHE/.lock-$SUITE"
flock 9 # one packaging per suite at a time; a second caller reuses the result

if box_complete "$OUT"; then
  log "box up to date: $OUT"
else
  START=$(date +%s)
  for d in "$CACHE"/.build-"$SUITE".*; do
    [ -d "$d" ] || continue
    log "removing stale $d"
    ! findmnt -rn -o TARGET | grep -q "^$d/" || umount "$d/root"
    rm -rf --one-file-system "$d"
  done
  WORK=$(mktemp -d "$CACHE/.build-$SUITE.XXXXXX")
  chmod 755 "$WORK"
  ROOT=$WORK/root
  cleanup() {
    local rc=$?
    ! mountpoint -q "$ROOT" || umount "$ROOT" || umount -l "$ROOT"
    rm -rf --one-file-system "$WORK"
    [ $rc -eq 0 ] || log "FAILED (rc=$rc)"
    exit $rc
  }
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM

  log "copying $IMG/disk.img"
  cp --sparse=always "$IMG/disk.img" "$WORK/disk.raw"
  cp "$IMG/vmlinuz" "$IMG/initrd.img" "$WORK/"
  mkdir "$ROOT"
  mount -o loop "$WORK/disk.raw" "$ROOT"
  [ -x "$ROOT/usr/sbin/sshd" ] && [ -x "$ROOT/usr/bin/sudo" ] && [ -x "$ROOT/lib/systemd/systemd" ] ||
    die "the image lacks sshd, sudo or systemd: was it built by an older build-image.sh/provision.sh?"

  # What Vagrant expects of a box: user vagrant, its insecure key, password-less sudo.
  chroot "$ROOT" id vagrant >/dev/null 2>&1 || chroot "$ROOT" useradd -m -U -s /bin/bash vagrant
  install -d -m 700 "$ROOT/home/vagrant/.ssh"
  install -m 600 "$INSECURE_KEY" "$ROOT/home/vagrant/.ssh/authorized_keys"
  chroot "$ROOT" chown -R vagrant:vagrant /home/vagrant/.ssh
  echo 'vagrant ALL=(ALL) NOPASSWD: ALL' >"$ROOT/etc/sudoers.d/vagrant"
  chmod 440 "$ROOT/etc/sudoers.d/vagrant"
  # The NIC of vagrant-libvirt's management network gets its address from libvirt's dnsmasq.
  cat >"$ROOT/etc/systemd/network/80-vagrant-dhcp.network" <<'NET'
[Match]
Name=en* eth*

[Network]
DHCP=ipv4
NET
  chroot "$ROOT" systemctl enable systemd-networkd.service ssh.service >/dev/null 2>&1
  # root is mounted rw by the kernel (cmd_line); no fsck at boot
  echo '/dev/vda / ext4 defaults 0 0' >"$ROOT/etc/fstab"
  # A throwaway VM with no network, emulated: no apt runs, scrubs or trims behind the tests.
  chroot "$ROOT" systemctl mask e2scrub_reap.service e2scrub_all.timer fstrim.timer \
    apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer >/dev/null 2>&1
  umount "$ROOT"
  rmdir "$ROOT"

  # The box: a qcow2 overlay of disk.raw (at its final place), its metadata and Vagrantfile.
  mkdir "$WORK/box"
  size=$(stat -c %s "$WORK/disk.raw")
  # -u: the backing file is not at its final place yet
  qemu-img create -q -u -f qcow2 -F raw -b "$OUT/disk.raw" "$WORK/box/box.img" "$size"
  virtual_gb=$(( (size + (1 << 30) - 1) >> 30 ))
  printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %d}\n' "$virtual_gb" \
    >"$WORK/box/metadata.json"
  cat >"$WORK/box/Vagrantfile" <<BOXFILE
# rst-tracer $SUITE box made by scripts/vm/vagrant-box.sh (image $IMG_HASH): the disk is a
# bare ext4 filesystem, booted with the image's own kernel and initrd.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.kernel = "$OUT/vmlinuz"
    lv.initrd = "$OUT/initrd.img"
    lv.cmd_line = "root=/dev/vda rw console=ttyS0 quiet"
  end
end
BOXFILE
  tar -C "$WORK/box" -cf "$WORK/$SUITE.box" metadata.json Vagrantfile box.img
  rm -rf "$WORK/box"
  VERSION=$(date -u +%Y%m%d.%H%M%S)
  printf 'suite=%s\nhash=%s\nimage=%s\nversion=%s\nbuild_seconds=%s\n' \
    "$SUITE" "$HASH" "$IMG" "$VERSION" "$(($(date +%s) - START))" >"$WORK/stamp"
  rm -rf "$OUT"
  mv "$WORK" "$OUT"
  trap - EXIT INT TERM
  log "made box $BOX_NAME $VERSION in $(($(date +%s) - START)) s: $OUT"
fi

VERSION=$(sed -n 's/^version=//p' "$OUT/stamp")
sha=$(sha256sum "$OUT/$SUITE.box" | cut -d' ' -f1)
cat >"$CATALOG.tmp" <<JSON
{
  "name": "$BOX_NAME",
  "description": "rst-tracer test image, Debian $SUITE (scripts/vm/vagrant-box.sh, $(basename "$IMG"))",
  "versions": [{"version": "$VERSION", "providers": [
    {"name": "libvirt", "url": "file://$OUT/$SUITE.box", "checksum_type": "sha256", "checksum": "$sha"}]}]
}
JSON
mv "$CATALOG.tmp" "$CATALOG"

# `vagrant box list`: "rst-tracer/bookworm (libvirt, 20250101.120000)"
installed_versions() {
  vagrant box list 2>/dev/null | awk -v n="$BOX_NAME" '$1 == n && $2 == "(libvirt," {sub(/\)$/, "", $3); print $3}'
}
if installed_versions | grep -qx "$VERSION"; then
  log "$BOX_NAME $VERSION already added"
else
  vagrant box add --provider libvirt "$CATALOG"
fi
for v in $(installed_versions); do
  [ "$v" != "$VERSION" ] || continue
  if vagrant box remove "$BOX_NAME" --provider libvirt --box-version "$v" </dev/null; then
    log "removed $BOX_NAME $v"
  else
    log "kept $BOX_NAME $v (a machine uses it)"
  fi
done
# Box directories no added version points to.
keep=$(installed_versions)
for d in "$CACHE/$SUITE"-*; do
  [ -d "$d" ] && [ "$d" != "$OUT" ] || continue
  grep -qx "$(sed -n 's/^version=//p' "$d/stamp" 2>/dev/null)" <<<"$keep" || { log "removing old box $d"; rm -rf "$d"; }
done
echo "$OUT" >&3
