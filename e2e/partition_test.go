package e2e

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/agentclient"
	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/pki"
	"github.com/ferry-dr/ferry/internal/store/etcdtest"
	"github.com/ferry-dr/ferry/internal/vaultclient"
)

// TestVaultPartition runs a vault in each of two network namespaces over
// one etcd; etcd and the two site agents run in the root namespace,
// reached over a veth pair per vault. An operator keeps enabling and
// disabling one protection, each a job, through whichever vault leads.
// Then the leader is cut off from etcd, and from etcd only: it still
// reaches both sites, as in a partition between a site's vault and the
// etcd quorum. The other vault takes over once the lease is gone; the
// cut-off one stops. The job history is the proof that at most one
// leader acted at any time: the protection's jobs never overlap, their
// leadership epochs never go back, both vaults ran some, and the sites
// obey the newest epoch, so any late call of the old leader was refused.
func TestVaultPartition(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test needs root to create network namespaces (CI runs as root)")
	}
	need(t, "ip", "etcd")
	n := os.Getpid() % 10000
	// 10.88.0.1: the agents, 10.88.0.2: etcd, both on the root
	// namespace's loopback; vault i at 10.88.i.2 behind 10.88.i.1.
	agentsIP, etcdIP := "10.88.0.1", "10.88.0.2"
	for _, ip := range []string{agentsIP, etcdIP} {
		mustRun(t, exec.Command("ip", "addr", "add", ip+"/32", "dev", "lo"))
		t.Cleanup(func() { exec.Command("ip", "addr", "del", ip+"/32", "dev", "lo").Run() })
	}
	type vaultNS struct {
		ns, ip string
		proc   *vaultProc
	}
	var vs []*vaultNS
	for i := 1; i <= 2; i++ {
		v := &vaultNS{ns: fmt.Sprintf("fv%d-%d", i, n), ip: fmt.Sprintf("10.88.%d.2", i)}
		in, out := fmt.Sprintf("fv%d-%d", i, n), fmt.Sprintf("fr%d-%d", i, n)
		mustRun(t, exec.Command("ip", "netns", "add", v.ns))
		t.Cleanup(func() { exec.Command("ip", "netns", "del", v.ns).Run() })
		mustRun(t, exec.Command("ip", "link", "add", in, "netns", v.ns, "type", "veth", "peer", "name", out))
		mustRun(t, exec.Command("ip", "addr", "add", fmt.Sprintf("10.88.%d.1/24", i), "dev", out))
		mustRun(t, exec.Command("ip", "link", "set", out, "up"))
		mustRun(t, exec.Command("ip", "-n", v.ns, "addr", "add", v.ip+"/24", "dev", in))
		mustRun(t, exec.Command("ip", "-n", v.ns, "link", "set", in, "up"))
		mustRun(t, exec.Command("ip", "-n", v.ns, "link", "set", "lo", "up"))
		mustRun(t, exec.Command("ip", "-n", v.ns, "route", "add", "10.88.0.0/24", "via", fmt.Sprintf("10.88.%d.1", i)))
		vs = append(vs, v)
	}

	pk := t.TempDir()
	run(t, ferryBin, "ca", "init", "--pki", pk)
	for _, c := range [][]string{{"site", "siteA"}, {"site", "siteB"}, {"operator", "operator"}} {
		run(t, ferryBin, "ca", "issue", "--pki", pk, "--role", c[0], c[1])
	}
	run(t, ferryBin, "ca", "issue", "--pki", pk, "--role", "vault", "--host", vs[0].ip+","+vs[1].ip, "vault")
	root := t.TempDir()
	var agents []*agentProc
	for _, name := range []string{"siteA", "siteB"} {
		a := &agentProc{name: name, dir: filepath.Join(root, name), addr: freePortOn(t, agentsIP), pki: pk}
		a.start(t)
		agents = append(agents, a)
		t.Cleanup(func() {
			a.stop(t)
			if t.Failed() {
				t.Logf("%s log:\n%s", name, a.log)
			}
		})
	}
	etcdURL := etcdtest.StartOn(t, etcdIP)
	store := "etcd://" + strings.TrimPrefix(etcdURL, "http://") + "/ferry-part"
	byURL := map[string]*vaultNS{}
	var urls []string
	for i, v := range vs {
		addr := v.ip + ":7400"
		v.proc = &vaultProc{dir: filepath.Join(root, fmt.Sprint("vault", i)), addr: addr}
		v.proc.args = []string{"netns", "exec", v.ns, ferryBin, "vault", "run", "--dir", v.proc.dir, "--pki", pk,
			"--listen", addr, "--store", store, "--advertise", addr}
		startIn(t, v.proc)
		byURL["https://"+addr] = v
		urls = append(urls, "https://"+addr)
		t.Cleanup(func() {
			if v.proc.cmd.ProcessState == nil {
				v.proc.cmd.Process.Kill()
				v.proc.cmd.Wait()
			}
			if t.Failed() {
				t.Logf("vault in %s log:\n%s", v.ns, v.proc.log.String())
			}
		})
	}
	var token string
	until(t, 30*time.Second, "a vault's first token", func() bool {
		b, err := os.ReadFile(filepath.Join(vs[0].proc.dir, "operator.token"))
		token = strings.TrimSpace(string(b))
		return err == nil && token != ""
	})
	c, err := vaultclient.New(strings.Join(urls, ","), token, filepath.Join(pk, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	until(t, 30*time.Second, "a leader to take changes", func() bool {
		return c.AddSite(ctx, api.AddSite{Name: "siteA", Addr: agents[0].addr}) == nil
	})
	if err := c.AddSite(ctx, api.AddSite{Name: "siteB", Addr: agents[1].addr}); err != nil {
		t.Fatal(err)
	}
	siteReachable(t, c, "siteA", true)
	siteReachable(t, c, "siteB", true)
	if _, err := c.DefineVM(ctx, api.VM{Name: "vm1", Site: "siteA", MemoryMiB: 64, Disks: []api.VMDisk{{Name: "vda", Size: 16 << 20}}}); err != nil {
		t.Fatal(err)
	}

	// The operator: enable, disable, enable... through whichever vault
	// leads, retrying what a vault refuses or cannot do while there is
	// none.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var cycles int
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			p, err := c.Protection(ctx, "vm1")
			var j api.Job
			switch {
			case err != nil && !errors.Is(err, api.ErrNotFound):
			case p.Job != "":
				j, err = c.Job(ctx, p.Job)
			case err == nil && p.State == api.StateProtected:
				j, err = c.Disable(ctx, "vm1", false)
			default:
				j, err = c.Enable(ctx, api.EnableRequest{VM: "vm1", Target: "siteB"})
			}
			if err != nil {
				time.Sleep(100 * time.Millisecond)
				continue
			}
			for deadline := time.Now().Add(30 * time.Second); j.State == api.JobRunning && time.Now().Before(deadline); {
				time.Sleep(50 * time.Millisecond)
				if cur, err := c.Job(ctx, j.ID); err == nil {
					j = cur
				}
			}
			cycles++
		}
	}()
	stopOperator := sync.OnceFunc(func() { close(stop); wg.Wait() })
	t.Cleanup(stopOperator)

	jobsBy := func(vault string) int {
		js, _ := c.Jobs(ctx, "vm1")
		k := 0
		for _, j := range js {
			if j.Vault == vault {
				k++
			}
		}
		return k
	}
	until(t, 60*time.Second, "the operator's first jobs", func() bool {
		js, _ := c.Jobs(ctx, "vm1")
		return len(js) >= 3
	})
	// The leader is the vault that ran the newest job (a read may have
	// been served by the other).
	var leaderURL string
	until(t, 30*time.Second, "a job that names its vault", func() bool {
		js, _ := c.Jobs(ctx, "vm1")
		slices.SortFunc(js, func(a, b api.Job) int { return a.Created.Compare(b.Created) })
		if len(js) > 0 {
			leaderURL = "https://" + js[len(js)-1].Vault
		}
		return byURL[leaderURL] != nil
	})
	old, next := byURL[leaderURL], vs[0]
	if next == old {
		next = vs[1]
	}
	oldAddr, nextAddr := strings.TrimPrefix(leaderURL, "https://"), next.ip+":7400"
	// The cut: the leader's packets to etcd go nowhere (no reset, no
	// unreachable: a partition), while it still reaches the sites.
	mustRun(t, exec.Command("ip", "-n", old.ns, "route", "add", "blackhole", etcdIP+"/32"))
	cut := time.Now()
	until(t, 60*time.Second, "jobs run by the other vault", func() bool { return jobsBy(nextAddr) >= 2 })
	t.Logf("takeover: the other vault's second job %v after the cut", time.Since(cut).Round(100*time.Millisecond))
	exited := make(chan error, 1)
	go func() { exited <- old.proc.cmd.Wait() }()
	select {
	case err := <-exited:
		if err == nil || !strings.Contains(old.proc.log.String(), "lost the leadership") {
			t.Errorf("the cut-off vault exited with %v, want the lost leadership in its log", err)
		}
	case <-time.After(30 * time.Second):
		// One Wait only: the cleanup's would race with this one's.
		old.proc.cmd.Process.Kill()
		<-exited
		t.Fatal("the cut-off vault still runs 30 s after the cut: it must stop once its lease is gone")
	}
	mustRun(t, exec.Command("ip", "-n", old.ns, "route", "del", "blackhole", etcdIP+"/32"))
	// Healed and started again, it follows: the jobs go on through the
	// leader.
	old.proc.log.Reset()
	startIn(t, old.proc)
	before := jobsBy(nextAddr)
	until(t, 60*time.Second, "more jobs after the heal", func() bool { return jobsBy(nextAddr) >= before+2 })
	stopOperator()

	js, err := c.Jobs(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(js, func(a, b api.Job) int { return a.Created.Compare(b.Created) })
	by := map[string]int{}
	var maxEpoch int64
	for i, j := range js {
		t.Logf("job %s %-20s by %s epoch %d: %v .. %v %s %s", j.ID, j.Action, j.Vault, j.Epoch,
			j.Created.Format("15:04:05.000"), j.Ended.Format("15:04:05.000"), j.State, j.Error)
		by[j.Vault]++
		if j.State == api.JobRunning && i < len(js)-1 {
			t.Errorf("job %s (%s by %s) still runs after job %s began", j.ID, j.Action, j.Vault, js[i+1].ID)
		}
		if i > 0 {
			prev := js[i-1]
			if j.Created.Before(prev.Ended) {
				t.Errorf("job %s (%s by %s, epoch %d) began at %v, before job %s (%s by %s, epoch %d) ended at %v",
					j.ID, j.Action, j.Vault, j.Epoch, j.Created, prev.ID, prev.Action, prev.Vault, prev.Epoch, prev.Ended)
			}
			if j.Epoch < prev.Epoch {
				t.Errorf("job %s by %s has epoch %d, after job %s of epoch %d: an old leader acted after a new one", j.ID, j.Vault, j.Epoch, prev.ID, prev.Epoch)
			}
		}
		if j.Epoch <= 0 {
			t.Errorf("job %s has no leadership epoch", j.ID)
		}
		maxEpoch = max(maxEpoch, j.Epoch)
	}
	if by[oldAddr] == 0 || by[nextAddr] == 0 {
		t.Errorf("jobs by vault: %v; want some by each", by)
	}
	op, err := pki.Load(pk, "operator")
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range agents {
		st, err := agentclient.New(op, a.addr, a.name).Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if st.LeaderEpoch != maxEpoch {
			t.Errorf("%s obeys epoch %d, want the newest leader's %d", a.name, st.LeaderEpoch, maxEpoch)
		}
		t.Logf("%s: epoch %d, %d calls of an older leader refused", a.name, st.LeaderEpoch, st.StaleLeaderRefused)
	}
	t.Logf("%d jobs (%d operator cycles): %v", len(js), cycles, by)
}

// startIn starts a vault process whose args begin with the command to
// run ("netns exec NS ferry ...").
func startIn(t *testing.T, v *vaultProc) {
	t.Helper()
	v.cmd = exec.Command("ip", v.args...)
	v.cmd.Stdout, v.cmd.Stderr = &v.log, &v.log
	if err := v.cmd.Start(); err != nil {
		t.Fatal(err)
	}
}
