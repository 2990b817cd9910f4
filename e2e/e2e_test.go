// Package e2e holds ferry's end-to-end tests: real ferry processes, real
// NBD clients from Debian (nbdinfo, qemu-io, qemu-img, nbdcopy, fio) and a
// real QEMU guest. They need the tools that 'make deps' installs and fail,
// never skip, when one is missing.
package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
)

var ferryBin string

func TestMain(m *testing.M) {
	if arg := os.Getenv("FERRY_E2E_PROXY"); arg != "" {
		proxyChild(arg) // the torture suite's delay proxy
		return
	}
	dir, err := os.MkdirTemp("", "ferry-e2e-")
	if err != nil {
		panic(err)
	}
	ferryBin = filepath.Join(dir, "ferry")
	out, err := exec.Command("go", "build", "-o", ferryBin, "../cmd/ferry").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build ferry: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	stopLibvirt()
	os.RemoveAll(dir)
	os.Exit(code)
}

func need(tb testing.TB, tools ...string) {
	tb.Helper()
	for _, t := range tools {
		if _, err := exec.LookPath(t); err != nil {
			tb.Fatalf("%s not found: run 'make deps' (installs qemu-utils, qemu-system-x86, libnbd-bin, fio)", t)
		}
	}
}

// server is a running 'ferry serve' process.
type server struct {
	cmd  *exec.Cmd
	dir  string
	sock string
	log  *bytes.Buffer
	done chan error
}

func (s *server) uri(export string) string { return "nbd+unix:///" + export + "?socket=" + s.sock }

// startServer runs 'ferry serve' on a group in dir with the given --create
// spec and waits until its socket accepts connections.
func startServer(tb testing.TB, dir, create string) *server {
	tb.Helper()
	s := &server{dir: dir, sock: filepath.Join(dir, "nbd.sock"), log: &bytes.Buffer{}, done: make(chan error, 1)}
	args := []string{"serve", "--dir", filepath.Join(dir, "group"), "--socket", s.sock, "--checkpoint-interval", "0"}
	if create != "" {
		args = append(args, "--create", create)
	}
	os.Remove(s.sock) // a killed server leaves its socket behind
	s.cmd = exec.Command(ferryBin, args...)
	s.cmd.Stdout, s.cmd.Stderr = s.log, s.log
	if err := s.cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	go func() { s.done <- s.cmd.Wait() }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if c, err := net.Dial("unix", s.sock); err == nil {
			c.Close()
			break
		}
		select {
		case err := <-s.done:
			tb.Fatalf("ferry serve exited: %v\n%s", err, s.log)
		default:
		}
		if time.Now().After(deadline) {
			tb.Fatalf("ferry serve did not listen within 10s\n%s", s.log)
		}
		time.Sleep(20 * time.Millisecond)
	}
	tb.Cleanup(func() { s.stop(tb) })
	return s
}

// stop sends SIGTERM and waits for a clean exit. Idempotent.
func (s *server) stop(tb testing.TB) {
	tb.Helper()
	if s.cmd.ProcessState != nil || s.done == nil {
		return
	}
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-s.done:
		if err != nil {
			tb.Errorf("ferry serve exit: %v\n%s", err, s.log)
		}
	case <-time.After(30 * time.Second):
		s.cmd.Process.Kill()
		tb.Errorf("ferry serve did not stop within 30s\n%s", s.log)
	}
	s.done = nil
}

// kill sends SIGKILL.
func (s *server) kill() {
	s.cmd.Process.Kill()
	<-s.done
	s.done = nil
}

func run(tb testing.TB, name string, args ...string) string {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		tb.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func TestNbdinfoFlags(t *testing.T) {
	need(t, "nbdinfo")
	s := startServer(t, t.TempDir(), "vda=64M,vdb=1M")
	var info struct {
		Exports []struct {
			Name      string `json:"export-name"`
			Size      int64  `json:"export-size"`
			ReadOnly  bool   `json:"is_read_only"`
			Flush     bool   `json:"can_flush"`
			FUA       bool   `json:"can_fua"`
			Trim      bool   `json:"can_trim"`
			Zero      bool   `json:"can_zero"`
			MultiConn bool   `json:"can_multi_conn"`
			MaxBlock  int64  `json:"block_size_maximum"`
		} `json:"exports"`
	}
	out := run(t, "nbdinfo", "--json", s.uri("vda"))
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("nbdinfo json: %v\n%s", err, out)
	}
	e := info.Exports[0]
	if e.Size != 64<<20 || e.ReadOnly || !e.Flush || !e.FUA || !e.Trim || !e.Zero || !e.MultiConn || e.MaxBlock != 32<<20 {
		t.Fatalf("nbdinfo: %+v", e)
	}
	list := run(t, "nbdinfo", "--list", "--json", "nbd+unix://?socket="+s.sock)
	if !strings.Contains(list, `"vda"`) || !strings.Contains(list, `"vdb"`) {
		t.Fatalf("nbdinfo --list: %s", list)
	}
	fi, err := os.Stat(s.sock)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, want 0600 (%v)", fi.Mode(), err)
	}
}

func TestQemuIOPatterns(t *testing.T) {
	need(t, "qemu-io")
	s := startServer(t, t.TempDir(), "vda=64M")
	cmds := []string{
		"write -P 0xa1 0 4k", "write -P 0xb2 1M 1M", "write -P 0xc3 63M 1M",
		"write -P 0xd4 12345 777", // unaligned
		"write -z 2M 512k", "discard 4M 64k", "flush",
		"write -f -P 0xe5 8M 8k", // FUA
	}
	var args []string
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	run(t, "qemu-io", append(append([]string{"-f", "raw"}, args...), s.uri("vda"))...)
	checks := []string{
		"read -P 0xa1 0 4k", "read -P 0xb2 1M 1M", "read -P 0xc3 63M 1M", "read -P 0xd4 12345 777",
		"read -P 0 2M 512k", "read -P 0 4M 64k", "read -P 0xe5 8M 8k", "read -P 0 16M 1M",
	}
	// Read back over a new connection, and again after a restart of the
	// server (from the image and journal on disk).
	for round := 0; round < 2; round++ {
		args = args[:0]
		for _, c := range checks {
			args = append(args, "-c", c)
		}
		out := run(t, "qemu-io", append(append([]string{"-f", "raw"}, args...), s.uri("vda"))...)
		if strings.Contains(out, "Pattern verification failed") || strings.Count(out, "read ") != len(checks) {
			t.Fatalf("round %d: qemu-io read back:\n%s", round, out)
		}
		s.stop(t)
		s = startServer(t, s.dir, "")
	}
}

func randomFile(tb testing.TB, path string, size int) []byte {
	tb.Helper()
	b := make([]byte, size)
	rand.Read(b)
	clear(b[size/4 : size/2]) // a zero region too
	if err := os.WriteFile(path, b, 0o600); err != nil {
		tb.Fatal(err)
	}
	return b
}

func TestCopyInOut(t *testing.T) {
	need(t, "qemu-img", "nbdcopy")
	dir := t.TempDir()
	const size = 48 << 20
	src := filepath.Join(dir, "src.img")
	want := randomFile(t, src, size)
	s := startServer(t, dir, fmt.Sprintf("a=%d,b=%d", size, size))
	tests := []struct {
		name    string
		in, out func(dst string) []string
		export  string
	}{
		{"qemu-img", func(string) []string {
			return []string{"qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, s.uri("a")}
		}, func(dst string) []string {
			return []string{"qemu-img", "convert", "-f", "raw", "-O", "raw", s.uri("a"), dst}
		}, "a"},
		{"nbdcopy", func(string) []string {
			return []string{"nbdcopy", "--flush", src, s.uri("b")}
		}, func(dst string) []string {
			return []string{"nbdcopy", s.uri("b"), dst}
		}, "b"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dst := filepath.Join(dir, tc.name+".out")
			in := tc.in(dst)
			run(t, in[0], in[1:]...)
			out := tc.out(dst)
			run(t, out[0], out[1:]...)
			got, err := os.ReadFile(dst)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("copied out differs from copied in")
			}
			run(t, "cmp", src, dst)
		})
	}
	// The images on disk equal the source too (after a clean stop).
	s.stop(t)
	for _, name := range []string{"a", "b"} {
		run(t, "cmp", src, filepath.Join(dir, "group", "images", name+".img"))
	}
}

func TestFioVerify(t *testing.T) {
	need(t, "fio")
	s := startServer(t, t.TempDir(), "vda=128M")
	for _, w := range [][]string{
		{"--rw=randwrite", "--bs=4k", "--iodepth=16"},
		{"--rw=write", "--bs=1M", "--iodepth=8", "--fsync=4"},
		{"--rw=randwrite", "--bsrange=512-256k", "--iodepth=32", "--fsync=16"},
	} {
		args := append([]string{"--name=verify", "--ioengine=nbd", "--uri=" + s.uri("vda"), "--size=64M",
			"--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--output-format=json"}, w...)
		out := run(t, "fio", args...)
		var res struct {
			Jobs []struct {
				Error int `json:"error"`
				Write struct {
					IOKiB int64 `json:"io_kbytes"`
				} `json:"write"`
			} `json:"jobs"`
		}
		if i := strings.Index(out, "{"); i >= 0 {
			out = out[i:]
		}
		if err := json.Unmarshal([]byte(out), &res); err != nil || len(res.Jobs) != 1 {
			t.Fatalf("fio output: %v\n%s", err, out)
		}
		if res.Jobs[0].Error != 0 || res.Jobs[0].Write.IOKiB < 64<<10 {
			t.Fatalf("fio %v: %+v", w, res.Jobs[0])
		}
	}
}

// TestKillNineServer writes and flushes through a ferry process, kills it
// with SIGKILL, restarts it and reads everything back: the journal makes
// flushed writes survive even if the image never got them.
func TestKillNineServer(t *testing.T) {
	need(t, "qemu-io")
	dir := t.TempDir()
	s := startServer(t, dir, "vda=32M")
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x11 0 2M", "-c", "write -P 0x22 5M 3M", "-c", "flush",
		"-c", "write -P 0x33 20M 1M", "-c", "flush", s.uri("vda"))
	s.kill()
	s = startServer(t, dir, "")
	out := run(t, "qemu-io", "-f", "raw", "-c", "read -P 0x11 0 2M", "-c", "read -P 0x22 5M 3M",
		"-c", "read -P 0x33 20M 1M", s.uri("vda"))
	if strings.Contains(out, "verification failed") {
		t.Fatalf("after kill -9:\n%s", out)
	}
}

// guestDir builds (or reuses) the test guest and returns its directory.
func guestDir(tb testing.TB) string {
	tb.Helper()
	dir, err := filepath.Abs("../build/guest")
	if err != nil {
		tb.Fatal(err)
	}
	fg := filepath.Join(filepath.Dir(dir), "ferry-guest")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s", "-o", fg, "../cmd/ferry-guest")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		tb.Fatalf("build ferry-guest: %v\n%s", err, out)
	}
	run(tb, "../guest/build.sh", dir, fg)
	return dir
}

// TestQEMUGuestWrites boots a real guest (TCG) with its disk on a ferry
// export over the unix socket; the guest writes, flushes and powers off, and
// the image holds what it wrote.
func TestQEMUGuestWrites(t *testing.T) {
	need(t, "qemu-system-x86_64", "apt-get", "dpkg-deb", "cpio")
	if runtime.GOARCH != "amd64" {
		t.Fatalf("the test guest is x86_64; this is %s", runtime.GOARCH)
	}
	g := guestDir(t)
	dir := t.TempDir()
	s := startServer(t, dir, "vda=32M")
	token := fmt.Sprintf("t%d", time.Now().UnixNano())
	console := filepath.Join(dir, "console.log")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-nographic", "-no-reboot",
		"-kernel", filepath.Join(g, "vmlinuz"), "-initrd", filepath.Join(g, "initrd.img"),
		"-append", "console=ttyS0 panic=-1 ferry.job=write-pattern ferry.token="+token,
		"-drive", "file="+s.uri("vda")+",format=raw,if=virtio,cache=none",
		"-serial", "file:"+console, "-monitor", "none", "-display", "none")
	if out, err := cmd.CombinedOutput(); err != nil {
		con, _ := os.ReadFile(console)
		t.Fatalf("qemu: %v\n%s\nconsole:\n%s", err, out, con)
	}
	t.Logf("guest booted, wrote and powered off in %v", time.Since(start).Round(time.Millisecond))
	con, _ := os.ReadFile(console)
	if !strings.Contains(string(con), "ferry-guest: wrote pattern") {
		t.Fatalf("guest did not report its writes:\n%s", con)
	}
	s.stop(t)
	img, err := os.ReadFile(filepath.Join(dir, "group", "images", "vda.img"))
	if err != nil {
		t.Fatal(err)
	}
	if want := "ferry-guest-ok " + token + "\n"; !bytes.HasPrefix(img, []byte(want)) {
		t.Fatalf("sector 0 = %q, want %q", img[:64], want)
	}
	pattern := bytes.Repeat([]byte(token+"\n"), 8<<20/(len(token)+1)+1)[:8<<20]
	if !bytes.Equal(img[1<<20:9<<20], pattern) {
		t.Fatal("the 8 MiB pattern the guest wrote is not in the image")
	}
}

// ext4Image writes an empty ext4 file system of size bytes at path (raw).
func ext4Image(t *testing.T, path string, size int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(size)
	f.Close()
	run(t, "mkfs.ext4", "-q", "-F", "-b", "4096", path)
}
