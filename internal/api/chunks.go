package api

import (
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math/bits"
)

// TrackSize is the granularity of changed-block tracking: the 4 KiB
// block, the unit file systems and the replica's index write in, so that
// a reprotect sends about what diverged and not whole chunks around it.
const TrackSize = 4096

// Chunks is a set of TrackSize blocks per disk name, one bit per block. It
// is how a reprotect says which parts of the disks may differ between the
// two sites (changed-block tracking), so that only those are sent. It is
// keyed by name, not disk id, because the two sites number disks
// independently. The zero value is not usable; make one with NewChunks.
type Chunks map[string][]uint64

// NewChunks returns an empty set.
func NewChunks() Chunks { return Chunks{} }

// Add marks every block that bytes [off, off+n) of disk touch.
func (c Chunks) Add(disk string, off, n int64) {
	if n <= 0 {
		return
	}
	first, last := off/TrackSize, (off+n-1)/TrackSize
	words := c[disk]
	if need := int(last/64) + 1; len(words) < need {
		words = append(words, make([]uint64, need-len(words))...)
	}
	for i := first; i <= last; {
		if i%64 == 0 && last-i >= 63 {
			words[i/64] = ^uint64(0) // a whole word at once: big ranges stay cheap
			i += 64
			continue
		}
		words[i/64] |= 1 << (i % 64)
		i++
	}
	c[disk] = words
}

// Union adds every block of o to c.
func (c Chunks) Union(o Chunks) {
	for d, ws := range o {
		mine := c[d]
		if len(mine) < len(ws) {
			mine = append(mine, make([]uint64, len(ws)-len(mine))...)
		}
		for i, w := range ws {
			mine[i] |= w
		}
		c[d] = mine
	}
}

// Has reports whether block i of disk is in the set.
func (c Chunks) Has(disk string, i int64) bool {
	ws := c[disk]
	return int(i/64) < len(ws) && ws[i/64]&(1<<(i%64)) != 0
}

// Count is the number of blocks in the set.
func (c Chunks) Count() int {
	n := 0
	for _, ws := range c {
		for _, w := range ws {
			n += bits.OnesCount64(w)
		}
	}
	return n
}

// Bytes is the size of the set's blocks.
func (c Chunks) Bytes() int64 { return int64(c.Count()) * TrackSize }

// Runs calls fn for every run of consecutive blocks of disk in the set,
// in order, as byte ranges clipped to size and cut to at most maxLen.
func (c Chunks) Runs(disk string, size, maxLen int64, fn func(off, n int64) error) error {
	ws := c[disk]
	var runOff, runLen int64
	flush := func() error {
		if runLen == 0 {
			return nil
		}
		err := fn(runOff, runLen)
		runLen = 0
		return err
	}
	for w, word := range ws {
		for word != 0 {
			b := bits.TrailingZeros64(word)
			word &^= 1 << b
			off := (int64(w)*64 + int64(b)) * TrackSize
			if off >= size {
				return flush()
			}
			n := min(int64(TrackSize), size-off)
			if runLen > 0 && runOff+runLen == off && runLen+n <= maxLen {
				runLen += n
				continue
			}
			if err := flush(); err != nil {
				return err
			}
			runOff, runLen = off, n
		}
	}
	return flush()
}

// MarshalJSON writes each disk's set as runs of blocks, [[first, count],
// ...], which is small for the sparse sets a reprotect has; a set with
// more runs than that pays for is written as base64 of its little-endian
// 64-bit words instead (a 1 TiB disk: 43 MiB at the most).
func (c Chunks) MarshalJSON() ([]byte, error) {
	m := make(map[string]any, len(c))
	for d, ws := range c {
		var runs [][2]int64
		for w, word := range ws {
			for word != 0 {
				b := bits.TrailingZeros64(word)
				word &^= 1 << b
				i := int64(w)*64 + int64(b)
				if n := len(runs); n > 0 && runs[n-1][0]+runs[n-1][1] == i {
					runs[n-1][1]++
				} else {
					runs = append(runs, [2]int64{i, 1})
				}
			}
			if len(runs) > len(ws) { // denser than the bitmap
				runs = nil
				break
			}
		}
		if runs != nil || len(ws) == 0 {
			if runs == nil {
				runs = [][2]int64{}
			}
			m[d] = runs
			continue
		}
		b := make([]byte, 8*len(ws))
		for i, w := range ws {
			binary.LittleEndian.PutUint64(b[8*i:], w)
		}
		m[d] = base64.StdEncoding.EncodeToString(b)
	}
	return json.Marshal(m)
}

// maxTrackBlocks bounds a decoded set: 2^32 blocks is a 16 TiB disk.
const maxTrackBlocks = 1 << 32

// UnmarshalJSON reads what MarshalJSON wrote.
func (c *Chunks) UnmarshalJSON(data []byte) error {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(data, &m); err != nil {
		return fmt.Errorf("block set: %w", err)
	}
	out := make(Chunks, len(m))
	for d, raw := range m {
		var s string
		if json.Unmarshal(raw, &s) == nil {
			b, err := base64.StdEncoding.DecodeString(s)
			if err != nil || len(b)%8 != 0 || len(b)*8 > maxTrackBlocks {
				return fmt.Errorf("block set of disk %q: not base64 of 64-bit words", d)
			}
			ws := make([]uint64, len(b)/8)
			for i := range ws {
				ws[i] = binary.LittleEndian.Uint64(b[8*i:])
			}
			out[d] = ws
			continue
		}
		var runs [][2]int64
		if err := json.Unmarshal(raw, &runs); err != nil {
			return fmt.Errorf("block set of disk %q: neither runs [[first, count], ...] nor a bitmap", d)
		}
		out[d] = nil
		for _, r := range runs {
			if r[0] < 0 || r[1] <= 0 || r[0]+r[1] > maxTrackBlocks {
				return fmt.Errorf("block set of disk %q: bad run %v", d, r)
			}
			out.Add(d, r[0]*TrackSize, r[1]*TrackSize)
		}
	}
	*c = out
	return nil
}
