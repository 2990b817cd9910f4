package vault

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
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

// TestRansomwareIncident: an incident the recovery site reports raises a
// critical alert naming the last clean point; "last-clean" picks the
// newest point before the incident's first write; the protection's policy
// reaches the site's detector; dismissing clears the alert.
func TestRansomwareIncident(t *testing.T) {
	f := newFixture(t, store.NewMem())
	f.setup(t)
	f.job(t, "/v1/protections", map[string]string{"vm": "vm1", "target": "west"})
	ctx := context.Background()
	f.west.mu.Lock()
	clean := f.west.points[1]
	f.west.incident = &api.EntropyIncident{Start: time.Now(), FirstSeq: 8, PeakBytes: 64 << 20, LastClean: &clean}
	f.west.mu.Unlock()
	f.v.Heartbeat(ctx)
	as, err := f.v.Alerts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(as) != 1 || as[0].Object != "ransomware/vm1" || as[0].Severity != sevCritical || !strings.Contains(as[0].Message, "last clean point is 7") {
		t.Fatalf("alerts with an incident: %+v", as)
	}
	f.west.mu.Lock()
	pol := f.west.ransomware["vm1"]
	f.west.mu.Unlock()
	var charted int64
	for _, s := range f.v.hist.get("vm1") {
		charted = max(charted, s.LowToHigh)
	}
	if charted != 64<<20 {
		t.Errorf("the history's low-to-high count: %d, want the site's %d", charted, 64<<20)
	}
	if pol.WithDefaults() != DefaultPolicy.Ransomware.WithDefaults() {
		t.Errorf("the site's detector policy %+v, want the default's", pol)
	}
	if j := f.job(t, "/v1/protections/vm1/test-failover", map[string]string{"point": "last-clean"}); j.State != JobSucceeded {
		t.Fatalf("drill at last-clean: %+v", j)
	}
	f.job(t, "/v1/protections/vm1/test-failover/cleanup", map[string]string{"notes": "checked"})
	p, err := f.v.Protection(ctx, "vm1")
	if err != nil || len(p.History) < 2 || p.History[len(p.History)-2].Point != 7 {
		t.Fatalf("the drill's point: %+v %v, want 7 (the last clean)", p.History, err)
	}
	if code := f.call(t, f.op, "POST", "/v1/protections/vm1/ransomware/dismiss", struct{}{}, nil); code != 200 {
		t.Fatalf("dismiss: %d", code)
	}
	f.v.Heartbeat(ctx)
	if as, _ := f.v.Alerts(ctx); len(as) != 0 {
		t.Fatalf("alerts after dismissing: %+v", as)
	}
	if code := f.call(t, f.op, "POST", "/v1/protections/vm1/ransomware/dismiss", struct{}{}, nil); code != 404 {
		t.Errorf("dismissing again: %d, want 404", code)
	}
	f.refused(t, "/v1/protections/vm1/test-failover", map[string]string{"point": "last-clean"}, 404, "no open ransomware incident")
}
