package e2e

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/agentclient"
	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/guest"
)

func workload(addr string) (guest.WorkloadState, error) { return guest.FetchState(addr) }

func until(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// viewToFile copies a view of the replica at seq into a file.
func viewToFile(t *testing.T, cb *agentclient.Client, seq uint64, path string) {
	t.Helper()
	vi, err := cb.OpenView(context.Background(), "vm1", api.OpenView{Disk: "vda", Seq: seq})
	if err != nil {
		t.Fatal(err)
	}
	defer cb.CloseView(context.Background(), vi.ID)
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", "nbd+unix:///"+vi.Export+"?socket="+vi.Socket, path)
}

func recordsIn(t *testing.T, img string) uint64 {
	t.Helper()
	out := filepath.Join(t.TempDir(), "records.log")
	run(t, "debugfs", "-R", "dump /records.log "+out, img)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	n, err := guest.VerifyRecords(b)
	if err != nil {
		t.Fatalf("records in %s: %v", img, err)
	}
	return n
}

// TestAppConsistentPoints runs the test guest's workload at site A on a
// replicated group, takes an application-consistent point while it writes,
// and checks at site B: the view at that point passes e2fsck -fn with no
// journal recovery and holds at least every record durable before the
// point, as a prefix; a crash-consistent view passes e2fsck once its ext4
// journal is replayed. Then the same guest without its guest agent: the
// application-consistent point fails with a reason and replication goes on.
func TestAppConsistentPoints(t *testing.T) {
	need(t, "qemu-system-x86_64", "qemu-img", "mkfs.ext4", "e2fsck", "debugfs")
	g := guestDir(t)
	st2 := twoSites(t)
	a, b, ca, cb, root := st2.a, st2.b, st2.ca, st2.cb, st2.root
	ctx := context.Background()
	const size = 64 << 20
	if err := ca.CreateGroup(ctx, "vm1", []api.DiskSpec{{Name: "vda", Size: size}}); err != nil {
		t.Fatal(err)
	}
	fs := filepath.Join(root, "fs.img")
	ext4Image(t, fs, size)
	run(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", fs, "nbd+unix:///vm1/vda?socket="+filepath.Join(a.dir, "nbd.sock"))
	if err := cb.ExpectReplica(ctx, "vm1", "siteA"); err != nil {
		t.Fatal(err)
	}
	if err := ca.Replicate(ctx, "vm1", api.Replicate{PeerAddr: b.addr, PeerName: "siteB"}); err != nil {
		t.Fatal(err)
	}
	web := freePort(t)
	startVM := func(qga string) {
		t.Helper()
		// Two NICs: the service on the first, the second on an
		// isolated network of its own.
		req := api.VMRequest{Name: "guest1", Group: "vm1", MemoryMiB: 256, QGA: true, NICs: []api.NICRequest{
			{Name: "nic0", Net: api.NetUser, Forwards: []api.Forward{{Host: netip.MustParseAddrPort(web), GuestPort: 80}}},
			{Name: "nic1", Net: api.NetIsolated, Subnet: "10.66.0.0/24"}},
			Boot: api.Boot{Kernel: filepath.Join(g, "vmlinuz"), Initrd: filepath.Join(g, "initrd.img"),
				Append: "console=ttyS0 panic=-1 ferry.job=workload ferry.data=vda ferry.rate=100 ferry.qga=" + qga}}
		if _, err := ca.StartVM(ctx, req); err != nil {
			t.Fatal(err)
		}
	}
	startVM("1")
	var before guest.WorkloadState
	until(t, 90*time.Second, "the workload", func() bool {
		st, err := workload(web)
		before = st
		return err == nil && st.LastDurable > 30
	})
	if want := []string{"eth0 52:54:00:12:34:56", "eth1 52:54:00:12:34:57"}; !slices.Equal(before.NICs, want) {
		t.Errorf("the guest sees NICs %q, want %q", before.NICs, want)
	}
	ap, err := ca.AppPoint(ctx, "vm1", "app1")
	if err != nil {
		t.Fatal(err)
	}
	if !ap.Succeeded || ap.Seq == 0 || ap.FreezeMS <= 0 || ap.FreezeMS > 10000 {
		t.Fatalf("app point: %+v", ap)
	}
	t.Logf("application-consistent point at seq %d, guest frozen %.1f ms", ap.Seq, ap.FreezeMS)
	// Let the workload go on, so that later crash-consistent points catch
	// it mid-write.
	until(t, 30*time.Second, "more records", func() bool {
		st, err := workload(web)
		return err == nil && st.LastDurable > before.LastDurable+100
	})
	var crash *api.Point
	until(t, 30*time.Second, "points at the recovery site", func() bool {
		pts, _ := cb.Points(ctx, "vm1")
		for i := range pts {
			if pts[i].Type == "crash" && pts[i].Seq > ap.Seq+50 {
				crash = &pts[i]
			}
		}
		return crash != nil
	})
	appImg := filepath.Join(root, "app.img")
	viewToFile(t, cb, ap.Seq, appImg)
	if out, err := exec.Command("e2fsck", "-fn", appImg).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn on the app-consistent view: %v\n%s", err, out)
	}
	if n := recordsIn(t, appImg); n < before.LastDurable {
		t.Fatalf("app view holds %d records; %d were durable before the point", n, before.LastDurable)
	}
	crashImg := filepath.Join(root, "crash.img")
	viewToFile(t, cb, crash.Seq, crashImg)
	// Replay the ext4 journal (as on a writable view), then it must be clean.
	if out, err := exec.Command("e2fsck", "-fy", crashImg).CombinedOutput(); err != nil {
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() > 1 {
			t.Fatalf("e2fsck -fy on the crash-consistent view: %v\n%s", err, out)
		}
	}
	if out, err := exec.Command("e2fsck", "-fn", crashImg).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn after journal replay: %v\n%s", err, out)
	}
	n := recordsIn(t, crashImg)
	t.Logf("crash-consistent point %d holds %d records", crash.Seq, n)

	// Graceful stop through the agent.
	stopped, err := ca.StopVM(ctx, "guest1", api.StopOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(strings.Join(stopped, ";"), "guest powered off") {
		t.Fatalf("stop steps: %q", stopped)
	}

	// The same guest without its guest agent.
	startVM("0")
	until(t, 90*time.Second, "the workload again", func() bool {
		st, err := workload(web)
		return err == nil && st.LastDurable > before.LastDurable+150
	})
	_, err = ca.AppPoint(ctx, "vm1", "app2")
	if !errors.Is(err, api.ErrConflict) || !strings.Contains(err.Error(), "guest agent") {
		t.Fatalf("app point without a guest agent: %v", err)
	}
	st, _ := ca.Status(ctx)
	gs := st.Groups[0]
	if gs.AppPoint == nil || gs.AppPoint.Succeeded || gs.AppPoint.Error == "" {
		t.Fatalf("failure not recorded: %+v", gs.AppPoint)
	}
	last := gs.LastSeq
	until(t, 30*time.Second, "replication to go on", func() bool {
		st, _ = ca.Status(ctx)
		r := st.Groups[0].Replication
		return r != nil && r.AckedSeq > last
	})
	ca.StopVM(ctx, "guest1", api.StopOptions{Force: true})
}
