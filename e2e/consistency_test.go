package e2e

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
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

// vmPair is two test guests: A writes records and, after each is durable,
// tells B its number over the network; B writes a record naming it. A
// recovery point is consistent across both VMs iff every record B holds
// names a record A holds.
type vmPair struct {
	groupA, diskA, groupB, diskB string
	webA, webB                   string // forwarded host addresses of their workloads
}

// start boots the pair at a site on groups (or, with seq, on the
// replicas at that point).
func (p *vmPair) start(t *testing.T, c *agentclient.Client, suffix string, seq uint64) {
	t.Helper()
	g := guestDir(t)
	p.webA, p.webB = freePort(t), freePort(t)
	_, portB, _ := strings.Cut(p.webB, ":")
	req := func(name, group, disk, web, extra string) api.VMRequest {
		r := api.VMRequest{Name: name + suffix, Disks: []string{disk}, MemoryMiB: 192, QGA: true,
			NICs: []api.NICRequest{{Name: "nic0", Net: api.NetUser, Forwards: []api.Forward{{Host: netip.MustParseAddrPort(web), GuestPort: 80}}}},
			Boot: api.Boot{Kernel: filepath.Join(g, "vmlinuz"), Initrd: filepath.Join(g, "initrd.img"),
				Append: "console=ttyS0 panic=-1 ferry.job=workload ferry.data=vda " + extra}}
		if seq != 0 {
			r.Replica, r.Seq = group, seq
		} else {
			r.Group = group
		}
		return r
	}
	ctx := context.Background()
	// B first: A tells it from its first record on.
	if _, err := c.StartVM(ctx, req("b", p.groupB, p.diskB, p.webB, "ferry.follow=1")); err != nil {
		t.Fatal(err)
	}
	if _, err := c.StartVM(ctx, req("a", p.groupA, p.diskA, p.webA, "ferry.rate=40 ferry.tell=10.0.2.2:"+portB)); err != nil {
		t.Fatal(err)
	}
}

func (p *vmPair) stop(c *agentclient.Client, suffix string) {
	c.StopVM(context.Background(), "a"+suffix, api.StopOptions{Force: true})
	c.StopVM(context.Background(), "b"+suffix, api.StopOptions{Force: true})
}

// diskAt copies a replica's disk at seq into a file, replays its ext4
// journal (as a VM booting on it would) and returns its record log.
func diskAt(t *testing.T, c *agentclient.Client, group, disk string, seq uint64, dir string) []byte {
	t.Helper()
	ctx := context.Background()
	vi, err := c.OpenView(ctx, group, api.OpenView{Disk: disk, Seq: seq})
	if err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, fmt.Sprintf("%s-%s-%d.img", group, disk, seq))
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", "nbd+unix:///"+vi.Export+"?socket="+vi.Socket, img)
	c.CloseView(ctx, vi.ID)
	if out, err := exec.Command("e2fsck", "-fy", img).CombinedOutput(); err != nil {
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() > 1 {
			t.Fatalf("e2fsck -fy %s: %v\n%s", img, err, out)
		}
	}
	logPath := img + ".records"
	run(t, "debugfs", "-R", "dump /records.log "+logPath, img)
	b, err := os.ReadFile(logPath)
	if errors.Is(err, os.ErrNotExist) {
		// A point before the workload created its log: no records.
		// (debugfs says so on stderr and exits 0.)
		b, err = nil, nil
	}
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(img)
	return b
}

// violations checks A's and B's record logs as of one instant: the
// records of B that name a record of A that A does not hold.
func violations(t *testing.T, logA, logB []byte) (bad, nA, nB uint64) {
	t.Helper()
	nA, err := guest.VerifyRecords(logA)
	if err != nil {
		t.Fatalf("A's records: %v", err)
	}
	nB, err = guest.VerifyRecords(logB)
	if err != nil {
		t.Fatalf("B's records: %v", err)
	}
	for _, peer := range guest.RecordPeers(logB, nB) {
		if peer > nA {
			bad++
		}
	}
	return bad, nA, nB
}

// TestCrossVMConsistency: two VMs whose disks are one consistency group
// share its points, so at every one of 20 random recovery points, and on
// the VMs failed over to the newest one, B never holds a record that
// names one of A's future. The same two VMs in separate groups, each
// recovered to its own newest point one after the other, show that the
// check does catch the violation. An application-consistent point
// freezes both.
func TestCrossVMConsistency(t *testing.T) {
	need(t, "qemu-system-x86_64", "qemu-img", "mkfs.ext4", "e2fsck", "debugfs")
	s := twoSites(t)
	ctx := context.Background()
	const size = 32 << 20
	fs := filepath.Join(s.root, "fs.img")
	ext4Image(t, fs, size)
	fill := func(group, disk string) {
		run(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", fs, "nbd+unix:///"+group+"/"+disk+"?socket="+filepath.Join(s.a.dir, "nbd.sock"))
	}
	protect := func(group string, disks ...string) {
		var specs []api.DiskSpec
		for _, d := range disks {
			specs = append(specs, api.DiskSpec{Name: d, Size: size})
		}
		if err := s.ca.CreateGroup(ctx, group, specs); err != nil {
			t.Fatal(err)
		}
		for _, d := range disks {
			fill(group, d)
		}
		if err := s.cb.ExpectReplica(ctx, group, "siteA"); err != nil {
			t.Fatal(err)
		}
		if err := s.ca.Replicate(ctx, group, api.Replicate{PeerAddr: s.b.addr, PeerName: "siteB"}); err != nil {
			t.Fatal(err)
		}
	}
	told := func(p *vmPair, n uint64) {
		t.Helper()
		until(t, 120*time.Second, fmt.Sprintf("B to write %d records on A's word", n), func() bool {
			st, err := workload(p.webB)
			return err == nil && st.LastDurable >= n
		})
	}
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))
	dir := t.TempDir()

	// One group, two VMs.
	protect("app", "a-vda", "b-vda")
	shared := &vmPair{groupA: "app", diskA: "a-vda", groupB: "app", diskB: "b-vda"}
	shared.start(t, s.ca, "", 0)
	told(shared, 10)
	talking := time.Now() // the points to check come after this
	told(shared, 100)
	// A guest agent that does not answer yet is a conflict (the point is
	// not taken, nothing frozen stays frozen): under CI's load a TCG guest
	// whose workload already answers over HTTP once took more than the
	// agent's 5 s to answer guest-sync. Ask again within a deadline; any
	// other failure ends the test.
	var (
		ap  api.AppPointStatus
		err error
	)
	until(t, 90*time.Second, "an application-consistent point of both VMs", func() bool {
		ap, err = s.ca.AppPoint(ctx, "app", "both")
		if err != nil && !errors.Is(err, api.ErrConflict) {
			t.Fatalf("app-consistent point of both VMs: %v", err)
		}
		if err != nil {
			t.Logf("app-consistent point not taken yet: %v", err)
		}
		return err == nil
	})
	if !ap.Succeeded {
		t.Fatalf("app-consistent point of both VMs: %+v", ap)
	}
	t.Logf("application-consistent point %d: both guests frozen together for %.1f ms", ap.Seq, ap.FreezeMS)
	st, _ := workload(shared.webB)
	told(shared, st.LastDurable+400) // ~10 s more: points to choose from
	var pts []api.Point
	until(t, 30*time.Second, "recovery points of app", func() bool {
		all, _ := s.cb.Points(ctx, "app")
		pts = pts[:0]
		for _, pt := range all {
			if pt.Type == "crash" && pt.Time.After(talking) {
				pts = append(pts, pt)
			}
		}
		return len(pts) >= 20
	})
	rng.Shuffle(len(pts), func(i, j int) { pts[i], pts[j] = pts[j], pts[i] })
	checked := pts[:20]
	slices.SortFunc(checked, func(x, y api.Point) int { return int(x.Seq) - int(y.Seq) })
	var withB int
	for _, pt := range checked {
		bad, nA, nB := violations(t, diskAt(t, s.cb, "app", "a-vda", pt.Seq, dir), diskAt(t, s.cb, "app", "b-vda", pt.Seq, dir))
		if bad > 0 {
			t.Errorf("point %d: B holds %d records naming records of A past its %d", pt.Seq, bad, nA)
		}
		if nB > 0 {
			withB++
		}
	}
	if withB < 20 {
		t.Fatalf("only %d of 20 points taken while B wrote hold records of B: the check proves little", withB)
	}

	// A failover of both VMs to the newest point: the site goes dark
	// (VMs killed), both boot at B on one point.
	newest, err := s.cb.Points(ctx, "app")
	if err != nil || len(newest) == 0 {
		t.Fatal(err)
	}
	shared.stop(s.ca, "")
	last := newest[len(newest)-1].Seq
	bad, nA, nB := violations(t, diskAt(t, s.cb, "app", "a-vda", last, dir), diskAt(t, s.cb, "app", "b-vda", last, dir))
	if bad > 0 {
		t.Fatalf("failover point %d: B holds %d records naming records of A past its %d", last, bad, nA)
	}
	failed := &vmPair{groupA: "app", diskA: "a-vda", groupB: "app", diskB: "b-vda"}
	failed.start(t, s.cb, "-fo", last)
	until(t, 120*time.Second, "both failed-over workloads", func() bool {
		a, errA := workload(failed.webA)
		b, errB := workload(failed.webB)
		return errA == nil && errB == nil && a.ResumedAfter == nA && b.ResumedAfter == nB
	})
	t.Logf("20 points and the failover point %d consistent across both VMs (%d records of A, %d of B there)", last, nA, nB)
	failed.stop(s.cb, "-fo")

	// Control: the same VMs, each its own group. Without a common point,
	// recovering them means picking a point for each, as separate
	// failovers do one after the other: A's newest point, then, a second
	// later, B's. B's records from that second name records of A past
	// A's point, and the check must see them.
	protect("sa", "vda")
	protect("sb", "vda")
	sep := &vmPair{groupA: "sa", diskA: "vda", groupB: "sb", diskB: "vda"}
	sep.start(t, s.ca, "-sep", 0)
	told(sep, 100)
	lastPoint := func(group string) api.Point {
		pts, err := s.cb.Points(ctx, group)
		if err != nil || len(pts) == 0 {
			return api.Point{}
		}
		return pts[len(pts)-1]
	}
	var pa, pb api.Point
	until(t, 30*time.Second, "a point of sa", func() bool { pa = lastPoint("sa"); return pa.Seq != 0 })
	until(t, 30*time.Second, "a point of sb a second after sa's", func() bool {
		pb = lastPoint("sb")
		return pb.Time.After(pa.Time.Add(time.Second))
	})
	sep.stop(s.ca, "-sep")
	caught, nA, _ := violations(t, diskAt(t, s.cb, "sa", "vda", pa.Seq, dir), diskAt(t, s.cb, "sb", "vda", pb.Seq, dir))
	if caught == 0 {
		t.Fatalf("separate groups, A's point then B's a second later: no record of B names a record of A past its %d; the check may be blind", nA)
	}
	t.Logf("separate groups: %d records of B name records of A past A's point (%d records)", caught, nA)
}

// TestGroupLifecycle: a consistency group of two real VMs, defined,
// started, protected and recovered through the vault: a planned failover
// starts both at the recovery site on one point with a step each and
// loses no durable record, commit keeps both running, and reprotect
// protects the group back.
func TestGroupLifecycle(t *testing.T) {
	need(t, "qemu-system-x86_64", "qemu-img", "mkfs.ext4")
	g := guestDir(t)
	s := twoSites(t)
	c, _ := startVaultProc(t, s)
	ctx := context.Background()
	webs := map[string][2]string{}
	var ms []api.VM
	for _, n := range []string{"db", "web"} {
		webs[n] = [2]string{freePort(t), freePort(t)}
		ms = append(ms, api.VM{Name: n, MemoryMiB: 192, Disks: []api.VMDisk{{Name: "vda", Size: 32 << 20}},
			Kernel: filepath.Join(g, "vmlinuz"), Initrd: filepath.Join(g, "initrd.img"),
			Append:   "console=ttyS0 panic=-1 ferry.job=workload ferry.data=vda ferry.rate=50",
			Forwards: map[string]string{"siteA": webs[n][0], "siteB": webs[n][1]}, GuestPort: 80, QGA: true})
	}
	if _, err := c.DefineVM(ctx, api.VM{Name: "shop", Site: "siteA", Members: ms}); err != nil {
		t.Fatal(err)
	}
	fs := filepath.Join(s.root, "fs.img")
	ext4Image(t, fs, 32<<20)
	for _, n := range []string{"db", "web"} {
		run(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", fs, "nbd+unix:///shop/"+n+"-vda?socket="+filepath.Join(s.a.dir, "nbd.sock"))
	}
	if _, err := c.StartVM(ctx, "shop"); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"db", "web"} {
		until(t, 90*time.Second, "the workload of "+n+" at siteA", func() bool {
			st, err := workload(webs[n][0])
			return err == nil && st.LastDurable > 20
		})
	}
	runJob(t, c, api.JobSucceeded)(c.Enable(ctx, api.EnableRequest{VM: "shop", Target: "siteB"}))
	durable := map[string]uint64{}
	for _, n := range []string{"db", "web"} {
		st, _ := workload(webs[n][0])
		durable[n] = st.LastDurable
	}
	yes := true
	j := runJob(t, c, api.JobSucceeded)(c.Failover(ctx, "shop", api.FailoverRequest{Point: "latest", ShutdownSource: &yes}))
	var names []string
	for _, st := range j.Steps {
		names = append(names, st.Name)
	}
	if got := strings.Join(names, ","); !strings.HasSuffix(got, "start db at recovery site,start web at recovery site") {
		t.Errorf("failover steps %q: want a start step per VM", got)
	}
	p, err := c.Protection(ctx, "shop")
	if err != nil || p.State != api.StateFailedOver || p.FailoverSeq == 0 {
		t.Fatalf("after the failover: %+v, %v", p, err)
	}
	st, err := s.cb.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	points := map[string]uint64{}
	for _, v := range st.VMs {
		points[v.Name] = v.Point
	}
	if points["db"] != p.FailoverSeq || points["web"] != p.FailoverSeq {
		t.Fatalf("the VMs at siteB run on points %v, want both on %d", points, p.FailoverSeq)
	}
	for _, n := range []string{"db", "web"} {
		until(t, 90*time.Second, n+" resumed at siteB with every durable record", func() bool {
			st, err := workload(webs[n][1])
			return err == nil && st.ResumedAfter >= durable[n] && st.LastDurable > st.ResumedAfter
		})
	}
	runJob(t, c, api.JobSucceeded)(c.Commit(ctx, "shop"))
	for _, n := range []string{"db", "web"} {
		before, _ := workload(webs[n][1])
		until(t, 30*time.Second, n+" writing after the commit", func() bool {
			st, err := workload(webs[n][1])
			return err == nil && st.LastDurable > before.LastDurable+20
		})
	}
	runJob(t, c, api.JobSucceeded)(c.Reprotect(ctx, "shop"))
	if p, _ := c.Protection(ctx, "shop"); p.State != api.StateProtected || p.Source != "siteB" || p.Target != "siteA" {
		t.Fatalf("after reprotect: %+v", p)
	}
}
