package vault

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/store"
)

// planFixture: vm1, vm2 and vm3 at east, each protected to west, and a
// script directory holding hook.sh, which records its environment and
// fails while the file "fail" exists.
func planFixture(t *testing.T, st store.Store) (*fixture, string) {
	t.Helper()
	dir := t.TempDir()
	script := "#!/bin/sh\nenv | grep ^FERRY_ | sort > \"$FERRY_JOB.$FERRY_GROUP_INDEX.$FERRY_PHASE.env\"\necho hook ran for $FERRY_VMS\nif [ -e fail ]; then echo broken >&2; exit 3; fi\n"
	if err := os.WriteFile(filepath.Join(dir, "hook.sh"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	f := newFixture(t, st, func(c *Config) { c.ScriptDir = dir })
	f.setup(t)
	for _, vm := range []string{"vm2", "vm3"} {
		f.east.mu.Lock()
		f.east.groups[vm], f.east.vms[vm] = true, api.VMRequest{Name: vm, Group: vm}
		f.east.mu.Unlock()
		if code := f.call(t, f.op, "POST", "/v1/vms", VM{Name: vm, Site: "east", MemoryMiB: 256, Disks: []DiskSpec{{Name: "vda", Size: 1 << 20}}}, nil); code != 200 {
			t.Fatalf("define %s: %d", vm, code)
		}
	}
	for _, vm := range []string{"vm1", "vm2", "vm3"} {
		if j := f.job(t, "/v1/protections", map[string]string{"vm": vm, "target": "west"}); j.State != JobSucceeded {
			t.Fatalf("protect %s: %+v", vm, j)
		}
	}
	return f, dir
}

// waitPlanJob waits until a plan job leaves the running state.
func waitPlanJob(t *testing.T, f *fixture, id string) Job {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	j, err := f.v.WaitJob(ctx, id)
	if err != nil {
		t.Fatalf("job %s: %v", id, err)
	}
	return j
}

func (f *fixture) runPlan(t *testing.T, action string) Job {
	t.Helper()
	var j Job
	if code := f.call(t, f.op, "POST", "/v1/plans/app/run", api.PlanRun{Action: action}, &j); code != 200 {
		t.Fatalf("run plan %s: %d", action, code)
	}
	return waitPlanJob(t, f, j.ID)
}

func (f *fixture) jobCall(t *testing.T, id, what string) Job {
	t.Helper()
	var j Job
	if code := f.call(t, f.op, "POST", "/v1/jobs/"+id+"/"+what, struct{}{}, &j); code != 200 {
		t.Fatalf("%s job %s: %d", what, id, code)
	}
	return waitPlanJob(t, f, id)
}

func appPlan() Plan {
	return Plan{Name: "app", Groups: []api.BootGroup{
		{Name: "db", VMs: []string{"vm1"}, Wait: api.Wait{For: api.WaitGuestAgent, Timeout: 5 * time.Second},
			Post: []api.PlanAction{{Name: "notify", Script: "hook.sh"}}},
		{Name: "front", VMs: []string{"vm2", "vm3"}, Pre: []api.PlanAction{{Name: "check", Manual: "Check that the database answers"}}},
	}}
}

// TestPlanValidation: plans that cannot run are refused with a reason.
func TestPlanValidation(t *testing.T) {
	f, _ := planFixture(t, store.NewMem())
	put := func(p Plan) (int, string) {
		var e map[string]string
		code := f.call(t, f.op, "PUT", "/v1/plans/"+p.Name, p, &e)
		return code, e["error"]
	}
	bad := func(mod func(p *Plan)) Plan { p := appPlan(); mod(&p); return p }
	for _, tc := range []struct {
		name string
		p    Plan
		want string
	}{
		{"no groups", Plan{Name: "app"}, "boot groups"},
		{"8 groups", bad(func(p *Plan) {
			for len(p.Groups) < 8 {
				p.Groups = append(p.Groups, api.BootGroup{VMs: []string{"vm" + string(rune('4'+len(p.Groups)))}})
			}
		}), "1 to 7"},
		{"empty group", bad(func(p *Plan) { p.Groups[1].VMs = nil }), "no VM"},
		{"VM twice", bad(func(p *Plan) { p.Groups[1].VMs = []string{"vm2", "vm1"} }), "twice"},
		{"unknown VM", bad(func(p *Plan) { p.Groups[1].VMs = []string{"vm9"} }), "not defined"},
		{"script path", bad(func(p *Plan) { p.Groups[0].Post[0].Script = "../bin/sh" }), "without a path"},
		{"missing script", bad(func(p *Plan) { p.Groups[0].Post[0].Script = "nope.sh" }), "no executable file"},
		{"script and manual", bad(func(p *Plan) { p.Groups[0].Post[0].Manual = "x" }), "either a script or a manual"},
		{"unknown wait", bad(func(p *Plan) { p.Groups[0].Wait.For = "ping" }), "waits for"},
		{"unknown action", bad(func(p *Plan) { p.Groups[0].Post[0].On = []string{"explode"} }), "runs on"},
	} {
		if code, msg := put(tc.p); code != 400 || !strings.Contains(msg, tc.want) {
			t.Errorf("%s: %d %q, want 400 with %q", tc.name, code, msg, tc.want)
		}
	}
	if code, msg := put(appPlan()); code != 200 {
		t.Fatalf("a good plan: %d %s", code, msg)
	}
	var e map[string]string
	if code := f.call(t, f.op, "POST", "/v1/plans/app/run", api.PlanRun{Action: "explode"}, &e); code != 400 {
		t.Errorf("unknown plan action: %d %v", code, e)
	}
}

// TestPlanLifecycle runs a plan through a drill, its cleanup, a failover,
// commit twice: boot groups in order, the script with the plan's
// context, a failing script that stops the plan and a retry from that
// step, a manual action that waits until resumed.
func TestPlanLifecycle(t *testing.T) {
	f, dir := planFixture(t, store.NewMem())
	if code := f.call(t, f.op, "PUT", "/v1/plans/app", appPlan(), nil); code != 200 {
		t.Fatalf("put plan: %d", code)
	}
	// The script fails: the plan stops at it, vm1's drill done, the
	// second group untouched.
	os.WriteFile(filepath.Join(dir, "fail"), nil, 0o644)
	j := f.runPlan(t, api.PlanTestFailover)
	wantSteps := []string{"db: test-failover vm1", "db: wait until up (guest-agent)", `db: after: script hook.sh "notify"`,
		`front: before: manual action "check"`, "front: test-failover vm2, vm3", "front: wait until up (guest-agent)"}
	var names []string
	for _, s := range j.Steps {
		names = append(names, s.Name)
	}
	if !slices.Equal(names, wantSteps) {
		t.Fatalf("steps %q, want %q", names, wantSteps)
	}
	if j.State != JobFailed || j.Steps[2].State != JobFailed || !strings.Contains(j.Error, "ferry job retry "+j.ID) || j.Steps[3].State != StepPending {
		t.Fatalf("failing script: %+v", j)
	}
	if msgs := strings.Join(j.Steps[2].Messages, "\n"); !strings.Contains(msgs, "broken") || !strings.Contains(msgs, "exit status 3") {
		t.Errorf("the script's output and exit are not in the step: %q", msgs)
	}
	if _, ok := f.west.vm("vm2-drill"); ok {
		t.Fatal("the second boot group started although the first group's script failed")
	}
	if p, _ := f.v.Plan(context.Background(), "app"); p.Job != "" {
		t.Fatalf("a failed plan job still holds the plan: %+v", p)
	}
	// Fixed, retried: the script passes and the manual action waits.
	os.Remove(filepath.Join(dir, "fail"))
	j = f.jobCall(t, j.ID, "retry")
	if j.State != JobWaiting || j.Steps[3].State != JobWaiting || j.Steps[2].State != JobSucceeded {
		t.Fatalf("after retry: %+v", j)
	}
	env, err := os.ReadFile(filepath.Join(dir, j.ID+".1.after.env"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"FERRY_PLAN=app", "FERRY_ACTION=test-failover", "FERRY_GROUP=db", "FERRY_VMS=vm1", "FERRY_JOB=" + j.ID} {
		if !strings.Contains(string(env), want+"\n") {
			t.Errorf("script environment lacks %s:\n%s", want, env)
		}
	}
	if _, ok := f.west.vm("vm2-drill"); ok {
		t.Fatal("the second group started before the manual action was confirmed")
	}
	var e map[string]string
	if code := f.call(t, f.op, "PUT", "/v1/plans/app", appPlan(), &e); code != 409 {
		t.Errorf("changing a plan whose job waits: %d %v, want 409", code, e)
	}
	if code := f.call(t, f.op, "POST", "/v1/jobs/"+j.ID+"/retry", struct{}{}, &e); code != 409 {
		t.Errorf("retrying a waiting job: %d %v, want 409", code, e)
	}
	j = f.jobCall(t, j.ID, "resume")
	if j.State != JobSucceeded {
		t.Fatalf("after resume: %+v", j)
	}
	f.west.mu.Lock()
	order := slices.Clone(f.west.started)
	f.west.mu.Unlock()
	if len(order) != 3 || order[0] != "vm1-drill" || !slices.Contains(order[1:], "vm2-drill") || !slices.Contains(order[1:], "vm3-drill") {
		t.Fatalf("drills started in order %q, want vm1-drill first", order)
	}
	for _, vm := range []string{"vm1", "vm2", "vm3"} {
		if p, _ := f.v.Protection(context.Background(), vm); !p.TestPending {
			t.Errorf("%s: no drill pending after the plan's drill", vm)
		}
	}

	if j := f.runPlan(t, api.PlanCleanupTest); j.State != JobSucceeded {
		t.Fatalf("plan cleanup: %+v", j)
	}
	// Failover: the manual action waits again (scripts and manual actions
	// run on failovers and drills by default).
	j = f.runPlan(t, api.PlanFailover)
	if j.State != JobWaiting {
		t.Fatalf("plan failover: %+v", j)
	}
	j = f.jobCall(t, j.ID, "resume")
	if j.State != JobSucceeded {
		t.Fatalf("plan failover after resume: %+v", j)
	}
	for _, vm := range []string{"vm1", "vm2", "vm3"} {
		if p, _ := f.v.Protection(context.Background(), vm); p.State != StateFailedOver {
			t.Errorf("%s: %s after the plan's failover", vm, p.State)
		}
	}
	// A repeated action skips VMs already there. (Reprotect needs the
	// real agents' statuses: the e2e test runs it.)
	for range 2 {
		if j = f.runPlan(t, api.PlanCommit); j.State != JobSucceeded {
			t.Fatalf("plan commit: %+v", j)
		}
	}
	if !strings.Contains(strings.Join(j.Steps[0].Messages, " "), "committed already") {
		t.Errorf("a repeated commit does not say it skipped: %+v", j.Steps[0])
	}
	for _, vm := range []string{"vm1", "vm2", "vm3"} {
		if p, _ := f.v.Protection(context.Background(), vm); p.State != StateCommitted {
			t.Errorf("%s: %s after the plan's commit", vm, p.State)
		}
	}
	p, _ := f.v.Plan(context.Background(), "app")
	if len(p.History) != 6 {
		t.Errorf("plan history: %d entries, want 6: %+v", len(p.History), p.History)
	}
}

// TestPlanJobVaultRestart: a plan job running when the vault stops is
// failed at its step when the vault starts again, the plan released; a
// retry finishes it. A job waiting for an operator keeps waiting.
func TestPlanJobVaultRestart(t *testing.T) {
	st := store.NewMem()
	f, _ := planFixture(t, st)
	p := appPlan()
	p.Groups[0].Post, p.Groups[1].Pre = nil, nil
	if code := f.call(t, f.op, "PUT", "/v1/plans/app", p, nil); code != 200 {
		t.Fatalf("put plan: %d", code)
	}
	f.west.block = make(chan struct{}) // StartVM hangs: the failover stays in its first step
	var j Job
	if code := f.call(t, f.op, "POST", "/v1/plans/app/run", api.PlanRun{Action: api.PlanFailover}, &j); code != 200 {
		t.Fatalf("run: %d", code)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if rj, _ := f.v.Job(context.Background(), j.ID); strings.Contains(strings.Join(rj.Steps[0].Messages, " "), "started") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the plan's failover of vm1 did not start")
		}
		time.Sleep(20 * time.Millisecond)
	}
	f.v.Close() // the vault stops mid-step
	close(f.west.block)
	f.west.block = nil
	g := newFixture(t, st, func(c *Config) { c.ScriptDir = t.TempDir() })
	g.east, g.west = f.east, f.west
	rj, err := g.v.Job(context.Background(), j.ID)
	if err != nil || rj.State != JobFailed || rj.Steps[0].State != JobFailed || !strings.Contains(rj.Error, "vault stopped") {
		t.Fatalf("plan job after the restart: %+v, %v", rj, err)
	}
	if pl, _ := g.v.Plan(context.Background(), "app"); pl.Job != "" {
		t.Fatalf("the plan is still held after the restart: %+v", pl)
	}
	// vm1's own failover job failed at the restart too; the retry runs it.
	var out Job
	if code := g.call(t, g.op, "POST", "/v1/jobs/"+j.ID+"/retry", struct{}{}, &out); code != 200 {
		t.Fatalf("retry: %d", code)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if out, err = g.v.WaitJob(ctx, j.ID); err != nil || out.State != JobSucceeded {
		t.Fatalf("retried plan failover: %+v, %v", out, err)
	}
	for _, vm := range []string{"vm1", "vm2", "vm3"} {
		if p, _ := g.v.Protection(context.Background(), vm); p.State != StateFailedOver {
			t.Errorf("%s: %s after the retried plan failover", vm, p.State)
		}
	}
	raw, _ := json.Marshal(out)
	if !strings.Contains(string(raw), "retried") {
		t.Errorf("the retried step does not say so: %s", raw)
	}
}

// TestMigrate: a vault's whole state copied to another store serves the
// same vault; a target that holds anything is refused untouched.
func TestMigrate(t *testing.T) {
	from := store.NewMem()
	f, _ := planFixture(t, from)
	if code := f.call(t, f.op, "PUT", "/v1/plans/app", appPlan(), nil); code != 200 {
		t.Fatalf("put plan: %d", code)
	}
	ctx := context.Background()
	to := store.NewMem()
	n, err := Migrate(ctx, from, to)
	if err != nil || n == 0 {
		t.Fatalf("migrate: %d, %v", n, err)
	}
	for _, k := range Kinds() {
		a, _ := from.List(ctx, k)
		b, _ := to.List(ctx, k)
		if len(a) != len(b) {
			t.Errorf("%s: %d documents, %d copied", k, len(a), len(b))
		}
	}
	g := newFixture(t, to)
	g.east, g.west = f.east, f.west
	for _, vm := range []string{"vm1", "vm2", "vm3"} {
		if p, err := g.v.Protection(ctx, vm); err != nil || p.State != StateProtected {
			t.Errorf("%s on the migrated store: %+v, %v", vm, p, err)
		}
	}
	if p, err := g.v.Plan(ctx, "app"); err != nil || len(p.Groups) != 2 {
		t.Errorf("plan on the migrated store: %+v, %v", p, err)
	}
	if code := g.call(t, f.op, "GET", "/v1/protections", nil, nil); code != 200 {
		t.Errorf("the old operator token on the migrated store: %d", code)
	}
	if _, err := Migrate(ctx, from, to); !errors.Is(err, store.ErrConflict) {
		t.Errorf("migrate into a store that holds a vault: %v, want ErrConflict", err)
	}
}
