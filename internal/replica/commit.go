package replica

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/ferry-dr/ferry/internal/atomicfile"
	"github.com/ferry-dr/ferry/internal/disk"
)

// CommitAt makes the replica the base of group at point seq (a commit of
// a failover): from now on, durably, it takes no more streams, offers no
// points and never folds past seq, so that its images plus its journal up
// to seq stay exactly the disks at seq. Idempotent for the same group and
// seq. Uncommit undoes it while the group does not exist yet.
func (r *Replica) CommitAt(seq uint64, group string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.j == nil || r.man.ConsistentSeq == 0 {
		return ErrNotReady
	}
	if r.man.CommittedTo != "" {
		if r.man.CommittedTo == group && r.man.CommittedSeq == seq {
			return nil
		}
		return fmt.Errorf("%w: to group %s at %d", ErrCommitted, r.man.CommittedTo, r.man.CommittedSeq)
	}
	if first := r.firstViewable(); seq < first || seq > r.j.LastSeq() || r.inGap(seq) {
		return fmt.Errorf("%w: seq %d is not a consistent state of the replica", ErrNoPoint, seq)
	}
	m := r.man
	r.man.CommittedSeq, r.man.CommittedTo = seq, group
	if err := r.saveManifest(); err != nil {
		r.man = m
		return fmt.Errorf("commit replica: %w", err)
	}
	return nil
}

// Uncommit makes a committed replica a replica again: a commit that did
// not finish rolls back with it (its group was never created).
func (r *Replica) Uncommit() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.man.CommittedTo == "" {
		return nil
	}
	m := r.man
	r.man.CommittedSeq, r.man.CommittedTo = 0, ""
	if err := r.saveManifest(); err != nil {
		r.man = m
		return fmt.Errorf("uncommit replica: %w", err)
	}
	return nil
}

// Committed returns the group and point a commit made the replica the
// base of ("" if none).
func (r *Replica) Committed() (group string, seq uint64) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.man.CommittedTo, r.man.CommittedSeq
}

// Base is a committed replica seen as the base of its group's layered
// disks (disk.Base): the disks at the commit point, read through views,
// flattened by folding the journal into the images up to that point.
type Base struct {
	r     *Replica
	seq   uint64
	views map[uint16]*View
}

var _ disk.Base = (*Base)(nil)

// Base returns the committed replica as a disk.Base. It fails unless
// CommitAt was called.
func (r *Replica) Base() (*Base, error) {
	group, seq := r.Committed()
	if group == "" {
		return nil, fmt.Errorf("replica %s is not committed", r.cfg.Dir)
	}
	b := &Base{r: r, seq: seq, views: map[uint16]*View{}}
	if b.Flat() {
		return b, nil // the group reads the images themselves
	}
	for _, s := range r.Disks() {
		v, err := r.OpenView(s.Name, seq, "")
		if err != nil {
			b.closeViews()
			return nil, fmt.Errorf("base view of %s: %w", s.Name, err)
		}
		b.views[s.ID] = v
	}
	return b, nil
}

// ReadAt implements disk.Base.
func (b *Base) ReadAt(id uint16, p []byte, off int64) error {
	v := b.views[id]
	if v == nil {
		return fmt.Errorf("%w: id %d (or the base is flat: read its image)", ErrUnknownDisk, id)
	}
	return v.ReadAt(context.Background(), p, off)
}

// Flat implements disk.Base.
func (b *Base) Flat() bool {
	b.r.mu.RLock()
	defer b.r.mu.RUnlock()
	return b.r.man.FoldedSeq >= b.seq
}

// FlattenStep implements disk.Base: it folds at most max entries.
func (b *Base) FlattenStep(ctx context.Context, max int) (left uint64, wrote int64, err error) {
	b.r.mu.RLock()
	folded := b.r.man.FoldedSeq
	b.r.mu.RUnlock()
	if folded >= b.seq {
		return 0, 0, nil
	}
	to, wrote, err := b.r.fold(ctx, min(b.seq, folded+uint64(max)))
	if err != nil {
		return b.seq - folded, wrote, err
	}
	return b.seq - min(to, b.seq), wrote, nil
}

// ImagePath implements disk.Base.
func (b *Base) ImagePath(id uint16) string {
	for _, s := range b.r.Disks() {
		if s.ID == id {
			return b.r.imagePath(s.Name)
		}
	}
	return ""
}

// Release implements disk.Base: the replica is closed and its directory
// (journal, index, what is left of its images) deleted.
func (b *Base) Release() error {
	b.Close()
	// Never half there under its name: a replica without its images
	// would not open, and its site would report it until an operator came.
	return atomicfile.RemoveDir(b.r.cfg.Dir)
}

// Close implements disk.Base.
func (b *Base) Close() error {
	b.closeViews()
	return b.r.Close()
}

func (b *Base) closeViews() {
	for id, v := range b.views {
		v.Close()
		delete(b.views, id)
	}
}

// ResetForResync prepares the replica in dir, whose journal is damaged
// (or distrusted), to be copied again by checksum compare: the journal is
// moved aside (returned: nothing is deleted), the images are kept, and the
// manifest says "copy in progress", so the source's next stream compares
// chunk hashes and sends what differs. The recovery points in the old
// journal go with it. The replica must not be open.
func ResetForResync(dir string, now time.Time) (kept string, err error) {
	b, err := os.ReadFile(filepath.Join(dir, "replica.json"))
	if err != nil {
		return "", fmt.Errorf("read replica manifest: %w", err)
	}
	var m manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return "", fmt.Errorf("parse replica manifest: %w", err)
	}
	kept = filepath.Join(dir, fmt.Sprintf("journal.damaged-%d", now.Unix()))
	if err := os.Rename(filepath.Join(dir, "journal"), kept); err != nil && !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("set the journal aside: %w", err)
	}
	m.ConsistentSeq, m.FoldedSeq, m.FoldingTo, m.CommittedSeq, m.CommittedTo = 0, 0, 0, 0, ""
	r := &Replica{cfg: Config{Dir: dir}, man: m}
	if err := r.saveManifest(); err != nil {
		return kept, fmt.Errorf("save replica manifest: %w", err)
	}
	return kept, nil
}
