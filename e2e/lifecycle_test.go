package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/agent"
	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/guest"
	"github.com/ferry-dr/ferry/internal/nbd"
	"github.com/ferry-dr/ferry/internal/qemu"
	"github.com/ferry-dr/ferry/internal/vault"
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
	bad, _ := vault.NewClient("https://"+vp.addr, "fy_wrong", filepath.Join(s.a.pki, "ca.crt"))
	if err := bad.Do(ctx, "GET", "/v1/sites", nil, nil); err == nil || !strings.Contains(err.Error(), "unknown token") {
		t.Fatalf("bad token: %v", err)
	}
	// Enrollment with a one-time token. The sites are already known: a
	// plain enroll token cannot take over siteB's name; a re-enrollment
	// token an operator made for siteB can, once.
	anon, _ := vault.NewClient("https://"+vp.addr, "", filepath.Join(s.a.pki, "ca.crt"))
	var plain map[string]any
	if err := c.Do(ctx, "POST", "/v1/tokens", map[string]string{"role": "enroll", "name": "new site"}, &plain); err != nil {
		t.Fatal(err)
	}
	if err := anon.Do(ctx, "POST", "/v1/enroll", map[string]any{"token": plain["token"], "name": "siteB", "addr": "127.0.0.1:9"}, nil); !errors.Is(err, api.ErrConflict) {
		t.Fatalf("enrollment over an existing site: %v, want a conflict", err)
	}
	var enroll map[string]any
	if err := c.Do(ctx, "POST", "/v1/tokens", map[string]string{"role": "enroll", "name": "siteB", "reenroll": "siteB"}, &enroll); err != nil {
		t.Fatal(err)
	}
	if err := anon.Do(ctx, "POST", "/v1/enroll", map[string]any{"token": enroll["token"], "name": "siteB", "addr": s.b.addr}, nil); err != nil {
		t.Fatal(err)
	}
	if err := anon.Do(ctx, "POST", "/v1/enroll", map[string]any{"token": enroll["token"], "name": "siteB", "addr": s.b.addr}, nil); !errors.Is(err, api.ErrUnauthorized) {
		t.Fatalf("an enroll token used twice: %v, want unauthorized", err)
	}
	webA, webB := freePort(t), freePort(t)
	createWorkloadVM(t, c, s, g, webA, webB)
	runJob := func(path string, body any, want string) vault.Job {
		t.Helper()
		return runJob(t, c, path, body, want)
	}
	refused := func(path string, body any, text string) {
		t.Helper()
		if err := c.Do(ctx, "POST", path, body, nil); err == nil || !strings.Contains(err.Error(), text) {
			t.Fatalf("POST %s: %v, want refusal with %q", path, err, text)
		}
	}
	protection := func() vault.Protection {
		var p vault.Protection
		c.Do(ctx, "GET", "/v1/protections/web", nil, &p)
		return p
	}
	refused("/v1/protections/web/failover", map[string]string{}, "not found")
	// Site B declares its own networks; the protection maps the VM's NIC
	// to them, and the guest's DHCP address shows where it is attached.
	for name, n := range map[string]vault.Network{"prod-b": {Kind: vault.KindProduction, Subnet: "10.20.0.0/24"}, "drill-b": {Kind: vault.KindIsolated, Subnet: "10.99.0.0/24"}} {
		if err := c.Do(ctx, "PUT", "/v1/sites/siteB/networks/"+name, n, nil); err != nil {
			t.Fatal(err)
		}
	}
	drillAddr := freePort(t)
	if err := c.Do(ctx, "PUT", "/v1/vms/web/forwards", map[string]string{"siteB/drill-b": drillAddr}, nil); err != nil {
		t.Fatal(err)
	}
	runJob("/v1/protections", map[string]any{"vm": "web", "target": "siteB", "networks": map[string]string{"nic0": "prod-b"}, "test_network": "drill-b"}, vault.JobSucceeded)
	if st, err := guest.FetchState(webA); err != nil || !strings.HasPrefix(st.Addr, "10.0.2.") {
		t.Fatalf("the VM at site A is on %q (%v), want its production network 10.0.2.0/24", st.Addr, err)
	}
	if p := protection(); p.State != vault.StateProtected {
		t.Fatalf("after enable: %+v", p)
	}
	refused("/v1/protections/web/commit", nil, "fail over first")
	// A point must exist at the recovery site.
	until(t, 30*time.Second, "recovery points", func() bool {
		var pts []map[string]any
		return c.Do(ctx, "GET", "/v1/protections/web/points", nil, &pts) == nil && len(pts) > 0
	})

	// DR drill.
	drill := runJob("/v1/protections/web/test-failover", map[string]string{"point": "latest-processed"}, vault.JobSucceeded)
	if p := protection(); !p.TestPending || p.State != vault.StateProtected {
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
	refused("/v1/protections/web/test-failover", map[string]string{}, "clean up the pending test failover")
	runJob("/v1/protections/web/test-failover/cleanup", map[string]string{"notes": "drill passed"}, vault.JobSucceeded)
	if p := protection(); p.TestPending || len(p.History) < 2 {
		t.Fatalf("after cleanup: %+v", p)
	}

	// Planned failover: the source VM is shut down first; nothing is lost.
	before, err := guest.FetchState(webA)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	fo := runJob("/v1/protections/web/failover", map[string]any{"point": "latest", "shutdown_source": true}, vault.JobSucceeded)
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
	if p := protection(); p.State != vault.StateFailedOver || p.Generation != 2 {
		t.Fatalf("after failover: %+v", p)
	}
	refused("/v1/protections/web/failover", map[string]string{}, "only a protected VM can fail over")
	refused("/v1/protections/web/reprotect", nil, "commit the failover first")

	runJob("/v1/protections/web/commit", nil, vault.JobSucceeded)
	if p := protection(); p.State != vault.StateCommitted {
		t.Fatalf("after commit: %+v", p)
	}
	refused("/v1/protections/web/change-point", map[string]string{"point": "latest-processed"}, "committed")
	if err := c.Do(ctx, "GET", "/v1/protections/web/points", nil, nil); err == nil {
		t.Fatal("recovery points still listed after commit")
	}
	until(t, 90*time.Second, "the workload on standalone disks", func() bool {
		st, err := guest.FetchState(webB)
		return err == nil && st.LastDurable > after.LastDurable
	})

	// Reprotect B -> A: the plan reuses A's disks; only differences go.
	var plan vault.ReprotectPlan
	if err := c.Do(ctx, "GET", "/v1/protections/web/reprotect-plan", nil, &plan); err != nil {
		t.Fatal(err)
	}
	if plan.From != "siteB" || plan.To != "siteA" || len(plan.Disks) != 1 || plan.Disks[0].Action != "reuse" ||
		plan.Method != "changed-block tracking" || plan.ExpectedBytes <= 0 || plan.ExpectedBytes >= plan.MaxBytes/2 {
		t.Fatalf("reprotect plan: %+v", plan)
	}
	rp := runJob("/v1/protections/web/reprotect", nil, vault.JobSucceeded)
	t.Logf("reprotect: %v", rp.Steps[len(rp.Steps)-1].Messages)
	if p := protection(); p.State != vault.StateProtected || p.Source != "siteB" || p.Target != "siteA" {
		t.Fatalf("after reprotect: %+v", p)
	}
	checkSent := func(j vault.Job) {
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
	replicaEqualsSource(t, s.cb, s.ca, s.b.dir)
	if err := s.cb.Do(ctx, "POST", "/v1/vms", agent.VMRequest{Name: "web", Group: "web", MemoryMiB: 256, QGA: true, Net: qemu.NetUser,
		Forwards: []qemu.Forward{{Host: netip.MustParseAddrPort(webB), GuestPort: 80}},
		Boot: qemu.Boot{Kernel: filepath.Join(g, "vmlinuz"), Initrd: filepath.Join(g, "initrd.img"),
			Append: "console=ttyS0 panic=-1 ferry.job=workload ferry.data=vda ferry.rate=100"}}, nil); err != nil {
		t.Fatal(err)
	}
	until(t, 90*time.Second, "the workload at site B again", func() bool {
		st, err := guest.FetchState(webB)
		return err == nil && st.LastDurable > 0
	})

	// Failback with shutdown: nothing lost.
	until(t, 30*time.Second, "a recovery point at site A", func() bool {
		var pts []map[string]any
		return c.Do(ctx, "GET", "/v1/protections/web/points", nil, &pts) == nil && len(pts) > 0
	})
	beforeB, err := guest.FetchState(webB)
	if err != nil {
		t.Fatal(err)
	}
	runJob("/v1/protections/web/failover", map[string]any{"point": "latest", "shutdown_source": true}, vault.JobSucceeded)
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
	runJob("/v1/protections/web/commit", nil, vault.JobSucceeded)
	rp2 := runJob("/v1/protections/web/reprotect", nil, vault.JobSucceeded)
	checkSent(rp2)
	if p := protection(); p.State != vault.StateProtected || p.Source != "siteA" || p.Target != "siteB" {
		t.Fatalf("full circle: %+v", p)
	}
}

func stepNames(j vault.Job) []string {
	var out []string
	for _, s := range j.Steps {
		out = append(out, s.Name+"="+s.State)
	}
	return out
}

// replicaEqualsSource stops the VM at the source (no more writes), waits
// until a point marked after that reached the recovery site, and compares
// the source's disk with a view of the replica at that point, byte for
// byte.
func replicaEqualsSource(t *testing.T, src, dst *agent.Client, srcDir string) {
	t.Helper()
	ctx := context.Background()
	var stopped struct{ Steps []string }
	if err := src.Do(ctx, "DELETE", "/v1/vms/web", nil, &stopped); err != nil {
		t.Fatal(err)
	}
	seq, err := markAndWait(t, src, dst, "web", "compare")
	if err != nil {
		t.Fatal(err)
	}
	var vi agent.ViewInfo
	if err := dst.Do(ctx, "POST", "/v1/replicas/web/views", map[string]any{"disk": "vda", "seq": seq}, &vi); err != nil {
		t.Fatal(err)
	}
	defer dst.Do(ctx, "DELETE", "/v1/views/"+vi.ID, nil, nil)
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
