package disk

import (
	"cmp"
	"context"
	"runtime"
	"slices"
	"time"

	"golang.org/x/sys/unix"
)

// Write-behind: the image writes of small writes run on a second core.
//
// A connection's requests run in order on one goroutine (internal/nbd),
// and with every write applied to its image there, one core did it all:
// the socket read, the journal append, the reply and the image pwrite,
// which alone is about half of it (a 4 KiB write into a sparse file's page
// cache). A peer such as nbdkit spreads its requests over threads, and so
// over both cores. Handing each batch to another goroutine cost more than
// it saved on this VM (docs/benchmarks.md: a wake-up per batch), so the
// hand-over here is not per batch: whole-block writes of a stream without
// FLUSHes are indexed (kept only in the journal, index.go), as those of a
// stream with FLUSHes always were, and a folder goroutine, woken once the
// backlog passes behindFrom, folds the indexed blocks in journal order,
// in chunks, until the backlog is below half of that. The request loop
// then does no image write at all, and the folder does them on the other
// core, reading each span of the journal back from the page cache with
// one pread.
//
// The backlog stays small without FLUSHes: past behindMax (or
// MaxUnfolded, if smaller) writes go to the image at once, as before, so a
// folder that falls behind slows the guest down instead of letting the
// journal grow untrimmed (its dirty pages would reach the kernel's
// write-back threshold; see indexing). With FLUSHes nothing changed: the
// index keeps its bound of MaxUnfolded, the paced checkpoint folds it, and
// the folder does not run (writingBehind).
//
// Correctness is the index's: the folder runs foldBlocks, as the
// checkpoint's fold does, under imgMu, and a block leaves the index only
// if its slot did not change meanwhile. The queue is a hint of where to
// look: an item whose block was overwritten since (a later item folds
// it) or folded by a checkpoint is skipped, and a block missing from the
// queue (it is bounded) is folded by the next checkpoint.

// writingBehind reports whether write-behind is at work: the group has
// it, and no FLUSHes come (with them, the index and the paced checkpoint
// fold serve as before: their overwrites cost nothing, and the images
// need no write until a checkpoint, where a folder writing them at once
// ran flush4k a third slower). Caller need not hold a lock.
func (g *Group) writingBehind() bool { return g.behind && !g.indexing() }

// behindItem is a block indexed while write-behind is at work, by the
// write of sequence seq.
type behindItem struct {
	d   *Disk
	b   int64
	seq uint64
}

const (
	// behindFrom wakes the folder: a fold round is worth its wake-up
	// from a few hundred blocks on.
	behindFrom = 1 << 20
	// behindMax bounds the backlog without FLUSHes: it keeps every
	// checkpoint's fold short, so the journal is trimmed every
	// CheckpointBytes and its files are reused while cached.
	behindMax = 64 << 20
	// behindChunk is how many blocks the folder writes per hold of
	// imgMu: an inline write waits for at most one chunk.
	behindChunk = 256
	// behindQueueMax bounds the queue (overwrites add to it, not to the
	// backlog) while the folder cannot keep up or fails.
	behindQueueMax = 4 * behindMax / BlockSize
)

// FoldBehind folds the blocks indexed since its last call, in journal
// order, and returns how many bytes of backlog are left. It is the
// folder's step: Start runs it whenever the backlog passes behindFrom;
// tests that drive the group step by step call it themselves. It may run
// alongside writes, reads and checkpoints. An error (the image's file
// system is full) leaves the blocks not folded indexed: reads still find
// them, and a later fold or checkpoint writes them.
func (g *Group) FoldBehind(ctx context.Context) (int64, error) {
	g.idxMu.Lock()
	q := g.behindQ
	g.behindQ, g.behindSpare = g.behindSpare, nil
	g.idxMu.Unlock()
	defer func() { // the queue's array is used again
		clear(q)
		g.idxMu.Lock()
		if g.behindSpare == nil {
			g.behindSpare = q[:0]
		}
		g.idxMu.Unlock()
	}()
	// Disk by disk, each in journal order: a group's disks interleave in
	// the queue, and a chunk is one disk's.
	if slices.ContainsFunc(q, func(it behindItem) bool { return it.d != q[0].d }) {
		slices.SortStableFunc(q, func(x, y behindItem) int { return cmp.Compare(x.d.spec.ID, y.d.spec.ID) })
	}
	bs := make([]int64, 0, behindChunk)
	for i := 0; i < len(q); {
		if err := ctx.Err(); err != nil {
			return g.unfolded.Load(), err
		}
		d := q[i].d
		bs = bs[:0]
		// Only items whose write is still the block's latest: a block
		// overwritten meanwhile is folded once, by its last item, and one
		// folded already (by a checkpoint) not at all.
		g.idxMu.RLock()
		for i < len(q) && q[i].d == d && len(bs) < behindChunk {
			if s, ok := d.idx[q[i].b]; ok && s.seq == q[i].seq {
				bs = append(bs, q[i].b)
			}
			i++
		}
		g.idxMu.RUnlock()
		if len(bs) == 0 {
			continue
		}
		g.imgMu.Lock()
		err := d.foldBlocks(bs)
		g.imgMu.Unlock()
		if err != nil {
			return g.unfolded.Load(), err
		}
	}
	return g.unfolded.Load(), nil
}

// behindLoop is the folder: it folds while the backlog is at least half
// of behindFrom, then waits for the next wake-up. After a failure it
// waits a second (or a wake-up after that) before it tries again; the
// checkpoint reports the failure too.
func (g *Group) behindLoop(ctx context.Context) {
	// The folder's thread is SCHED_BATCH (the policy is per thread on
	// Linux, and the thread is never unlocked, so it ends with the loop
	// instead of going back to the runtime's pool with the policy). The
	// kernel then takes it for CPU-bound: its wake-ups do not preempt the
	// request loop or the client, yet it keeps a full share of the CPU.
	//
	// Why (docs/benchmarks.md, "fifth day"): the folder must keep up with
	// the guest, or the backlog reaches behindMax and the loop writes
	// inline again. As a plain thread it did, but each of its wake-ups
	// preempted the loop or fio: they took turns on two CPUs at the
	// kernel's time slices (p99 1.1 ms against nbdkit's 0.35, 126k
	// writes/s). At nice 10 it preempted nothing but got 40-55 % of a
	// core while a third of both sat idle (the kernel does not move a
	// waiting low-weight thread to a CPU that idles in short gaps), fell
	// behind, and left the checkpoint to fold the rest at normal
	// priority: 123k against 134k for SCHED_BATCH in alternating runs.
	runtime.LockOSThread()
	if cur, err := unix.SchedGetAttr(0, 0); err != nil {
		g.log.Debug("write-behind folder: could not read its scheduling policy", "err", err)
	} else if err := unix.SchedSetAttr(0, &unix.SchedAttr{Policy: unix.SCHED_BATCH, Nice: cur.Nice}, 0); err != nil {
		g.log.Debug("write-behind folder: could not set SCHED_BATCH", "err", err) // it works as a plain thread
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-g.stop:
			return
		case <-g.behindKick:
		}
		for {
			left, err := g.FoldBehind(ctx)
			if err != nil {
				if ctx.Err() != nil {
					return
				}
				g.log.Warn("write-behind fold failed; retrying in a second", "err", err)
				select {
				case <-ctx.Done():
					return
				case <-g.stop:
					return
				case <-time.After(time.Second):
				}
				break
			}
			if left < behindFrom/2 {
				break
			}
			g.idxMu.RLock()
			empty := len(g.behindQ) == 0
			g.idxMu.RUnlock()
			if empty {
				break // the rest waits for a checkpoint (or was not queued)
			}
		}
	}
}
