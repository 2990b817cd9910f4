package vault

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
)

// Plan is a recovery plan (api.Plan).
type Plan = api.Plan

const kindPlan = "plan"

// Defaults of a plan run.
const (
	defaultWaitTimeout   = 5 * time.Minute
	defaultScriptTimeout = 10 * time.Minute
)

// PutPlan creates or replaces a recovery plan. Its VMs must be defined;
// its scripts must be in the vault's script directory. A plan whose job
// runs or waits for an operator cannot change (ErrBusy).
func (v *Vault) PutPlan(ctx context.Context, p Plan) (Plan, error) {
	p.Job, p.History = "", nil
	if err := api.CheckPlan(p); err != nil {
		return Plan{}, err
	}
	for _, g := range p.Groups {
		for _, vm := range g.VMs {
			if _, _, err := get[VM](ctx, v.st, kindVM, vm); err != nil {
				return Plan{}, fmt.Errorf("%w: plan %s: VM %s is not defined (ferry vm define, or ferry vm import)", ErrInvalid, p.Name, vm)
			}
		}
		for _, a := range append(append([]api.PlanAction(nil), g.Pre...), g.Post...) {
			if a.Script == "" {
				continue
			}
			if _, err := v.script(a.Script); err != nil {
				return Plan{}, err
			}
		}
	}
	for {
		old, ver, err := get[Plan](ctx, v.st, kindPlan, p.Name)
		if err != nil && !errors.Is(err, ErrNotFound) {
			return Plan{}, err
		}
		if old.Job != "" {
			return Plan{}, fmt.Errorf("%w: plan %s has job %s running or waiting; it can change once the job ends", ErrBusy, p.Name, old.Job)
		}
		p.History = old.History
		if _, err := put(ctx, v.st, kindPlan, p.Name, p, ver); err == nil {
			return p, nil
		} else if !isConflict(err) {
			return Plan{}, err
		}
	}
}

// Plans lists the recovery plans.
func (v *Vault) Plans(ctx context.Context) ([]Plan, error) { return list[Plan](ctx, v.st, kindPlan) }

// Plan returns a recovery plan.
func (v *Vault) Plan(ctx context.Context, name string) (Plan, error) {
	p, _, err := get[Plan](ctx, v.st, kindPlan, name)
	return p, err
}

// DeletePlan removes a plan (not its VMs or their protections); refused
// while its job runs or waits.
func (v *Vault) DeletePlan(ctx context.Context, name string) error {
	p, ver, err := get[Plan](ctx, v.st, kindPlan, name)
	if err != nil {
		return err
	}
	if p.Job != "" {
		return fmt.Errorf("%w: plan %s has job %s running or waiting", ErrBusy, name, p.Job)
	}
	return v.st.Delete(ctx, kindPlan, name, ver)
}

// script resolves a plan script's name in the script directory.
func (v *Vault) script(name string) (string, error) {
	if v.cfg.ScriptDir == "" {
		return "", fmt.Errorf("%w: script %s: the vault has no script directory; run it with --script-dir DIR and put the script there", ErrInvalid, name)
	}
	path := filepath.Join(v.cfg.ScriptDir, name)
	fi, err := os.Stat(path)
	if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0 {
		return "", fmt.Errorf("%w: script %s: no executable file %s (the vault's --script-dir)", ErrInvalid, name, path)
	}
	return path, nil
}

// planStep is one step of a plan job.
type planStep struct {
	Name  string
	Group int
	Kind  string // stepPre, stepVMs, stepWait, stepPost
	Act   api.PlanAction
}

const (
	stepPre  = "pre"
	stepVMs  = "vms"
	stepWait = "wait"
	stepPost = "post"
)

func groupName(g api.BootGroup, i int) string {
	if g.Name != "" {
		return g.Name
	}
	return fmt.Sprintf("group %d", i+1)
}

// boots says whether a plan action starts VMs (so the plan waits for
// them before the next group).
func boots(action string) bool { return action == api.PlanFailover || action == api.PlanTestFailover }

// planSteps lists a plan job's steps: per boot group in order, the
// actions before it, the action on its VMs, the wait for them and the
// actions after it.
func planSteps(p Plan, action string) []planStep {
	var steps []planStep
	for i, g := range p.Groups {
		gn := groupName(g, i)
		for _, a := range g.Pre {
			if a.RunsOn(action) {
				steps = append(steps, planStep{Name: fmt.Sprintf("%s: before: %s", gn, actionLabel(a)), Group: i, Kind: stepPre, Act: a})
			}
		}
		steps = append(steps, planStep{Name: fmt.Sprintf("%s: %s %s", gn, action, strings.Join(g.VMs, ", ")), Group: i, Kind: stepVMs})
		if boots(action) && g.Wait.For != api.WaitNone {
			steps = append(steps, planStep{Name: fmt.Sprintf("%s: wait until up (%s)", gn, waitKind(g.Wait)), Group: i, Kind: stepWait})
		}
		for _, a := range g.Post {
			if a.RunsOn(action) {
				steps = append(steps, planStep{Name: fmt.Sprintf("%s: after: %s", gn, actionLabel(a)), Group: i, Kind: stepPost, Act: a})
			}
		}
	}
	return steps
}

// actionLabel names a plan action in its step's name.
func actionLabel(a api.PlanAction) string {
	what := "script " + a.Script
	if a.Manual != "" {
		what = "manual action"
	}
	if a.Name != "" {
		what += " " + strconv.Quote(a.Name)
	}
	return what
}

func waitKind(w api.Wait) string {
	if w.For == "" {
		return api.WaitGuestAgent
	}
	return w.For
}

// planRun runs a plan job's steps in order, persisting each change.
type planRun struct {
	v     *Vault
	mu    sync.Mutex
	job   Job
	ver   int64
	plan  Plan
	req   api.PlanRun
	steps []planStep
}

// errWaiting: a manual step waits for an operator.
var errWaiting = errors.New("waiting for an operator")

// RunPlan starts a plan job: req.Action on every VM of the plan, group
// after group in boot order. ErrBusy while another job of the plan runs
// or waits.
func (v *Vault) RunPlan(ctx context.Context, name string, req api.PlanRun) (Job, error) {
	if !slices.Contains(api.PlanActions, req.Action) {
		return Job{}, fmt.Errorf("%w: plan action %q: want one of %s", ErrInvalid, req.Action, strings.Join(api.PlanActions, ", "))
	}
	rb := make([]byte, 4)
	rand.Read(rb)
	id := fmt.Sprintf("j%d-%x", v.now().Unix(), rb)
	var plan Plan
	for {
		p, ver, err := get[Plan](ctx, v.st, kindPlan, name)
		if err != nil {
			return Job{}, err
		}
		if p.Job != "" {
			return Job{}, fmt.Errorf("%w: plan %s has job %s running or waiting; wait for it, or resume it (ferry job resume %s)", ErrBusy, name, p.Job, p.Job)
		}
		p.Job = id
		if _, err := put(ctx, v.st, kindPlan, name, p, ver); err == nil {
			plan = p
			break
		} else if !isConflict(err) {
			return Job{}, err
		}
	}
	snap, _ := json.Marshal(api.Plan{Name: plan.Name, Groups: plan.Groups})
	rj, _ := json.Marshal(req)
	job := Job{ID: id, Action: "plan-" + req.Action, Plan: name, State: JobRunning, Created: v.now(), Vault: v.cfg.Advertise, Epoch: v.epoch(),
		Params: map[string]string{"plan": string(snap), "request": string(rj)}}
	pr := &planRun{v: v, job: job, plan: plan, req: req, steps: planSteps(plan, req.Action)}
	for _, s := range pr.steps {
		pr.job.Steps = append(pr.job.Steps, Step{Name: s.Name, State: StepPending})
	}
	if err := pr.save(ctx); err != nil {
		dctx, cancel := v.detached(ctx)
		defer cancel()
		v.releasePlan(dctx, name, id, nil)
		return Job{}, err
	}
	out := pr.snapshot()
	pr.start(0)
	return out, nil
}

// loadPlanRun rebuilds a plan job's runner from its record.
func (v *Vault) loadPlanRun(ctx context.Context, id string) (*planRun, error) {
	j, ver, err := get[Job](ctx, v.st, kindJob, id)
	if err != nil {
		return nil, err
	}
	if j.Plan == "" {
		return nil, fmt.Errorf("%w: job %s is not a plan job: run the action again instead", ErrInvalid, id)
	}
	pr := &planRun{v: v, job: j, ver: ver}
	if err := json.Unmarshal([]byte(j.Params["plan"]), &pr.plan); err != nil {
		return nil, fmt.Errorf("job %s: its plan: %w", id, err)
	}
	if err := json.Unmarshal([]byte(j.Params["request"]), &pr.req); err != nil {
		return nil, fmt.Errorf("job %s: its request: %w", id, err)
	}
	pr.steps = planSteps(pr.plan, pr.req.Action)
	if len(pr.steps) != len(j.Steps) {
		return nil, fmt.Errorf("job %s: %d steps recorded, its plan makes %d", id, len(j.Steps), len(pr.steps))
	}
	return pr, nil
}

// ResumeJob confirms the manual action a plan job waits for; the job
// goes on with its next step. ErrForbidden if the job does not wait.
func (v *Vault) ResumeJob(ctx context.Context, id string) (Job, error) {
	pr, err := v.loadPlanRun(ctx, id)
	if err != nil {
		return Job{}, err
	}
	if pr.job.State != JobWaiting {
		return Job{}, fmt.Errorf("%w: job %s is %s, not waiting for an operator", ErrForbidden, id, pr.job.State)
	}
	i := pr.current()
	pr.mu.Lock()
	s := &pr.job.Steps[i]
	s.State, s.End, s.Percent = JobSucceeded, v.now(), 100
	s.Messages = append(s.Messages, "confirmed by an operator")
	pr.job.State = JobRunning
	pr.mu.Unlock()
	if err := pr.save(ctx); err != nil {
		return Job{}, err // someone else resumed it first: a conflict
	}
	out := pr.snapshot()
	pr.start(i + 1)
	return out, nil
}

// RetryJob runs a failed plan job again from the step that failed; the
// steps before it are not redone, and VMs of that step that already
// reached the action's end are skipped. ErrForbidden unless the job
// failed; ErrBusy if another job of the plan runs.
func (v *Vault) RetryJob(ctx context.Context, id string) (Job, error) {
	pr, err := v.loadPlanRun(ctx, id)
	if err != nil {
		return Job{}, err
	}
	if pr.job.State != JobFailed {
		return Job{}, fmt.Errorf("%w: job %s is %s; only a failed job is retried", ErrForbidden, id, pr.job.State)
	}
	i := pr.current()
	for {
		p, ver, err := get[Plan](ctx, v.st, kindPlan, pr.plan.Name)
		if err != nil {
			return Job{}, err
		}
		if p.Job != "" {
			return Job{}, fmt.Errorf("%w: plan %s has job %s running or waiting", ErrBusy, p.Name, p.Job)
		}
		p.Job = id
		if _, err := put(ctx, v.st, kindPlan, p.Name, p, ver); err == nil {
			break
		} else if !isConflict(err) {
			return Job{}, err
		}
	}
	pr.mu.Lock()
	for k := i; k < len(pr.job.Steps); k++ {
		s := &pr.job.Steps[k]
		if k == i {
			s.Messages = append(s.Messages, "retried")
		}
		s.State, s.Percent, s.End = StepPending, 0, time.Time{}
	}
	pr.job.State, pr.job.Error, pr.job.Ended = JobRunning, "", time.Time{}
	pr.mu.Unlock()
	if err := pr.save(ctx); err != nil {
		dctx, cancel := v.detached(ctx)
		defer cancel()
		v.releasePlan(dctx, pr.plan.Name, id, nil)
		return Job{}, err
	}
	out := pr.snapshot()
	pr.start(i)
	return out, nil
}

// current is the step the job stopped at: the first one not succeeded
// or skipped.
func (pr *planRun) current() int {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	for i, s := range pr.job.Steps {
		if s.State != JobSucceeded && s.State != JobSkipped {
			return i
		}
	}
	return len(pr.job.Steps)
}

func (pr *planRun) save(ctx context.Context) error {
	if pr.v.ctx.Err() != nil {
		return errStopped
	}
	pr.mu.Lock()
	defer pr.mu.Unlock()
	ver, err := put(ctx, pr.v.st, kindJob, pr.job.ID, pr.job, pr.ver)
	if err != nil {
		return fmt.Errorf("persist job %s: %w", pr.job.ID, err)
	}
	pr.ver = ver
	return nil
}

func (pr *planRun) snapshot() Job {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	j := pr.job
	j.Steps = append([]Step(nil), pr.job.Steps...)
	return j
}

// say adds a message to step i.
func (pr *planRun) say(ctx context.Context, i int, format string, a ...any) {
	pr.mu.Lock()
	pr.job.Steps[i].Messages = append(pr.job.Steps[i].Messages, fmt.Sprintf(format, a...))
	pr.mu.Unlock()
	pr.save(ctx)
}

// start runs the steps from i on in the background.
func (pr *planRun) start(from int) {
	pr.v.wg.Add(1)
	go func() {
		defer pr.v.wg.Done()
		pr.run(pr.v.ctx, from)
	}()
}

func (pr *planRun) run(ctx context.Context, from int) {
	v := pr.v
	for i := from; i < len(pr.steps); i++ {
		pr.mu.Lock()
		pr.job.Steps[i].State, pr.job.Steps[i].Start = JobRunning, v.now()
		pr.mu.Unlock()
		pr.save(ctx)
		v.log.Info("plan step", "job", pr.job.ID, "plan", pr.plan.Name, "step", pr.steps[i].Name)
		err := pr.do(ctx, i)
		if v.ctx.Err() != nil {
			return // the vault is stopping: failed at the next start, then retried
		}
		if errors.Is(err, errWaiting) {
			pr.mu.Lock()
			pr.job.Steps[i].State, pr.job.State = JobWaiting, JobWaiting
			pr.mu.Unlock()
			pr.save(ctx)
			v.log.Info("plan waits for an operator", "job", pr.job.ID, "step", pr.steps[i].Name)
			return
		}
		if err != nil {
			pr.end(ctx, i, err)
			return
		}
		pr.mu.Lock()
		pr.job.Steps[i].State, pr.job.Steps[i].End, pr.job.Steps[i].Percent = JobSucceeded, v.now(), 100
		pr.mu.Unlock()
		pr.save(ctx)
	}
	pr.end(ctx, -1, nil)
}

// end ends the job (failed at step i with err, or succeeded) and
// releases the plan, recording the run in its history.
func (pr *planRun) end(ctx context.Context, i int, err error) {
	v := pr.v
	ctx, cancel := v.detached(ctx)
	defer cancel()
	now := v.now()
	pr.mu.Lock()
	pr.job.Ended = now
	if err != nil {
		s := &pr.job.Steps[i]
		s.State, s.End = JobFailed, now
		s.Messages = append(s.Messages, err.Error())
		pr.job.State = JobFailed
		pr.job.Error = fmt.Sprintf("step %q: %v; once fixed, retry from this step: ferry job retry %s", s.Name, err, pr.job.ID)
	} else {
		pr.job.State = JobSucceeded
	}
	entry := HistoryEntry{Action: pr.job.Action, Time: pr.job.Created, Duration: now.Sub(pr.job.Created).Round(time.Millisecond).String(),
		Notes: string(pr.job.State) + " · job " + pr.job.ID}
	pr.mu.Unlock()
	v.releasePlan(ctx, pr.plan.Name, pr.job.ID, &entry)
	pr.save(ctx)
	v.metrics.jobEnded(pr.snapshot())
	v.jobEvent(ctx, pr.snapshot())
	if err != nil {
		v.log.Warn("plan job failed", "job", pr.job.ID, "plan", pr.plan.Name, "err", err)
	} else {
		v.log.Info("plan job succeeded", "job", pr.job.ID, "plan", pr.plan.Name)
	}
}

// releasePlan frees the plan from job id, adding entry to its history.
func (v *Vault) releasePlan(ctx context.Context, name, id string, entry *HistoryEntry) {
	for {
		p, ver, err := get[Plan](ctx, v.st, kindPlan, name)
		if err != nil || p.Job != id {
			return
		}
		p.Job = ""
		if entry != nil {
			p.History = append(p.History, *entry)
			if len(p.History) > 100 {
				p.History = p.History[len(p.History)-100:]
			}
		}
		if _, err := put(ctx, v.st, kindPlan, name, p, ver); err == nil || !isConflict(err) {
			return
		}
	}
}

// do runs step i.
func (pr *planRun) do(ctx context.Context, i int) error {
	st := pr.steps[i]
	g := pr.plan.Groups[st.Group]
	switch st.Kind {
	case stepPre, stepPost:
		if st.Act.Manual != "" {
			pr.say(ctx, i, "%s — confirm when done: ferry job resume %s", st.Act.Manual, pr.job.ID)
			return errWaiting
		}
		return pr.runScript(ctx, i, st, g)
	case stepVMs:
		return pr.actOnVMs(ctx, i, g)
	case stepWait:
		return pr.waitUp(ctx, i, g)
	}
	return fmt.Errorf("unknown step kind %q", st.Kind)
}

// actOnVMs runs the plan's action on every VM of group g at once, as
// each VM's own job, and waits for them all. A VM that is already where
// the action leads (a retry) is skipped.
func (pr *planRun) actOnVMs(ctx context.Context, i int, g api.BootGroup) error {
	v := pr.v
	type result struct {
		vm  string
		job Job
		err error
	}
	results := make(chan result, len(g.VMs))
	for _, vm := range g.VMs {
		go func() {
			j, skip, err := pr.startVMJob(ctx, vm)
			if err != nil || skip != "" {
				if skip != "" {
					pr.say(ctx, i, "%s: %s", vm, skip)
				}
				results <- result{vm: vm, err: err}
				return
			}
			pr.say(ctx, i, "%s: %s job %s started", vm, j.Action, j.ID)
			j, err = v.WaitJob(ctx, j.ID)
			results <- result{vm: vm, job: j, err: err}
		}()
	}
	var errs []error
	for range g.VMs {
		r := <-results
		switch {
		case r.err != nil:
			errs = append(errs, fmt.Errorf("%s: %w", r.vm, r.err))
		case r.job.ID == "":
		case r.job.State != JobSucceeded:
			errs = append(errs, fmt.Errorf("%s: job %s %s: %s", r.vm, r.job.ID, r.job.State, r.job.Error))
		default:
			pr.say(ctx, i, "%s: job %s succeeded in %s", r.vm, r.job.ID, r.job.Ended.Sub(r.job.Created).Round(time.Millisecond))
		}
	}
	return errors.Join(errs...)
}

// startVMJob starts the plan's action on one VM, or says why it needs
// none.
func (pr *planRun) startVMJob(ctx context.Context, vm string) (Job, string, error) {
	v := pr.v
	p, err := v.Protection(ctx, vm)
	if err != nil {
		return Job{}, "", fmt.Errorf("not protected: %w (ferry protect %s --to SITE)", err, vm)
	}
	req := pr.req
	switch req.Action {
	case api.PlanTestFailover:
		if p.TestPending {
			return Job{}, "its test failover runs already", nil
		}
		j, err := v.TestFailover(ctx, vm, cmp.Or(req.Point, "latest-processed"))
		return j, "", err
	case api.PlanCleanupTest:
		if !p.TestPending {
			return Job{}, "no test failover to clean up", nil
		}
		j, err := v.CleanupTestFailover(ctx, vm, req.Notes)
		return j, "", err
	case api.PlanFailover:
		if p.State == StateFailedOver || p.State == StateCommitted {
			return Job{}, "failed over already (" + string(p.State) + ")", nil
		}
		j, err := v.Failover(ctx, vm, api.FailoverRequest{Point: cmp.Or(req.Point, "latest"), ShutdownSource: req.ShutdownSource})
		return j, "", err
	case api.PlanCommit:
		if p.State == StateCommitted {
			return Job{}, "committed already", nil
		}
		j, err := v.Commit(ctx, vm)
		return j, "", err
	case api.PlanReprotect:
		if p.State == StateProtected && !p.TestPending {
			return Job{}, "protected already", nil
		}
		j, err := v.Reprotect(ctx, vm)
		return j, "", err
	}
	return Job{}, "", fmt.Errorf("%w: plan action %q", ErrInvalid, req.Action)
}

// waitUp waits until every VM of group g answers (its guest agent, or
// its published service), within the group's timeout.
func (pr *planRun) waitUp(ctx context.Context, i int, g api.BootGroup) error {
	v := pr.v
	timeout := g.Wait.Timeout
	if timeout == 0 {
		timeout = defaultWaitTimeout
	}
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	start := v.now()
	var errs []error
	for _, vm := range g.VMs {
		check, what, err := pr.upCheck(wctx, vm, waitKind(g.Wait))
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", vm, err))
			continue
		}
		var last error
		for {
			if last = check(wctx); last == nil {
				pr.say(ctx, i, "%s is up (%s answers) after %s", vm, what, v.now().Sub(start).Round(100*time.Millisecond))
				break
			}
			select {
			case <-wctx.Done():
			case <-time.After(500 * time.Millisecond):
				continue
			}
			break
		}
		if last != nil {
			errs = append(errs, fmt.Errorf("%s: %s did not answer within %s: %v", vm, what, timeout, last))
		}
	}
	return errors.Join(errs...)
}

// upCheck returns a probe of whether vm is up: its guest agent at the
// site it runs at now (as NAME-drill at the recovery site during a
// drill), or its published service there.
func (pr *planRun) upCheck(ctx context.Context, vm, kind string) (func(context.Context) error, string, error) {
	v := pr.v
	spec, _, err := get[VM](ctx, v.st, kindVM, vm)
	if err != nil {
		return nil, "", err
	}
	p, err := v.Protection(ctx, vm)
	if err != nil {
		return nil, "", err
	}
	site, name, drill := spec.Site, vm, false
	if pr.req.Action == api.PlanTestFailover {
		site, name, drill = p.Target, vm+"-drill", true
	}
	if len(spec.Members) > 0 {
		// A consistency group is up when every member's guest agent
		// answers.
		_, c, err := v.site(ctx, site)
		if err != nil {
			return nil, "", err
		}
		suffix := strings.TrimPrefix(name, vm)
		return func(ctx context.Context) error {
			for _, m := range members(spec) {
				if err := c.PingGuest(ctx, m.Name+suffix); err != nil {
					return fmt.Errorf("%s: %w", m.Name+suffix, err)
				}
			}
			return nil
		}, "the guest agents of its VMs at " + site, nil
	}
	switch kind {
	case api.WaitService:
		nets, err := v.attach(ctx, &p, spec, site, drill)
		if err != nil {
			return nil, "", err
		}
		addr := forwardAddr(spec, site, nets[0])
		if (addr == "" || spec.GuestPort == 0) && drill {
			// A drill's network publishes nothing unless asked
			// (--forward SITE/NETWORK=...): its guest agent tells.
			return pr.upCheck(ctx, vm, api.WaitGuestAgent)
		}
		if addr == "" || spec.GuestPort == 0 {
			return nil, "", fmt.Errorf("%w: no published service at %s to wait for (ferry vm forward); wait for its guest agent instead", ErrInvalid, site)
		}
		url := "http://" + addr + "/"
		hc := &http.Client{Timeout: 2 * time.Second}
		return func(ctx context.Context) error {
			req, _ := http.NewRequestWithContext(ctx, "GET", url, nil)
			resp, err := hc.Do(req)
			if err != nil {
				return err
			}
			resp.Body.Close()
			return nil
		}, "its service " + url, nil
	default:
		_, c, err := v.site(ctx, site)
		if err != nil {
			return nil, "", err
		}
		return func(ctx context.Context) error { return c.PingGuest(ctx, name) }, "its guest agent at " + site, nil
	}
}

// runScript runs a plan script with the plan's context in its
// environment; its output's last lines go to the step's messages.
func (pr *planRun) runScript(ctx context.Context, i int, st planStep, g api.BootGroup) error {
	path, err := pr.v.script(st.Act.Script)
	if err != nil {
		return err
	}
	timeout := st.Act.Timeout
	if timeout == 0 {
		timeout = defaultScriptTimeout
	}
	sctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(sctx, path)
	cmd.Dir = pr.v.cfg.ScriptDir
	cmd.WaitDelay = 5 * time.Second
	phase := "after"
	if st.Kind == stepPre {
		phase = "before"
	}
	cmd.Env = append(os.Environ(),
		"FERRY_PLAN="+pr.plan.Name, "FERRY_ACTION="+pr.req.Action, "FERRY_JOB="+pr.job.ID,
		"FERRY_GROUP="+groupName(g, st.Group), "FERRY_GROUP_INDEX="+strconv.Itoa(st.Group+1),
		"FERRY_PHASE="+phase, "FERRY_VMS="+strings.Join(g.VMs, ","))
	var out bytes.Buffer
	lw := &limited{w: &out, n: 64 << 10}
	cmd.Stdout, cmd.Stderr = lw, lw // one writer: exec copies both through one pipe
	start := time.Now()
	err = cmd.Run()
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) > 10 {
		lines = lines[len(lines)-10:]
	}
	for _, l := range lines {
		if l != "" {
			pr.say(ctx, i, "| %s", l)
		}
	}
	if sctx.Err() == context.DeadlineExceeded {
		return fmt.Errorf("script %s did not end within %s", st.Act.Script, timeout)
	}
	if err != nil {
		return fmt.Errorf("script %s: %v", st.Act.Script, err)
	}
	pr.say(ctx, i, "script %s succeeded in %s", st.Act.Script, time.Since(start).Round(time.Millisecond))
	return nil
}

// limited writes at most n bytes to w and drops the rest.
type limited struct {
	w *bytes.Buffer
	n int
}

func (l *limited) Write(p []byte) (int, error) {
	if k := min(len(p), l.n); k > 0 {
		l.w.Write(p[:k])
		l.n -= k
	}
	return len(p), nil
}

// recoverPlanJob handles a plan job found unfinished at start: one that
// was running is failed at its step (retry goes on from there); one that
// waits for an operator keeps waiting.
func (v *Vault) recoverPlanJob(ctx context.Context, j Job, ver int64) {
	if j.State != JobRunning {
		return
	}
	pr := &planRun{v: v, job: j, ver: ver}
	json.Unmarshal([]byte(j.Params["plan"]), &pr.plan)
	i := pr.current()
	if i >= len(pr.job.Steps) {
		i = len(pr.job.Steps) - 1
	}
	pr.end(ctx, i, fmt.Errorf("the vault stopped during this step; the VMs' own jobs were failed or finished (see each VM)"))
	v.log.Warn("plan job failed at restart", "job", j.ID, "step", i)
}
