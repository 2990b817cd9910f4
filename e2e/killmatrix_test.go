package e2e

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/guest"
)

// TestLifecycleKills runs the whole DR lifecycle of a QEMU guest (protect,
// drill, cleanup, planned failover, commit, reprotect, failback, commit,
// reprotect back, disable) and kills one process with SIGKILL at a random step of
// each job: the vault, the current source's agent or the current recovery
// site's agent, in rotation. After each kill the process is restarted and
// the job must end, succeeded or failed with a reason, never hang; the
// protection must not stay held by it; a failed job must succeed when
// retried; a planned failover must lose no record the guest had made
// durable; and the guest's records must have no checksum error at the end.
//
// make torture (FERRY_TORTURE=full) runs three lifecycles, so that every
// job meets every victim.
func TestLifecycleKills(t *testing.T) {
	need(t, "qemu-system-x86_64", "qemu-img", "mkfs.ext4")
	if os.Getenv("FERRY_TORTURE") != "full" {
		t.Skip("make torture runs this (FERRY_TORTURE=full): it is not yet green (docs/architecture.md, Torture suite)")
	}
	rounds := 3
	g := guestDir(t)
	s := twoSites(t)
	c, vp := startVaultProc(t, s)
	webA, webB := freePort(t), freePort(t)
	createWorkloadVM(t, c, s, g, webA, webB)
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 7))
	t.Logf("seed %d", time.Now().UnixNano())
	yes := true
	web := map[string]string{"siteA": webA, "siteB": webB}
	agents := map[string]*agentProc{"siteA": s.a, "siteB": s.b}
	source := "siteA" // where the VM runs
	target := func() string {
		if source == "siteA" {
			return "siteB"
		}
		return "siteA"
	}
	kills := 0
	for round := 0; round < rounds; round++ {
		type job struct {
			name  string
			start func() (api.Job, error)
			after func() // once it succeeded
		}
		var before guest.WorkloadState
		jobs := []job{
			{"protect", func() (api.Job, error) {
				return c.Enable(ctx, api.EnableRequest{VM: "web", Target: target()})
			}, nil},
			{"drill", func() (api.Job, error) { return c.TestFailover(ctx, "web", "latest-processed") }, nil},
			{"cleanup", func() (api.Job, error) { return c.CleanupTestFailover(ctx, "web", "kill test") }, nil},
			{"failover", func() (api.Job, error) {
				return c.Failover(ctx, "web", api.FailoverRequest{Point: "latest", ShutdownSource: &yes})
			}, func() { source = target() }},
			{"commit", func() (api.Job, error) { return c.Commit(ctx, "web") }, nil},
			{"reprotect", func() (api.Job, error) { return c.Reprotect(ctx, "web") }, nil},
			{"failback", func() (api.Job, error) {
				return c.Failover(ctx, "web", api.FailoverRequest{Point: "latest", ShutdownSource: &yes})
			}, func() { source = target() }},
			{"commit-back", func() (api.Job, error) { return c.Commit(ctx, "web") }, nil},
			{"reprotect-back", func() (api.Job, error) { return c.Reprotect(ctx, "web") }, nil},
			// So that the next round's protect starts afresh.
			{"disable", func() (api.Job, error) { return c.Disable(ctx, "web", false) }, nil},
		}
		for i, jb := range jobs {
			// Rotating: over three rounds every job meets every victim.
			victim := []string{"vault", "source", "recovery"}[(i+round)%3]
			siteReachable(t, c, "siteA", true)
			siteReachable(t, c, "siteB", true)
			if jb.name == "drill" {
				// A drill needs a recovery point, and points follow the
				// guest's writes: a VM the vault just started again after
				// its agent was killed may not have written yet.
				until(t, 3*time.Minute, "a recovery point of web", func() bool {
					pts, err := c.Points(ctx, "web")
					return err == nil && len(pts) > 0
				})
			}
			if jb.name == "failover" || jb.name == "failback" {
				// A VM whose agent was killed is started again by the
				// vault: wait for its workload.
				until(t, 3*time.Minute, "the workload at "+source, func() bool {
					st, err := guest.FetchState(web[source])
					before = st
					return err == nil && st.LastDurable > 0
				})
			}
			j, err := jb.start()
			if err != nil {
				t.Fatalf("round %d %s: start: %v", round, jb.name, err)
			}
			// A random step of the job, and a random moment in it.
			k := rng.IntN(max(len(j.Steps), 1))
			until(t, 4*time.Minute, fmt.Sprintf("%s step %d", jb.name, k), func() bool {
				cur, err := c.Job(ctx, j.ID)
				return err == nil && (cur.State != api.JobRunning || k < len(cur.Steps) && cur.Steps[k].State != api.JobPending)
			})
			time.Sleep(time.Duration(rng.IntN(300)) * time.Millisecond)
			switch victim {
			case "vault":
				vp.cmd.Process.Kill()
				vp.cmd.Wait()
				vp.start(t)
				until(t, 20*time.Second, "the vault back", func() bool { return sitesOK(c) })
			case "source", "recovery":
				site := source
				if victim == "recovery" {
					site = target()
				}
				agents[site].kill()
				agents[site].start(t)
			}
			kills++
			end := waitJob(t, c, j.ID)
			t.Logf("round %d %s: %s killed at step %d: job %s %s", round, jb.name, victim, k, end.State, end.Error)
			for attempt := 0; end.State != api.JobSucceeded; attempt++ {
				if end.Error == "" {
					t.Fatalf("%s failed without a reason: %+v", jb.name, end)
				}
				if p, _ := c.Protection(ctx, "web"); p.Job != "" {
					t.Fatalf("%s failed, and the protection is still held by job %s", jb.name, p.Job)
				}
				if attempt == 3 {
					t.Fatalf("%s: still failing after %d retries: %s", jb.name, attempt, end.Error)
				}
				siteReachable(t, c, "siteA", true)
				siteReachable(t, c, "siteB", true)
				j, err := jb.start()
				if err != nil {
					t.Fatalf("%s: retry refused: %v", jb.name, err)
				}
				end = waitJob(t, c, j.ID)
				t.Logf("round %d %s: retry: %s %s", round, jb.name, end.State, end.Error)
			}
			if p, _ := c.Protection(ctx, "web"); p.Job != "" {
				t.Fatalf("%s succeeded, and the protection is still held by job %s", jb.name, p.Job)
			}
			if jb.after != nil {
				jb.after()
			}
			if jb.name == "drill" {
				// A drill needs a recovery point, and points follow the
				// guest's writes: a VM the vault just started again after
				// its agent was killed may not have written yet.
				until(t, 3*time.Minute, "a recovery point of web", func() bool {
					pts, err := c.Points(ctx, "web")
					return err == nil && len(pts) > 0
				})
			}
			if jb.name == "failover" || jb.name == "failback" {
				var st guest.WorkloadState
				until(t, 2*time.Minute, "the workload at "+source, func() bool {
					var err error
					st, err = guest.FetchState(web[source])
					return err == nil && st.LastDurable > 0
				})
				if st.ResumedAfter < before.LastDurable || st.ChecksumErrors != 0 {
					t.Fatalf("%s lost records: %d durable before, resumed after %d (%d checksum errors)", jb.name, before.LastDurable, st.ResumedAfter, st.ChecksumErrors)
				}
			}
		}
	}
	// A VM whose agent was killed in the last jobs is started again by
	// the vault once no job runs.
	var st guest.WorkloadState
	until(t, 3*time.Minute, "the workload at the end", func() bool {
		var err error
		st, err = guest.FetchState(web[source])
		return err == nil
	})
	if st.ChecksumErrors != 0 || st.Error != "" {
		t.Fatalf("the workload at the end: %+v", st)
	}
	fmt.Printf("RESULT lifecycle-kills rounds=%d kills=%d records=%d\n", rounds, kills, st.LastDurable)
}

// waitJob waits for a job to end (4 minutes at most: a job that runs
// longer hangs).
func waitJob(t *testing.T, c interface {
	Job(context.Context, string) (api.Job, error)
}, id string) api.Job {
	t.Helper()
	var j api.Job
	until(t, 4*time.Minute, "job "+id+" to end", func() bool {
		cur, err := c.Job(context.Background(), id)
		if err != nil {
			return false
		}
		j = cur
		return j.State != api.JobRunning
	})
	return j
}
