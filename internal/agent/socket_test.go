package agent

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/disk"
)

func TestSocketAccess(t *testing.T) {
	root := t.TempDir()
	closed := filepath.Join(root, "closed")
	open := filepath.Join(root, "open")
	for _, d := range []string{closed, open} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	for d := root; d != "/" && d != os.TempDir(); d = filepath.Dir(d) {
		if err := os.Chmod(d, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(open, 0o711); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, group string
		mode        os.FileMode
		sock        string
		wantGID     int
		wantErr     string // part of the message; "" for success
	}{
		{"no group: private", "", 0, filepath.Join(closed, "nbd.sock"), 0, ""},
		{"a mode needs a group", "", 0o660, filepath.Join(open, "nbd.sock"), 0, "without a group"},
		{"unknown group", "no-such-group-ferry", 0, filepath.Join(open, "nbd.sock"), 0, "no-such-group-ferry"},
		{"a directory in the way", "nogroup", 0, filepath.Join(closed, "nbd.sock"), 0, "chmod o+x " + closed},
		{"reachable", "nogroup", 0, filepath.Join(open, "nbd.sock"), 65534, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			acc, err := socketAccess(tc.group, tc.mode, tc.sock)
			if tc.wantErr != "" {
				if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want ErrInvalid saying %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if acc.GID != tc.wantGID {
				t.Fatalf("GID = %d, want %d", acc.GID, tc.wantGID)
			}
		})
	}
}

// TestLibvirtOnlyRequests: a site that runs QEMU directly refuses, as
// invalid requests and before anything runs, what only libvirt can do:
// a libvirt domain, a libvirt network attachment, an import.
func TestLibvirtOnlyRequests(t *testing.T) {
	a := startAgent(t, pkiDir(t, "s1"), "s1")
	ctx := context.Background()
	if err := a.CreateGroup("vm1", []disk.Spec{{Name: "vda", Size: 1 << 20}}); err != nil {
		t.Fatal(err)
	}
	for _, req := range []VMRequest{
		{Name: "x", Group: "vm1", MemoryMiB: 64, Domain: "<domain type='kvm'><name>x</name></domain>"},
		{Name: "x", Group: "vm1", MemoryMiB: 64, Attach: "network:prod"},
	} {
		if _, err := a.StartVM(ctx, req); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "--runtime libvirt") {
			t.Errorf("StartVM(domain %t, attach %q): %v, want ErrInvalid naming --runtime libvirt", req.Domain != "", req.Attach, err)
		}
	}
	if _, err := a.Import(ctx, api.ImportRequest{Domain: "web"}); !errors.Is(err, ErrInvalid) {
		t.Errorf("Import at a QEMU site: %v, want ErrInvalid", err)
	}
	if err := a.Release(ctx, "vm1"); !errors.Is(err, ErrInvalid) {
		t.Errorf("Release at a QEMU site: %v, want ErrInvalid", err)
	}
	if st := a.FullStatus(ctx); len(st.VMs) != 0 {
		t.Errorf("a refused VM runs: %+v", st.VMs)
	}
}
