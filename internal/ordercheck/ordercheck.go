// Package ordercheck is ferry's write-order checker. A Writer writes
// sequence-stamped, checksummed records to a disk through NBD from several
// lanes at once; each lane writes its records one after the other, each
// acknowledged durable (FUA) before the next is sent. Verify then checks
// an image of the disk (a replica's view at some point): every record
// present must be intact, and in every lane the records present must be a
// prefix of what the lane wrote. A view that breaks that is not a state
// the source disk ever had, so replication lost write order.
package ordercheck

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"sync"
	"sync/atomic"
)

// RecordSize is the size of a record and of its slot on the disk.
const RecordSize = 4096

var magic = []byte("FRYREC01")

// Record returns the bytes of record k (1-based) of lane.
func Record(k uint64, lane int) []byte {
	b := make([]byte, RecordSize)
	copy(b, magic)
	binary.LittleEndian.PutUint64(b[8:], k)
	binary.LittleEndian.PutUint32(b[16:], uint32(lane))
	for i := 24; i < RecordSize; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], k*0x9e3779b97f4a7c15+uint64(i))
	}
	binary.LittleEndian.PutUint32(b[20:], crc32.ChecksumIEEE(b))
	return b
}

// Disk is where a Writer writes (nbd.Client fits).
type Disk interface {
	WriteAt(ctx context.Context, p []byte, off int64, fua bool) error
}

// Writer writes records 1..N: record k goes to slot k-1 and belongs to lane
// (k-1) mod Lanes.
type Writer struct {
	Lanes int
	acked []atomic.Uint64 // per lane: highest record acknowledged
}

// NewWriter returns a writer with the given number of lanes.
func NewWriter(lanes int) *Writer {
	return &Writer{Lanes: lanes, acked: make([]atomic.Uint64, lanes)}
}

// Run writes records from..to (inclusive) until ctx is done or a write
// fails; it returns the first error (nil if all were written).
func (w *Writer) Run(ctx context.Context, d Disk, from, to uint64) error {
	var wg sync.WaitGroup
	errs := make(chan error, w.Lanes)
	for l := 0; l < w.Lanes; l++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := from; k <= to; k++ {
				if int((k-1)%uint64(w.Lanes)) != l {
					continue
				}
				if ctx.Err() != nil {
					errs <- ctx.Err()
					return
				}
				if err := d.WriteAt(ctx, Record(k, l), int64(k-1)*RecordSize, true); err != nil {
					errs <- fmt.Errorf("record %d: %w", k, err)
					return
				}
				if k > w.acked[l].Load() { // a resumed writer may write a record again
					w.acked[l].Store(k)
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	return <-errs
}

// Acked returns, per lane, the highest record acknowledged as durable.
func (w *Writer) Acked() []uint64 {
	out := make([]uint64, w.Lanes)
	for i := range out {
		out[i] = w.acked[i].Load()
	}
	return out
}

// ErrOrder: a view holds a record whose predecessor in its lane is missing.
var ErrOrder = errors.New("ordercheck: write order broken")

// Verify checks img (records from slot 0) for lanes and returns, per lane,
// the highest record present.
func Verify(img []byte, lanes int) ([]uint64, error) {
	top := make([]uint64, lanes)
	gap := make([]uint64, lanes) // first missing record per lane, 0 = none yet
	zero := make([]byte, RecordSize)
	for slot := 0; (slot+1)*RecordSize <= len(img); slot++ {
		k := uint64(slot + 1)
		lane := int(uint64(slot) % uint64(lanes))
		rec := img[slot*RecordSize : (slot+1)*RecordSize]
		if bytes.Equal(rec, zero) {
			if gap[lane] == 0 {
				gap[lane] = k
			}
			continue
		}
		if !bytes.Equal(rec, Record(k, lane)) {
			return nil, fmt.Errorf("ordercheck: slot %d holds a damaged or foreign record", slot)
		}
		if gap[lane] != 0 {
			return nil, fmt.Errorf("%w: lane %d has record %d but not %d", ErrOrder, lane, k, gap[lane])
		}
		top[lane] = k
	}
	return top, nil
}
