package agent

import (
	"fmt"
	"path/filepath"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/bandwidth"
)

func (a *Agent) bandwidthPath() string { return filepath.Join(a.cfg.Dir, "bandwidth.json") }

// loadBandwidth applies the caps saved by the last SetBandwidth, so that
// a restarted agent honours them before the vault says anything.
func (a *Agent) loadBandwidth() error {
	var bw api.Bandwidth
	found, err := readJSONFile(a.bandwidthPath(), &bw)
	if err != nil || !found {
		if err != nil {
			return fmt.Errorf("read bandwidth caps: %w", err)
		}
		return nil
	}
	return a.applyBandwidth(bw)
}

// Bandwidth returns the caps as set.
func (a *Agent) Bandwidth() api.Bandwidth {
	a.bwMu.Lock()
	defer a.bwMu.Unlock()
	return a.bw
}

// SetBandwidth replaces every cap of this site (ErrInvalid for a
// malformed one, and then nothing changes); streams running now slow
// down or speed up at their next write. The caps are saved first, so a
// restart keeps them.
func (a *Agent) SetBandwidth(bw api.Bandwidth) error {
	for _, m := range []map[string]api.BandwidthLimit{bw.Peers, bw.Groups} {
		for name, lim := range m {
			if err := bandwidth.Check(lim); err != nil {
				return fmt.Errorf("%w: cap of %q: %v", ErrInvalid, name, err)
			}
		}
	}
	if err := writeJSONFile(a.bandwidthPath(), bw); err != nil {
		return err
	}
	return a.applyBandwidth(bw)
}

func (a *Agent) applyBandwidth(bw api.Bandwidth) error {
	a.bwMu.Lock()
	defer a.bwMu.Unlock()
	set := func(ls map[string]*bandwidth.Limiter, want map[string]api.BandwidthLimit) error {
		for name, l := range ls {
			if _, ok := want[name]; !ok {
				l.Set(api.BandwidthLimit{}) // streams keep their limiter: lift its cap
			}
		}
		for name, lim := range want {
			if err := a.limiterLocked(ls, name).Set(lim); err != nil {
				return fmt.Errorf("%w: cap of %q: %v", ErrInvalid, name, err)
			}
		}
		return nil
	}
	if err := set(a.bwPeers, bw.Peers); err != nil {
		return err
	}
	if err := set(a.bwGroups, bw.Groups); err != nil {
		return err
	}
	a.bw = bw
	return nil
}

// limiter returns the limiter of name in ls, made (without a cap) if
// there is none: every stream writes through its peer's and its group's.
func (a *Agent) limiter(ls map[string]*bandwidth.Limiter, name string) *bandwidth.Limiter {
	a.bwMu.Lock()
	defer a.bwMu.Unlock()
	return a.limiterLocked(ls, name)
}

func (a *Agent) limiterLocked(ls map[string]*bandwidth.Limiter, name string) *bandwidth.Limiter {
	l := ls[name]
	if l == nil {
		l = bandwidth.NewLimiter(a.cfg.Now)
		ls[name] = l
	}
	return l
}

// capOf returns the cap in force now for a group's stream to peer, in
// bits per second (the lower of the two; 0: none).
func (a *Agent) capOf(group, peer string) int64 {
	g, p := a.limiter(a.bwGroups, group).Rate(), a.limiter(a.bwPeers, peer).Rate()
	switch {
	case g == 0:
		return p
	case p == 0:
		return g
	}
	return min(g, p)
}
