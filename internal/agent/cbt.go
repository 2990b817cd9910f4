package agent

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/atomicfile"
	"github.com/ferry-dr/ferry/internal/replica"
	"github.com/ferry-dr/ferry/internal/replication"
)

// Changed-block tracking for reprotect. After a failover the two sites'
// disks differ only in:
//
//   - what the VM wrote at the recovery site since the point (the view's
//     overlay, then the committed group's journal),
//   - what the replica received after the point (the old source's writes
//     that the failover discarded), and
//   - what the old source wrote that never reached the recovery site (its
//     journal past the acknowledged sequence, or its dirty-block bitmap).
//
// The first two are recorded at commit in the group's divergence file and
// its journal is held from then on; the third is taken from the old
// source when it turns into the replica. A reprotect sends only the union;
// when any part is missing it falls back to comparing chunk hashes.

const divergenceHolder = "divergence"

// divergence is what a committed group records about how it departed from
// the replica it was failed over from.
type divergence struct {
	// Base is the failover point, in the old source's sequence numbers.
	Base uint64 `json:"base"`
	// Received is the last entry the replica had: the old source's
	// changes up to it are in Chunks.
	Received uint64 `json:"received"`
	// After is the group's own last entry when it was recorded: changes
	// after it are in the group's journal, held from After+1.
	After  uint64             `json:"after"`
	Chunks replication.Chunks `json:"chunks"`
}

// PeerChanges is what the old source of a failover changed after the
// failover point, as it tells a reprotect.
type PeerChanges = api.PeerChanges

const divergenceFile = "divergence.json"

func (a *Agent) divergencePath(name string) string {
	return filepath.Join(a.groupDir(name), divergenceFile)
}

func writeJSONFile(path string, v any) error { return atomicfile.WriteJSON(path, v, 0o600) }

// readJSONFile reads a state file writeJSONFile wrote into v; false, nil
// if there is none.
func readJSONFile(path string, v any) (bool, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return false, fmt.Errorf("%s: %w", path, err)
	}
	return true, nil
}

// replicaDivergence starts a commit's divergence record: what the
// replica received after the point seq, from its index. The commit adds
// what the VM wrote (its views' overlays) and saves it with
// saveDivergence.
func replicaDivergence(rep *replica.Replica, seq uint64) (divergence, error) {
	d := divergence{Chunks: replication.NewChunks(), Base: seq}
	last, err := rep.Changes(seq, func(disk string, off, n int64) { d.Chunks.Add(disk, off, n) })
	if err != nil {
		return d, err
	}
	d.Received = last
	return d, nil
}

// saveDivergence records d for the group a commit created and holds the
// group's journal from its start: the group's own writes are tracked
// there.
func (a *Agent) saveDivergence(gr *group, d divergence) error {
	gr.divMu.Lock()
	defer gr.divMu.Unlock()
	d.After = gr.g.Journal().LastSeq()
	gr.g.Hold(divergenceHolder, d.After+1)
	return writeJSONFile(a.divergencePath(gr.name), d)
}

// loadDivergence reads a group's divergence record; ok is false if none.
func (a *Agent) loadDivergence(name string) (d divergence, ok bool, err error) {
	b, err := os.ReadFile(a.divergencePath(name))
	if errors.Is(err, os.ErrNotExist) {
		return d, false, nil
	}
	if err == nil {
		err = json.Unmarshal(b, &d)
	}
	if err != nil {
		return d, false, fmt.Errorf("divergence of %s: %w", name, err)
	}
	return d, true, nil
}

// dropDivergence forgets the record and releases the journal it held.
func (a *Agent) dropDivergence(gr *group) {
	gr.divMu.Lock()
	defer gr.divMu.Unlock()
	os.Remove(a.divergencePath(gr.name))
	gr.g.Hold(divergenceHolder, 0)
}

// Divergence is a group's changed-block tracking since its failover, as
// the vault sees it.
type Divergence = api.Divergence

// GroupDivergence reports a group's divergence record (ErrNotFound if it
// has none: it was not created by a commit, or it was used up).
func (a *Agent) GroupDivergence(name string) (Divergence, error) {
	gr, err := a.group(name)
	if err != nil {
		return Divergence{}, err
	}
	c, d, err := a.divergenceChunks(gr, gr.g.Journal().LastSeq())
	if err != nil {
		return Divergence{}, err
	}
	return Divergence{Base: d.Base, Received: d.Received, Chunks: c}, nil
}

// divergenceChunks returns what changed in the group since the failover
// point, with the group's journal read up to upTo.
func (a *Agent) divergenceChunks(gr *group, upTo uint64) (replication.Chunks, divergence, error) {
	gr.divMu.Lock()
	defer gr.divMu.Unlock()
	d, ok, err := a.loadDivergence(gr.name)
	if err != nil {
		return nil, d, err
	}
	if !ok {
		return nil, d, fmt.Errorf("%w: group %q has no changed-block tracking (not failed over and committed here, or already reprotected)", ErrNotFound, gr.name)
	}
	c := replication.NewChunks()
	c.Union(d.Chunks)
	if err := replication.JournalChanges(gr.g.Journal(), gr.g.Disks(), d.After+1, upTo, c); err != nil {
		return nil, d, err
	}
	return c, d, nil
}

// deltaChunks is a reprotect's changed-block tracking: the union of what
// diverged here and what the peer (the old source) changed. It fails when
// the two do not fit together, and the copy then compares hashes.
func (a *Agent) deltaChunks(gr *group, peer *PeerChanges, upTo uint64) (replication.Chunks, error) {
	if peer == nil {
		return nil, errors.New("no changes from the old source")
	}
	c, d, err := a.divergenceChunks(gr, upTo)
	if err != nil {
		return nil, err
	}
	if peer.After != d.Base {
		return nil, fmt.Errorf("the old source's changes are after %d, the failover point was %d", peer.After, d.Base)
	}
	if peer.From > d.Received+1 {
		return nil, fmt.Errorf("the old source's journal starts at %d, but the replica had only up to %d", peer.From, d.Received)
	}
	c.Union(peer.Chunks)
	return c, nil
}

func (a *Agent) changesPath(name string) string {
	return filepath.Join(a.cfg.Dir, "replicas", name, "changes.json")
}

// GroupChanges reports what a group changed after seq since, as far as its
// replication journal and bitmap tell (a reprotect's plan asks the old
// source before it turns the group into the replica). ErrNotFound if the
// group never replicated.
func (a *Agent) GroupChanges(name string, since uint64) (PeerChanges, error) {
	gr, err := a.group(name)
	if err != nil {
		return PeerChanges{}, err
	}
	sh := cmp.Or(gr.shipper, gr.kept)
	if sh == nil {
		return PeerChanges{}, fmt.Errorf("%w: group %q keeps no record of its changes (it does not replicate)", ErrNotFound, name)
	}
	c, from, err := sh.Changes(since)
	if err != nil {
		return PeerChanges{}, err
	}
	return PeerChanges{After: since, From: from, Chunks: c}, nil
}

// compactDivergence folds the changes the group's journal holds past the
// divergence record into the record's chunk set once the journal is over
// bound (<= 0: 1 GiB), then lets the journal go: a VM that runs long after
// a commit without a reprotect must not fill the disk. The record is made
// durable before the hold moves, so a crash loses no change. No-op for a
// group without a record.
func (a *Agent) compactDivergence(gr *group, bound int64) error {
	if bound <= 0 {
		bound = 1 << 30
	}
	j := gr.g.Journal()
	if j.Size() <= bound {
		return nil
	}
	gr.divMu.Lock()
	defer gr.divMu.Unlock()
	d, ok, err := a.loadDivergence(gr.name)
	if err != nil || !ok {
		return err
	}
	last := j.LastSeq()
	// Only what the record holds counts: the group may keep more journal
	// for itself (recent writes not folded yet).
	if last <= d.After || j.SizeAfter(d.After) <= bound {
		return nil
	}
	if d.Chunks == nil {
		d.Chunks = replication.NewChunks()
	}
	if err := replication.JournalChanges(j, gr.g.Disks(), d.After+1, last, d.Chunks); err != nil {
		return err
	}
	d.After = last
	if err := writeJSONFile(a.divergencePath(gr.name), d); err != nil {
		return err
	}
	gr.g.Hold(divergenceHolder, last+1)
	a.log.Info("changed-block tracking: journal folded into the chunk set", "group", gr.name, "after", last, "blocks", d.Chunks.Count())
	return nil
}
