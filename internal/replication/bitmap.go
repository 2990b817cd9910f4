package replication

import (
	"encoding/json"
	"fmt"
	"math/bits"
	"os"
	"sort"
	"sync"

	"github.com/ferry-dr/ferry/internal/atomicfile"
	"github.com/ferry-dr/ferry/internal/journal"
)

// ChunkSize is the granularity of the dirty-block bitmap.
const ChunkSize = 64 << 10

// bitmap records which chunks of a group's disks changed since Since, once
// the source journal may no longer grow (the peer is gone or too slow). It
// is persisted; Marked says up to which journal sequence it is complete, and
// the shipper keeps the journal from Marked+1 so that a crash loses nothing
// (the rest is re-marked from the journal at start).
type bitmap struct {
	mu     sync.Mutex
	Since  uint64              `json:"since"`  // the first entry the recovery site lacks
	Marked uint64              `json:"marked"` // every change up to here is marked
	Bits   map[uint16][]uint64 `json:"bits"`   // per disk id: one bit per chunk
	// ResyncFrom is set once a resynchronization began: the journal
	// continues at this sequence and the bitmap no longer changes.
	ResyncFrom uint64 `json:"resync_from,omitempty"`
}

func newBitmap(since uint64) *bitmap { return &bitmap{Since: since, Bits: map[uint16][]uint64{}} }

// mark records the chunks e changes. Safe for concurrent use.
func (b *bitmap) mark(e *journal.Entry) {
	if e.Kind == journal.KindMarker || e.Kind == journal.KindSkip || e.Length == 0 {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	first := int64(e.Offset) / ChunkSize
	last := (int64(e.Offset) + int64(e.Length) - 1) / ChunkSize
	words := b.Bits[e.Disk]
	if need := int(last/64) + 1; len(words) < need {
		words = append(words, make([]uint64, need-len(words))...)
	}
	for c := first; c <= last; c++ {
		words[c/64] |= 1 << (c % 64)
	}
	b.Bits[e.Disk] = words
	b.Marked = max(b.Marked, e.Seq)
}

// marked returns Marked under the lock.
func (b *bitmap) marked() uint64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.Marked
}

// extent is a run of dirty bytes.
type extent struct {
	disk   uint16
	off, n int64
}

// extents returns the dirty runs, clipped to the disks' sizes and cut to
// at most maxLen bytes each.
func (b *bitmap) extents(sizes map[uint16]int64, maxLen int64) []extent {
	b.mu.Lock()
	defer b.mu.Unlock()
	ids := make([]int, 0, len(b.Bits))
	for id := range b.Bits {
		ids = append(ids, int(id))
	}
	sort.Ints(ids)
	var out []extent
	for _, id := range ids {
		words := b.Bits[uint16(id)]
		size := sizes[uint16(id)]
		var run *extent
		for w, word := range words {
			for word != 0 {
				bit := bits.TrailingZeros64(word)
				word &^= 1 << bit
				off := (int64(w)*64 + int64(bit)) * ChunkSize
				if off >= size {
					break
				}
				n := min(int64(ChunkSize), size-off)
				if run != nil && run.off+run.n == off && run.n+n <= maxLen {
					run.n += n
					continue
				}
				out = append(out, extent{disk: uint16(id), off: off, n: n})
				run = &out[len(out)-1]
			}
		}
	}
	return out
}

func (b *bitmap) save(path string) error {
	b.mu.Lock()
	data, err := json.Marshal(b)
	b.mu.Unlock()
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(path, data, 0o600); err != nil {
		return fmt.Errorf("save bitmap: %w", err)
	}
	return nil
}

func loadBitmap(path string) (*bitmap, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	b := newBitmap(0)
	if err := json.Unmarshal(data, b); err != nil {
		return nil, fmt.Errorf("parse bitmap %s: %w", path, err)
	}
	if b.Bits == nil {
		b.Bits = map[uint16][]uint64{}
	}
	return b, nil
}
