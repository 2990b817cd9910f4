package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/agent"
	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/guest"
	"github.com/ferry-dr/ferry/internal/vaultclient"
)

// TestUnplannedFailoverAndFencing kills the source site (SIGKILL) while
// its VM runs, fails over to the recovery site, brings the source back:
// it must not start the VM or replicate as a source (fencing), the vault
// fences it, and reprotect proceeds. The records at the recovery site are
// a prefix of what the source wrote, up to the RPO.
func TestUnplannedFailoverAndFencing(t *testing.T) {
	e := protectedWeb(t)
	s, c, webA, webB := e.s, e.c, e.webA, e.webB
	ctx := context.Background()
	until(t, 90*time.Second, "records replicated", func() bool {
		st, err := guest.FetchState(webA)
		return err == nil && st.LastDurable > 100
	})
	// The link goes first (site B dies for a while), so that site A holds
	// writes that never reached B: a reprotect must send them back too.
	s.b.kill()
	until(t, 30*time.Second, "writes at site A that site B lacks", func() bool {
		st, _ := s.ca.Status(ctx)
		for _, g := range st.Groups {
			if g.Name == "web" && g.Replication != nil && g.LastSeq > g.Replication.AckedSeq+200 {
				return true
			}
		}
		return false
	})
	before, _ := guest.FetchState(webA)
	// The source site dies; site B comes back.
	killed := time.Now()
	s.a.kill()
	s.b.start(t)
	siteReachable(t, c, "siteA", false)
	siteReachable(t, c, "siteB", true)
	t.Logf("site A unreachable %v after the kill", time.Since(killed).Round(time.Millisecond))
	fo := runJob(t, c, api.JobSucceeded)(c.Failover(ctx, "web", api.FailoverRequest{Point: "latest"}))
	if !strings.Contains(strings.Join(fo.Steps[1].Messages, " "), "source site is down") {
		t.Fatalf("the job does not say the source was down: %+v", fo.Steps[1])
	}
	var after guest.WorkloadState
	until(t, 90*time.Second, "the workload at site B", func() bool {
		st, err := guest.FetchState(webB)
		after = st
		return err == nil && st.LastDurable > 0
	})
	t.Logf("unplanned failover: %d records durable at A before the kill sample, %d at B after", before.LastDurable, after.LastDurable)
	if after.ChecksumErrors != 0 {
		t.Fatalf("damaged records after an unplanned failover: %+v", after)
	}
	// Site A comes back; its group still says "replicate to B".
	s.a.start(t)
	until(t, 20*time.Second, "the vault to fence site A", func() bool {
		p, _ := c.Protection(ctx, "web")
		return p.Fenced
	})
	ca := s.ca
	_, err := ca.StartVM(ctx, api.VMRequest{Name: "web", Group: "web", MemoryMiB: 256})
	if !errors.Is(err, api.ErrConflict) || !strings.Contains(err.Error(), "fenced") {
		t.Fatalf("starting the VM at the fenced old source: %v", err)
	}
	st, _ := ca.Status(ctx)
	for _, gs := range st.Groups {
		if gs.Replication != nil {
			t.Fatalf("the fenced old source still replicates: %+v", gs.Replication)
		}
	}
	runJob(t, c, api.JobSucceeded)(c.Commit(ctx, "web"))
	rp := runJob(t, c, api.JobSucceeded)(c.Reprotect(ctx, "web"))
	if msgs := strings.Join(rp.Steps[2].Messages, " "); !strings.Contains(msgs, "changed-block tracking") {
		t.Fatalf("reprotect after an unplanned failover did not use changed-block tracking: %s", msgs)
	}
	t.Logf("reprotect: %v %v", rp.Steps[2].Messages, rp.Steps[len(rp.Steps)-1].Messages)
	p, _ := c.Protection(ctx, "web")
	if p.State != api.StateProtected || p.Source != "siteB" {
		t.Fatalf("after reprotect: %+v", p)
	}
	// Site A's unshipped writes were overwritten with site B's data.
	replicaEqualsSource(t, c, s.cb, s.ca, s.b.dir)
}

// vaultProc is a running 'ferry vault run' process.
type vaultProc struct {
	cmd       *exec.Cmd
	args      []string
	log       bytes.Buffer
	dir, addr string
}

func (v *vaultProc) start(t *testing.T) {
	t.Helper()
	v.cmd = exec.Command(ferryBin, v.args...)
	v.cmd.Stdout, v.cmd.Stderr = &v.log, &v.log
	if err := v.cmd.Start(); err != nil {
		t.Fatal(err)
	}
}

// startVaultProc runs a vault process for the two sites and returns an
// operator client; both sites are added and reachable.
func startVaultProc(t *testing.T, s *sites) (*vaultclient.Client, *vaultProc) {
	t.Helper()
	pk := s.a.pki
	run(t, ferryBin, "ca", "issue", "--pki", pk, "--role", "vault", "vault")
	vp := &vaultProc{dir: filepath.Join(s.root, "vault"), addr: freePort(t)}
	vp.args = []string{"vault", "run", "--dir", vp.dir, "--pki", pk, "--listen", vp.addr}
	vp.start(t)
	t.Cleanup(func() {
		vp.cmd.Process.Signal(os.Interrupt)
		vp.cmd.Wait()
		if t.Failed() {
			t.Logf("vault log:\n%s", vp.log.String())
		}
	})
	var token string
	until(t, 15*time.Second, "the vault's first token", func() bool {
		b, err := os.ReadFile(filepath.Join(vp.dir, "operator.token"))
		token = strings.TrimSpace(string(b))
		return err == nil && token != ""
	})
	c, err := vaultclient.New("https://"+vp.addr, token, filepath.Join(pk, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	until(t, 15*time.Second, "the vault API", func() bool { return sitesOK(c) })
	for _, x := range []*agentProc{s.a, s.b} {
		if err := c.AddSite(ctx, api.AddSite{Name: x.name, Addr: x.addr}); err != nil {
			t.Fatal(err)
		}
	}
	siteReachable(t, c, "siteA", true)
	siteReachable(t, c, "siteB", true)
	return c, vp
}

// TestVaultKilledMidFailover kills the vault (SIGKILL) while a planned
// failover runs: at restart the job is failed with the step it was in, the
// protection is released (not stuck), and the failover can be retried.
func TestVaultKilledMidFailover(t *testing.T) {
	e := protectedWeb(t)
	c, vp, webB := e.c, e.vp, e.webB
	ctx := context.Background()
	j, err := c.Failover(ctx, "web", api.FailoverRequest{Point: "latest"})
	if err != nil {
		t.Fatal(err)
	}
	// The guest's shutdown takes a moment: kill the vault inside it.
	until(t, 20*time.Second, "the job to be shutting the source down", func() bool {
		cur, _ := c.Job(ctx, j.ID)
		return cur.Steps[1].State == api.JobRunning
	})
	vp.cmd.Process.Kill()
	vp.cmd.Wait()
	vp.start(t)
	until(t, 15*time.Second, "the vault back", func() bool { return sitesOK(c) })
	after, _ := c.Job(ctx, j.ID)
	if after.State != api.JobFailed || !strings.Contains(after.Error, "the vault stopped during step") {
		t.Fatalf("job after the vault's restart: %s %q", after.State, after.Error)
	}
	p, _ := c.Protection(ctx, "web")
	if p.State != api.StateProtected || p.Job != "" {
		t.Fatalf("protection after restart: %+v", p)
	}
	siteReachable(t, c, "siteA", true)
	siteReachable(t, c, "siteB", true)
	retry := runJob(t, c, api.JobSucceeded)(c.Failover(ctx, "web", api.FailoverRequest{Point: "latest"}))
	t.Logf("retried failover: %v", stepNames(retry))
	until(t, 90*time.Second, "the workload at site B", func() bool {
		st, err := guest.FetchState(webB)
		return err == nil && st.LastDurable > 0
	})
}

// createWorkloadVM defines the test guest's workload VM "web" at site A
// with an ext4 data disk and starts it.
func createWorkloadVM(t *testing.T, c *vaultclient.Client, s *sites, g, webA, webB string) {
	t.Helper()
	defineWorkloadVM(t, c, s, g, "web", webA, webB)
}

// defineWorkloadVM defines the test guest as VM name at site A, with an
// ext4 data disk and its HTTP published at webA and webB, and starts it.
func defineWorkloadVM(t *testing.T, c *vaultclient.Client, s *sites, g, name, webA, webB string) {
	t.Helper()
	defineWorkloadVMSize(t, c, s, g, name, webA, webB, 64<<20)
}

// defineWorkloadVMSize is defineWorkloadVM with a data disk of size bytes.
func defineWorkloadVMSize(t *testing.T, c *vaultclient.Client, s *sites, g, name, webA, webB string, size int64) {
	t.Helper()
	ctx := context.Background()
	vm := api.VM{Name: name, Site: "siteA", MemoryMiB: 256, Disks: []api.VMDisk{{Name: "vda", Size: size}},
		Kernel: filepath.Join(g, "vmlinuz"), Initrd: filepath.Join(g, "initrd.img"),
		Append:   "console=ttyS0 panic=-1 ferry.job=workload ferry.data=vda ferry.rate=100",
		Forwards: map[string]string{"siteA": webA, "siteB": webB}, GuestPort: 80, QGA: true}
	if _, err := c.DefineVM(ctx, vm); err != nil {
		t.Fatal(err)
	}
	fs := filepath.Join(s.root, name+"-fs.img")
	ext4Image(t, fs, size)
	run(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", fs, "nbd+unix:///"+name+"/vda?socket="+filepath.Join(s.a.dir, "nbd.sock"))
	if _, err := c.StartVM(ctx, name); err != nil {
		t.Fatal(err)
	}
	until(t, 90*time.Second, "the workload of "+name+" at site A", func() bool {
		st, err := guest.FetchState(webA)
		return err == nil && st.LastDurable > 20
	})
}

// runJob waits for the job a call started to end in state want:
// runJob(t, c, api.JobSucceeded)(c.Commit(ctx, "web")).
func runJob(t *testing.T, c *vaultclient.Client, want api.JobState) func(api.Job, error) api.Job {
	return func(j api.Job, err error) api.Job {
		t.Helper()
		if err != nil {
			t.Fatalf("start the job: %v", err)
		}
		ctx := context.Background()
		deadline := time.Now().Add(3 * time.Minute)
		for j.State == api.JobRunning && time.Now().Before(deadline) {
			time.Sleep(200 * time.Millisecond)
			if cur, err := c.Job(ctx, j.ID); err == nil {
				j = cur
			}
		}
		if j.State != want {
			t.Fatalf("job %s %s: %s (%s)\n%+v", j.ID, j.Action, j.State, j.Error, j.Steps)
		}
		return j
	}
}

// sitesOK reports whether the vault answers.
func sitesOK(c *vaultclient.Client) bool {
	_, err := c.Sites(context.Background())
	return err == nil
}

// TestRecoverySiteDownDuringDrill loses the recovery site while a drill
// runs there: the cleanup fails with a reason and the drill stays pending
// (nothing stuck); when the site is back, the cleanup succeeds and
// replication catches up.
func TestRecoverySiteDownDuringDrill(t *testing.T) {
	e := protectedWeb(t)
	s, c := e.s, e.c
	ctx := context.Background()
	until(t, 30*time.Second, "recovery points", func() bool {
		pts, err := c.Points(ctx, "web")
		return err == nil && len(pts) > 0
	})
	runJob(t, c, api.JobSucceeded)(c.TestFailover(ctx, "web", ""))
	s.b.kill()
	siteReachable(t, c, "siteB", false)
	j := runJob(t, c, api.JobFailed)(c.CleanupTestFailover(ctx, "web", "site down"))
	if !strings.Contains(j.Error, "unreachable") {
		t.Fatalf("cleanup with the recovery site down: %q", j.Error)
	}
	p, _ := c.Protection(ctx, "web")
	if !p.TestPending || p.Job != "" || p.State != api.StateProtected {
		t.Fatalf("after the failed cleanup: %+v", p)
	}
	s.b.start(t)
	siteReachable(t, c, "siteA", true)
	siteReachable(t, c, "siteB", true)
	runJob(t, c, api.JobSucceeded)(c.CleanupTestFailover(ctx, "web", "after the outage"))
	var st agent.Status
	until(t, 60*time.Second, "replication to catch up", func() bool {
		st, _ = s.ca.Status(ctx)
		r := st.Groups[0].Replication
		return r != nil && r.State == api.ReplStreaming && r.AckedSeq+50 >= st.Groups[0].LastSeq
	})
}

// TestVaultKilledMidReprotect kills the vault while a reprotect compares
// and sends differences: at restart the job is failed and the protection is
// back to failover-committed; the retried reprotect finds the work already
// done (the old disks are the replica, replication runs) and completes.
func TestVaultKilledMidReprotect(t *testing.T) {
	e := protectedWeb(t)
	c, vp := e.c, e.vp
	ctx := context.Background()
	runJob(t, c, api.JobSucceeded)(c.Failover(ctx, "web", api.FailoverRequest{Point: "latest"}))
	runJob(t, c, api.JobSucceeded)(c.Commit(ctx, "web"))
	j, err := c.Reprotect(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	until(t, 30*time.Second, "the reprotect to start replication", func() bool {
		cur, _ := c.Job(ctx, j.ID)
		return cur.Steps[3].State != api.JobPending
	})
	vp.cmd.Process.Kill()
	vp.cmd.Wait()
	vp.start(t)
	until(t, 15*time.Second, "the vault back", func() bool { return sitesOK(c) })
	after, _ := c.Job(ctx, j.ID)
	p, _ := c.Protection(ctx, "web")
	if after.State == api.JobRunning || p.Job != "" {
		t.Fatalf("after restart: job %s, protection %+v", after.State, p)
	}
	if after.State == api.JobFailed && p.State != api.StateCommitted {
		t.Fatalf("a failed reprotect left %+v", p)
	}
	siteReachable(t, c, "siteA", true)
	siteReachable(t, c, "siteB", true)
	if after.State == api.JobFailed {
		retry := runJob(t, c, api.JobSucceeded)(c.Reprotect(ctx, "web"))
		t.Logf("retried reprotect: %v", stepNames(retry))
	}
	p, _ = c.Protection(ctx, "web")
	if p.State != api.StateProtected || p.Source != "siteB" {
		t.Fatalf("after the retried reprotect: %+v", p)
	}
}

// siteReachable waits until the vault sees site as reachable (or not).
func siteReachable(t *testing.T, c *vaultclient.Client, site string, want bool) {
	t.Helper()
	until(t, 15*time.Second, fmt.Sprintf("site %s reachable=%v", site, want), func() bool {
		sites, _ := c.Sites(context.Background())
		for _, x := range sites {
			if x.Name == site && x.Reachable == want {
				return true
			}
		}
		return false
	})
}

// drEnv is two sites, a vault, and the workload VM "web" at siteA
// protected to siteB.
type drEnv struct {
	s          *sites
	c          *vaultclient.Client
	vp         *vaultProc
	webA, webB string
}

func protectedWeb(t *testing.T) *drEnv {
	t.Helper()
	need(t, "qemu-system-x86_64", "qemu-img", "mkfs.ext4")
	g := guestDir(t)
	e := &drEnv{s: twoSites(t), webA: freePort(t), webB: freePort(t)}
	e.c, e.vp = startVaultProc(t, e.s)
	createWorkloadVM(t, e.c, e.s, g, e.webA, e.webB)
	runJob(t, e.c, api.JobSucceeded)(e.c.Enable(context.Background(), api.EnableRequest{VM: "web", Target: "siteB"}))
	return e
}
