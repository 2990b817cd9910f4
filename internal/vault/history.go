package vault

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/ferry-dr/ferry/internal/store"
)

// kindHistory holds the replication history of protections, one
// document per protection and hour ("VM@2006010215"), so that a sample
// costs one small write a minute and the window is pruned a document at
// a time.
const kindHistory = "history"

// history keeps, per protection, one sample of its replication every
// interval over the last window: the worst RPO of the interval, and the
// last throughput, pending bytes and journal size seen. It feeds the
// portal's charts. The leader saves each protection's current hour at
// most every saveEvery and loads the window when it takes over, so the
// charts survive a restart of the vault or a change of leader (losing at
// most saveEvery of samples). Safe for concurrent use.
type history struct {
	mu        sync.Mutex
	interval  time.Duration
	window    time.Duration
	saveEvery time.Duration
	samples   map[string][]RPOSample
	saved     map[string]time.Time // when the protection's samples were last saved
}

func newHistory() *history {
	return &history{interval: 10 * time.Second, window: 6 * time.Hour, saveEvery: time.Minute,
		samples: map[string][]RPOSample{}, saved: map[string]time.Time{}}
}

// add folds a sample taken at now into its interval and reports whether
// the protection's history is due to be saved.
func (h *history) add(vm string, now time.Time, in RPOSample) (due bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	t := now.Truncate(h.interval)
	s := h.samples[vm]
	if n := len(s); n > 0 && s[n-1].T.Equal(t) {
		last := &s[n-1]
		last.RPO = max(last.RPO, in.RPO)
		last.Throughput, last.Pending, last.Journal = in.Throughput, in.Pending, in.Journal
		last.LowToHigh = max(last.LowToHigh, in.LowToHigh)
	} else {
		in.T = t
		s = append(s, in)
	}
	i := 0
	for i < len(s) && now.Sub(s[i].T) > h.window {
		i++
	}
	h.samples[vm] = s[i:]
	return now.Sub(h.saved[vm]) >= h.saveEvery
}

// addLowHigh records the recovery site's low-to-high count in vm's
// current slot (the source's figures fill the rest of it).
func (h *history) addLowHigh(vm string, now time.Time, total int64) {
	h.mu.Lock()
	s := h.samples[vm]
	n := len(s)
	t := now.Truncate(h.interval)
	if n > 0 && s[n-1].T.Equal(t) {
		s[n-1].LowToHigh = max(s[n-1].LowToHigh, total)
		h.mu.Unlock()
		return
	}
	h.mu.Unlock()
	h.add(vm, now, RPOSample{LowToHigh: total})
}

func (h *history) get(vm string) []RPOSample {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]RPOSample{}, h.samples[vm]...)
}

// hourID names the document of vm's samples in the hour of t.
func hourID(vm string, t time.Time) string { return vm + "@" + t.UTC().Format("2006010215") }

// saveHistory writes vm's samples of the current hour (and of the hour
// before, if the last save was in it, so an hour's last minute is kept).
// Only the leader calls it; a failure is logged and retried at the next
// sample.
func (v *Vault) saveHistory(ctx context.Context, vm string, now time.Time) {
	h := v.hist
	h.mu.Lock()
	last := h.saved[vm]
	byHour := map[string][]RPOSample{}
	for _, s := range h.samples[vm] {
		if s.T.Truncate(time.Hour).Before(last.Truncate(time.Hour)) {
			continue
		}
		id := hourID(vm, s.T)
		byHour[id] = append(byHour[id], s)
	}
	h.mu.Unlock()
	for id, ss := range byHour {
		if err := putLatest(ctx, v.st, kindHistory, id, ss); err != nil {
			v.log.Warn("save the replication history: will retry", "vm", vm, "err", err)
			return
		}
	}
	h.mu.Lock()
	h.saved[vm] = now
	h.mu.Unlock()
	// Once an hour, the hour that just left the window.
	if now.Truncate(time.Hour).Equal(last.Truncate(time.Hour)) {
		return
	}
	old := hourID(vm, now.Add(-h.window-time.Hour))
	if d, err := v.st.Get(ctx, kindHistory, old); err == nil {
		v.st.Delete(ctx, kindHistory, old, d.Version)
	}
}

// flushHistory saves every protection's samples since its last save.
func (v *Vault) flushHistory(ctx context.Context) {
	v.hist.mu.Lock()
	var vms []string
	for vm := range v.hist.samples {
		vms = append(vms, vm)
	}
	v.hist.mu.Unlock()
	now := v.now()
	for _, vm := range vms {
		v.saveHistory(ctx, vm, now)
	}
}

// loadHistory reads the window's samples of every protection from the
// store (the leader, when it takes over) and deletes older hours.
func (v *Vault) loadHistory(ctx context.Context) error {
	docs, err := v.st.List(ctx, kindHistory)
	if err != nil {
		return fmt.Errorf("load the replication history: %w", err)
	}
	now := v.now()
	h := v.hist
	loaded := map[string][]RPOSample{}
	for _, d := range docs {
		vm, hour, ok := strings.Cut(d.ID, "@")
		t, err := time.Parse("2006010215", hour)
		if !ok || err != nil {
			continue
		}
		if now.Sub(t) > h.window+time.Hour {
			v.st.Delete(ctx, kindHistory, d.ID, d.Version)
			continue
		}
		var ss []RPOSample
		if err := json.Unmarshal(d.Data, &ss); err != nil {
			v.log.Warn("a replication history document does not parse: skipped", "id", d.ID, "err", err)
			continue
		}
		loaded[vm] = append(loaded[vm], ss...)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for vm, ss := range loaded {
		slices.SortFunc(ss, bySampleTime)
		// Samples this vault took since it started come after.
		mine := h.samples[vm]
		var keep []RPOSample
		for _, s := range ss {
			if now.Sub(s.T) <= h.window && (len(mine) == 0 || s.T.Before(mine[0].T)) {
				keep = append(keep, s)
			}
		}
		h.samples[vm] = append(keep, mine...)
		h.saved[vm] = now
	}
	return nil
}

// historyFromStore reads vm's samples of the window from the store: what
// a follower answers (the leader answers from memory).
func (v *Vault) historyFromStore(ctx context.Context, vm string) ([]RPOSample, error) {
	now := v.now()
	var out []RPOSample
	for t := now.Add(-v.hist.window).Truncate(time.Hour); !t.After(now); t = t.Add(time.Hour) {
		ss, _, err := get[[]RPOSample](ctx, v.st, kindHistory, hourID(vm, t))
		if errors.Is(err, ErrNotFound) {
			continue
		}
		if err != nil {
			return nil, err
		}
		for _, s := range ss {
			if now.Sub(s.T) <= v.hist.window {
				out = append(out, s)
			}
		}
	}
	slices.SortFunc(out, bySampleTime)
	return out, nil
}

// RPOHistory returns vm's replication samples over the window, oldest
// first.
func (v *Vault) RPOHistory(ctx context.Context, vm string) ([]RPOSample, error) {
	if v.Leading() {
		return v.hist.get(vm), nil
	}
	return v.historyFromStore(ctx, vm)
}

func bySampleTime(a, b RPOSample) int { return a.T.Compare(b.T) }

// putLatest writes v as the document kind/id whatever version the store
// holds (documents only the leader writes, such as the history).
func putLatest(ctx context.Context, st store.Store, kind, id string, v any) error {
	for range 3 {
		var ver int64
		if d, err := st.Get(ctx, kind, id); err == nil {
			ver = d.Version
		} else if !errors.Is(err, store.ErrNotFound) {
			return err
		}
		if _, err := put(ctx, st, kind, id, v, ver); !errors.Is(err, store.ErrConflict) {
			return err
		}
	}
	return fmt.Errorf("%s %s: %w three times", kind, id, store.ErrConflict)
}
