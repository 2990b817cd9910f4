package agent

import (
	"errors"
	"testing"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/guestfs"
)

func TestSplitFilePath(t *testing.T) {
	tests := []struct {
		in         string
		root, rest string
		bad        bool
	}{
		{"/", "", "/", false},
		{"/vda1", "vda1", "/", false},
		{"/vda1/etc/passwd", "vda1", "/etc/passwd", false},
		{"/vdb/docs/../etc", "vdb", "/etc", false},
		{"/../../etc", "etc", "/", false}, // Clean keeps it inside the root
		{"/vdb//docs/", "vdb", "/docs", false},
		{"vdb/docs", "", "", true},
		{"", "", "", true},
		{"/vdb/a\x00b", "", "", true},
	}
	for _, tt := range tests {
		root, rest, err := splitFilePath(tt.in)
		if tt.bad {
			if !errors.Is(err, api.ErrInvalid) {
				t.Errorf("splitFilePath(%q): %v, want ErrInvalid", tt.in, err)
			}
			continue
		}
		if err != nil || root != tt.root || rest != tt.rest {
			t.Errorf("splitFilePath(%q) = %q, %q, %v; want %q, %q", tt.in, root, rest, err, tt.root, tt.rest)
		}
	}
}

func TestFileRoots(t *testing.T) {
	disks := []api.DiskSpec{{ID: 0, Name: "vda"}, {ID: 1, Name: "vdb"}}
	fss := []guestfs.FS{{Device: "/dev/sda1", Type: "ext4"}, {Device: "/dev/sda2", Type: "swap"}, {Device: "/dev/sdb", Type: "xfs"},
		{Device: "/dev/vg0/data", Type: "ext4"}, {Device: "/dev/sda12", Type: "vfat"}}
	got := fileRoots([]string{"/dev/sda", "/dev/sdb"}, fss, disks)
	want := map[string]string{"vda1": "/dev/sda1", "vda2": "/dev/sda2", "vdb": "/dev/sdb", "vg0-data": "/dev/vg0/data", "vda12": "/dev/sda12"}
	if len(got) != len(want) {
		t.Fatalf("roots %+v", got)
	}
	for name, dev := range want {
		if got[name].Device != dev {
			t.Errorf("root %s: %+v, want device %s", name, got[name], dev)
		}
	}
	if got["vda2"].Unsupported == "" || got["vda1"].Unsupported != "" {
		t.Errorf("swap must be unsupported, ext4 not: %+v %+v", got["vda2"], got["vda1"])
	}
}
