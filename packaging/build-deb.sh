#!/usr/bin/env bash
# packaging/build-deb.sh BINARY VERSION OUTDIR: builds ferry_VERSION_ARCH.deb
# from a static binary: the binary, systemd units for the agent and the
# vault, their config files (conffiles), man pages and shell completions.
# Plain dpkg-deb, no build dependencies beyond dpkg.
set -euo pipefail
bin=$1 version=$2 out=$3
here=$(cd "$(dirname "$0")" && pwd)
arch=$(dpkg --print-architecture)
# Debian versions start with a digit: v1.2.3-4-gabc -> 1.2.3+4.gabc; a
# bare commit -> 0~gCOMMIT.
v=$(echo "${version#v}" | sed -e 's/-\([0-9]*\)-g/+\1.g/' -e 's/-dirty$/+dirty/')
case $v in [0-9]*) ;; *) v="0~g$v" ;; esac
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/root
install -Dm0755 "$bin" "$root/usr/bin/ferry"
install -Dm0644 "$here/systemd/ferry-agent.service" "$root/lib/systemd/system/ferry-agent.service"
install -Dm0644 "$here/systemd/ferry-vault.service" "$root/lib/systemd/system/ferry-vault.service"
install -Dm0640 "$here/etc/agent.toml" "$root/etc/ferry/agent.toml"
install -Dm0640 "$here/etc/vault.toml" "$root/etc/ferry/vault.toml"
install -d -m0750 "$root/etc/ferry/pki"
mkdir -p "$root/usr/share/man/man1"
"$bin" man "$root/usr/share/man/man1"
gzip -9n "$root"/usr/share/man/man1/*.1
install -d "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" "$root/usr/share/fish/vendor_completions.d"
"$bin" completion bash >"$root/usr/share/bash-completion/completions/ferry"
"$bin" completion zsh >"$root/usr/share/zsh/vendor-completions/_ferry"
"$bin" completion fish >"$root/usr/share/fish/vendor_completions.d/ferry.fish"
install -Dm0644 "$here/../README.md" "$root/usr/share/doc/ferry/README.md"
install -Dm0644 "$here/../docs/security.md" "$root/usr/share/doc/ferry/security.md"
mkdir -p "$root/DEBIAN"
size=$(du -sk "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<CONTROL
Package: ferry
Version: $v
Architecture: $arch
Maintainer: ferry developers <ferry@localhost>
Installed-Size: $size
Depends: adduser
Recommends: qemu-system-x86, qemu-utils
Section: admin
Priority: optional
Homepage: https://github.com/ferry-dr/ferry
Description: disaster recovery for QEMU/KVM virtual machines
 ferry replicates a VM's disks continuously to a second site, keeps
 recovery points at any instant, and runs the DR lifecycle: drill,
 failover, change recovery point, commit, reprotect with delta sync,
 failback. This package holds the single ferry binary (site agent, vault
 and CLI), systemd units for the agent and the vault, and their configs.
CONTROL
printf '/etc/ferry/agent.toml\n/etc/ferry/vault.toml\n' >"$root/DEBIAN/conffiles"
cat >"$root/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
	if ! getent passwd ferry >/dev/null; then
		adduser --system --group --home /var/lib/ferry --no-create-home --quiet ferry
	fi
	if getent group kvm >/dev/null; then
		adduser --quiet ferry kvm || true
	fi
	chown root:ferry /etc/ferry /etc/ferry/agent.toml /etc/ferry/vault.toml /etc/ferry/pki
	chmod 0750 /etc/ferry /etc/ferry/pki
	if [ -d /run/systemd/system ]; then
		systemctl daemon-reload >/dev/null || true
	fi
fi
POSTINST
cat >"$root/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null || true
fi
POSTRM
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/postrm"
mkdir -p "$out"
deb="$out/ferry_${v}_${arch}.deb"
dpkg-deb --build -Zxz --root-owner-group "$root" "$deb" >/dev/null
echo "$deb"
