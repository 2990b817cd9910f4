package e2e

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/agentclient"
	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/guest"
	"github.com/ferry-dr/ferry/internal/pki"
	"github.com/ferry-dr/ferry/internal/store/etcdtest"
	"github.com/ferry-dr/ferry/internal/vaultclient"
)

// TestVaultTakeover runs two vault processes over one real etcd, as a
// vault at each site would: one leads, the other serves reads. The
// client is given both. The leader is killed (SIGKILL); the other takes
// over within the lease, polls the sites, and the same client's changes
// go through it. Started again, the killed vault follows.
func TestVaultTakeover(t *testing.T) {
	s := twoSites(t)
	c, vaults := haVaults(t, s)
	ctx := context.Background()
	until(t, 30*time.Second, "a leader to take changes", func() bool {
		_, err := c.PutPolicy(ctx, api.Policy{Name: "gold", Retention: time.Hour, CheckpointInterval: time.Second, AppInterval: time.Hour,
			RPOWarning: 30 * time.Second, RPOCritical: time.Minute})
		return err == nil
	})
	for _, x := range []*agentProc{s.a, s.b} {
		if err := c.AddSite(ctx, api.AddSite{Name: x.name, Addr: x.addr}); err != nil {
			t.Fatal(err)
		}
	}
	siteReachable(t, c, "siteA", true)
	leaderURL := c.URL() // the vault that took the last change
	leader := vaults[leaderURL]
	leader.cmd.Process.Kill()
	leader.cmd.Wait()
	killed := time.Now()
	var took time.Duration
	until(t, 30*time.Second, "the other vault to take over", func() bool {
		_, err := c.PutPolicy(ctx, api.Policy{Name: "silver", Retention: time.Hour, CheckpointInterval: time.Second, AppInterval: time.Hour,
			RPOWarning: 30 * time.Second, RPOCritical: time.Minute})
		took = time.Since(killed)
		return err == nil
	})
	if c.URL() == leaderURL {
		t.Fatalf("the change went to the killed vault %s", leaderURL)
	}
	t.Logf("takeover: the other vault took changes %v after the leader was killed", took.Round(10*time.Millisecond))
	if took > 15*time.Second {
		t.Errorf("takeover took %v: want the lease (5 s) and a little", took)
	}
	// The new leader polls the sites: a site that goes down, and comes
	// back, is seen so.
	s.b.kill()
	siteReachable(t, c, "siteB", false)
	s.b.start(t)
	siteReachable(t, c, "siteB", true)
	// Started again, the killed vault follows: the leader stays, and
	// changes still go through.
	leader.log.Reset()
	leader.start(t)
	until(t, 30*time.Second, "the restarted vault to answer", func() bool {
		ps, err := c.Policies(ctx)
		return err == nil && len(ps) >= 2
	})
	if _, err := c.PutPolicy(ctx, api.Policy{Name: "bronze", Retention: time.Hour, CheckpointInterval: time.Second, AppInterval: time.Hour,
		RPOWarning: 30 * time.Second, RPOCritical: time.Minute}); err != nil {
		t.Fatalf("a change with the old leader back as a follower: %v", err)
	}
}

// TestUpHA starts `ferry up --ha` (three etcd members, a vault at east
// and at west, both agents), runs the test guest's VM at the site whose
// vault leads, protected to the other, and kills everything of that
// site with SIGKILL: its agent, its vault and its etcd member. The other
// site's vault takes over on the two remaining members' quorum, sees the
// killed site down, and runs an unplanned failover: the VM resumes at
// the other site with every record replicated before the kill.
func TestUpHA(t *testing.T) {
	need(t, "etcd", "qemu-system-x86_64", "qemu-img", "mkfs.ext4")
	g := guestDir(t)
	dir := t.TempDir()
	ports := []string{freePort(t), freePort(t), freePort(t), freePort(t)}
	etcdBase := strconv.Itoa(freeRun(t, 6))
	logf, err := os.Create(filepath.Join(t.TempDir(), "up.out"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(ferryBin, "up", "--ha", "--dir", dir, "--vault-listen", ports[0], "--west-vault-listen", ports[1],
		"--east-listen", ports[2], "--west-listen", ports[3], "--etcd-port", etcdBase)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		cmd.Wait()
		if t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			t.Logf("ferry up --ha:\n%s", b)
			for _, f := range []string{"vault", "vault-west", "east", "west"} {
				b, _ := os.ReadFile(filepath.Join(dir, f+".log"))
				t.Logf("%s.log:\n%s", f, b)
			}
		}
	})
	var token string
	until(t, 90*time.Second, "ferry up --ha to print its token", func() bool {
		b, _ := os.ReadFile(logf.Name())
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "token: "); ok {
				token = v
			}
		}
		return token != ""
	})
	c, err := vaultclient.New("https://"+ports[0]+",https://"+ports[1], token, filepath.Join(dir, "pki", "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	policy := func(name string) error {
		_, err := c.PutPolicy(ctx, api.Policy{Name: name, Retention: time.Hour, CheckpointInterval: time.Second, AppInterval: time.Hour,
			RPOWarning: 30 * time.Second, RPOCritical: time.Minute})
		return err
	}
	siteReachable(t, c, "east", true)
	siteReachable(t, c, "west", true)
	if err := policy("before"); err != nil {
		t.Fatal(err)
	}
	// The change went to the leader: its site is the one to burn. The
	// test guest's VM runs there, protected to the other site.
	lead, other, otherURL, vaultProc := "east", "west", "https://"+ports[1], "vault"
	if c.URL() == "https://"+ports[1] {
		lead, other, otherURL, vaultProc = "west", "east", "https://"+ports[0], "vault-west"
	}
	webLead, webOther := freePort(t), freePort(t)
	vm := api.VM{Name: "web", Site: lead, MemoryMiB: 256, Disks: []api.VMDisk{{Name: "vda", Size: 64 << 20}},
		Kernel: filepath.Join(g, "vmlinuz"), Initrd: filepath.Join(g, "initrd.img"),
		Append:   "console=ttyS0 panic=-1 ferry.job=workload ferry.data=vda ferry.rate=100",
		Forwards: map[string]string{lead: webLead, other: webOther}, GuestPort: 80, QGA: true}
	if _, err := c.DefineVM(ctx, vm); err != nil {
		t.Fatal(err)
	}
	fs := filepath.Join(t.TempDir(), "fs.img")
	ext4Image(t, fs, 64<<20)
	run(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", fs, "nbd+unix:///web/vda?socket="+filepath.Join(dir, lead, "nbd.sock"))
	if _, err := c.StartVM(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	until(t, 90*time.Second, "the workload at "+lead, func() bool {
		st, err := guest.FetchState(webLead)
		return err == nil && st.LastDurable > 20
	})
	runJob(t, c, api.JobSucceeded)(c.Enable(ctx, api.EnableRequest{VM: "web", Target: other}))
	// What the recovery site holds at the kill: every record durable at
	// the sample, once the source's stream acknowledges the journal as
	// it was then.
	before, err := guest.FetchState(webLead)
	if err != nil {
		t.Fatal(err)
	}
	op, err := pki.Load(filepath.Join(dir, "pki"), "operator")
	if err != nil {
		t.Fatal(err)
	}
	src := agentclient.New(op, map[string]string{"east": ports[2], "west": ports[3]}[lead], lead)
	var sampled uint64
	until(t, 30*time.Second, "the records at the sample to reach "+other, func() bool {
		st, err := src.Status(ctx)
		if err != nil || len(st.Groups) == 0 || st.Groups[0].Replication == nil {
			return false
		}
		if sampled == 0 {
			sampled = st.Groups[0].LastSeq
		}
		return st.Groups[0].Replication.AckedSeq >= sampled
	})
	if p, err := c.Protection(ctx, "web"); err == nil {
		t.Logf("before the kill: %d records durable, RPO %.3f s", before.LastDurable, p.RPOSeconds)
	}
	for _, p := range []string{lead, vaultProc, "etcd-" + lead} {
		b, err := os.ReadFile(filepath.Join(dir, p+".pid"))
		if err != nil {
			t.Fatal(err)
		}
		pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatalf("kill %s: %v", p, err)
		}
	}
	killed := time.Now()
	until(t, 60*time.Second, other+"'s vault to take changes", func() bool { return policy("after") == nil })
	took := time.Since(killed)
	t.Logf("%s's vault took changes %v after everything of %s was killed", other, took.Round(10*time.Millisecond), lead)
	if c.URL() != otherURL {
		t.Fatalf("the change went to %s, not %s's vault", c.URL(), other)
	}
	if took > 20*time.Second {
		t.Errorf("takeover took %v: want the lease (5 s) and a little", took)
	}
	siteReachable(t, c, lead, false)
	siteReachable(t, c, other, true)

	// Unplanned failover through the new leader.
	fo := runJob(t, c, api.JobSucceeded)(c.Failover(ctx, "web", api.FailoverRequest{Point: "latest"}))
	if fo.Vault != strings.TrimPrefix(otherURL, "https://") {
		t.Errorf("the failover ran at %s, want %s's vault", fo.Vault, other)
	}
	for _, st := range fo.Steps {
		t.Logf("failover %s: %v", st.Name, st.Messages)
	}
	var after guest.WorkloadState
	until(t, 120*time.Second, "the workload at "+other, func() bool {
		st, err := guest.FetchState(webOther)
		after = st
		return err == nil && st.LastDurable > 0
	})
	if after.ChecksumErrors != 0 {
		t.Errorf("damaged records after the failover: %+v", after)
	}
	if after.ResumedAfter < before.LastDurable {
		t.Errorf("the VM at %s resumed after record %d; %d were durable and replicated before the kill: %d lost beyond the RPO",
			other, after.ResumedAfter, before.LastDurable, before.LastDurable-after.ResumedAfter)
	}
	p, err := c.Protection(ctx, "web")
	if err != nil || p.State != api.StateFailedOver || p.Target != other {
		t.Errorf("after the failover: %+v %v", p, err)
	}
	t.Logf("unplanned failover through %s's vault: resumed after record %d (%d durable at the sample)", other, after.ResumedAfter, before.LastDurable)
}

// haVaults runs two vault processes over one real etcd, as a vault at
// each site would, and returns a client given both, and the vaults by URL.
func haVaults(t *testing.T, s *sites) (*vaultclient.Client, map[string]*vaultProc) {
	t.Helper()
	etcdURL := etcdtest.Start(t)
	pk := s.a.pki
	run(t, ferryBin, "ca", "issue", "--pki", pk, "--role", "vault", "vault")
	store := "etcd://" + strings.TrimPrefix(etcdURL, "http://") + "/ferry-e2e"
	vaults := map[string]*vaultProc{}
	var urls []string
	for _, n := range []string{"east", "west"} {
		vp := &vaultProc{dir: filepath.Join(s.root, "vault-"+n), addr: freePort(t)}
		vp.args = []string{"vault", "run", "--dir", vp.dir, "--pki", pk, "--listen", vp.addr, "--store", store, "--advertise", vp.addr}
		vp.start(t)
		vaults["https://"+vp.addr] = vp
		urls = append(urls, "https://"+vp.addr)
		t.Cleanup(func() {
			vp.cmd.Process.Kill()
			vp.cmd.Wait()
			if t.Failed() {
				t.Logf("vault %s log:\n%s", n, vp.log.String())
			}
		})
	}
	var token string
	until(t, 30*time.Second, "a vault's first token", func() bool {
		b, err := os.ReadFile(filepath.Join(vaults[urls[0]].dir, "operator.token"))
		token = strings.TrimSpace(string(b))
		return err == nil && token != ""
	})
	c, err := vaultclient.New(strings.Join(urls, ","), token, filepath.Join(pk, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	return c, vaults
}

// TestLeaderKilledMidJobs: two vaults over etcd and a protected VM. The
// leader is SIGKILLed in the middle of a failover (while it shuts the
// source down), then, started again as a follower, the new leader is
// killed in the middle of a reprotect. Each time the other vault fails
// the job at its step within the lease, the protection is released (not
// stuck), and the same action, run again through it, succeeds.
func TestLeaderKilledMidJobs(t *testing.T) {
	need(t, "qemu-system-x86_64", "qemu-img", "mkfs.ext4", "etcd")
	g := guestDir(t)
	s := twoSites(t)
	c, vaults := haVaults(t, s)
	ctx := context.Background()
	until(t, 30*time.Second, "a leader to take changes", func() bool {
		return c.AddSite(ctx, api.AddSite{Name: "siteA", Addr: s.a.addr}) == nil
	})
	if err := c.AddSite(ctx, api.AddSite{Name: "siteB", Addr: s.b.addr}); err != nil {
		t.Fatal(err)
	}
	siteReachable(t, c, "siteA", true)
	siteReachable(t, c, "siteB", true)
	webA, webB := freePort(t), freePort(t)
	createWorkloadVM(t, c, s, g, webA, webB)
	runJob(t, c, api.JobSucceeded)(c.Enable(ctx, api.EnableRequest{VM: "web", Target: "siteB"}))

	// killLeaderIn kills the vault running job j once its step i runs,
	// and returns the job as the next leader ended it.
	killLeaderIn := func(j api.Job, i int) (api.Job, *vaultProc) {
		t.Helper()
		until(t, 60*time.Second, "step "+j.Steps[i].Name, func() bool {
			cur, err := c.Job(ctx, j.ID)
			return err == nil && cur.Steps[i].State != api.JobPending
		})
		vp := vaults["https://"+j.Vault]
		if vp == nil {
			t.Fatalf("job %s ran at %q, not one of the vaults", j.ID, j.Vault)
		}
		vp.cmd.Process.Kill()
		vp.cmd.Wait()
		killed := time.Now()
		var after api.Job
		until(t, 30*time.Second, "the other vault to end the job", func() bool {
			cur, err := c.Job(ctx, j.ID)
			after = cur
			return err == nil && cur.State != api.JobRunning
		})
		t.Logf("%s: ended %s by the next leader %v after the kill: %s", j.Action, after.State, time.Since(killed).Round(10*time.Millisecond), after.Error)
		if time.Since(killed) > 20*time.Second {
			t.Errorf("the next leader took %v to end the job: want the lease (5 s) and a little", time.Since(killed))
		}
		return after, vp
	}

	fo, err := c.Failover(ctx, "web", api.FailoverRequest{Point: "latest"})
	if err != nil {
		t.Fatal(err)
	}
	after, killed := killLeaderIn(fo, 1)
	p, _ := c.Protection(ctx, "web")
	if after.State == api.JobFailed && (p.State != api.StateProtected || p.Job != "") {
		t.Fatalf("a failed failover left %+v", p)
	}
	killed.log.Reset()
	killed.start(t) // a follower now
	if after.State == api.JobFailed {
		retry := runJob(t, c, api.JobSucceeded)(c.Failover(ctx, "web", api.FailoverRequest{Point: "latest"}))
		t.Logf("retried failover at %s: %v", retry.Vault, stepNames(retry))
	}
	until(t, 90*time.Second, "the workload at site B", func() bool {
		st, err := guest.FetchState(webB)
		return err == nil && st.LastDurable > 0
	})
	runJob(t, c, api.JobSucceeded)(c.Commit(ctx, "web"))

	rp, err := c.Reprotect(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	after, _ = killLeaderIn(rp, 3)
	p, _ = c.Protection(ctx, "web")
	if after.State == api.JobRunning || p.Job != "" {
		t.Fatalf("after the kill: job %s, protection %+v", after.State, p)
	}
	if after.State == api.JobFailed {
		if p.State != api.StateCommitted {
			t.Fatalf("a failed reprotect left %+v", p)
		}
		siteReachable(t, c, "siteA", true)
		retry := runJob(t, c, api.JobSucceeded)(c.Reprotect(ctx, "web"))
		t.Logf("retried reprotect at %s: %v", retry.Vault, stepNames(retry))
	}
	p, _ = c.Protection(ctx, "web")
	if p.State != api.StateProtected || p.Source != "siteB" {
		t.Fatalf("after the retried reprotect: %+v", p)
	}
}

// freeRun returns the first of n consecutive free loopback ports (the
// etcd members of ferry up --ha take six from --etcd-port on).
func freeRun(t *testing.T, n int) int {
	t.Helper()
	for base := 20000 + rand.IntN(20000); base < 60000; base += n {
		var ls []net.Listener
		for i := range n {
			l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", base+i))
			if err != nil {
				break
			}
			ls = append(ls, l)
		}
		for _, l := range ls {
			l.Close()
		}
		if len(ls) == n {
			return base
		}
	}
	t.Fatalf("no %d consecutive free ports", n)
	return 0
}
