package disk

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"os"
	"sync"

	"github.com/ferry-dr/ferry/internal/atomicfile"
	"github.com/ferry-dr/ferry/internal/checksum"
	"golang.org/x/sys/unix"
)

// BlockSize is the granularity of a layered disk's top layer.
const BlockSize = 4096

// Base is the read-only lower layer of a committed group's disks: a
// replica's disks at the point the failover chose. A layered disk reads a
// block from its top layer (what the VM wrote since the failover) if that
// holds it, else from the base. The group's background fold flattens the
// base (makes its image files hold exactly the point), then moves the top
// layer's blocks into those files and adopts them as its images.
type Base interface {
	// ReadAt fills p with disk id's content at off as of the base's
	// point. Safe for concurrent use. Only called while Flat is false.
	ReadAt(id uint16, p []byte, off int64) error
	// Flat reports whether the base's image files hold exactly its point.
	// Once true it stays true, across restarts.
	Flat() bool
	// FlattenStep does a bounded part of the work that makes the base
	// flat (at most max journal entries) and returns how many entries are
	// left (0: flat) and how many bytes it wrote. Resumable after a crash
	// at any moment; never changes what ReadAt returns.
	FlattenStep(ctx context.Context, max int) (left uint64, wrote int64, err error)
	// ImagePath is the file that holds disk id. Once the base is flat the
	// group writes it in place, then moves it into its own directory.
	ImagePath(id uint16) string
	// Release closes the base and deletes what is left of it, after the
	// group took its images.
	Release() error
	// Close closes the base, keeping everything.
	Close() error
}

// BaseRef names a layered group's base in its manifest.
type BaseRef struct {
	// Name is what Config.OpenBase is given (the replica's name).
	Name string `json:"name"`
	// Seq is the point the base shows.
	Seq uint64 `json:"seq"`
	// Finishing: the fold is done and the base's images are being moved
	// into the group; Open completes the move.
	Finishing bool `json:"finishing,omitempty"`
}

// Layer is the top layer a commit hands to CreateLayered for one disk: a
// sparse file of the disk's size and the blocks it holds.
type Layer struct {
	Path    string
	Present BlockSet
}

// BlockSet is a set of BlockSize blocks (a bitmap).
type BlockSet struct {
	words []uint64
	n     int64
}

// NewBlockSet returns an empty set for a disk of size bytes.
func NewBlockSet(size int64) BlockSet {
	blocks := (size + BlockSize - 1) / BlockSize
	return BlockSet{words: make([]uint64, (blocks+63)/64)}
}

// Has reports whether block b is in the set.
func (s *BlockSet) Has(b int64) bool {
	return b>>6 < int64(len(s.words)) && s.words[b>>6]&(1<<(b&63)) != 0
}

// Add puts block b in the set.
func (s *BlockSet) Add(b int64) {
	if !s.Has(b) {
		s.words[b>>6] |= 1 << (b & 63)
		s.n++
	}
}

// Remove takes block b out of the set.
func (s *BlockSet) Remove(b int64) {
	if s.Has(b) {
		s.words[b>>6] &^= 1 << (b & 63)
		s.n--
	}
}

// Len is the number of blocks in the set.
func (s *BlockSet) Len() int64 { return s.n }

// Clone copies the set.
func (s *BlockSet) Clone() BlockSet {
	return BlockSet{words: append([]uint64(nil), s.words...), n: s.n}
}

// next returns the first block >= b in the set, or -1.
func (s *BlockSet) next(b int64) int64 {
	for w := b >> 6; w < int64(len(s.words)); w++ {
		x := s.words[w]
		if w == b>>6 {
			x &^= (1 << (b & 63)) - 1
		}
		if x != 0 {
			return w<<6 + int64(bits.TrailingZeros64(x))
		}
	}
	return -1
}

// Map file: "FMAP1\n", the number of words (uvarint), then runs of
// (start, length) in blocks as uvarints, then the CRC-32C of all that.
var mapMagic = []byte("FMAP1\n")

// ErrBadMap: a top layer's map file does not parse or fails its checksum.
var ErrBadMap = errors.New("disk: top layer map damaged")

func (s *BlockSet) marshal() []byte {
	b := append([]byte(nil), mapMagic...)
	b = binary.AppendUvarint(b, uint64(len(s.words)))
	for i := s.next(0); i >= 0; {
		j := i
		for s.Has(j + 1) {
			j++
		}
		b = binary.AppendUvarint(b, uint64(i))
		b = binary.AppendUvarint(b, uint64(j-i+1))
		i = s.next(j + 1)
	}
	return binary.LittleEndian.AppendUint32(b, checksum.Checksum(b))
}

func unmarshalBlockSet(b []byte) (BlockSet, error) {
	if len(b) < len(mapMagic)+4 || string(b[:len(mapMagic)]) != string(mapMagic) {
		return BlockSet{}, fmt.Errorf("%w: bad magic", ErrBadMap)
	}
	body, sum := b[:len(b)-4], binary.LittleEndian.Uint32(b[len(b)-4:])
	if checksum.Checksum(body) != sum {
		return BlockSet{}, fmt.Errorf("%w: checksum mismatch", ErrBadMap)
	}
	p := body[len(mapMagic):]
	words, k := binary.Uvarint(p)
	if k <= 0 || words > 1<<40 {
		return BlockSet{}, fmt.Errorf("%w: bad size", ErrBadMap)
	}
	p = p[k:]
	s := BlockSet{words: make([]uint64, words)}
	for len(p) > 0 {
		start, k1 := binary.Uvarint(p)
		if k1 <= 0 {
			return BlockSet{}, fmt.Errorf("%w: bad run", ErrBadMap)
		}
		n, k2 := binary.Uvarint(p[k1:])
		if k2 <= 0 || start+n > words*64 || start+n < start {
			return BlockSet{}, fmt.Errorf("%w: run out of range", ErrBadMap)
		}
		for b := start; b < start+n; b++ {
			s.Add(int64(b))
		}
		p = p[k1+k2:]
	}
	return s, nil
}

// image is where a disk's blocks live: a plain file, or while a commit's
// fold runs, a top layer over a base. The group calls WriteAt and Zero
// under its lock; ReadAt may run concurrently with them.
type image interface {
	ReadAt(p []byte, off int64) error
	WriteAt(p []byte, off int64) error
	Zero(off, n int64) error
	Sync() error
	// StartSync starts writing dirty pages back without waiting for
	// them: a hint that spreads a later Sync's work; errors surface at
	// Sync.
	StartSync()
	Close() error
}

type plainImage struct{ f *os.File }

func (p plainImage) ReadAt(b []byte, off int64) error {
	_, err := p.f.ReadAt(b, off)
	return err
}

func (p plainImage) WriteAt(b []byte, off int64) error {
	_, err := p.f.WriteAt(b, off)
	return err
}

func (p plainImage) Zero(off, n int64) error { return zeroRange(p.f, off, n) }

func (p plainImage) StartSync() { startSync(p.f) }

// dataRanges reports the allocated parts of the file in [0, size), in
// order (SEEK_DATA/SEEK_HOLE); without that support, the whole file.
func (p plainImage) dataRanges(size int64, fn func(off, n int64) error) error {
	fd := int(p.f.Fd())
	for off := int64(0); off < size; {
		start, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return nil // only a hole is left
		}
		if err != nil {
			return fn(off, size-off)
		}
		if start >= size {
			return nil
		}
		end, err := unix.Seek(fd, start, unix.SEEK_HOLE)
		if err != nil || end > size {
			end = size
		}
		if err := fn(start, end-start); err != nil {
			return err
		}
		off = end
	}
	return nil
}
func (p plainImage) Sync() error  { return fdatasync(p.f) }
func (p plainImage) Close() error { return p.f.Close() }

// layered is a disk while its group folds: blocks in present are read
// from top, the others from the base (through Base.ReadAt until the base
// is flat, then from its image file, flat). Before the base is flat,
// writes copy the block into top first (copy on write); after, they go to
// the flat file, and a block still in top is moved there first.
//
// Crash safety: the map saved at a checkpoint is taken with the journal
// sequence the checkpoint records, before the files are synced; a block
// leaves top only by being copied, never erased, until the fold is done.
// So after a crash the map names, for every block, a layer that holds
// the block's content at the checkpoint or later, and replaying the
// journal from the checkpoint (every write is an absolute overwrite)
// restores the rest.
type layered struct {
	id   uint16
	size int64

	mu      sync.RWMutex
	top     *os.File
	present BlockSet
	base    Base
	flat    *os.File
}

func (l *layered) blockLen(b int64) int64 { return min(BlockSize, l.size-b*BlockSize) }

func (l *layered) ReadAt(p []byte, off int64) error {
	l.mu.RLock()
	defer l.mu.RUnlock()
	for len(p) > 0 {
		b := off / BlockSize
		inTop := l.present.Has(b)
		end := (b + 1) * BlockSize
		for end < off+int64(len(p)) && l.present.Has(end/BlockSize) == inTop {
			end += BlockSize
		}
		n := min(int64(len(p)), end-off)
		var err error
		switch {
		case inTop:
			_, err = l.top.ReadAt(p[:n], off)
		case l.flat != nil:
			_, err = l.flat.ReadAt(p[:n], off)
		default:
			err = l.base.ReadAt(l.id, p[:n], off)
		}
		if err != nil {
			return fmt.Errorf("read layered disk at %d: %w", off, err)
		}
		p, off = p[n:], off+n
	}
	return nil
}

// edges returns the first and last block of [off, off+n) that the range
// covers only in part (-1 if none).
func (l *layered) edges(off, n int64) (first, last int64) {
	first, last = -1, -1
	if n == 0 {
		return
	}
	b0, b1 := off/BlockSize, (off+n-1)/BlockSize
	if off != b0*BlockSize || off+n < b0*BlockSize+l.blockLen(b0) {
		first = b0
	}
	if b1 != b0 && off+n != b1*BlockSize+l.blockLen(b1) {
		last = b1
	}
	return
}

// cow copies block b from the base into top. Caller holds mu.
func (l *layered) cow(b int64) error {
	blk := make([]byte, l.blockLen(b))
	if err := l.base.ReadAt(l.id, blk, b*BlockSize); err != nil {
		return fmt.Errorf("copy block %d from the base: %w", b, err)
	}
	if _, err := l.top.WriteAt(blk, b*BlockSize); err != nil {
		return fmt.Errorf("copy block %d into the top layer: %w", b, err)
	}
	l.present.Add(b)
	return nil
}

// move copies block b from top into the flat base and forgets it in top.
// Caller holds mu.
func (l *layered) move(b int64) error {
	blk := make([]byte, l.blockLen(b))
	if _, err := l.top.ReadAt(blk, b*BlockSize); err != nil {
		return fmt.Errorf("move block %d: %w", b, err)
	}
	if _, err := l.flat.WriteAt(blk, b*BlockSize); err != nil {
		return fmt.Errorf("move block %d: %w", b, err)
	}
	l.present.Remove(b)
	return nil
}

// prepare makes [off, off+n) writable in the layer that will take the
// write and reports whether that is top. Caller holds mu.
func (l *layered) prepare(off, n int64) (toTop bool, err error) {
	first, last := l.edges(off, n)
	if l.flat == nil {
		for _, b := range []int64{first, last} {
			if b >= 0 && !l.present.Has(b) {
				if err := l.cow(b); err != nil {
					return false, err
				}
			}
		}
		for b := off / BlockSize; n > 0 && b <= (off+n-1)/BlockSize; b++ {
			l.present.Add(b)
		}
		return true, nil
	}
	for b := off / BlockSize; n > 0 && b <= (off+n-1)/BlockSize; b++ {
		if !l.present.Has(b) {
			continue
		}
		if b == first || b == last {
			if err := l.move(b); err != nil {
				return false, err
			}
		} else {
			l.present.Remove(b) // overwritten whole
		}
	}
	return false, nil
}

func (l *layered) WriteAt(p []byte, off int64) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	toTop, err := l.prepare(off, int64(len(p)))
	if err != nil {
		return err
	}
	f := l.flat
	if toTop {
		f = l.top
	}
	_, err = f.WriteAt(p, off)
	return err
}

func (l *layered) Zero(off, n int64) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	toTop, err := l.prepare(off, n)
	if err != nil {
		return err
	}
	if toTop {
		return zeroRange(l.top, off, n)
	}
	return zeroRange(l.flat, off, n)
}

func (l *layered) Sync() error {
	l.mu.RLock()
	top, flat := l.top, l.flat
	l.mu.RUnlock()
	if err := fdatasync(top); err != nil {
		return err
	}
	if flat != nil {
		return fdatasync(flat)
	}
	return nil
}

func (l *layered) StartSync() {
	l.mu.RLock()
	top, flat := l.top, l.flat
	l.mu.RUnlock()
	startSync(top)
	if flat != nil {
		startSync(flat)
	}
}

func (l *layered) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	err := l.top.Close()
	if l.flat != nil {
		l.flat.Close()
	}
	return err
}

// left is the number of blocks still in top.
func (l *layered) left() int64 {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.present.Len()
}

// snapshot copies the set of blocks in top.
func (l *layered) snapshot() BlockSet {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.present.Clone()
}

// becomeFlat switches writes to the base's image file once it is flat.
func (l *layered) becomeFlat() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.flat != nil {
		return nil
	}
	f, err := os.OpenFile(l.base.ImagePath(l.id), os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("open flattened base image: %w", err)
	}
	l.flat = f
	return nil
}

// moveSome moves up to max blocks from top into the flat base and
// returns how many bytes it moved and how many blocks are left.
func (l *layered) moveSome(max int) (moved int64, left int64, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for b := l.present.next(0); b >= 0 && max > 0; b = l.present.next(b + 1) {
		if err := l.move(b); err != nil {
			return moved, l.present.Len(), err
		}
		moved += l.blockLen(b)
		max--
	}
	return moved, l.present.Len(), nil
}

func saveMap(path string, s BlockSet) error {
	if err := atomicfile.WriteFile(path, s.marshal(), 0o600); err != nil {
		return fmt.Errorf("save top layer map: %w", err)
	}
	return nil
}

func loadMap(path string) (BlockSet, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return BlockSet{}, fmt.Errorf("read top layer map: %w", err)
	}
	s, err := unmarshalBlockSet(b)
	if err != nil {
		return BlockSet{}, fmt.Errorf("%s: %w", path, err)
	}
	return s, nil
}
