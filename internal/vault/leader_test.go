package vault

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/store"
)

// fakeLeadership is an election the test decides: Campaign returns once
// elect is closed; closing lost ends the leadership.
type fakeLeadership struct {
	elect, lost chan struct{}
	leader      func() string
}

func (f *fakeLeadership) Campaign(ctx context.Context) (<-chan struct{}, error) {
	select {
	case <-f.elect:
		return f.lost, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}
func (f *fakeLeadership) Leader(context.Context) (string, error) { return f.leader(), nil }
func (f *fakeLeadership) Resign(context.Context) error           { return nil }
func (f *fakeLeadership) Epoch() int64                           { return 1 }

// leadingFixture returns a fixture whose vault was elected (by a
// fakeLeadership named "a") and leads.
func leadingFixture(t *testing.T, st store.Store) (*fixture, *fakeLeadership) {
	t.Helper()
	la := &fakeLeadership{elect: make(chan struct{}), lost: make(chan struct{}), leader: func() string { return "a" }}
	close(la.elect)
	f := newFixture(t, st, func(c *Config) { c.Leadership = la })
	for deadline := time.Now().Add(5 * time.Second); !f.v.Leading(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the elected vault does not lead")
		}
	}
	return f, la
}

// TestLeadership: two vaults on one store. The follower serves reads and
// refuses changes naming the leader; when the leader loses the
// leadership in the middle of a failover it stops at once, and the new
// leader fails that job with its step and releases the protection, then
// takes changes.
func TestLeadership(t *testing.T) {
	st := store.NewMem()
	var leaderName atomic.Value
	leaderName.Store("east-vault:7400")
	name := func() string { return leaderName.Load().(string) }
	la := &fakeLeadership{elect: make(chan struct{}), lost: make(chan struct{}), leader: name}
	lb := &fakeLeadership{elect: make(chan struct{}), lost: make(chan struct{}), leader: name}
	close(la.elect)
	f := newFixture(t, st, func(c *Config) { c.Leadership = la })
	deadline := time.Now().Add(5 * time.Second)
	for !f.v.Leading() {
		if time.Now().After(deadline) {
			t.Fatal("the elected vault does not lead")
		}
		time.Sleep(10 * time.Millisecond)
	}
	f.setup(t)
	f.job(t, "/v1/protections", map[string]string{"vm": "vm1", "target": "west"})

	b, bs := second(t, st, lb, f)
	call := func(method, path, body string) (int, string) {
		req, _ := http.NewRequest(method, bs.URL+path, strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+f.op)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := call("GET", "/v1/protections/vm1", ""); code != 200 || !strings.Contains(body, `"protected"`) {
		t.Fatalf("a read at the follower: %d %s", code, body)
	}
	if code, body := call("POST", "/v1/protections/vm1/test-failover", `{"point":"latest-processed"}`); code != http.StatusMisdirectedRequest || !strings.Contains(body, "east-vault:7400") {
		t.Fatalf("a change at the follower: %d %s, want 421 naming the leader", code, body)
	}

	// A failover hangs in its start step; the leader loses the lead.
	f.west.block = make(chan struct{})
	var j Job
	if code := f.call(t, f.op, "POST", "/v1/protections/vm1/failover", map[string]any{"point": "latest", "shutdown_source": false}, &j); code != 200 {
		t.Fatalf("failover: %d", code)
	}
	waitStep := time.Now().Add(5 * time.Second)
	for {
		cur, _ := f.v.Job(context.Background(), j.ID)
		if strings.Contains(func() string {
			for _, s := range cur.Steps {
				if s.State == JobRunning {
					return s.Name
				}
			}
			return ""
		}(), "start VM") {
			break
		}
		if time.Now().After(waitStep) {
			t.Fatalf("the failover did not reach its start step: %+v", cur)
		}
		time.Sleep(10 * time.Millisecond)
	}
	close(la.lost)
	select {
	case <-f.v.Lost():
	case <-time.After(5 * time.Second):
		t.Fatal("the vault that lost the leadership did not stop")
	}
	close(f.west.block) // the old leader's start returns; nothing acts on it
	if f.v.Leading() {
		t.Fatal("a vault that lost the leadership still leads")
	}
	leaderName.Store("west-vault:7400")
	close(lb.elect)
	deadline = time.Now().Add(5 * time.Second)
	for {
		cur, _ := b.Job(context.Background(), j.ID)
		p, _ := b.Protection(context.Background(), "vm1")
		if cur.State == JobFailed && p.Job == "" {
			if !strings.Contains(cur.Error, "vault stopped during step") || p.State != StateProtected {
				t.Fatalf("the new leader ended the job as %q with the protection %s", cur.Error, p.State)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the new leader did not take over the job: %+v, protection %+v", cur, p)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !b.Leading() {
		t.Fatal("the new leader does not say it leads")
	}
	// The retry at the new leader succeeds: the VM the interrupted
	// attempt started is kept.
	g := &fixture{v: b, srv: bs, op: f.op, east: f.east, west: f.west}
	j = g.job(t, "/v1/protections/vm1/failover", map[string]any{"point": "latest", "shutdown_source": false})
	var said []string
	for _, s := range j.Steps {
		said = append(said, s.Messages...)
	}
	if j.State != JobSucceeded || !strings.Contains(strings.Join(said, " "), "started by an interrupted attempt): kept") {
		t.Fatalf("failover retried at the new leader: %s %s %q", j.State, j.Error, said)
	}
	if j := g.job(t, "/v1/protections/vm1/commit", map[string]any{}); j.State != JobSucceeded {
		t.Fatalf("commit: %s %s", j.State, j.Error)
	}
}

// TestLeaderLostInReprotect: the leader stops in the middle of a
// reprotect (turning the old source's disks into a replica); the next
// leader fails the job at its step, the protection is not stuck, and the
// reprotect run again at the new leader completes.
func TestLeaderLostInReprotect(t *testing.T) {
	st := store.NewMem()
	lb := &fakeLeadership{elect: make(chan struct{}), lost: make(chan struct{}), leader: func() string { return "b" }}
	f, la := leadingFixture(t, st)
	f.setup(t)
	f.job(t, "/v1/protections", map[string]string{"vm": "vm1", "target": "west"})
	if j := f.job(t, "/v1/protections/vm1/failover", map[string]any{"point": "latest", "shutdown_source": false}); j.State != JobSucceeded {
		t.Fatalf("failover: %s %s", j.State, j.Error)
	}
	if j := f.job(t, "/v1/protections/vm1/commit", map[string]any{}); j.State != JobSucceeded {
		t.Fatalf("commit: %s %s", j.State, j.Error)
	}
	f.east.mu.Lock()
	f.east.blockCall, f.east.blockC = "to-replica", make(chan struct{})
	f.east.mu.Unlock()
	var j Job
	if code := f.call(t, f.op, "POST", "/v1/protections/vm1/reprotect", map[string]any{}, &j); code != 200 {
		t.Fatalf("reprotect: %d", code)
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		f.east.mu.Lock()
		blocked := slices.ContainsFunc(f.east.calls, func(c string) bool { return strings.HasPrefix(c, "to-replica") })
		f.east.mu.Unlock()
		if blocked {
			break
		}
		if time.Now().After(deadline) {
			cur, _ := f.v.Job(context.Background(), j.ID)
			t.Fatalf("the reprotect did not reach east's disks: %+v", cur)
		}
	}
	close(la.lost)
	select {
	case <-f.v.Lost():
	case <-time.After(5 * time.Second):
		t.Fatal("the vault that lost the leadership did not stop")
	}
	f.east.mu.Lock()
	f.east.blockCall = ""
	close(f.east.blockC)
	f.east.mu.Unlock()
	b, bs := second(t, st, lb, f)
	close(lb.elect)
	start := time.Now()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		cur, _ := b.Job(context.Background(), j.ID)
		p, _ := b.Protection(context.Background(), "vm1")
		if cur.State == JobFailed && p.Job == "" {
			if p.State != StateCommitted {
				t.Fatalf("after the interrupted reprotect the protection is %s, want %s", p.State, StateCommitted)
			}
			t.Logf("the new leader ended the interrupted job in %v: %s", time.Since(start).Round(time.Millisecond), cur.Error)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the new leader did not take over the job: %+v, protection %+v", cur, p)
		}
	}
	g := &fixture{v: b, srv: bs, op: f.op, east: f.east, west: f.west}
	if j := g.job(t, "/v1/protections/vm1/reprotect", map[string]any{}); j.State != JobSucceeded {
		t.Fatalf("reprotect retried at the new leader: %s %s", j.State, j.Error)
	}
	if p, _ := b.Protection(context.Background(), "vm1"); p.State != StateProtected || p.Source != "west" || p.Target != "east" {
		t.Fatalf("after the retried reprotect: %+v", p)
	}
}

// second starts another vault over st, with leadership l, on f's sites,
// serving its API.
func second(t *testing.T, st store.Store, l Leadership, f *fixture) (*Vault, *httptest.Server) {
	t.Helper()
	b := New(Config{Store: st, NoHeartbeats: true, Leadership: l, Site: func(addr, site string) Site {
		if site == "east" {
			return f.east
		}
		return f.west
	}})
	if err := b.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	bs := httptest.NewServer(b.Handler())
	t.Cleanup(bs.Close)
	return b, bs
}

// TestDeposed: a leading vault told by a site that a newer leader exists
// stops at once, as if its lease were gone; a lone vault ignores it.
func TestDeposed(t *testing.T) {
	f, _ := leadingFixture(t, store.NewMem())
	f.v.Deposed()
	f.v.Deposed() // idempotent
	select {
	case <-f.v.Lost():
	case <-time.After(5 * time.Second):
		t.Fatal("the deposed vault did not stop")
	}
	if f.v.Leading() {
		t.Error("the deposed vault still leads")
	}

	lone := newFixture(t, store.NewMem())
	lone.v.Deposed()
	select {
	case <-lone.v.Lost():
		t.Fatal("a lone vault stopped on Deposed")
	default:
	}
	if !lone.v.Leading() {
		t.Error("a lone vault stopped leading on Deposed")
	}
}

// stallStore stalls, once armed, the write that releases a protection
// from its job (the first write of a job's end) until its context ends,
// as an etcd cut off from the vault does: its requests wait for a
// connection.
type stallStore struct {
	store.Store
	armed   atomic.Bool
	stalled chan struct{}
	release chan struct{} // ends the stall (for a test that failed)
	once    sync.Once
}

func (s *stallStore) Put(ctx context.Context, kind, id string, data []byte, version int64) (int64, error) {
	var p Protection
	if s.armed.Load() && kind == kindProtection && json.Unmarshal(data, &p) == nil && p.Job == "" {
		s.once.Do(func() { close(s.stalled) })
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-s.release:
			return 0, errors.New("stall ended by the test")
		}
	}
	return s.Store.Put(ctx, kind, id, data, version)
}

// TestLeaderLostWhileRecordingJob: the store stops answering just as a
// job ends, and the leadership is lost while the vault records the
// outcome. The vault must stop (Close returns) rather than wait on the
// store for ever: the new leader records the job.
func TestLeaderLostWhileRecordingJob(t *testing.T) {
	st := &stallStore{Store: store.NewMem(), stalled: make(chan struct{}), release: make(chan struct{})}
	f, la := leadingFixture(t, st)
	f.setup(t)
	f.job(t, "/v1/protections", map[string]string{"vm": "vm1", "target": "west"})
	st.armed.Store(true)
	var j Job
	if code := f.call(t, f.op, "POST", "/v1/protections/vm1/test-failover", map[string]any{"point": "latest-processed"}, &j); code != 200 {
		t.Fatalf("test failover: %d", code)
	}
	select {
	case <-st.stalled:
	case <-time.After(10 * time.Second):
		cur, _ := f.v.Job(context.Background(), j.ID)
		t.Fatalf("the job's end did not reach the store: %+v", cur)
	}
	close(la.lost)
	closed := make(chan struct{})
	go func() {
		f.v.Close()
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(endTimeout / 2):
		close(st.release)
		t.Fatal("the vault that lost the leadership still waits on the store while it records a job's end")
	}
}
