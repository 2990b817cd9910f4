package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/guest"
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
	pk := s.a.pki
	run(t, ferryBin, "ca", "issue", "--pki", pk, "vault")
	vdir := filepath.Join(s.root, "vault")
	vaddr := freePort(t)
	cmd := exec.Command(ferryBin, "vault", "run", "--dir", vdir, "--pki", pk, "--listen", vaddr)
	var vlog bytes.Buffer
	cmd.Stdout, cmd.Stderr = &vlog, &vlog
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		cmd.Process.Signal(os.Interrupt)
		cmd.Wait()
		if t.Failed() {
			t.Logf("vault log:\n%s", vlog.String())
		}
	}()
	var token string
	until(t, 15*time.Second, "the vault's first token", func() bool {
		b, err := os.ReadFile(filepath.Join(vdir, "operator.token"))
		token = strings.TrimSpace(string(b))
		return err == nil && token != ""
	})
	c, err := vault.NewClient("https://"+vaddr, token, filepath.Join(pk, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	until(t, 15*time.Second, "the vault API", func() bool { return c.Do(ctx, "GET", "/v1/sites", nil, nil) == nil })
	bad, _ := vault.NewClient("https://"+vaddr, "fy_wrong", filepath.Join(pk, "ca.crt"))
	if err := bad.Do(ctx, "GET", "/v1/sites", nil, nil); err == nil || !strings.Contains(err.Error(), "unknown token") {
		t.Fatalf("bad token: %v", err)
	}
	if err := c.Do(ctx, "POST", "/v1/sites", map[string]string{"name": "siteA", "addr": s.a.addr}, nil); err != nil {
		t.Fatal(err)
	}
	var enroll map[string]string
	if err := c.Do(ctx, "POST", "/v1/tokens", map[string]string{"role": "enroll", "name": "siteB"}, &enroll); err != nil {
		t.Fatal(err)
	}
	anon, _ := vault.NewClient("https://"+vaddr, "", filepath.Join(pk, "ca.crt"))
	if err := anon.Do(ctx, "POST", "/v1/enroll", map[string]string{"token": enroll["token"], "name": "siteB", "addr": s.b.addr}, nil); err != nil {
		t.Fatal(err)
	}
	until(t, 15*time.Second, "both sites reachable", func() bool {
		var sites []vault.Site
		c.Do(ctx, "GET", "/v1/sites", nil, &sites)
		return len(sites) == 2 && sites[0].Reachable && sites[1].Reachable
	})

	webA, webB := freePort(t), freePort(t)
	vm := vault.VM{Name: "web", Site: "siteA", MemoryMiB: 256, Disks: []vault.DiskSpec{{Name: "vda", Size: 64 << 20}},
		Kernel: filepath.Join(g, "vmlinuz"), Initrd: filepath.Join(g, "initrd.img"),
		Append:   "console=ttyS0 panic=-1 ferry.job=workload ferry.data=vda ferry.rate=100",
		Forwards: map[string]string{"siteA/user": webA, "siteB/user": webB}, GuestPort: 80, QGA: true}
	if err := c.Do(ctx, "POST", "/v1/vms", vm, nil); err != nil {
		t.Fatal(err)
	}
	fs := filepath.Join(s.root, "fs.img")
	f, _ := os.Create(fs)
	f.Truncate(64 << 20)
	f.Close()
	run(t, "mkfs.ext4", "-q", "-F", fs)
	run(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", fs, "nbd+unix:///web/vda?socket="+filepath.Join(s.a.dir, "nbd.sock"))
	if err := c.Do(ctx, "POST", "/v1/vms/web/start", nil, nil); err != nil {
		t.Fatal(err)
	}
	until(t, 90*time.Second, "the workload at site A", func() bool {
		st, err := guest.FetchState(webA)
		return err == nil && st.LastDurable > 20
	})
	runJob := func(path string, body any, want string) vault.Job {
		t.Helper()
		var j vault.Job
		if err := c.Do(ctx, "POST", path, body, &j); err != nil {
			t.Fatalf("POST %s: %v", path, err)
		}
		deadline := time.Now().Add(3 * time.Minute)
		for j.State == vault.JobRunning && time.Now().Before(deadline) {
			time.Sleep(200 * time.Millisecond)
			c.Do(ctx, "GET", "/v1/jobs/"+j.ID, nil, &j)
		}
		if j.State != want {
			t.Fatalf("job %s %s: %s (%s)\n%+v", j.ID, j.Action, j.State, j.Error, j.Steps)
		}
		return j
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
	runJob("/v1/protections", map[string]string{"vm": "web", "target": "siteB"}, vault.JobSucceeded)
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
	if plan.From != "siteB" || plan.To != "siteA" || len(plan.Disks) != 1 || plan.Disks[0].Action != "reuse" {
		t.Fatalf("reprotect plan: %+v", plan)
	}
	rp := runJob("/v1/protections/web/reprotect", nil, vault.JobSucceeded)
	t.Logf("reprotect: %v", rp.Steps[len(rp.Steps)-1].Messages)
	if p := protection(); p.State != vault.StateProtected || p.Source != "siteB" || p.Target != "siteA" {
		t.Fatalf("after reprotect: %+v", p)
	}
	checkSent := func(j vault.Job) {
		t.Helper()
		var sent, total int64
		for _, m := range j.Steps[len(j.Steps)-1].Messages {
			fmt.Sscanf(m, "sent %d bytes for %d bytes", &sent, &total)
		}
		if total == 0 || sent >= total/2 {
			t.Fatalf("reprotect sent %d of %d bytes: not a delta", sent, total)
		}
	}
	checkSent(rp)

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
