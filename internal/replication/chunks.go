package replication

import (
	"fmt"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/disk"
	"github.com/ferry-dr/ferry/internal/journal"
)

// TrackSize is the granularity of changed-block tracking (api.TrackSize).
const TrackSize = api.TrackSize

// Chunks is a set of TrackSize blocks per disk (api.Chunks, the wire type).
type Chunks = api.Chunks

// NewChunks returns an empty set.
func NewChunks() Chunks { return api.NewChunks() }

// AddEntry marks the chunks a journal entry changes (markers and skips
// change none). names maps the group's disk ids to names.
func AddEntry(c Chunks, e *journal.Entry, names map[uint16]string) {
	if e.Kind == journal.KindMarker || e.Kind == journal.KindSkip || e.Length == 0 {
		return
	}
	c.Add(names[e.Disk], int64(e.Offset), int64(e.Length))
}

// diskNames maps a group's disk ids to their names.
func diskNames(specs []disk.Spec) map[uint16]string {
	m := make(map[uint16]string, len(specs))
	for _, s := range specs {
		m[s.ID] = s.Name
	}
	return m
}

// JournalChanges adds to c the chunks changed by the entries of j with
// sequence numbers in [from, to]. It fails if from is no longer in the
// journal: c is then incomplete and must not be trusted.
func JournalChanges(j *journal.Journal, specs []disk.Spec, from, to uint64, c Chunks) error {
	if from > to {
		return nil
	}
	if first := j.FirstSeq(); from < first {
		return fmt.Errorf("journal changes from %d: the journal starts at %d", from, first)
	}
	names := diskNames(specs)
	r, err := j.NewReader(from)
	if err != nil {
		return fmt.Errorf("journal changes from %d: %w", from, err)
	}
	defer r.Close()
	for {
		e, ok, err := r.TryNext()
		if err != nil {
			return fmt.Errorf("journal changes: %w", err)
		}
		if !ok || e.Seq > to {
			return nil
		}
		AddEntry(c, &e, names)
	}
}

// Changes returns the chunks of the group changed by entries after seq
// after, as far as this shipper can still tell, and from: every change
// with a sequence number >= from is in the set. Changes older than from
// were acknowledged by the recovery site (the journal was trimmed only
// behind its acknowledgements or into the dirty-block bitmap), so the
// recovery site knows them. Works on a stopped shipper; safe to call
// concurrently with writes (they may or may not be included).
func (s *Shipper) Changes(after uint64) (c Chunks, from uint64, err error) {
	g := s.cfg.Group
	specs := g.Disks()
	names := diskNames(specs)
	c = NewChunks()
	j := g.Journal()
	from = max(after+1, j.FirstSeq())
	s.mu.Lock()
	bm := s.bm
	s.mu.Unlock()
	if bm != nil {
		sizes := map[uint16]int64{}
		for _, sp := range specs {
			sizes[sp.ID] = sp.Size
		}
		for _, x := range bm.extents(sizes, 1<<30) {
			c.Add(names[x.disk], x.off, x.n)
		}
		bm.mu.Lock()
		since := bm.Since
		bm.mu.Unlock()
		from = max(after+1, min(from, since))
	}
	if err := JournalChanges(j, specs, max(after+1, j.FirstSeq()), j.LastSeq(), c); err != nil {
		return nil, 0, err
	}
	return c, from, nil
}
