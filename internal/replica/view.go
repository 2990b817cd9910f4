package replica

import (
	"context"
	"fmt"
	"os"
	"sync"
	"syscall"

	"github.com/ferry-dr/ferry/internal/disk"
)

// View is a disk of the replica as it was at one point: the image plus,
// per block, the journal's changes up to that point. A writable view keeps
// its writes in a copy-on-write overlay file that Close discards. View
// implements nbd.Device.
type View struct {
	r    *Replica
	disk uint16
	size int64
	at   uint64

	mu      sync.Mutex // overlay
	overlay *os.File
	present map[int64]bool // blocks held in the overlay
	taken   bool           // a commit took the overlay: Close keeps it
	ops     []op
}

// OpenView opens a view of the named disk at sequence number at (a point
// from the catalog or any entry boundary from ConsistentSeq to the last
// received). overlayPath, if not empty, makes the view writable with its
// overlay there. It does no I/O proportional to the journal.
func (r *Replica) OpenView(diskName string, at uint64, overlayPath string) (*View, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.j == nil || r.man.ConsistentSeq == 0 {
		return nil, ErrNotReady
	}
	last := r.j.LastSeq()
	if first := r.firstViewable(); at < first || at > last {
		return nil, fmt.Errorf("%w: seq %d is outside %d..%d (oldest in retention..last received)", ErrNoPoint, at, first, last)
	}
	if r.inGap(at) {
		return nil, fmt.Errorf("%w: seq %d falls inside a resynchronization, where the replica is not consistent", ErrNoPoint, at)
	}
	for _, s := range r.man.Disks {
		if s.Name != diskName {
			continue
		}
		v := &View{r: r, disk: s.ID, size: s.Size, at: at}
		if overlayPath != "" {
			f, err := os.OpenFile(overlayPath, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
			if err != nil {
				return nil, fmt.Errorf("create view overlay: %w", err)
			}
			if err := f.Truncate(s.Size); err != nil {
				f.Close()
				return nil, err
			}
			v.overlay, v.present = f, map[int64]bool{}
		}
		if r.viewHolds == nil {
			r.viewHolds = map[*View]uint64{}
		}
		r.viewHolds[v] = at
		return v, nil
	}
	return nil, fmt.Errorf("%w: %q", ErrUnknownDisk, diskName)
}

// Size is the disk's size.
func (v *View) Size() int64 { return v.size }

// Seq is the point the view shows.
func (v *View) Seq() uint64 { return v.at }

// Writable reports whether the view has an overlay.
func (v *View) Writable() bool { return v.overlay != nil }

// readBlock fills blk (BlockSize bytes) with block b as of the view's point.
func (v *View) readBlock(b int64, blk []byte) error {
	if v.overlay != nil && v.present[b] {
		_, err := v.overlay.ReadAt(blk, b*BlockSize)
		return err
	}
	r := v.r
	r.mu.RLock()
	defer r.mu.RUnlock()
	img := r.images[v.disk]
	if img == nil {
		return fmt.Errorf("replica closed")
	}
	n := min(int64(BlockSize), v.size-b*BlockSize)
	if _, err := img.ReadAt(blk[:n], b*BlockSize); err != nil {
		return fmt.Errorf("read replica image: %w", err)
	}
	v.ops = r.idx[v.disk].ops(b, v.at, v.ops)
	for _, o := range v.ops {
		if o.r != nil {
			s, e := max(o.r.off, b*BlockSize)-b*BlockSize, min(o.r.end, (b+1)*BlockSize)-b*BlockSize
			clear(blk[s:e])
			continue
		}
		dst := blk[o.v.start : int(o.v.start)+o.v.length()]
		if o.v.zero {
			clear(dst)
			continue
		}
		if err := r.j.ReadData(o.v.loc, dst, o.v.pOff); err != nil {
			return err
		}
	}
	return nil
}

func (v *View) check(off, n int64) error {
	if off < 0 || n < 0 || off+n > v.size {
		return fmt.Errorf("view: [%d,+%d) outside disk of %d bytes: %w", off, n, v.size, syscall.EINVAL)
	}
	return nil
}

// ReadAt implements nbd.Device.
func (v *View) ReadAt(_ context.Context, p []byte, off int64) error {
	if err := v.check(off, int64(len(p))); err != nil {
		return err
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	var blk [BlockSize]byte
	for len(p) > 0 {
		b := off / BlockSize
		if err := v.readBlock(b, blk[:]); err != nil {
			return err
		}
		n := copy(p, blk[off-b*BlockSize:])
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// WriteAt implements nbd.Device: writable views copy each touched block
// into the overlay first.
func (v *View) WriteAt(_ context.Context, p []byte, off int64) error {
	return v.write(p, off, int64(len(p)))
}

func (v *View) write(p []byte, off, n int64) error {
	if v.overlay == nil {
		return fmt.Errorf("%w: %w", ErrReadOnlyView, syscall.EROFS)
	}
	if err := v.check(off, n); err != nil {
		return err
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	var blk [BlockSize]byte
	for n > 0 {
		b := off / BlockSize
		if err := v.readBlock(b, blk[:]); err != nil {
			return err
		}
		s := off - b*BlockSize
		k := min(n, BlockSize-s)
		if p == nil {
			clear(blk[s : s+k])
		} else {
			copy(blk[s:s+k], p[:k])
			p = p[k:]
		}
		if _, err := v.overlay.WriteAt(blk[:min(int64(BlockSize), v.size-b*BlockSize)], b*BlockSize); err != nil {
			return fmt.Errorf("write view overlay: %w", err)
		}
		v.present[b] = true
		off, n = off+k, n-k
	}
	return nil
}

// WriteZeroes implements nbd.Device.
func (v *View) WriteZeroes(_ context.Context, off, n int64) error { return v.write(nil, off, n) }

// Trim implements nbd.Device (trimmed bytes read as zero).
func (v *View) Trim(_ context.Context, off, n int64) error { return v.write(nil, off, n) }

// Flush implements nbd.Device. A view's writes are scratch data that Close
// discards, so there is nothing to make durable.
func (v *View) Flush(context.Context) error { return nil }

// Close releases the view's hold on folding and discards the overlay.
func (v *View) Close() error {
	v.r.mu.Lock()
	delete(v.r.viewHolds, v)
	v.r.mu.Unlock()
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.overlay != nil {
		name := v.overlay.Name()
		v.overlay.Close()
		v.overlay = nil
		if v.taken {
			return nil
		}
		return os.Remove(name)
	}
	return nil
}

// TakeOverlay hands a writable view's overlay to a commit, which makes it
// the top layer of the group that replaces the view: the overlay is made
// durable and its path and blocks returned. The view must not be written
// afterwards (the commit pauses its device first); Close then leaves the
// file alone.
func (v *View) TakeOverlay() (path string, present disk.BlockSet, err error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.overlay == nil {
		return "", disk.BlockSet{}, fmt.Errorf("%w: no overlay to take", ErrReadOnlyView)
	}
	if err := v.overlay.Sync(); err != nil {
		return "", disk.BlockSet{}, fmt.Errorf("sync view overlay: %w", err)
	}
	present = disk.NewBlockSet(v.size)
	for b := range v.present {
		present.Add(b)
	}
	v.taken = true
	return v.overlay.Name(), present, nil
}

// Written calls fn for every block a writable view's overlay holds (the
// writes made through the view), in no particular order.
func (v *View) Written(fn func(off, n int64)) {
	v.mu.Lock()
	defer v.mu.Unlock()
	for b := range v.present {
		fn(b*BlockSize, min(BlockSize, v.size-b*BlockSize))
	}
}
