package agent

import (
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/entropy"
	"github.com/ferry-dr/ferry/internal/replica"
)

// This file: the ransomware detector of each replica (internal/entropy),
// its policy, its incident and how it holds the last clean point.

// replicaConfig is the configuration of the replica called name, its
// detector attached.
func (a *Agent) replicaConfig(name string) replica.Config {
	dir := filepath.Join(a.cfg.Dir, "replicas", name)
	cfg := replica.Config{Dir: dir, Logger: a.log.With("replica", name)}
	if m := a.monitorFor(name); m != nil {
		cfg.Observer = m
	}
	return cfg
}

// monitorFor returns the detector of replica name, opening it from the
// replica's directory the first time. nil if its state cannot be read (it
// is advisory: the replica works without it).
func (a *Agent) monitorFor(name string) *entropy.Monitor {
	a.monMu.Lock()
	defer a.monMu.Unlock()
	if m := a.monitors[name]; m != nil {
		return m
	}
	m, err := entropy.New(entropy.Config{Dir: filepath.Join(a.cfg.Dir, "replicas", name), Logger: a.log.With("replica", name), Now: a.cfg.Now})
	if err != nil {
		a.log.Error("ransomware detector not available", "replica", name, "err", err)
		return nil
	}
	m.OnIncident(func(inc entropy.Incident) {
		a.log.Warn("ransomware suspected", "replica", name, "first_seq", inc.FirstSeq, "start", inc.Start)
	})
	a.monitors[name] = m
	return m
}

// dropMonitor forgets a replica's detector (the replica is gone).
func (a *Agent) dropMonitor(name string) {
	a.monMu.Lock()
	defer a.monMu.Unlock()
	delete(a.monitors, name)
}

// saveMonitors writes every detector's state that changed.
func (a *Agent) saveMonitors() {
	a.monMu.Lock()
	ms := make(map[string]*entropy.Monitor, len(a.monitors))
	for k, m := range a.monitors {
		ms[k] = m
	}
	a.monMu.Unlock()
	for name, m := range ms {
		if err := m.Save(); err != nil {
			a.log.Warn("save ransomware detector", "replica", name, "err", err)
		}
	}
}

// entropyStatus is a replica's detector status with its last clean point.
func (a *Agent) entropyStatus(name string, r *replica.Replica) *api.EntropyStatus {
	a.monMu.Lock()
	m := a.monitors[name]
	a.monMu.Unlock()
	if m == nil {
		return nil
	}
	st := m.Status()
	if st.Incident != nil {
		st.Incident.LastClean = lastClean(r.Points(), st.Incident.FirstSeq)
	}
	return &st
}

// lastClean is the newest point before seq (a point at seq already holds
// the write).
func lastClean(pts []api.Point, seq uint64) *api.Point {
	for i := len(pts) - 1; i >= 0; i-- {
		if pts[i].Seq < seq {
			p := pts[i]
			return &p
		}
	}
	return nil
}

// foldCutoff is how far retention may fold replica name: not past its
// open incident's last clean point, which a failover may still need.
func (a *Agent) foldCutoff(name string, r *replica.Replica, cutoff time.Time) time.Time {
	a.monMu.Lock()
	m := a.monitors[name]
	a.monMu.Unlock()
	if m == nil {
		return cutoff
	}
	inc, ok := m.Incident()
	if !ok {
		return cutoff
	}
	if p := lastClean(r.Points(), inc.FirstSeq); p != nil && !p.Time.After(cutoff) {
		return p.Time.Add(-time.Nanosecond)
	}
	return cutoff
}

// SetRansomwarePolicy sets a replica's detector thresholds (the vault
// sends its protection's policy; idempotent).
func (a *Agent) SetRansomwarePolicy(name string, p api.RansomwarePolicy) error {
	m, err := a.monitorOf(name)
	if err != nil {
		return err
	}
	m.SetPolicy(p)
	return m.Save()
}

// DismissIncident closes a replica's open incident: the operator has
// dealt with it, and its last clean point is no longer held.
func (a *Agent) DismissIncident(name string) error {
	m, err := a.monitorOf(name)
	if err != nil {
		return err
	}
	if err := m.Dismiss(); err != nil {
		if errors.Is(err, entropy.ErrNoIncident) {
			return fmt.Errorf("%w: replica %s has no open ransomware incident", ErrNotFound, name)
		}
		return err
	}
	return m.Save()
}

func (a *Agent) monitorOf(name string) (*entropy.Monitor, error) {
	a.mu.Lock()
	r := a.replicas[name]
	a.mu.Unlock()
	if r == nil {
		return nil, fmt.Errorf("%w: replica %q", ErrNotFound, name)
	}
	m := a.monitorFor(name)
	if m == nil {
		return nil, fmt.Errorf("replica %s: the ransomware detector's state could not be read (see the agent's log)", name)
	}
	return m, nil
}
