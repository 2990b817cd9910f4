package replica

import (
	"context"
	"fmt"
	"sort"
	"time"

	"github.com/ferry-dr/ferry/internal/journal"
)

// Policy thins the recovery point catalog by age: every point younger than
// KeepAll, then one per Hourly interval up to HourlyUntil, then one per
// Sparse interval. Any instant inside retention stays available by
// sequence number whatever the catalog lists.
type Policy struct {
	KeepAll     time.Duration // default 2 h
	Hourly      time.Duration // default 1 h
	HourlyUntil time.Duration // default 24 h
	Sparse      time.Duration // default 4 h
}

func (p Policy) withDefaults() Policy {
	if p.KeepAll == 0 {
		p.KeepAll = 2 * time.Hour
	}
	if p.Hourly == 0 {
		p.Hourly = time.Hour
	}
	if p.HourlyUntil == 0 {
		p.HourlyUntil = 24 * time.Hour
	}
	if p.Sparse == 0 {
		p.Sparse = 4 * time.Hour
	}
	return p
}

// Prune returns the points the policy keeps at time now, oldest first.
// Application-consistent and named points are always kept. Within each
// bucket of the thinned ranges, the newest point is kept.
func Prune(points []Point, now time.Time, p Policy) []Point {
	p = p.withDefaults()
	var out []Point
	seen := map[int64]bool{}
	// Walk newest first so that the newest point of each bucket wins.
	for i := len(points) - 1; i >= 0; i-- {
		pt := points[i]
		age := now.Sub(pt.Time)
		keep := pt.Type != "crash" || age < p.KeepAll
		if !keep {
			step := p.Hourly
			if age >= p.HourlyUntil {
				step = p.Sparse
			}
			bucket := pt.Time.UnixNano() / int64(step)
			if step == p.Sparse {
				bucket = -bucket - 1 // separate key space from hourly buckets
			}
			if !seen[bucket] {
				seen[bucket] = true
				keep = true
			}
		}
		if keep {
			out = append(out, pt)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Seq < out[j].Seq })
	return out
}

// FoldBefore folds every entry older than cutoff (by the catalog's points:
// up to the newest point before cutoff) into the images, but never past
// an open view's point. It returns the new folded sequence.
func (r *Replica) FoldBefore(ctx context.Context, cutoff time.Time) (uint64, error) {
	r.mu.RLock()
	var upTo uint64
	for _, p := range r.points {
		if p.Time.Before(cutoff) {
			upTo = p.Seq
		}
	}
	r.mu.RUnlock()
	return r.Fold(ctx, upTo)
}

// Fold applies the journal's entries up to seq to the images, makes them
// durable, drops them from the index and trims the journal. Views open at
// points before seq hold it back: the fold stops at the oldest of them.
// Idempotent; a seq at or below the folded point does nothing.
func (r *Replica) Fold(ctx context.Context, seq uint64) (uint64, error) {
	to, _, err := r.fold(ctx, seq)
	return to, err
}

// fold is Fold that also returns the bytes it wrote into the images.
func (r *Replica) fold(ctx context.Context, seq uint64) (_ uint64, wrote int64, _ error) {
	r.foldMu.Lock()
	defer r.foldMu.Unlock()
	r.mu.RLock()
	j := r.j
	from := r.man.FoldedSeq + 1
	if r.man.ConsistentSeq == 0 || j == nil {
		r.mu.RUnlock()
		return 0, 0, ErrNotReady
	}
	seq = min(seq, j.LastSeq())
	for _, at := range r.viewHolds {
		seq = min(seq, at)
	}
	if r.man.CommittedSeq != 0 {
		seq = min(seq, r.man.CommittedSeq)
	}
	r.mu.RUnlock()
	if seq < from {
		return from - 1, 0, nil
	}
	// The intent first: once an entry past FoldedSeq may be in an image,
	// a view below the fold's end would show it, so none is offered
	// (across a crash too) until the fold is done.
	r.mu.Lock()
	if seq > r.man.FoldingTo {
		r.man.FoldingTo = seq
		if err := r.saveManifest(); err != nil {
			r.mu.Unlock()
			return 0, wrote, fmt.Errorf("fold: save intent: %w", err)
		}
	}
	r.mu.Unlock()
	crash("fold-intent-saved")
	rd, err := j.NewReader(from)
	if err != nil {
		return 0, wrote, fmt.Errorf("fold: %w", err)
	}
	defer rd.Close()
	for s := from; s <= seq; s++ {
		if ctx.Err() != nil {
			return 0, wrote, ctx.Err()
		}
		e, ok, err := rd.TryNext()
		if err != nil || !ok {
			return 0, wrote, fmt.Errorf("fold at %d: %v", s, err)
		}
		if e.Kind != journal.KindMarker {
			wrote += int64(e.Length)
		}
		if err := r.applyToImage(&e); err != nil {
			return 0, wrote, fmt.Errorf("fold seq %d: %w", s, err)
		}
		if s == from {
			crash("fold-first-applied")
		}
	}
	r.mu.Lock()
	for _, f := range r.images {
		if err := f.Sync(); err != nil {
			r.mu.Unlock()
			return 0, wrote, fmt.Errorf("fold: sync image: %w", err)
		}
	}
	r.man.FoldedSeq = seq
	if err := r.saveManifest(); err != nil {
		r.mu.Unlock()
		return 0, wrote, fmt.Errorf("fold: %w", err)
	}
	for _, x := range r.idx {
		x.dropUpTo(seq)
	}
	keep := r.points[:0]
	for _, p := range r.points {
		if p.Seq >= seq {
			keep = append(keep, p)
		}
	}
	r.points = keep
	r.mu.Unlock()
	if err := j.Trim(seq + 1); err != nil {
		return seq, wrote, err
	}
	r.log.Info("folded journal into replica images", "to_seq", seq)
	return seq, wrote, nil
}

func (r *Replica) applyToImage(e *journal.Entry) error {
	if e.Kind == journal.KindMarker {
		return nil
	}
	r.mu.RLock()
	f := r.images[e.Disk]
	r.mu.RUnlock()
	if f == nil {
		return fmt.Errorf("%w: id %d", ErrUnknownDisk, e.Disk)
	}
	switch e.Kind {
	case journal.KindWrite:
		_, err := f.WriteAt(e.Data, int64(e.Offset))
		return err
	default:
		const chunk = 1 << 20
		zero := make([]byte, min(int64(e.Length), chunk))
		for off, end := int64(e.Offset), int64(e.Offset)+int64(e.Length); off < end; off += chunk {
			if _, err := f.WriteAt(zero[:min(chunk, end-off)], off); err != nil {
				return err
			}
		}
	}
	return nil
}
