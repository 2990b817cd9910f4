package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/agentclient"
	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/guest"
	"github.com/ferry-dr/ferry/internal/nbd"
	"github.com/ferry-dr/ferry/internal/vaultclient"
)

// TestDRLifecycle drives the vault (its own process, SQLite store, tokens)
// and two site agents through the tutorial with a real guest: protect,
// DR drill and cleanup, planned failover with the source shut down (no
// record lost), commit, and the forbidden moves in between.
func TestDRLifecycle(t *testing.T) {
	need(t, "qemu-system-x86_64", "qemu-img", "mkfs.ext4")
	g := guestDir(t)
	s := twoSites(t) // agents siteA (east) and siteB (west)
	c, vp := startVaultProc(t, s)
	ctx := context.Background()
	bad, _ := vaultclient.New("https://"+vp.addr, "fy_wrong", filepath.Join(s.a.pki, "ca.crt"))
	if _, err := bad.Sites(ctx); !errors.Is(err, api.ErrUnauthorized) || !strings.Contains(err.Error(), "unknown token") {
		t.Fatalf("bad token: %v", err)
	}
	// Enrollment with a one-time token. The sites are already known: a
	// plain enroll token cannot take over siteB's name; a re-enrollment
	// token an operator made for siteB can, once.
	anon, _ := vaultclient.New("https://"+vp.addr, "", filepath.Join(s.a.pki, "ca.crt"))
	plain, err := c.CreateToken(ctx, api.TokenRequest{Role: "enroll", Name: "new site"})
	if err != nil {
		t.Fatal(err)
	}
	if err := anon.Enroll(ctx, api.Enroll{Token: plain.Token, Name: "siteB", Addr: "127.0.0.1:9"}); !errors.Is(err, api.ErrConflict) {
		t.Fatalf("enrollment over an existing site: %v, want a conflict", err)
	}
	enroll, err := c.CreateToken(ctx, api.TokenRequest{Role: "enroll", Name: "siteB", Reenroll: "siteB"})
	if err != nil {
		t.Fatal(err)
	}
	if err := anon.Enroll(ctx, api.Enroll{Token: enroll.Token, Name: "siteB", Addr: s.b.addr}); err != nil {
		t.Fatal(err)
	}
	if err := anon.Enroll(ctx, api.Enroll{Token: enroll.Token, Name: "siteB", Addr: s.b.addr}); !errors.Is(err, api.ErrUnauthorized) {
		t.Fatalf("an enroll token used twice: %v, want unauthorized", err)
	}
	webA, webB := freePort(t), freePort(t)
	createWorkloadVM(t, c, s, g, webA, webB)
	ok := runJob(t, c, api.JobSucceeded)
	refused := func(want error, text string) func(api.Job, error) {
		return func(_ api.Job, err error) {
			t.Helper()
			if !errors.Is(err, want) || !strings.Contains(err.Error(), text) {
				t.Fatalf("%v, want %v with %q", err, want, text)
			}
		}
	}
	protection := func() api.Protection {
		p, _ := c.Protection(ctx, "web")
		return p
	}
	refused(api.ErrNotFound, "not found")(c.Failover(ctx, "web", api.FailoverRequest{}))
	// Site B declares its own networks; the protection maps the VM's NIC
	// to them, and the guest's DHCP address shows where it is attached.
	for _, n := range []api.Network{{Name: "prod-b", Kind: api.NetworkProduction, Subnet: "10.20.0.0/24"}, {Name: "drill-b", Kind: api.NetworkIsolated, Subnet: "10.99.0.0/24"}} {
		if _, err := c.PutNetwork(ctx, "siteB", n); err != nil {
			t.Fatal(err)
		}
	}
	drillAddr := freePort(t)
	if _, err := c.SetForwards(ctx, "web", map[string]string{"siteB/drill-b": drillAddr}); err != nil {
		t.Fatal(err)
	}
	ok(c.Enable(ctx, api.EnableRequest{VM: "web", Target: "siteB", Networks: map[string]string{"nic0": "prod-b"}, TestNetwork: "drill-b"}))
	if st, err := guest.FetchState(webA); err != nil || !strings.HasPrefix(st.Addr, "10.0.2.") {
		t.Fatalf("the VM at site A is on %q (%v), want its production network 10.0.2.0/24", st.Addr, err)
	}
	if p := protection(); p.State != api.StateProtected {
		t.Fatalf("after enable: %+v", p)
	}
	refused(api.ErrConflict, "fail over first")(c.Commit(ctx, "web"))
	// A point must exist at the recovery site.
	until(t, 30*time.Second, "recovery points", func() bool {
		pts, err := c.Points(ctx, "web")
		return err == nil && len(pts) > 0
	})

	// DR drill.
	drill := ok(c.TestFailover(ctx, "web", "latest-processed"))
	if p := protection(); !p.TestPending || p.State != api.StateProtected {
		t.Fatalf("during drill: %+v", p)
	}
	t.Logf("drill job steps: %v", stepNames(drill))
	var drillSt guest.WorkloadState
	until(t, 60*time.Second, "the drill VM's workload", func() bool {
		var err error
		drillSt, err = guest.FetchState(drillAddr)
		return err == nil
	})
	if !strings.HasPrefix(drillSt.Addr, "10.99.0.") {
		t.Fatalf("the drill VM is on %q, want site B's isolated network 10.99.0.0/24", drillSt.Addr)
	}
	refused(api.ErrConflict, "clean up the pending test failover")(c.TestFailover(ctx, "web", ""))
	ok(c.CleanupTestFailover(ctx, "web", "drill passed"))
	if p := protection(); p.TestPending || len(p.History) < 2 {
		t.Fatalf("after cleanup: %+v", p)
	}

	// Planned failover: the source VM is shut down first; nothing is lost.
	before, err := guest.FetchState(webA)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	yes := true
	fo := ok(c.Failover(ctx, "web", api.FailoverRequest{Point: "latest", ShutdownSource: &yes}))
	t.Logf("failover job: %v in %v", stepNames(fo), time.Since(start).Round(time.Millisecond))
	var after guest.WorkloadState
	until(t, 90*time.Second, "the workload at site B", func() bool {
		after, err = guest.FetchState(webB)
		return err == nil && after.LastDurable > 0
	})
	t.Logf("VM answering at site B %v after the failover began; records before %d, after %d", time.Since(start).Round(time.Millisecond), before.LastDurable, after.LastDurable)
	if !strings.HasPrefix(after.Addr, "10.20.0.") {
		t.Fatalf("the failed-over VM is on %q, want site B's production network 10.20.0.0/24", after.Addr)
	}
	if after.LastDurable < before.LastDurable {
		t.Fatalf("planned failover lost records: %d durable before, %d after", before.LastDurable, after.LastDurable)
	}
	if after.ChecksumErrors != 0 {
		t.Fatalf("records damaged after failover: %+v", after)
	}
	if p := protection(); p.State != api.StateFailedOver || p.Generation != 2 {
		t.Fatalf("after failover: %+v", p)
	}
	refused(api.ErrConflict, "only a protected VM can fail over")(c.Failover(ctx, "web", api.FailoverRequest{}))
	refused(api.ErrConflict, "commit the failover first")(c.Reprotect(ctx, "web"))

	// Commit does not stop the VM: its HTTP answers every 100 ms poll
	// while the job runs, and its record count keeps growing.
	pollStop := make(chan struct{})
	pollDone := make(chan []string)
	go func() {
		var missed []string
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-pollStop:
				pollDone <- missed
				return
			case <-tick.C:
			}
			if _, err := guest.FetchState(webB); err != nil {
				missed = append(missed, err.Error())
			}
		}
	}()
	cj := ok(c.Commit(ctx, "web"))
	close(pollStop)
	if missed := <-pollDone; len(missed) > 0 {
		t.Fatalf("the VM did not answer %d polls during commit: %v", len(missed), missed)
	}
	if msgs := strings.Join(cj.Steps[0].Messages, " "); !strings.Contains(msgs, "kept running") {
		t.Fatalf("commit steps: %+v", cj.Steps)
	}
	t.Logf("commit: %v", cj.Steps[0].Messages)
	if p := protection(); p.State != api.StateCommitted {
		t.Fatalf("after commit: %+v", p)
	}
	refused(api.ErrConflict, "committed")(c.ChangePoint(ctx, "web", "latest-processed"))
	if _, err := c.Points(ctx, "web"); err == nil {
		t.Fatal("recovery points still listed after commit")
	}
	until(t, 90*time.Second, "the workload on standalone disks", func() bool {
		st, err := guest.FetchState(webB)
		return err == nil && st.LastDurable > after.LastDurable
	})

	// Reprotect B -> A: the plan reuses A's disks; only differences go.
	plan, err := c.PlanReprotect(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	if plan.From != "siteB" || plan.To != "siteA" || len(plan.Disks) != 1 || plan.Disks[0].Action != "reuse" ||
		plan.Method != "changed-block tracking" || plan.ExpectedBytes <= 0 || plan.ExpectedBytes >= plan.MaxBytes/2 {
		t.Fatalf("reprotect plan: %+v", plan)
	}
	rp := ok(c.Reprotect(ctx, "web"))
	t.Logf("reprotect: %v", rp.Steps[len(rp.Steps)-1].Messages)
	if p := protection(); p.State != api.StateProtected || p.Source != "siteB" || p.Target != "siteA" {
		t.Fatalf("after reprotect: %+v", p)
	}
	checkSent := func(j api.Job) {
		t.Helper()
		if !strings.Contains(strings.Join(j.Steps[2].Messages, " "), "changed-block tracking") {
			t.Fatalf("reprotect did not use changed-block tracking: %v", j.Steps[2].Messages)
		}
		var sent, total int64
		for _, m := range j.Steps[len(j.Steps)-1].Messages {
			fmt.Sscanf(m, "sent %d bytes for %d bytes", &sent, &total)
		}
		if total == 0 || sent >= total/2 {
			t.Fatalf("reprotect sent %d of %d bytes: not a delta", sent, total)
		}
	}
	checkSent(rp)

	// Once drained, the replica equals the source.
	replicaEqualsSource(t, c, s.cb, s.ca, s.b.dir)
	if _, err := c.StartVM(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	until(t, 90*time.Second, "the workload at site B again", func() bool {
		st, err := guest.FetchState(webB)
		return err == nil && st.LastDurable > 0
	})

	// Failback with shutdown: nothing lost.
	until(t, 30*time.Second, "a recovery point at site A", func() bool {
		pts, err := c.Points(ctx, "web")
		return err == nil && len(pts) > 0
	})
	beforeB, err := guest.FetchState(webB)
	if err != nil {
		t.Fatal(err)
	}
	ok(c.Failover(ctx, "web", api.FailoverRequest{Point: "latest", ShutdownSource: &yes}))
	var back guest.WorkloadState
	until(t, 90*time.Second, "the workload back at site A", func() bool {
		back, err = guest.FetchState(webA)
		return err == nil && back.LastDurable > 0
	})
	if back.LastDurable < beforeB.LastDurable || back.ChecksumErrors != 0 {
		t.Fatalf("failback lost records: %d before, %+v after", beforeB.LastDurable, back)
	}
	if !strings.HasPrefix(back.Addr, "10.0.2.") {
		t.Fatalf("after failback the VM is on %q, want site A's production network 10.0.2.0/24", back.Addr)
	}
	ok(c.Commit(ctx, "web"))
	rp2 := ok(c.Reprotect(ctx, "web"))
	checkSent(rp2)
	if p := protection(); p.State != api.StateProtected || p.Source != "siteA" || p.Target != "siteB" {
		t.Fatalf("full circle: %+v", p)
	}
}

func stepNames(j api.Job) []string {
	var out []string
	for _, s := range j.Steps {
		out = append(out, s.Name+"="+string(s.State))
	}
	return out
}

// replicaEqualsSource stops the VM at the source (no more writes; through
// the vault, which would otherwise start it again), waits until a point
// marked after that reached the recovery site, and compares the source's
// disk with a view of the replica at that point, byte for byte.
func replicaEqualsSource(t *testing.T, c *vaultclient.Client, src, dst *agentclient.Client, srcDir string) {
	t.Helper()
	ctx := context.Background()
	if _, err := c.StopVM(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	seq, err := markAndWait(t, src, dst, "web", "compare")
	if err != nil {
		t.Fatal(err)
	}
	vi, err := dst.OpenView(ctx, "web", api.OpenView{Disk: "vda", Seq: seq})
	if err != nil {
		t.Fatal(err)
	}
	defer dst.CloseView(ctx, vi.ID)
	srcDisk, err := nbd.Dial(ctx, "unix", filepath.Join(srcDir, "nbd.sock"), "web/vda")
	if err != nil {
		t.Fatal(err)
	}
	defer srcDisk.Close()
	repView, err := nbd.Dial(ctx, "unix", vi.Socket, vi.Export)
	if err != nil {
		t.Fatal(err)
	}
	defer repView.Close()
	if !bytes.Equal(readAll(t, srcDisk, 64<<20), readAll(t, repView, 64<<20)) {
		t.Fatal("after reprotect and drain, the replica differs from the source disk")
	}
}
