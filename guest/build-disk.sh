#!/usr/bin/env bash
# guest/build-disk.sh GUESTDIR: builds GUESTDIR/boot.img, a small bootable
# disk for testing boot from a (replicated) disk: a FAT file system over the
# whole disk with SYSLINUX's boot sector and loader (Debian packages
# syslinux, mtools, dosfstools; no mounting, no root), and the test guest's
# kernel and initramfs on it. Its SYSLINUX configuration boots the guest
# with the job "write-pattern" on the second disk (vdb). Cached like the
# guest itself.
set -euo pipefail
dir=${1:?usage: guest/build-disk.sh GUESTDIR}
for t in syslinux mcopy mkfs.vfat; do
	command -v "$t" >/dev/null || { echo "guest disk: $t missing: run 'make deps'" >&2; exit 1; }
done
stamp="$(sha256sum "$dir/vmlinuz" "$dir/initrd.img" "$0" | sha256sum | cut -c1-16)"
if [ -f "$dir/boot.img" ] && [ "$(cat "$dir/boot.stamp" 2>/dev/null)" = "$stamp" ]; then
	exit 0
fi
img=$dir/boot.img.tmp
rm -f "$img"
truncate -s 48M "$img"
mkfs.vfat -n FERRYBOOT "$img" >/dev/null
syslinux --install "$img"
cfg=$(mktemp)
cat >"$cfg" <<'CFG'
DEFAULT ferry
PROMPT 0
TIMEOUT 0
SERIAL 0 115200
LABEL ferry
  KERNEL vmlinuz
  INITRD initrd.img
  APPEND console=ttyS0 panic=-1 ferry.job=write-pattern ferry.dev=vdb ferry.token=bootdisk
CFG
export MTOOLS_SKIP_CHECK=1
mcopy -i "$img" "$dir/vmlinuz" ::vmlinuz
mcopy -i "$img" "$dir/initrd.img" ::initrd.img
mcopy -i "$img" "$cfg" ::syslinux.cfg
rm -f "$cfg"
mv "$img" "$dir/boot.img"
echo "$stamp" >"$dir/boot.stamp"
echo "guest disk: built $dir/boot.img" >&2
