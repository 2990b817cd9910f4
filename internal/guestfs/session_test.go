package guestfs

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
)

// The tests run the real appliance (one for the whole package: it takes
// 10-20 s to start under TCG) on disks served by qemu-nbd over unix
// sockets: a whole-disk ext4, a GPT disk holding ext4, XFS and swap, and
// an MBR disk holding XFS.

func run(t testing.TB, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// serve exports img read-only over NBD on a unix socket in dir.
func serve(t testing.TB, dir, img string) string {
	t.Helper()
	sock := filepath.Join(dir, filepath.Base(img)+".sock")
	cmd := exec.Command("qemu-nbd", "--read-only", "--persistent", "--shared=4", "-f", "raw", "-k", sock, img)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			return sock
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu-nbd did not create %s", sock)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

type fixture struct {
	s    *Session
	text []byte // /docs/report.txt on every file system
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	dir := t.TempDir()
	text := bytes.Repeat([]byte("the invoice for order 42 is paid\n"), 4000)
	src := filepath.Join(dir, "src")
	os.MkdirAll(filepath.Join(src, "docs", "deep"), 0o755)
	os.WriteFile(filepath.Join(src, "docs", "report.txt"), text, 0o644)
	os.WriteFile(filepath.Join(src, "docs", "deep", "a.log"), []byte("log line\n"), 0o600)
	os.Symlink("report.txt", filepath.Join(src, "docs", "latest"))
	// vda: ext4 over the whole disk.
	whole := filepath.Join(dir, "vda.img")
	run(t, "truncate", "-s", "64M", whole)
	run(t, "mkfs.ext4", "-q", "-F", "-d", src, whole)
	// vdb: GPT with ext4 (1), XFS (2) and swap (3).
	parts := filepath.Join(dir, "vdb.img")
	run(t, "truncate", "-s", "400M", parts)
	sf := exec.Command("sfdisk", "-q", parts)
	sf.Stdin = strings.NewReader("label: gpt\nstart=2048, size=131072\nstart=133120, size=614400\nstart=747520, size=32768\n")
	if out, err := sf.CombinedOutput(); err != nil {
		t.Fatalf("sfdisk: %v %s", err, out)
	}
	p1 := filepath.Join(dir, "p1.img")
	run(t, "truncate", "-s", "64M", p1)
	run(t, "mkfs.ext4", "-q", "-F", "-d", src, p1)
	proto := filepath.Join(dir, "proto")
	os.WriteFile(proto, fmt.Appendf(nil, "/dev/null\n0 0\nd--755 0 0\ndocs d--755 0 0\nreport.txt ---644 0 0 %s\n$\n$\n", filepath.Join(src, "docs", "report.txt")), 0o644)
	p2 := filepath.Join(dir, "p2.img")
	run(t, "truncate", "-s", "300M", p2)
	run(t, "mkfs.xfs", "-q", "-f", "-p", proto, p2)
	p3 := filepath.Join(dir, "p3.img")
	run(t, "truncate", "-s", "16M", p3)
	run(t, "mkswap", "-q", p3)
	for _, p := range []struct {
		img   string
		start int
	}{{p1, 2048}, {p2, 133120}, {p3, 747520}} {
		run(t, "dd", "if="+p.img, "of="+parts, "bs=512", fmt.Sprintf("seek=%d", p.start), "conv=notrunc,sparse", "status=none")
	}
	// vdc: MBR (dos) with one XFS partition starting at 1 MiB.
	mbr := filepath.Join(dir, "vdc.img")
	run(t, "truncate", "-s", "320M", mbr)
	sf = exec.Command("sfdisk", "-q", mbr)
	sf.Stdin = strings.NewReader("label: dos\nstart=2048, size=614400, type=83\n")
	if out, err := sf.CombinedOutput(); err != nil {
		t.Fatalf("sfdisk: %v %s", err, out)
	}
	p4 := filepath.Join(dir, "p4.img") // its own XFS: two of one UUID do not mount side by side
	run(t, "truncate", "-s", "300M", p4)
	run(t, "mkfs.xfs", "-q", "-f", "-p", proto, p4)
	run(t, "dd", "if="+p4, "of="+mbr, "bs=512", "seek=2048", "conv=notrunc,sparse", "status=none")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	s, err := Open(ctx, Config{Drives: []Drive{{Name: "vda", Socket: serve(t, dir, whole)}, {Name: "vdb", Socket: serve(t, dir, parts)}, {Name: "vdc", Socket: serve(t, dir, mbr)}},
		ForceTCG: os.Getenv("FERRY_ACCEL") != "kvm"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return &fixture{s: s, text: text}
}

func TestSession(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	fss := map[string]string{}
	for _, fs := range f.s.Filesystems() {
		fss[fs.Device] = fs.Type
	}
	want := map[string]string{"/dev/sda": "ext4", "/dev/sdb1": "ext4", "/dev/sdb2": "xfs", "/dev/sdb3": "swap", "/dev/sdc1": "xfs"}
	for dev, typ := range want {
		if fss[dev] != typ {
			t.Errorf("file system on %s: %q, want %q (all: %v)", dev, fss[dev], typ, fss)
		}
	}
	if got := f.s.Devices(); len(got) != 3 || got[0] != "/dev/sda" || got[1] != "/dev/sdb" || got[2] != "/dev/sdc" {
		t.Errorf("devices %v", got)
	}
	for _, dev := range []string{"/dev/sda", "/dev/sdb1", "/dev/sdb2", "/dev/sdc1"} {
		t.Run(dev, func(t *testing.T) {
			es, err := f.s.List(ctx, dev, "/docs")
			if err != nil {
				t.Fatal(err)
			}
			got := map[string]Entry{}
			for _, e := range es {
				got[e.Name] = e
			}
			if e := got["report.txt"]; e.Type != "file" || e.Size != int64(len(f.text)) {
				t.Errorf("report.txt: %+v, want a file of %d bytes", e, len(f.text))
			}
			var b bytes.Buffer
			if err := f.s.Download(ctx, dev, "/docs/report.txt", &b); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(b.Bytes(), f.text) {
				t.Errorf("downloaded %d bytes, not the file's %d", b.Len(), len(f.text))
			}
		})
	}
	// A tree as tar, a symlink as a symlink.
	var b bytes.Buffer
	if err := f.s.Tar(ctx, "/dev/sda", "/docs", &b); err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(&b)
	var names []string
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, strings.TrimPrefix(h.Name, "./"))
		if strings.TrimPrefix(h.Name, "./") == "latest" && (h.Typeflag != tar.TypeSymlink || h.Linkname != "report.txt") {
			t.Errorf("latest: %+v, want a symlink to report.txt", h)
		}
	}
	sort.Strings(names)
	if !strings.Contains(strings.Join(names, " "), "deep/a.log") || !strings.Contains(strings.Join(names, " "), "report.txt") {
		t.Errorf("tar of /docs: %v", names)
	}
	// Errors, each of its kind, and the session still works after them.
	tests := []struct {
		dev, path string
		want      error
	}{
		{"/dev/sda", "/nope", api.ErrNotFound},
		{"/dev/sda", "/docs/report.txt", api.ErrInvalid},
		{"/dev/sdb3", "/", api.ErrUnsupported},
		{"/dev/sdz", "/", api.ErrInvalid},
	}
	for _, tt := range tests {
		if _, err := f.s.List(ctx, tt.dev, tt.path); !errors.Is(err, tt.want) {
			t.Errorf("List(%s, %s): %v, want %v", tt.dev, tt.path, err, tt.want)
		}
	}
	if err := f.s.Download(ctx, "/dev/sda", "/nope", io.Discard); !errors.Is(err, api.ErrNotFound) {
		t.Errorf("Download of a missing file: %v", err)
	}
	if n, err := f.s.Usage(ctx, "/dev/sda", "/docs"); err != nil || n < int64(len(f.text)) {
		t.Errorf("Usage(/docs) = %d, %v; want at least %d", n, err, len(f.text))
	}
	// A receiver that goes away mid-file: an error, and the session goes on.
	if err := f.s.Download(ctx, "/dev/sda", "/docs/report.txt", failingWriter{}); err == nil {
		t.Error("a failing writer: no error")
	}
	if _, err := f.s.Stat(ctx, "/dev/sda", "/docs/latest"); err != nil {
		t.Errorf("the session after a failed download: %v", err)
	}
}

type failingWriter struct{}

func (failingWriter) Write([]byte) (int, error) { return 0, errors.New("gone") }
