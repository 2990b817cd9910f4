// Package packaging builds and checks ferry's Debian package: the
// systemd units, config files and build-deb.sh live beside this file, and
// its test builds a package from a fresh static binary, unpacks it into
// a clean directory tree and checks what an installation gets.
package packaging
