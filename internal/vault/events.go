package vault

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/store"
)

// Alert and Event are the API's.
type (
	Alert = api.Alert
	Event = api.Event
)

// kindEvent holds the event log: one document per event, its ID
// time-ordered, the newest maxEvents kept.
const kindEvent = "event"

const maxEvents = 1000

// Severities of alerts and events.
const (
	sevInfo     = "info"
	sevWarning  = "warning"
	sevCritical = "critical"
)

// alerting is what the leader remembers of the alerts between two
// heartbeats, to log each one once when it is raised and once when it
// clears.
type alerting struct {
	mu      sync.Mutex
	active  map[string]Alert // by object
	started bool             // active was initialized from the log
	emitted int              // events logged since the last prune
}

// currentAlerts derives the alerts from the state in the store and, at
// the leader, the problems the sites reported.
func (v *Vault) currentAlerts(ctx context.Context) ([]Alert, error) {
	sites, err := v.Sites(ctx)
	if err != nil {
		return nil, err
	}
	var out []Alert
	down := map[string]bool{}
	for _, s := range sites {
		if s.Reachable {
			continue
		}
		down[s.Name] = true
		out = append(out, Alert{Object: "site/" + s.Name, Severity: sevCritical,
			Message: fmt.Sprintf("site %s does not answer (last seen %s)", s.Name, s.LastSeen.UTC().Format("2006-01-02 15:04:05 MST")),
			Action: fmt.Sprintf("Check the agent at %s (ferry agent status --agent %s), its host and the network. "+
				"While it is down its protections are not replicated; if it is lost, fail its VMs over (ferry failover VM).", s.Name, s.Addr)})
	}
	ps, err := v.Protections(ctx)
	if err != nil {
		return nil, err
	}
	for _, p := range ps {
		if p.Ransomware != nil && p.State != StateDisabled {
			out = append(out, ransomwareAlert(p))
		}
		if p.State == StateDisabled || p.Health == "" || p.Health == api.Healthy {
			continue
		}
		a := Alert{Object: "protection/" + p.VM, Severity: string(p.Health), Message: p.VM + ": " + p.HealthReason}
		if a.Severity != sevCritical {
			a.Severity = sevWarning
		}
		switch {
		case down[p.Source] || down[p.Target]:
			a.Action = "A site of this protection is down: see the site's alert."
		case strings.Contains(p.HealthReason, "did not open") || strings.Contains(p.HealthReason, "refuse writes"):
			a.Action = "Repair it at that site: ferry agent replica resync " + p.VM + " (a replica) or ferry agent group reseed " + p.VM + " (a source), then the replication resumes (docs/replication.md)."
		case strings.Contains(p.HealthReason, "RPO"):
			a.Action = "Writes come faster than the link carries them or the link is down: check the link and any bandwidth cap (ferry bandwidth show); the RPO falls by itself once the backlog clears."
		default:
			a.Action = "See the protection (ferry protection show " + p.VM + "): replication resumes by itself when the cause is gone."
		}
		out = append(out, a)
	}
	slices.SortFunc(out, func(a, b Alert) int { return strings.Compare(a.Object, b.Object) })
	return out, nil
}

// Alerts returns the alerts in force, with when each was raised.
func (v *Vault) Alerts(ctx context.Context) ([]Alert, error) {
	cur, err := v.currentAlerts(ctx)
	if err != nil {
		return nil, err
	}
	since, err := v.raisedAt(ctx)
	if err != nil {
		return nil, err
	}
	for i := range cur {
		if e, ok := since[cur[i].Object]; ok && e.Severity == cur[i].Severity {
			cur[i].Since = e.Time
		}
	}
	return cur, nil
}

// raisedAt returns, per object, the newest event that raised an alert,
// unless an event cleared it after.
func (v *Vault) raisedAt(ctx context.Context) (map[string]Event, error) {
	evs, err := v.Events(ctx, 0)
	if err != nil {
		return nil, err
	}
	out := map[string]Event{}
	seen := map[string]bool{}
	for _, e := range evs { // newest first
		if seen[e.Object] {
			continue
		}
		switch e.Kind {
		case "raised":
			out[e.Object] = e
			seen[e.Object] = true
		case "cleared":
			seen[e.Object] = true
		}
	}
	return out, nil
}

// checkAlerts, at the end of a heartbeat, logs an event for each alert
// raised (or changed severity) and each cleared since the last one.
func (v *Vault) checkAlerts(ctx context.Context) {
	cur, err := v.currentAlerts(ctx)
	if err != nil {
		return
	}
	al := &v.alerting
	al.mu.Lock()
	if !al.started {
		// After a restart or a change of leader: what the log says is
		// raised is not raised again.
		al.active = map[string]Alert{}
		if raised, err := v.raisedAt(ctx); err == nil {
			for o, e := range raised {
				al.active[o] = Alert{Object: o, Severity: e.Severity, Since: e.Time}
			}
			al.started = true
		}
	}
	prev := al.active
	al.active = map[string]Alert{}
	var evs []Event
	for _, a := range cur {
		p, was := prev[a.Object]
		if !was || p.Severity != a.Severity {
			evs = append(evs, Event{Severity: a.Severity, Object: a.Object, Kind: "raised", Message: a.Message, Action: a.Action})
		}
		al.active[a.Object] = a
	}
	for o := range prev {
		if _, still := al.active[o]; !still {
			evs = append(evs, Event{Severity: sevInfo, Object: o, Kind: "cleared", Message: strings.TrimPrefix(strings.TrimPrefix(o, "site/"), "protection/") + " is back to normal"})
		}
	}
	al.mu.Unlock()
	slices.SortFunc(evs, func(a, b Event) int { return strings.Compare(a.Object, b.Object) })
	for _, e := range evs {
		v.logEvent(ctx, e)
	}
}

// jobEvent logs the end of a job.
func (v *Vault) jobEvent(ctx context.Context, j Job) {
	subject := j.Protection
	if j.Plan != "" {
		subject = "plan " + j.Plan
	}
	e := Event{Object: "job/" + j.ID, Kind: "job-succeeded", Severity: sevInfo, Message: fmt.Sprintf("%s of %s succeeded", j.Action, subject)}
	if j.State == JobFailed {
		e.Kind, e.Severity = "job-failed", sevWarning
		e.Message = fmt.Sprintf("%s of %s failed: %s", j.Action, subject, j.Error)
		e.Action = "See the job (ferry job show " + j.ID + "), fix the cause, and run the action again."
	}
	ctx, cancel := v.detached(ctx)
	defer cancel()
	v.logEvent(ctx, e)
}

// logEvent appends e to the event log (best effort: the log is for
// people; a store that fails here fails the next heartbeat too) and
// prunes the log now and then.
func (v *Vault) logEvent(ctx context.Context, e Event) {
	now := v.now()
	var rb [3]byte
	rand.Read(rb[:])
	e.ID = fmt.Sprintf("%020d-%x", now.UnixNano(), rb)
	e.Time = now
	if _, err := put(ctx, v.st, kindEvent, e.ID, e, 0); err != nil {
		v.log.Warn("log an event", "object", e.Object, "err", err)
		return
	}
	v.metrics.eventLogged(e)
	v.alerting.mu.Lock()
	v.alerting.emitted++
	prune := v.alerting.emitted >= 50
	if prune {
		v.alerting.emitted = 0
	}
	v.alerting.mu.Unlock()
	if prune {
		docs, err := v.st.List(ctx, kindEvent)
		if err != nil || len(docs) <= maxEvents {
			return
		}
		slices.SortFunc(docs, func(a, b store.Doc) int { return strings.Compare(a.ID, b.ID) })
		for _, d := range docs[:len(docs)-maxEvents] {
			v.st.Delete(ctx, kindEvent, d.ID, d.Version)
		}
	}
}

// Events returns the event log, newest first; at most limit (0: all
// kept).
func (v *Vault) Events(ctx context.Context, limit int) ([]Event, error) {
	docs, err := v.st.List(ctx, kindEvent)
	if err != nil {
		return nil, err
	}
	out := make([]Event, 0, len(docs))
	for _, d := range docs {
		var e Event
		if json.Unmarshal(d.Data, &e) == nil {
			out = append(out, e)
		}
	}
	slices.SortFunc(out, func(a, b Event) int { return strings.Compare(b.ID, a.ID) })
	if limit > 0 && len(out) > limit {
		out = out[:limit]
	}
	return out, nil
}
