#!/usr/bin/env bash
# guest/build.sh OUTDIR [FERRY_GUEST]: builds ferry's minimal test guest
# from Debian packages only: the cloud kernel (vmlinuz), and an initramfs
# with busybox-static, the kernel's virtio modules, guest/init and our own
# static guest program (ferry-guest: QGA agent and workload). Packages are
# fetched with apt-get download, extracted, never installed or committed.
# The result is cached: it is rebuilt only when an input changes.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: guest/build.sh OUTDIR [FERRY_GUEST]}
fg=${2:-}
mkdir -p "$out"
out=$(cd "$out" && pwd)

resolve() { apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
kpkg=$(resolve)
if [ -z "$kpkg" ]; then # no package lists yet on a fresh machine
	SUDO=$( [ "$(id -u)" = 0 ] || echo sudo )
	$SUDO apt-get update -qq
	kpkg=$(resolve)
fi
[ -n "$kpkg" ] || { echo "guest: cannot resolve linux-image-cloud-amd64 (run apt-get update)" >&2; exit 1; }
stamp="$kpkg $(sha256sum "$here/init" "$0" ${fg:+"$fg"} | sha256sum | cut -c1-16)"
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ]; then
	exit 0
fi
echo "guest: building from $kpkg and busybox-static" >&2
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
chmod 755 "$work" # apt's sandbox user writes the download here
(cd "$work" && apt-get download -q "$kpkg" busybox-static >/dev/null 2>&1) ||
	{ echo "guest: apt-get download $kpkg busybox-static failed" >&2; exit 1; }
dpkg-deb -x "$work"/linux-image-*.deb "$work/k"
dpkg-deb -x "$work"/busybox-static_*.deb "$work/bb"
kver=${kpkg#linux-image-}
cp "$work/k/boot/vmlinuz-$kver" "$out/vmlinuz.tmp"

root=$work/root
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,mnt,lib/modules}
cp "$work/bb/bin/busybox" "$root/bin/busybox"
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk virtio_console failover net_failover virtio_net button evdev; do
	f=$(find "$work/k/lib/modules/$kver" -name "$m.ko*" | head -1)
	[ -n "$f" ] || { echo "guest: module $m not found in $kpkg" >&2; exit 1; }
	case $f in
	*.xz) xz -dc "$f" >"$root/lib/modules/$m.ko" ;;
	*.zst) zstd -qdc "$f" >"$root/lib/modules/$m.ko" ;;
	*) cp "$f" "$root/lib/modules/$m.ko" ;;
	esac
done
cp "$here/init" "$root/init"
if [ -n "$fg" ]; then cp "$fg" "$root/bin/ferry-guest"; chmod +x "$root/bin/ferry-guest"; fi
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$out/initrd.img.tmp"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
mv "$out/initrd.img.tmp" "$out/initrd.img"
echo "$stamp" >"$out/stamp"
echo "guest: built $out/vmlinuz and $out/initrd.img" >&2
