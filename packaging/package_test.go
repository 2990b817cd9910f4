package packaging

import (
	"bytes"
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestDebianPackage builds the .deb as 'make package' does, unpacks it
// into an empty directory tree (no installation on this machine) and
// checks the files, the stamped static binary, the config files against
// the daemons' flags, and the systemd units with systemd-analyze verify.
func TestDebianPackage(t *testing.T) {
	for _, tool := range []string{"dpkg-deb", "dpkg", "gzip", "systemd-analyze"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s missing: run 'make deps'", tool)
		}
	}
	tmp := t.TempDir()
	bin := filepath.Join(tmp, "ferry")
	const version = "v9.8.7-3-gabcdef0"
	build := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w -X github.com/ferry-dr/ferry/internal/cli.Version="+version, "-o", bin, "../cmd/ferry")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	out, err := exec.Command("./build-deb.sh", bin, version, filepath.Join(tmp, "out")).CombinedOutput()
	if err != nil {
		t.Fatalf("build-deb.sh: %v\n%s", err, out)
	}
	deb := strings.TrimSpace(string(out))
	info, err := exec.Command("dpkg-deb", "--field", deb, "Package", "Version", "Depends").Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Package: ferry", "Version: 9.8.7+3.gabcdef0", "Depends: adduser"} {
		if !strings.Contains(string(info), want) {
			t.Errorf("control lacks %q:\n%s", want, info)
		}
	}
	conffiles, err := exec.Command("dpkg-deb", "--ctrl-tarfile", deb).Output()
	if err != nil || !bytes.Contains(conffiles, []byte("/etc/ferry/agent.toml\n/etc/ferry/vault.toml")) {
		t.Errorf("conffiles: %v", err)
	}
	root := filepath.Join(tmp, "root")
	if out, err := exec.Command("dpkg-deb", "-x", deb, root).CombinedOutput(); err != nil {
		t.Fatalf("unpack: %v\n%s", err, out)
	}
	for _, f := range []struct {
		path string
		mode os.FileMode
	}{
		{"usr/bin/ferry", 0o755},
		{"lib/systemd/system/ferry-agent.service", 0o644},
		{"lib/systemd/system/ferry-vault.service", 0o644},
		{"etc/ferry/agent.toml", 0o640},
		{"etc/ferry/vault.toml", 0o640},
		{"usr/share/man/man1/ferry.1.gz", 0o644},
		{"usr/share/man/man1/ferry-failover.1.gz", 0o644},
		{"usr/share/bash-completion/completions/ferry", 0o644},
		{"usr/share/zsh/vendor-completions/_ferry", 0o644},
		{"usr/share/fish/vendor_completions.d/ferry.fish", 0o644},
		{"usr/share/doc/ferry/security.md", 0o644},
	} {
		fi, err := os.Stat(filepath.Join(root, f.path))
		if err != nil {
			t.Errorf("%s: %v", f.path, err)
			continue
		}
		if fi.Mode().Perm() != f.mode {
			t.Errorf("%s: mode %v, want %v", f.path, fi.Mode().Perm(), f.mode)
		}
	}
	ferry := filepath.Join(root, "usr/bin/ferry")
	if out, err := exec.Command(ferry, "--version").Output(); err != nil || strings.TrimSpace(string(out)) != "ferry "+version {
		t.Errorf("packaged ferry --version: %q %v", out, err)
	}
	ef, err := elf.Open(ferry)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range ef.Progs {
		if p.Type == elf.PT_INTERP {
			t.Error("the packaged binary is dynamically linked")
		}
	}
	ef.Close()
	// The shipped configs hold only flags of their daemons: with the
	// required values given, the agent gets as far as loading its
	// certificate, the vault as far as its PKI.
	agentOut, _ := exec.Command(ferry, "--config", filepath.Join(root, "etc/ferry/agent.toml"), "agent", "run",
		"--name", "east", "--dir", filepath.Join(tmp, "a"), "--pki", filepath.Join(tmp, "pki")).CombinedOutput()
	if !strings.Contains(string(agentOut), "load certificate") {
		t.Errorf("agent with the shipped config: %s", agentOut)
	}
	vaultOut, _ := exec.Command(ferry, "--config", filepath.Join(root, "etc/ferry/vault.toml"), "vault", "run",
		"--dir", filepath.Join(tmp, "v"), "--pki", filepath.Join(tmp, "pki")).CombinedOutput()
	if !strings.Contains(string(vaultOut), "load certificate") {
		t.Errorf("vault with the shipped config: %s", vaultOut)
	}
	// systemd-analyze verify checks that ExecStart's binary exists: check
	// copies of the units that start the unpacked binary, otherwise
	// identical. Any warning (an unknown key, a bad value) fails.
	var units []string
	for _, u := range []string{"ferry-agent.service", "ferry-vault.service"} {
		b, err := os.ReadFile(filepath.Join(root, "lib/systemd/system", u))
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(tmp, u)
		os.WriteFile(p, bytes.ReplaceAll(b, []byte("/usr/bin/ferry"), []byte(ferry)), 0o644)
		units = append(units, p)
	}
	verify := exec.Command("systemd-analyze", append([]string{"verify", "--man=no"}, units...)...)
	if out, err := verify.CombinedOutput(); err != nil || len(bytes.TrimSpace(out)) != 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
}
