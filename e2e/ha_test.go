package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
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
	etcdURL := etcdtest.Start(t)
	pk := s.a.pki
	run(t, ferryBin, "ca", "issue", "--pki", pk, "--role", "vault", "vault")
	store := "etcd://" + strings.TrimPrefix(etcdURL, "http://") + "/ferry-e2e"
	vaults := map[string]*vaultProc{}
	for _, n := range []string{"east", "west"} {
		vp := &vaultProc{dir: filepath.Join(s.root, "vault-"+n), addr: freePort(t)}
		vp.args = []string{"vault", "run", "--dir", vp.dir, "--pki", pk, "--listen", vp.addr, "--store", store, "--advertise", vp.addr}
		vp.start(t)
		vaults["https://"+vp.addr] = vp
		t.Cleanup(func() {
			vp.cmd.Process.Kill()
			vp.cmd.Wait()
			if t.Failed() {
				t.Logf("vault %s log:\n%s", n, vp.log.String())
			}
		})
	}
	var urls []string
	for u := range vaults {
		urls = append(urls, u)
	}
	east := vaults[urls[0]]
	var token string
	until(t, 30*time.Second, "a vault's first token", func() bool {
		b, err := os.ReadFile(filepath.Join(east.dir, "operator.token"))
		token = strings.TrimSpace(string(b))
		return err == nil && token != ""
	})
	c, err := vaultclient.New(strings.Join(urls, ","), token, filepath.Join(pk, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
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
