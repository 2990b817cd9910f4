package agent

import (
	"fmt"
	"path/filepath"
	"strconv"

	"github.com/ferry-dr/ferry/internal/api"
)

// The agent obeys one vault at a time. Where several vaults share the
// control plane (etcd), each call of the leader carries its epoch
// (api.LeaderEpochHeader); the agent remembers the highest it obeyed,
// durably, and refuses any call with a lower one. A vault that lost the
// leadership without knowing it yet (partitioned from etcd, paused)
// therefore cannot act on a site once its successor has: the fencing
// token of a lease-based lock.

// leaderEpoch is what leader-epoch.json holds.
type leaderEpoch struct {
	Epoch int64 `json:"epoch"`
}

func (a *Agent) epochPath() string { return filepath.Join(a.cfg.Dir, "leader-epoch.json") }

// loadEpoch reads the highest epoch obeyed before a restart.
func (a *Agent) loadEpoch() error {
	var e leaderEpoch
	if _, err := readJSONFile(a.epochPath(), &e); err != nil {
		return fmt.Errorf("read leader epoch: %w", err)
	}
	a.epoch = e.Epoch
	return nil
}

// admitEpoch decides on a call that carries the header value h ("" : not
// fenced). A higher epoch is saved before the call goes on, so that a
// restart never forgets a successor.
func (a *Agent) admitEpoch(h string) error {
	if h == "" {
		return nil
	}
	n, err := strconv.ParseInt(h, 10, 64)
	if err != nil || n <= 0 {
		return fmt.Errorf("%w: %s %q: want a positive integer", ErrInvalid, api.LeaderEpochHeader, h)
	}
	a.epochMu.Lock()
	defer a.epochMu.Unlock()
	switch {
	case n < a.epoch:
		a.staleRefused++
		return fmt.Errorf("%w: this site obeys the vault of epoch %d, the caller's is %d; the caller lost the leadership and must stop acting", api.ErrStaleLeader, a.epoch, n)
	case n > a.epoch:
		if err := writeJSONFile(a.epochPath(), leaderEpoch{Epoch: n}); err != nil {
			return fmt.Errorf("save leader epoch: %w", err)
		}
		if a.epoch != 0 {
			a.log.Info("a new vault leads: calls of older epochs are refused from now on", "epoch", n, "was", a.epoch)
		}
		a.epoch = n
	}
	return nil
}

// Epoch returns the highest leader epoch obeyed and how many calls of
// older epochs were refused since the agent started.
func (a *Agent) Epoch() (epoch, refused int64) {
	a.epochMu.Lock()
	defer a.epochMu.Unlock()
	return a.epoch, a.staleRefused
}
