package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/guest"
	"github.com/ferry-dr/ferry/internal/vaultclient"
)

// waitPlanJob follows the plan job a call started until it leaves the
// running state: waitPlanJob(t, c)(c.RunPlan(...)).
func waitPlanJob(t *testing.T, c *vaultclient.Client) func(api.Job, error) api.Job {
	return func(j api.Job, err error) api.Job {
		t.Helper()
		if err != nil {
			t.Fatalf("start the plan job: %v", err)
		}
		until(t, 5*time.Minute, "plan job "+j.ID+" ("+j.Action+")", func() bool {
			cur, err := c.Job(context.Background(), j.ID)
			if err == nil {
				j = cur
			}
			return err == nil && j.State != api.JobRunning
		})
		return j
	}
}

// vmJob returns the newest job of action on vm.
func vmJob(t *testing.T, c *vaultclient.Client, vm, action string) api.Job {
	t.Helper()
	js, err := c.Jobs(context.Background(), vm)
	if err != nil {
		t.Fatal(err)
	}
	for _, j := range js { // newest first
		if j.Action == action {
			return j
		}
	}
	t.Fatalf("%s has no %s job", vm, action)
	return api.Job{}
}

// TestPlan runs a recovery plan of three real VMs in two boot groups
// (the database, then the application and web servers), with a script
// after the first group and a manual action before the second, through
// a drill, its cleanup, a failover, commit, reprotect and failback. The
// script fails once, which stops the plan before the second group, and
// a retry goes on from it; the manual action holds the plan until it is
// resumed; the second group starts only after the first answered; no
// record durable before the planned failover is lost; and a vault killed
// in the middle of the failback fails the plan job cleanly, which a retry
// then finishes.
func TestPlan(t *testing.T) {
	need(t, "qemu-system-x86_64", "qemu-img", "mkfs.ext4")
	g := guestDir(t)
	s := twoSites(t)
	c, vp := startVaultProc(t, s)
	ctx := context.Background()
	vms := []string{"db", "app", "web"}
	webs := map[string][2]string{}
	for _, name := range vms {
		webs[name] = [2]string{freePort(t), freePort(t)}
		defineWorkloadVM(t, c, s, g, name, webs[name][0], webs[name][1])
	}
	for _, name := range vms {
		runJob(t, c, api.JobSucceeded)(c.Enable(ctx, api.EnableRequest{VM: name, Target: "siteB"}))
	}
	hookLog, fail := filepath.Join(s.root, "hook.log"), filepath.Join(s.root, "fail")
	script := "#!/bin/sh\necho \"$FERRY_ACTION $FERRY_GROUP $FERRY_VMS\" >> " + hookLog + "\n" +
		"if [ -e " + fail + " ]; then echo 'the load balancer does not answer' >&2; exit 1; fi\necho load balancer switched\n"
	if err := os.WriteFile(filepath.Join(vp.dir, "scripts", "lb.sh"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	plan := api.Plan{Name: "shop", Groups: []api.BootGroup{
		{Name: "database", VMs: []string{"db"}, Wait: api.Wait{For: api.WaitGuestAgent, Timeout: 3 * time.Minute},
			Post: []api.PlanAction{{Name: "switch the load balancer", Script: "lb.sh"}}},
		{Name: "front", VMs: []string{"app", "web"}, Wait: api.Wait{For: api.WaitService, Timeout: 3 * time.Minute},
			Pre: []api.PlanAction{{Name: "check", Manual: "Check that the database accepts connections"}}},
	}}
	if _, err := c.PutPlan(ctx, plan); err != nil {
		t.Fatal(err)
	}
	bootOrder := func(action string) {
		t.Helper()
		db := vmJob(t, c, "db", action)
		for _, vm := range []string{"app", "web"} {
			if j := vmJob(t, c, vm, action); !j.Created.After(db.Ended) {
				t.Errorf("%s: %s's job began at %v, before db's ended (%v)", action, vm, j.Created, db.Ended)
			}
		}
	}

	// Drill: the script fails, the plan stops before the second group.
	os.WriteFile(fail, nil, 0o644)
	j := waitPlanJob(t, c)(c.RunPlan(ctx, "shop", api.PlanRun{Action: api.PlanTestFailover}))
	if j.State != api.JobFailed || !strings.Contains(j.Error, "lb.sh") || !strings.Contains(j.Error, "ferry job retry") {
		t.Fatalf("drill with a failing script: %s %s", j.State, j.Error)
	}
	if msgs := strings.Join(j.Steps[2].Messages, "\n"); !strings.Contains(msgs, "load balancer does not answer") {
		t.Errorf("the script's error output is not in its step: %q", msgs)
	}
	if p, _ := c.Protection(ctx, "app"); p.TestPending {
		t.Fatal("the second boot group was drilled although the script after the first failed")
	}
	os.Remove(fail)
	j = waitPlanJob(t, c)(c.RetryJob(ctx, j.ID))
	if j.State != api.JobWaiting {
		t.Fatalf("retried drill: %s %s, want waiting for the manual action", j.State, j.Error)
	}
	if p, _ := c.Protection(ctx, "app"); p.TestPending {
		t.Fatal("the second boot group was drilled before the manual action was confirmed")
	}
	j = waitPlanJob(t, c)(c.ResumeJob(ctx, j.ID))
	if j.State != api.JobSucceeded {
		t.Fatalf("drill after resume: %s %s\n%+v", j.State, j.Error, j.Steps)
	}
	bootOrder(api.PlanTestFailover)
	if b, _ := os.ReadFile(hookLog); strings.Count(string(b), "test-failover database db\n") != 2 {
		t.Errorf("the script ran %q, want twice for the drill's first group (failed, then retried)", b)
	}
	if j = waitPlanJob(t, c)(c.RunPlan(ctx, "shop", api.PlanRun{Action: api.PlanCleanupTest, Notes: "plan drill"})); j.State != api.JobSucceeded {
		t.Fatalf("plan cleanup: %s %s", j.State, j.Error)
	}

	// Planned failover: nothing durable is lost, the boot order holds.
	durable := map[string]uint64{}
	for _, vm := range vms {
		st, err := guest.FetchState(webs[vm][0])
		if err != nil {
			t.Fatal(err)
		}
		durable[vm] = st.LastDurable
	}
	start := time.Now()
	j = waitPlanJob(t, c)(c.RunPlan(ctx, "shop", api.PlanRun{Action: api.PlanFailover}))
	if j.State != api.JobWaiting {
		t.Fatalf("plan failover: %s %s, want waiting for the manual action", j.State, j.Error)
	}
	j = waitPlanJob(t, c)(c.ResumeJob(ctx, j.ID))
	if j.State != api.JobSucceeded {
		t.Fatalf("plan failover after resume: %s %s\n%+v", j.State, j.Error, j.Steps)
	}
	t.Logf("plan failover took %v (with the manual action's wait)", time.Since(start).Round(time.Millisecond))
	bootOrder(api.PlanFailover)
	started := map[string]int64{}
	for _, vm := range vms {
		st, err := guest.FetchState(webs[vm][1])
		if err != nil {
			t.Fatalf("%s at site B: %v", vm, err)
		}
		started[vm] = st.Started
		if st.ResumedAfter < durable[vm] || st.ChecksumErrors != 0 {
			t.Errorf("%s at site B resumed after record %d (%d checksum errors); %d were durable before the failover", vm, st.ResumedAfter, st.ChecksumErrors, durable[vm])
		}
	}
	// As the guests saw it: the front's workloads started after the
	// database's (the plan waited for its guest agent in between).
	if started["app"] <= started["db"] || started["web"] <= started["db"] {
		t.Errorf("workload start times at site B: db %d, app %d, web %d: the front started first", started["db"], started["app"], started["web"])
	}
	for _, act := range []string{api.PlanCommit, api.PlanReprotect} {
		if j = waitPlanJob(t, c)(c.RunPlan(ctx, "shop", api.PlanRun{Action: act})); j.State != api.JobSucceeded {
			t.Fatalf("plan %s: %s %s", act, j.State, j.Error)
		}
	}
	for _, vm := range vms {
		if p, _ := c.Protection(ctx, vm); p.State != api.StateProtected || p.Source != "siteB" {
			t.Fatalf("%s after the plan's reprotect: %s from %s", vm, p.State, p.Source)
		}
	}
	// Failback, with the vault killed (SIGKILL) while the first group
	// fails over: at restart the plan job is failed at that step, the
	// plan released; the retry finishes it.
	j, err := c.RunPlan(ctx, "shop", api.PlanRun{Action: api.PlanFailover})
	if err != nil {
		t.Fatal(err)
	}
	until(t, time.Minute, "the failback's first group to start", func() bool {
		cur, err := c.Job(ctx, j.ID)
		return err == nil && len(cur.Steps[0].Messages) > 0
	})
	vp.cmd.Process.Kill()
	vp.cmd.Wait()
	vp.start(t)
	until(t, 30*time.Second, "the vault API after the restart", func() bool { return sitesOK(c) })
	if cur, err := c.Job(ctx, j.ID); err != nil || cur.State != api.JobFailed || !strings.Contains(cur.Error, "vault stopped") || cur.Steps[0].State != api.JobFailed {
		t.Fatalf("plan job after the vault's restart: %+v, %v", cur, err)
	}
	if p, err := c.Plan(ctx, "shop"); err != nil || p.Job != "" {
		t.Fatalf("the plan is held after the vault's restart: %+v, %v", p, err)
	}
	j = waitPlanJob(t, c)(c.RetryJob(ctx, j.ID))
	if j.State == api.JobWaiting {
		j = waitPlanJob(t, c)(c.ResumeJob(ctx, j.ID))
	}
	if j.State != api.JobSucceeded {
		t.Fatalf("plan failback retried after the vault's restart: %s %s\n%+v", j.State, j.Error, j.Steps)
	}
	for _, vm := range vms {
		if _, err := guest.FetchState(webs[vm][0]); err != nil {
			t.Errorf("%s does not answer at site A after the failback: %v", vm, err)
		}
	}
	p, err := c.Plan(ctx, "shop")
	// Eight runs: the drill and the failback each failed once and were
	// retried.
	if err != nil || p.Job != "" || len(p.History) != 8 || !strings.Contains(p.History[0].Notes, "failed") {
		t.Fatalf("plan after its runs: %+v, %v", p, err)
	}
}
