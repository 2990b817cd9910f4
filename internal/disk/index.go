package disk

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/ferry-dr/ferry/internal/journal"
)

// Recent writes live only in the journal.
//
// A write of whole BlockSize blocks is appended to the journal and
// recorded in its disk's block index (block -> where its latest bytes lie
// in the journal); the image is not touched. Reads take indexed blocks
// from the journal and the rest from the image. The checkpoint folds the
// index into the images: every indexed block once, sorted by disk and
// offset, so overwrites cost nothing and neighbouring blocks are written
// together, off the guest's path. Everything else (zeroes, trims, writes
// that do not cover whole blocks, and every write while the index holds
// MaxUnfolded bytes) is applied to the image at once, as before, after the
// indexed blocks it touches are written out.
//
// Invariants (docs/architecture.md, "Write path"):
//   - A block is indexed iff its latest write is journal-only; its slot
//     names that write. So reads = the journal replayed, always.
//   - The image never goes back: a block is written to the image only by
//     the latest write that touched it, or by an older one while a newer
//     one is still indexed (and so overrides it for reads and is written
//     later).
//   - After foldIndex returns L, every entry <= L is in the images' page
//     cache (or superseded), which is what a checkpoint needs to record
//     AppliedSeq = L and trim the journal before L+1. Replaying entries
//     after L over such images, in order, gives the same disks: per block,
//     the last write wins.
//
// Locks, in order: Group.mu (appends) -> imgMu (image writes) -> idxMu
// (the indices). Reads take readMu (shared) around journal reads, and the
// checkpoint takes it exclusively to trim, so a read never meets a
// recycled segment.

// slot locates the latest bytes of one indexed block.
type slot struct {
	seq uint64
	loc journal.Loc
}

// defaultMaxUnfolded bounds the journal-only bytes by default: about 50
// MiB of index; the journal grows by at most twice this between
// checkpoints, which bounds the replay after a crash
// (docs/architecture.md, "Write path").
const defaultMaxUnfolded = 4 << 30

// inlineFrom: writes this large go to the image at once. Nothing
// overwrites them soon enough for the fold to save work, and the journal
// would only hold more new bytes in the page cache (docs/benchmarks.md).
const inlineFrom = 256 << 10

func (g *Group) foldIdle() time.Duration {
	if g.cfg.FoldIdle == 0 {
		return time.Second
	}
	return g.cfg.FoldIdle
}

// wantCheckpoint: the journal grew enough that a checkpoint pays, or
// the backlog nears its bound. A checkpoint is cheap when the backlog is
// small (the journal grew by overwrites or inline writes), so it runs
// every CheckpointBytes; one that would fold a large backlog waits for
// its bound or for the disks to go idle. Caller holds mu.
func (g *Group) wantCheckpoint() bool {
	j, u, m := g.appended, g.unfolded.Load(), g.maxUnfolded()
	// Without Flushes the index no longer grows: its fold is a one-time
	// cost, and the checkpoints after it are cheap again.
	return j >= g.cfg.CheckpointBytes && (u <= g.cfg.CheckpointBytes/4 || !g.indexing()) ||
		m > 0 && (u >= m/2 || j >= 2*m)
}

func (g *Group) maxUnfolded() int64 {
	switch {
	case g.cfg.MaxUnfolded < 0:
		return 0
	case g.cfg.MaxUnfolded == 0:
		return defaultMaxUnfolded
	}
	return g.cfg.MaxUnfolded
}

// unfoldedLimit is the backlog up to which a write may be kept only in
// the journal: MaxUnfolded while Flushes come (indexing), the
// write-behind bound without them (behind.go), else nothing.
func (g *Group) unfoldedLimit() int64 {
	m := g.maxUnfolded()
	switch {
	case g.indexing():
		return m
	case g.behind:
		return min(m, behindMax)
	}
	return 0
}

// indexing reports whether a write may be kept only in the journal for
// long: while Flushes come at least every CheckpointBytes of journal.
// Their syncs leave the journal's pages clean, so holding recent writes
// there costs cache, not write-back, and the fold saves the images'
// writes (and their fsyncs) for overwrites. A stream without FLUSH must
// not pile up in the journal: it could not be trimmed before a fold, and
// its dirty pages would pile up until the kernel wrote them back (4 KiB
// random writes without FLUSH ran 26 % slower indexed than inline, with a
// FLUSH every 32 writes 32 % faster: docs/benchmarks.md). Such a stream
// is written behind instead, its backlog bounded (behind.go), or, with
// NoWriteBehind, goes to the images at once; either way the soft
// checkpoint trims the journal every CheckpointBytes and reuses its
// cached files.
func (g *Group) indexing() bool {
	return g.total.Load()-g.flushMark.Load() <= g.cfg.CheckpointBytes
}

// Unfolded returns the bytes of recent writes held only in the journal
// (the fold's backlog).
func (g *Group) Unfolded() int64 { return g.unfolded.Load() }

// applyEntry makes e, appended at loc, part of the disks: indexed, or
// applied to the image. Caller holds mu.
func (g *Group) applyEntry(e *journal.Entry, loc journal.Loc) error {
	if e.Kind == journal.KindMarker {
		return nil
	}
	d := g.disks[e.Disk]
	if d == nil {
		return fmt.Errorf("%w: id %d", ErrUnknownDisk, e.Disk)
	}
	off, n := int64(e.Offset), int64(e.Length)
	if e.Kind == journal.KindWrite && off%BlockSize == 0 && n%BlockSize == 0 && n > 0 && n < inlineFrom &&
		g.unfolded.Load() < g.unfoldedLimit() {
		g.idxMu.Lock()
		had := len(d.idx)
		queue := g.writingBehind() && len(g.behindQ) < behindQueueMax
		for k := int64(0); k < n/BlockSize; k++ {
			d.idx[off/BlockSize+k] = slot{seq: e.Seq, loc: journal.Loc{Seg: loc.Seg, Off: loc.Off + k*BlockSize}}
			if queue {
				g.behindQ = append(g.behindQ, behindItem{d, off/BlockSize + k, e.Seq})
			}
		}
		added := len(d.idx) - had // one map operation per block, not two
		d.nidx.Store(int64(len(d.idx)))
		g.idxMu.Unlock()
		g.unfolded.Add(int64(added) * BlockSize)
		return nil
	}
	g.imgMu.Lock()
	defer g.imgMu.Unlock()
	covered, err := d.flushEdges(off, n)
	if err != nil {
		return err
	}
	if err := g.applyImage(e); err != nil {
		return err
	}
	d.unindex(covered)
	return nil
}

// flushEdges writes out the indexed blocks that [off, off+n) touches but
// does not cover (the change to the image would otherwise mix with older
// bytes than the latest) and returns the covered indexed blocks, which
// the change supersedes: the caller unindexes them once it is applied.
// Caller holds imgMu.
func (d *Disk) flushEdges(off, n int64) (covered []int64, err error) {
	if d.nidx.Load() == 0 || n == 0 {
		return nil, nil
	}
	first, last := off/BlockSize, (off+n-1)/BlockSize
	d.g.idxMu.RLock()
	var hit []int64
	if last-first+1 <= int64(len(d.idx)) {
		for b := first; b <= last; b++ {
			if _, ok := d.idx[b]; ok {
				hit = append(hit, b)
			}
		}
	} else {
		for b := range d.idx {
			if b >= first && b <= last {
				hit = append(hit, b)
			}
		}
	}
	d.g.idxMu.RUnlock()
	var edges []int64
	for _, b := range hit {
		if b*BlockSize >= off && (b+1)*BlockSize <= off+n {
			covered = append(covered, b)
		} else {
			edges = append(edges, b)
		}
	}
	if len(edges) > 0 {
		if err := d.foldBlocks(edges); err != nil {
			return nil, err
		}
	}
	return covered, nil
}

// unindex drops blocks from the index, whatever their slot.
func (d *Disk) unindex(bs []int64) {
	if len(bs) == 0 {
		return
	}
	d.g.idxMu.Lock()
	gone := 0
	for _, b := range bs {
		if _, ok := d.idx[b]; ok {
			delete(d.idx, b)
			gone++
		}
	}
	d.nidx.Store(int64(len(d.idx)))
	d.g.idxMu.Unlock()
	d.g.unfolded.Add(-int64(gone) * BlockSize)
}

// foldItem is a block foldBlocks folds, with its slot when it began.
type foldItem struct {
	b int64
	s slot
}

// foldBlocks writes the latest bytes of the given indexed blocks to the
// image and unindexes those whose slot did not change meanwhile. Blocks
// no longer indexed are skipped. It works in journal order: the journal
// is read in spans of up to foldSpan bytes (one pread for many blocks),
// and blocks that are neighbours both on the disk and in the journal (one
// large write) are written at once. Caller holds imgMu.
func (d *Disk) foldBlocks(bs []int64) error {
	g := d.g
	items := g.foldItems[:0]
	defer func() { g.foldItems = items[:0] }()
	g.idxMu.RLock()
	for _, b := range bs {
		if s, ok := d.idx[b]; ok {
			items = append(items, foldItem{b, s})
		}
	}
	g.idxMu.RUnlock()
	slices.SortFunc(items, func(x, y foldItem) int {
		if c := cmp.Compare(x.s.loc.Seg, y.s.loc.Seg); c != 0 {
			return c
		}
		return cmp.Compare(x.s.loc.Off, y.s.loc.Off)
	})
	buf := g.foldBuf
	img := d.image()
	for i := 0; i < len(items); {
		// A span of the journal: same segment, within foldSpan.
		first := items[i].s.loc
		j := i + 1
		for j < len(items) && items[j].s.loc.Seg == first.Seg && items[j].s.loc.Off+BlockSize-first.Off <= foldSpan {
			j++
		}
		n := items[j-1].s.loc.Off + BlockSize - first.Off
		if int64(cap(buf)) < n {
			buf = make([]byte, max(n, foldSpan))
			g.foldBuf = buf
		}
		span := buf[:n]
		if err := g.j.ReadData(first, span, 0); err != nil {
			return fmt.Errorf("fold disk %q: %w", d.spec.Name, err)
		}
		for k := i; k < j; {
			// Neighbours on the disk and in the journal: one write.
			e := k + 1
			for e < j && items[e].b == items[e-1].b+1 && items[e].s.loc.Off == items[e-1].s.loc.Off+BlockSize {
				e++
			}
			at := items[k].s.loc.Off - first.Off
			if err := img.WriteAt(span[at:at+int64(e-k)*BlockSize], items[k].b*BlockSize); err != nil {
				return fmt.Errorf("fold blocks %d..%d of disk %q: %w", items[k].b, items[e-1].b, d.spec.Name, err)
			}
			k = e
		}
		i = j
	}
	g.idxMu.Lock()
	gone := 0
	for _, it := range items {
		if s, ok := d.idx[it.b]; ok && s.seq == it.s.seq {
			delete(d.idx, it.b)
			gone++
		}
	}
	d.nidx.Store(int64(len(d.idx)))
	g.idxMu.Unlock()
	g.unfolded.Add(-int64(gone) * BlockSize)
	return nil
}

// foldSpan is the most journal the fold reads at once.
const foldSpan = 1 << 20

// foldChunk is how many blocks the fold writes per hold of imgMu.
const foldChunk = 4096

// foldIndex writes every block indexed now to the images and returns L:
// every entry <= L is then in the images' page cache, or superseded by a
// later one. Writes go on meanwhile (they index blocks > L). Caller holds
// ckptMu.
//
// Paced, it goes at FoldRate while the guest writes, and starts each
// chunk's write-back at once: a large backlog folded in one burst, then
// synced in one burst, took a core and the disk's queue for seconds and
// stalled replication behind it (RPO spikes in bench/replication.sh).
// An idle group, or an unpaced checkpoint waiting (urgent), is served at
// full speed.
func (g *Group) foldIndex(ctx context.Context, paced bool) (uint64, error) {
	g.mu.Lock()
	if g.failed != nil {
		g.mu.Unlock()
		return 0, g.failed
	}
	last := g.j.LastSeq() // every slot indexed now has seq <= last
	disks := make([]*Disk, 0, len(g.disks))
	for _, d := range g.disks {
		disks = append(disks, d)
	}
	g.mu.Unlock()
	for _, d := range disks {
		if d.nidx.Load() == 0 {
			continue
		}
		// In journal order, so each chunk reads a few spans of it.
		g.idxMu.RLock()
		type bl struct {
			b   int64
			seq uint64
		}
		all := make([]bl, 0, len(d.idx))
		for b, s := range d.idx {
			if s.seq <= last {
				all = append(all, bl{b, s.seq})
			}
		}
		g.idxMu.RUnlock()
		slices.SortFunc(all, func(x, y bl) int { return cmp.Compare(x.seq, y.seq) })
		bs := make([]int64, len(all))
		for i, x := range all {
			bs[i] = x.b
		}
		for i := 0; i < len(bs); i += foldChunk {
			if err := ctx.Err(); err != nil {
				return 0, err
			}
			chunk := bs[i:min(i+foldChunk, len(bs))]
			g.imgMu.Lock()
			err := d.foldBlocks(chunk)
			g.imgMu.Unlock()
			if err != nil {
				return 0, err
			}
			if paced && !g.writingBehind() {
				// Before a soft checkpoint too: it skips the wait, not
				// the write. Left to the kernel, the dirty image pages
				// went out in bursts of 200-450 MB once they passed its
				// background threshold, and every fsync on that disk
				// queued behind a burst (a recovery site's journal
				// commits: RPO p99 150-270 ms against 27-67 ms,
				// docs/benchmarks.md), as would the FLUSH that hardens
				// the soft checkpoint. write1m did not slow down.
				//
				// Write-behind folds at full speed anyway, without
				// FLUSHes to hold up: pacing there only held the
				// checkpoint, and so the journal's trim, back, and the
				// write-back hint over the image at every checkpoint
				// took a fifth of the server's CPU in bench/nbd.sh's
				// randwrite4k, for pages that a plain write-back server
				// never writes within the run (behind.go).
				d.image().StartSync()
				if err := g.paceFold(ctx, int64(len(chunk))*BlockSize); err != nil {
					return 0, err
				}
			}
		}
	}
	return last, nil
}

// paceFold waits as long as folding n bytes takes at FoldRate, unless
// the group is idle or an unpaced checkpoint waits.
func (g *Group) paceFold(ctx context.Context, n int64) error {
	rate := g.cfg.FoldRate
	if rate == 0 {
		rate = 128 << 20
	}
	if rate < 0 || g.urgent.Load() > 0 || g.cfg.Now().UnixNano()-g.lastWrite.Load() >= int64(g.foldIdle()) {
		return nil
	}
	t := time.NewTimer(time.Duration(float64(n) / float64(rate) * float64(time.Second)))
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-g.stop: // Close checkpoints at full speed next
	case <-g.hurry:
	case <-t.C:
	}
	return nil
}

// readMerged reads [off, off+len(p)) with indexed blocks from the journal.
func (d *Disk) readMerged(p []byte, off int64) error {
	g := d.g
	g.readMu.RLock()
	defer g.readMu.RUnlock()
	n := int64(len(p))
	first, last := off/BlockSize, (off+n-1)/BlockSize
	type piece struct {
		at  int64 // offset in the disk
		n   int64
		loc journal.Loc
	}
	var pieces []piece
	g.idxMu.RLock()
	for b := first; b <= last; b++ {
		s, ok := d.idx[b]
		if !ok {
			continue
		}
		lo, hi := max(off, b*BlockSize), min(off+n, (b+1)*BlockSize)
		loc := journal.Loc{Seg: s.loc.Seg, Off: s.loc.Off + lo - b*BlockSize}
		if k := len(pieces) - 1; k >= 0 && pieces[k].at+pieces[k].n == lo &&
			pieces[k].loc.Seg == loc.Seg && pieces[k].loc.Off+pieces[k].n == loc.Off {
			pieces[k].n += hi - lo
			continue
		}
		pieces = append(pieces, piece{at: lo, n: hi - lo, loc: loc})
	}
	g.idxMu.RUnlock()
	img := d.image()
	at := off // next byte not read yet
	for _, pc := range pieces {
		if pc.at > at {
			if err := img.ReadAt(p[at-off:pc.at-off], at); err != nil {
				return err
			}
		}
		if err := g.j.ReadData(pc.loc, p[pc.at-off:pc.at-off+pc.n], 0); err != nil {
			return fmt.Errorf("read disk %q at %d: %w", d.spec.Name, pc.at, err)
		}
		at = pc.at + pc.n
	}
	if at < off+n {
		return img.ReadAt(p[at-off:], at)
	}
	return nil
}

// indexedRanges returns the byte ranges of the disk's indexed blocks, in
// order, merged.
func (d *Disk) indexedRanges() [][2]int64 {
	d.g.idxMu.RLock()
	bs := make([]int64, 0, len(d.idx))
	for b := range d.idx {
		bs = append(bs, b)
	}
	d.g.idxMu.RUnlock()
	slices.Sort(bs)
	var rs [][2]int64
	for _, b := range bs {
		lo, hi := b*BlockSize, min((b+1)*BlockSize, d.spec.Size)
		if k := len(rs) - 1; k >= 0 && rs[k][1] == lo {
			rs[k][1] = hi
			continue
		}
		rs = append(rs, [2]int64{lo, hi})
	}
	return rs
}

// unionRanges merges two ordered lists of disjoint ranges.
func unionRanges(a, b [][2]int64) [][2]int64 {
	all := append(append([][2]int64(nil), a...), b...)
	slices.SortFunc(all, func(x, y [2]int64) int { return cmp.Compare(x[0], y[0]) })
	var out [][2]int64
	for _, r := range all {
		if k := len(out) - 1; k >= 0 && r[0] <= out[k][1] {
			out[k][1] = max(out[k][1], r[1])
			continue
		}
		out = append(out, r)
	}
	return out
}
