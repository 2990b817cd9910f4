package vault

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/store"
)

// TestAlertsAndEvents: a site that stops answering raises an alert for
// it and for its protection, logged once each however many heartbeats
// pass; when it answers again they clear, logged once; a vault started
// on the same store does not raise again what the log says is raised;
// jobs log their end.
func TestAlertsAndEvents(t *testing.T) {
	st := store.NewMem()
	f := newFixture(t, st)
	f.setup(t)
	f.job(t, "/v1/protections", map[string]string{"vm": "vm1", "target": "west"})
	ctx := context.Background()
	f.v.Heartbeat(ctx)
	if as, err := f.v.Alerts(ctx); err != nil || len(as) != 0 {
		t.Fatalf("alerts with everything up: %+v %v", as, err)
	}
	kinds := func() map[string]int {
		t.Helper()
		evs, err := f.v.Events(ctx, 0)
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]int{}
		for _, e := range evs {
			got[e.Kind+" "+e.Object]++
		}
		return got
	}
	for k := range kinds() {
		if !strings.HasPrefix(k, "job-succeeded job/") {
			t.Fatalf("event %q with everything up; want only the enable job's end", k)
		}
	}

	f.west.mu.Lock()
	f.west.down = true
	f.west.mu.Unlock()
	f.skew.Store(int64(5 * time.Second))
	for range 3 {
		f.v.Heartbeat(ctx)
	}
	as, err := f.v.Alerts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	objects := map[string]string{}
	for _, a := range as {
		objects[a.Object] = a.Severity
		if a.Action == "" || a.Since.IsZero() {
			t.Errorf("alert without an action or a time: %+v", a)
		}
	}
	if objects["site/west"] != sevCritical {
		t.Fatalf("alerts with the recovery site down: %+v", as)
	}
	if got := kinds(); got["raised site/west"] != 1 {
		t.Fatalf("events after 3 heartbeats with west down: %v, want one raise", got)
	}

	// A new vault on the same store (a restart, a new leader).
	f.v.Close()
	g := newFixture(t, st)
	g.west.mu.Lock()
	g.west.down = true
	g.west.mu.Unlock()
	g.skew.Store(int64(10 * time.Second))
	g.v.Heartbeat(ctx)
	f = g
	if got := kinds(); got["raised site/west"] != 1 {
		t.Fatalf("events after a restart with west still down: %v, want the one raise", got)
	}
	g.west.mu.Lock()
	g.west.down = false
	g.west.mu.Unlock()
	g.v.Heartbeat(ctx)
	g.v.Heartbeat(ctx)
	if as, _ := g.v.Alerts(ctx); len(as) != 0 {
		t.Fatalf("alerts with west back: %+v", as)
	}
	if got := kinds(); got["cleared site/west"] != 1 {
		t.Fatalf("events with west back: %v, want one clear", got)
	}
	evs, _ := g.v.Events(ctx, 1)
	if len(evs) != 1 || evs[0].Kind != "cleared" {
		t.Fatalf("the newest event: %+v, want the clear", evs)
	}
}
