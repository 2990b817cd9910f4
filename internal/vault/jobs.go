package vault

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/ferry-dr/ferry/internal/store"
)

// Kinds of stored documents.
const (
	kindSite       = "site"
	kindVM         = "vm"
	kindPolicy     = "policy"
	kindProtection = "protection"
	kindJob        = "job"
	kindToken      = "token"
	kindMeta       = "meta"
	kindImport     = "import" // an import in progress: how to define its VM
)

// Kinds lists every kind of document the vault stores, for a copy of
// its whole state to another store (Migrate).
func Kinds() []string {
	return []string{kindSite, kindVM, kindPolicy, kindProtection, kindJob, kindToken, kindMeta, kindImport, kindPlan}
}

// Migrate copies the vault's whole state from one store to another that
// holds none of it (ferry vault migrate: SQLite to etcd), and returns
// the number of documents copied. The vault must not run on from. A
// target that already holds a document fails with store.ErrConflict
// before anything is written.
func Migrate(ctx context.Context, from, to store.Store) (int, error) {
	var docs []store.Doc
	for _, k := range Kinds() {
		ds, err := from.List(ctx, k)
		if err != nil {
			return 0, fmt.Errorf("read %s: %w", k, err)
		}
		docs = append(docs, ds...)
		existing, err := to.List(ctx, k)
		if err != nil {
			return 0, fmt.Errorf("read the target's %s: %w", k, err)
		}
		if len(existing) > 0 {
			return 0, fmt.Errorf("%w: the target already holds %d %s documents: migrate only into an empty store", store.ErrConflict, len(existing), k)
		}
	}
	for i, d := range docs {
		// Versions start again at 1: they only order writes to one store.
		if _, err := to.Put(ctx, d.Kind, d.ID, d.Data, 0); err != nil {
			return i, fmt.Errorf("write %s %s: %w", d.Kind, d.ID, err)
		}
	}
	return len(docs), nil
}

func get[T any](ctx context.Context, s store.Store, kind, id string) (T, int64, error) {
	var v T
	d, err := s.Get(ctx, kind, id)
	if err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return v, 0, fmt.Errorf("%w: %s %q", ErrNotFound, kind, id)
		}
		return v, 0, err
	}
	if err := json.Unmarshal(d.Data, &v); err != nil {
		return v, 0, fmt.Errorf("decode %s %q: %w", kind, id, err)
	}
	return v, d.Version, nil
}

func put(ctx context.Context, s store.Store, kind, id string, v any, version int64) (int64, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return 0, err
	}
	return s.Put(ctx, kind, id, b, version)
}

func list[T any](ctx context.Context, s store.Store, kind string) ([]T, error) {
	docs, err := s.List(ctx, kind)
	if err != nil {
		return nil, err
	}
	out := make([]T, 0, len(docs))
	for _, d := range docs {
		var v T
		if err := json.Unmarshal(d.Data, &v); err != nil {
			return nil, fmt.Errorf("decode %s %q: %w", kind, d.ID, err)
		}
		out = append(out, v)
	}
	return out, nil
}

// updateProtection applies fn to the protection with compare-and-set,
// retrying on conflicts.
func (v *Vault) updateProtection(ctx context.Context, name string, fn func(p *Protection) error) (Protection, error) {
	for {
		p, ver, err := get[Protection](ctx, v.st, kindProtection, name)
		if err != nil {
			return p, err
		}
		if err := fn(&p); err != nil {
			return p, err
		}
		if _, err := put(ctx, v.st, kindProtection, name, p, ver); err == nil {
			return p, nil
		} else if !errors.Is(err, store.ErrConflict) {
			return p, err
		}
	}
}

// run is the context a job's body gets: it moves through named steps, each
// persisted as it starts and ends.
type run struct {
	v   *Vault
	job Job
	ver int64
	mu  sync.Mutex
	cur int
}

// errStopped: the vault stopped (or no longer leads); a job's runner
// writes nothing more, so that the vault that acts now owns the record.
var errStopped = errors.New("the vault stopped acting")

func (r *run) save(ctx context.Context) error {
	if r.v.ctx.Err() != nil {
		return errStopped
	}
	ver, err := put(ctx, r.v.st, kindJob, r.job.ID, r.job, r.ver)
	if err != nil {
		return fmt.Errorf("persist job %s: %w", r.job.ID, err)
	}
	r.ver = ver
	return nil
}

// Step marks step name running (the steps before it done) and persists.
func (r *run) Step(ctx context.Context, name string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := r.v.now()
	for i := range r.job.Steps {
		s := &r.job.Steps[i]
		if s.State == JobRunning {
			s.State, s.End, s.Percent = JobSucceeded, now, 100
		}
		if s.Name == name {
			r.cur = i
			s.State, s.Start = JobRunning, now
		}
	}
	r.save(ctx)
	r.v.log.Info("job step", "job", r.job.ID, "step", name)
}

// Skip marks a step skipped with a message.
func (r *run) Skip(ctx context.Context, name, why string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for i := range r.job.Steps {
		if s := &r.job.Steps[i]; s.Name == name {
			s.State, s.Messages = "skipped", append(s.Messages, why)
		}
	}
	r.save(ctx)
}

// Say adds a message (and progress) to the running step.
func (r *run) Say(ctx context.Context, percent int, format string, a ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := &r.job.Steps[r.cur]
	s.Messages = append(s.Messages, fmt.Sprintf(format, a...))
	if percent >= 0 {
		s.Percent = percent
	}
	r.save(ctx)
}

// jobBody runs a job; it returns the protection state to end in.
type jobBody func(ctx context.Context, r *run, p Protection) (newState func(p *Protection), err error)

// startJob checks the guard, claims the protection for a new job (one at
// a time), persists the job with its steps and runs body in the
// background. It returns the job as created.
func (v *Vault) startJob(ctx context.Context, protection, action string, steps []string, params map[string]string, body jobBody) (Job, error) {
	// Time-ordered, and unique across vault restarts.
	rb := make([]byte, 4)
	rand.Read(rb)
	id := fmt.Sprintf("j%d-%x", v.now().Unix(), rb)
	job := Job{ID: id, Action: action, Protection: protection, State: JobRunning, Params: params, Created: v.now(),
		Vault: v.cfg.Advertise, Epoch: v.epoch()}
	for _, s := range steps {
		job.Steps = append(job.Steps, Step{Name: s, State: StepPending})
	}
	var snapshot Protection
	_, err := v.updateProtection(ctx, protection, func(p *Protection) error {
		if err := guard(p, action); err != nil {
			return err
		}
		job.PrevState = p.State
		p.Job = id
		if action == ActFailover {
			p.State = StateFailingOver
		}
		snapshot = *p
		return nil
	})
	if err != nil {
		return Job{}, err
	}
	r := &run{v: v, job: job}
	r.job.Steps = append([]Step(nil), job.Steps...) // the runner's own copy
	if err := r.save(ctx); err != nil {
		// Release the protection: the job never started.
		dctx, cancel := v.detached(ctx)
		defer cancel()
		v.updateProtection(dctx, protection, func(p *Protection) error {
			if p.Job == id {
				p.Job, p.State = "", job.PrevState
			}
			return nil
		})
		return Job{}, err
	}
	v.wg.Add(1)
	go func() {
		defer v.wg.Done()
		jctx := v.ctx
		newState, err := body(jctx, r, snapshot)
		v.finish(jctx, r, newState, err)
	}()
	return job, nil
}

// finish ends a job and releases the protection; a failed job restores
// the protection's previous state.
func (v *Vault) finish(ctx context.Context, r *run, newState func(*Protection), err error) {
	if v.ctx.Err() != nil {
		return // the vault is stopping: the job is resumed or failed at the next start
	}
	ctx, cancel := v.detached(ctx)
	defer cancel()
	// The protection first, then the job's record: whoever sees the job
	// ended (a CLI --wait, the portal) finds the protection free for the
	// next action. A vault that dies between the two finds the job still
	// running with the protection already released; recoverJobs then
	// records the outcome the protection shows.
	v.updateProtection(ctx, r.job.Protection, func(p *Protection) error {
		if p.Job != r.job.ID {
			return errReleased
		}
		p.Job = ""
		if err != nil {
			p.State = r.job.PrevState
		} else if newState != nil {
			newState(p)
		}
		return nil
	})
	r.mu.Lock()
	r.end(err)
	r.saveFinal(ctx)
	v.metrics.jobEnded(r.job)
	ended := r.job
	r.mu.Unlock()
	v.jobEvent(ctx, ended)
	if err != nil {
		v.log.Warn("job failed", "job", r.job.ID, "action", r.job.Action, "err", err)
	} else {
		v.log.Info("job succeeded", "job", r.job.ID, "action", r.job.Action)
	}
}

// saveFinal records an ended job even if a stopped vault's runner wrote
// it after this one read it: the vault that ends the job owns it.
func (r *run) saveFinal(ctx context.Context) {
	for range 5 {
		err := r.save(ctx)
		if err == nil || !isConflict(err) {
			return
		}
		_, ver, gerr := get[Job](ctx, r.v.st, kindJob, r.job.ID)
		if gerr != nil {
			return
		}
		r.ver = ver
	}
}

// errReleased: the protection no longer belongs to the job.
var errReleased = errors.New("the protection is not held by this job")

// end marks the job and its running step ended with err. Caller holds mu.
func (r *run) end(err error) {
	now := r.v.now()
	for i := range r.job.Steps {
		s := &r.job.Steps[i]
		if s.State == JobRunning {
			if err != nil {
				s.State = JobFailed
				s.Messages = append(s.Messages, err.Error())
			} else {
				s.State, s.Percent = JobSucceeded, 100
			}
			s.End = now
		}
	}
	r.job.Ended = now
	if err != nil {
		r.job.State, r.job.Error = JobFailed, err.Error()
	} else {
		r.job.State = JobSucceeded
	}
}

// recoverJobs runs at start: a job that was running when the vault stopped
// (a crash, kill -9) is failed with the step it was in, and its protection
// is released and restored, so nothing stays stuck; the action can be
// retried.
func (v *Vault) recoverJobs(ctx context.Context) error {
	docs, err := v.st.List(ctx, kindJob)
	if err != nil {
		return err
	}
	for _, d := range docs {
		var j Job
		if json.Unmarshal(d.Data, &j) != nil || j.State != JobRunning {
			continue
		}
		if j.Plan != "" {
			v.recoverPlanJob(ctx, j, d.Version)
			continue
		}
		step := "?"
		for _, s := range j.Steps {
			if s.State == JobRunning {
				step = s.Name
			}
		}
		r := &run{v: v, job: j, ver: d.Version}
		if p, err := v.Protection(ctx, j.Protection); err == nil && p.Job != j.ID {
			// The vault stopped after the outcome reached the protection,
			// before it reached the job's record: record what it shows.
			var err error
			if p.State == j.PrevState {
				err = fmt.Errorf("the vault stopped as the job ended; the protection is back in state %s", p.State)
			}
			r.end(err)
			r.save(ctx)
			v.log.Warn("job ended at restart from its protection's state", "job", j.ID, "state", r.job.State)
			continue
		}
		v.finish(ctx, r, nil, fmt.Errorf("the vault stopped during step %q; nothing after it was done: check the VM and retry the action", step))
		v.log.Warn("job failed at restart", "job", j.ID, "step", step)
	}
	return nil
}

// Job returns a job.
func (v *Vault) Job(ctx context.Context, id string) (Job, error) {
	j, _, err := get[Job](ctx, v.st, kindJob, id)
	return j, err
}

// Jobs lists jobs, newest first, optionally of one protection.
func (v *Vault) Jobs(ctx context.Context, protection string) ([]Job, error) {
	all, err := list[Job](ctx, v.st, kindJob)
	if err != nil {
		return nil, err
	}
	var out []Job
	for _, j := range all {
		if protection == "" || j.Protection == protection {
			out = append(out, j)
		}
	}
	sort.Slice(out, func(i, k int) bool { return out[i].Created.After(out[k].Created) })
	return out, nil
}

// WaitJob waits until the job ends or ctx is done.
func (v *Vault) WaitJob(ctx context.Context, id string) (Job, error) {
	for {
		j, err := v.Job(ctx, id)
		if err != nil || j.State != JobRunning {
			return j, err
		}
		select {
		case <-ctx.Done():
			return j, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}
