package replica

import (
	"cmp"
	"slices"

	"github.com/ferry-dr/ferry/internal/disk"
	"github.com/ferry-dr/ferry/internal/journal"
)

// BlockSize is the granularity of the version index (the same as a
// layered disk's, so a view's overlay can become a top layer).
const BlockSize = disk.BlockSize

// bigRange is the number of blocks from which a zero or trim is kept as
// one range operation rather than a version per block (a discard of a
// whole disk must not cost millions of index entries).
const bigRange = 64

// version is one change to part of a block, as of a journal entry.
type version struct {
	seq   uint64
	loc   journal.Loc // payload of the entry (writes)
	pOff  int64       // offset of this block's part inside the payload
	start uint16      // first byte in the block
	n     uint16      // bytes in the block; 0 means the whole block (4096)
	zero  bool
}

func (v *version) length() int {
	if v.n == 0 {
		return BlockSize
	}
	return int(v.n)
}

// rangeOp is a large zero or trim.
type rangeOp struct {
	seq      uint64
	off, end int64
}

// diskIndex is the version index of one disk: for each block, the changes
// made to it by journal entries not yet folded into the image, oldest first.
// Looking up a block as of any sequence number costs a binary search; no
// work at all is needed to "open" a point, which is why a view opens in
// constant time whatever the journal's size.
type diskIndex struct {
	blocks map[int64][]version
	ranges []rangeOp // ascending seq
}

func newDiskIndex() *diskIndex { return &diskIndex{blocks: map[int64][]version{}} }

// add records entry e (payload at loc).
func (x *diskIndex) add(e *journal.Entry, loc journal.Loc) {
	off, end := int64(e.Offset), int64(e.Offset)+int64(e.Length)
	if e.Length == 0 {
		return
	}
	zero := e.Kind == journal.KindZero || e.Kind == journal.KindTrim
	if zero && (end-off)/BlockSize >= bigRange {
		x.ranges = append(x.ranges, rangeOp{seq: e.Seq, off: off, end: end})
		return
	}
	for b := off / BlockSize; b*BlockSize < end; b++ {
		bs := b * BlockSize
		s, t := max(off, bs), min(end, bs+BlockSize)
		v := version{seq: e.Seq, loc: loc, pOff: s - off, start: uint16(s - bs), zero: zero}
		if t-s < BlockSize {
			v.n = uint16(t - s)
		}
		x.blocks[b] = append(x.blocks[b], v)
	}
}

// dropUpTo forgets every change with seq <= seq (folded into the image).
func (x *diskIndex) dropUpTo(seq uint64) {
	for b, vs := range x.blocks {
		i, _ := slices.BinarySearchFunc(vs, seq+1, func(v version, s uint64) int {
			if v.seq < s {
				return -1
			}
			if v.seq > s {
				return 1
			}
			return 0
		})
		if i == len(vs) {
			delete(x.blocks, b)
		} else if i > 0 {
			x.blocks[b] = slices.Clone(vs[i:])
		}
	}
	i := 0
	for i < len(x.ranges) && x.ranges[i].seq <= seq {
		i++
	}
	x.ranges = slices.Clone(x.ranges[i:])
}

// firstAfter returns the index of the first version with seq > seq.
func firstAfter(vs []version, seq uint64) int {
	i, _ := slices.BinarySearchFunc(vs, seq+1, func(v version, s uint64) int { return cmp.Compare(v.seq, s) })
	return i
}

// op is one change applied while building a block: a version or a range.
type op struct {
	seq uint64
	v   *version // nil for a range (zero the whole overlap)
	r   *rangeOp
}

// ops returns, in seq order, the changes to block b with seq <= at that a
// reader must apply over the image, skipping those hidden by a later change
// of the whole block.
func (x *diskIndex) ops(b int64, at uint64, buf []op) []op {
	buf = buf[:0]
	vs := x.blocks[b]
	// Versions with seq <= at: vs[:k].
	k := firstAfter(vs, at)
	first := 0
	for i := k - 1; i >= 0; i-- {
		if vs[i].start == 0 && vs[i].n == 0 {
			first = i // a whole-block change hides everything before it
			break
		}
	}
	var floor uint64
	if k > 0 && vs[first].start == 0 && vs[first].n == 0 {
		floor = vs[first].seq
	}
	for i := first; i < k; i++ {
		buf = append(buf, op{seq: vs[i].seq, v: &vs[i]})
	}
	bs, be := b*BlockSize, (b+1)*BlockSize
	for i := range x.ranges {
		r := &x.ranges[i]
		if r.seq > at {
			break
		}
		if r.seq > floor && r.off < be && r.end > bs {
			buf = append(buf, op{seq: r.seq, r: r})
		}
	}
	slices.SortFunc(buf, func(a, c op) int { return cmp.Compare(a.seq, c.seq) })
	return buf
}
