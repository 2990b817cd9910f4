package e2e

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/agentclient"
	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/nbd"
	"github.com/ferry-dr/ferry/internal/qemu"
)

// TestBootFromReplicatedDisk puts a bootable disk (SYSLINUX, the test
// guest's kernel and initramfs) on a replicated group at site A, then at
// site B boots a VM from writable views of the replica: the BIOS loads the
// boot loader from the replicated disk over NBD, the guest writes to its
// second disk and powers off; the writes land in the view's overlay, not
// in the replica. The same disk also boots at site A through the agent.
func TestBootFromReplicatedDisk(t *testing.T) {
	need(t, "qemu-system-x86_64", "qemu-img", "syslinux", "mcopy", "mkfs.vfat")
	g := guestDir(t)
	run(t, "../guest/build-disk.sh", g)
	st2 := twoSites(t)
	a, b, ca, cb := st2.a, st2.b, st2.ca, st2.cb
	ctx := context.Background()
	if err := ca.CreateGroup(ctx, "vm2", []api.DiskSpec{{Name: "boot", Size: 48 << 20}, {Name: "data", Size: 32 << 20}}); err != nil {
		t.Fatal(err)
	}
	sockA := filepath.Join(a.dir, "nbd.sock")
	run(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", filepath.Join(g, "boot.img"), "nbd+unix:///vm2/boot?socket="+sockA)
	if err := cb.ExpectReplica(ctx, "vm2", "siteA"); err != nil {
		t.Fatal(err)
	}
	if err := ca.Replicate(ctx, "vm2", api.Replicate{PeerAddr: b.addr, PeerName: "siteB"}); err != nil {
		t.Fatal(err)
	}
	seq, err := markAndWait(t, ca, cb, "vm2", "bootable")
	if err != nil {
		t.Fatal(err)
	}

	// Site B: boot the replica from writable views.
	var views []api.ViewInfo
	for _, d := range []string{"boot", "data"} {
		vi, err := cb.OpenView(ctx, "vm2", api.OpenView{Disk: d, Seq: seq, Writable: true})
		if err != nil {
			t.Fatal(err)
		}
		views = append(views, vi)
	}
	start := time.Now()
	vm, err := qemu.Start(ctx, qemu.Spec{Name: "drill", MemoryMiB: 256, Accel: "auto",
		Disks: []qemu.Disk{{Socket: views[0].Socket, Export: views[0].Export}, {Socket: views[1].Socket, Export: views[1].Export}}},
		t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-vm.Done():
	case <-time.After(90 * time.Second):
		vm.Kill()
		t.Fatal("the guest booted from the replica did not power off")
	}
	if st := vm.Status(ctx); st.State != qemu.StateStopped {
		t.Fatalf("VM booted from the replica: %+v", st)
	}
	t.Logf("booted from the replicated disk, wrote and powered off in %v", time.Since(start).Round(time.Millisecond))
	head := func(sock, export string) []byte {
		c, err := nbd.Dial(ctx, "unix", sock, export)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		b := make([]byte, 32)
		if err := c.ReadAt(ctx, b, 0); err != nil {
			t.Fatal(err)
		}
		return b
	}
	if got := head(views[1].Socket, views[1].Export); !bytes.HasPrefix(got, []byte("ferry-guest-ok bootdisk")) {
		t.Fatalf("the guest's write is not in the writable view: %q", got)
	}
	ro, err := cb.OpenView(ctx, "vm2", api.OpenView{Disk: "data", Seq: seq})
	if err != nil {
		t.Fatal(err)
	}
	if got := head(ro.Socket, ro.Export); !bytes.Equal(got, make([]byte, 32)) {
		t.Fatalf("the drill's write reached the replica: %q", got)
	}

	// Site A: the agent boots the same disk.
	if _, err := ca.StartVM(ctx, api.VMRequest{Name: "g2", Group: "vm2", MemoryMiB: 256, Net: api.NetNone}); err != nil {
		t.Fatal(err)
	}
	until(t, 90*time.Second, "the guest at site A to power off", func() bool {
		st, _ := ca.Status(ctx)
		return len(st.VMs) == 1 && st.VMs[0].State == qemu.StateStopped
	})
	if got := head(sockA, "vm2/data"); !strings.HasPrefix(string(got), "ferry-guest-ok bootdisk") {
		t.Fatalf("site A guest's write: %q", got)
	}
}

// markAndWait records a named point at the source and waits until the
// recovery site lists it; it returns the point's sequence.
func markAndWait(t *testing.T, ca, cb *agentclient.Client, group, label string) (uint64, error) {
	t.Helper()
	ctx := context.Background()
	// A point is only offered once the initial copy is over: wait for it.
	until(t, 60*time.Second, "the initial copy", func() bool {
		st, _ := ca.Status(ctx)
		for _, g := range st.Groups {
			if g.Name == group && g.Replication != nil && g.Replication.State == api.ReplStreaming && g.Replication.AckedSeq == g.LastSeq {
				return true
			}
		}
		return false
	})
	seq, err := ca.Mark(ctx, group, api.Marker{Type: api.PointNamed, Label: label})
	if err != nil {
		return 0, err
	}
	var lastErr error
	var pts []api.Point
	defer func() {
		if t.Failed() {
			st, _ := cb.Status(ctx)
			t.Logf("points %v, err %v, recovery status %+v", pts, lastErr, st)
		}
	}()
	until(t, 60*time.Second, "point "+label+" at the recovery site", func() bool {
		pts, lastErr = cb.Points(ctx, group)
		for _, p := range pts {
			if p.Label == label {
				return true
			}
		}
		return false
	})
	return seq, nil
}
