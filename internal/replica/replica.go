// Package replica is the recovery-site side of replication: a replica of a
// consistency group made of base images, the source's journal as received
// (same sequence numbers, same times), a version index over that journal,
// and the catalog of recovery points found in it.
//
// A replica is consistent at every sequence number from ConsistentSeq (the
// end of the initial copy) to the last entry received: the images hold a
// copy of the source taken while it was being written, and every write the
// source made from the start of that copy on is in the journal. A View of a
// disk at a point reads the image and applies, per block, the journal's
// changes up to that point; nothing is copied, so opening a view costs the
// same whatever the size of the journal.
package replica

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/atomicfile"
	"github.com/ferry-dr/ferry/internal/disk"
	"github.com/ferry-dr/ferry/internal/journal"
	"golang.org/x/sys/unix"
)

// Sentinel errors.
var (
	ErrNotReady     = errors.New("replica: initial copy not complete")
	ErrNoPoint      = errors.New("replica: no such recovery point")
	ErrUnknownDisk  = errors.New("replica: unknown disk")
	ErrReadOnlyView = errors.New("replica: view is read-only")
	ErrCommitted    = errors.New("replica: committed (the base of a standalone group)")
)

// Marker is the payload of a recovery-point marker entry (api.Marker).
type Marker = api.Marker

// TypeResyncDone marks the end of a resynchronization: the replica is
// consistent again from this point (it was not from the skip before it).
const TypeResyncDone = api.PointResyncDone

// Point is a recovery point in the catalog (api.Point).
type Point = api.Point

// Config configures a Replica.
type Config struct {
	Dir         string
	SegmentSize int64
	Logger      *slog.Logger
	// Observer, if set, sees the data the replica takes in (the
	// ransomware detector).
	Observer Observer
}

// Observer watches a replica's incoming data. Its methods are called on
// the receive path, in order, after the data was written (not yet
// durable); they must be quick, must not block and cannot fail.
type Observer interface {
	// ObserveBase: initial-copy data for a disk at off.
	ObserveBase(disk uint16, off int64, p []byte)
	// ObserveEntries: entries appended from the source, in order.
	ObserveEntries(es []*journal.Entry)
	// ObserveReset: a new initial copy begins; what was seen is stale.
	ObserveReset()
}

type manifest struct {
	Version int         `json:"version"`
	Group   string      `json:"group"`
	Disks   []disk.Spec `json:"disks"`
	// BaseSeq: the journal starts here; the base copy began when the
	// source's next entry was BaseSeq.
	BaseSeq uint64 `json:"base_seq"`
	// ConsistentSeq: the first point that is consistent (0 while the base
	// copy runs).
	ConsistentSeq uint64 `json:"consistent_seq"`
	// FoldedSeq: entries up to here are in the images (retention).
	FoldedSeq uint64 `json:"folded_seq"`
	// FoldingTo: a fold to here was started (the intent, saved before the
	// images change). Until it is done the images may hold some entries
	// past FoldedSeq, so no view below it is offered.
	FoldingTo uint64 `json:"folding_to,omitempty"`
	// CommittedSeq and CommittedTo: a commit made this replica the base
	// of the group CommittedTo at point CommittedSeq. It takes no more
	// streams, offers no points, and never folds past CommittedSeq.
	CommittedSeq uint64 `json:"committed_seq,omitempty"`
	CommittedTo  string `json:"committed_to,omitempty"`
}

// Replica is one replicated group at the recovery site.
type Replica struct {
	cfg Config
	log *slog.Logger

	mu     sync.RWMutex
	man    manifest
	j      *journal.Journal
	images map[uint16]*os.File
	idx    map[uint16]*diskIndex
	points []Point
	tail   *journal.Reader // indexes what Receive appended
	peeked *peekedEntry    // read by tail past the last commit, indexed by the next
	last   journal.Entry   // header of the last entry received (no data)

	// gaps are ranges of sequence numbers at which the replica is not
	// consistent: from a skip (writes the source could not send) to the
	// resync-done point after it (0 while open).
	gaps []gap

	foldMu    sync.Mutex       // one fold at a time
	viewHolds map[*View]uint64 // open views hold folding at their point
}

// Open opens the replica in cfg.Dir (empty if new) and rebuilds its index
// from the journal.
func Open(cfg Config) (*Replica, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("create replica dir: %w", err)
	}
	r := &Replica{cfg: cfg, log: cfg.Logger}
	b, err := os.ReadFile(r.manifestPath())
	if errors.Is(err, os.ErrNotExist) {
		return r, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read replica manifest: %w", err)
	}
	if err := json.Unmarshal(b, &r.man); err != nil {
		return nil, fmt.Errorf("parse replica manifest: %w", err)
	}
	if r.man.ConsistentSeq == 0 {
		// An initial copy that did not end (the agent stopped, or died in
		// Begin): its images and journal are incomplete, maybe partly
		// gone. Nothing of it is served; the source's next stream starts
		// the copy again (NextSeq is 0), and Begin rebuilds the files.
		return r, nil
	}
	if err := r.openData(); err != nil {
		return nil, err
	}
	if err := r.indexNew(math.MaxUint64); err != nil {
		r.closeData()
		return nil, err
	}
	return r, nil
}

func (r *Replica) manifestPath() string { return filepath.Join(r.cfg.Dir, "replica.json") }
func (r *Replica) imagePath(name string) string {
	return filepath.Join(r.cfg.Dir, "images", name+".img")
}

func (r *Replica) saveManifest() error {
	b, _ := json.MarshalIndent(r.man, "", "  ")
	return atomicfile.WriteFile(r.manifestPath(), b, 0o600)
}

func (r *Replica) openData() error {
	j, _, err := journal.Open(journal.Options{Dir: filepath.Join(r.cfg.Dir, "journal"), SegmentSize: r.cfg.SegmentSize,
		FirstSeq: r.man.BaseSeq, Logger: r.log})
	if err != nil {
		return fmt.Errorf("open replica journal: %w", err)
	}
	r.j = j
	r.images = map[uint16]*os.File{}
	r.idx = map[uint16]*diskIndex{}
	for _, s := range r.man.Disks {
		f, err := os.OpenFile(r.imagePath(s.Name), os.O_RDWR, 0)
		if err != nil {
			return fmt.Errorf("open replica image %q: %w", s.Name, err)
		}
		r.images[s.ID] = f
		r.idx[s.ID] = newDiskIndex()
	}
	tail, err := j.NewReader(max(j.FirstSeq(), r.man.FoldedSeq+1))
	if err != nil {
		return err
	}
	r.tail = tail
	r.points = nil
	return nil
}

func (r *Replica) closeData() {
	if r.tail != nil {
		r.tail.Close()
		r.tail = nil
	}
	r.peeked = nil
	for _, f := range r.images {
		f.Close()
	}
	r.images = nil
	if r.j != nil {
		r.j.Close()
		r.j = nil
	}
}

// indexNew indexes every entry appended since the last call. Caller holds
// mu (or has exclusive access).
func (r *Replica) indexNew(limit uint64) error {
	for {
		var (
			e   journal.Entry
			loc journal.Loc
		)
		if r.peeked != nil {
			e, loc, r.peeked = r.peeked.e, r.peeked.loc, nil
		} else {
			var ok bool
			var err error
			e, ok, err = r.tail.TryNext()
			if err != nil {
				return fmt.Errorf("index replica journal: %w", err)
			}
			if !ok {
				return nil
			}
			loc = r.tail.Loc()
		}
		if e.Seq > limit {
			// Appended while a commit ran, and not yet durable: not
			// offered until the commit that covers it.
			e.Data = append([]byte(nil), e.Data...)
			r.peeked = &peekedEntry{e: e, loc: loc}
			return nil
		}
		switch e.Kind {
		case journal.KindSkip:
			r.gaps = append(r.gaps, gap{from: e.Seq})
		case journal.KindMarker:
			var m Marker
			if json.Unmarshal(e.Data, &m) != nil || m.Type == "" {
				break
			}
			if m.Type == TypeResyncDone {
				// It ends every resync still open: a source that restarted
				// in the middle of one sends a second skip, and the one
				// resync-done that follows covers both.
				open := false
				for i := range r.gaps {
					if r.gaps[i].to == 0 {
						r.gaps[i].to = e.Seq
						open = true
					}
				}
				if !open {
					// The skip was folded away: inconsistent up to here.
					r.gaps = append(r.gaps, gap{from: r.man.FoldedSeq + 1, to: e.Seq})
				}
			}
			r.points = append(r.points, Point{Seq: e.Seq, Time: time.Unix(0, e.Time).UTC(), Type: m.Type, Label: m.Label})
		default:
			x := r.idx[e.Disk]
			if x == nil {
				return fmt.Errorf("%w: entry %d names disk %d", ErrUnknownDisk, e.Seq, e.Disk)
			}
			x.add(&e, loc)
		}
		hdr := e
		hdr.Data = nil
		r.last = hdr
	}
}

type peekedEntry struct {
	e   journal.Entry
	loc journal.Loc
}

// Begin starts (or restarts) the initial copy of group with the given
// disks, whose journal will continue at startSeq. Existing replica data is
// discarded.
func (r *Replica) Begin(group string, disks []disk.Spec, startSeq uint64) error {
	return r.begin(group, disks, startSeq, false)
}

// BeginDelta is Begin for a delta copy: images that exist with the right
// size are kept (the sender sends only the chunks whose hashes differ,
// see ChunkHashes); the others start empty.
func (r *Replica) BeginDelta(group string, disks []disk.Spec, startSeq uint64) error {
	return r.begin(group, disks, startSeq, true)
}

func (r *Replica) begin(group string, disks []disk.Spec, startSeq uint64, keep bool) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, s := range disks {
		if s.Name == "" || filepath.Base(s.Name) != s.Name || s.Size <= 0 {
			return fmt.Errorf("replica: invalid disk %+v", s)
		}
	}
	r.closeData()
	// The intent first: a manifest that says "copy in progress" is
	// durable before any file goes, so a crash anywhere below reopens as
	// an incomplete copy (redone), never as a consistent replica whose
	// files are missing.
	r.man = manifest{Version: 1, Group: group, Disks: disks, BaseSeq: max(startSeq, 1), FoldedSeq: max(startSeq, 1) - 1}
	if err := r.saveManifest(); err != nil {
		return fmt.Errorf("save replica manifest: %w", err)
	}
	crash("begin-intent-saved")
	if err := os.RemoveAll(filepath.Join(r.cfg.Dir, "journal")); err != nil {
		return err
	}
	if !keep {
		if err := os.RemoveAll(filepath.Join(r.cfg.Dir, "images")); err != nil {
			return err
		}
		if r.cfg.Observer != nil {
			r.cfg.Observer.ObserveReset()
		}
	}
	crash("begin-old-data-removed")
	if err := os.MkdirAll(filepath.Join(r.cfg.Dir, "images"), 0o700); err != nil {
		return err
	}
	for _, s := range disks {
		flags := os.O_RDWR | os.O_CREATE | os.O_TRUNC
		if fi, err := os.Stat(r.imagePath(s.Name)); keep && err == nil && fi.Size() == s.Size {
			flags = os.O_RDWR // reuse: the delta copy fixes what differs
		}
		f, err := os.OpenFile(r.imagePath(s.Name), flags, 0o600)
		if err != nil {
			return err
		}
		err = f.Truncate(s.Size)
		f.Close()
		if err != nil {
			return err
		}
	}
	crash("begin-images-created")
	r.last = journal.Entry{}
	return r.openData()
}

// CrashPoint, if set (tests only), is called at each named step of a
// multi-file change; a test makes the process "die" there (panics, or
// exits) and reopens the replica to prove the change is crash-safe.
var CrashPoint func(name string)

func crash(name string) {
	if CrashPoint != nil {
		CrashPoint(name)
	}
}

// HasImages reports whether the replica holds images of exactly these
// disks (sizes included): a delta copy can then reuse them.
func (r *Replica) HasImages(disks []disk.Spec) bool {
	for _, d := range disks {
		fi, err := os.Stat(r.imagePath(d.Name))
		if err != nil || fi.Size() != d.Size {
			return false
		}
	}
	return len(disks) > 0
}

// ChunkHashes hashes the image of disk id in chunks of size bytes (SHA-256
// truncated to 16 bytes each), for a delta copy.
func (r *Replica) ChunkHashes(id uint16, size int64) ([]byte, error) {
	r.mu.RLock()
	f := r.images[id]
	r.mu.RUnlock()
	if f == nil {
		return nil, fmt.Errorf("%w: id %d", ErrUnknownDisk, id)
	}
	return HashChunks(f, size)
}

// HashChunks hashes everything readable from r in chunks of size bytes.
func HashChunks(r io.ReaderAt, size int64) ([]byte, error) {
	var out []byte
	buf := make([]byte, size)
	for off := int64(0); ; off += size {
		n, err := r.ReadAt(buf, off)
		if n > 0 {
			h := sha256.Sum256(buf[:n])
			out = append(out, h[:16]...)
		}
		if err == io.EOF || n < len(buf) {
			return out, nil
		}
		if err != nil {
			return nil, err
		}
	}
}

// Adopt turns existing disk images (an old source's disks after a
// failover) into a replica that is not consistent yet but whose images a
// delta copy can reuse. The image files are moved, not copied.
//
// Crash safety: the manifest ("copy in progress") is written before any
// image moves, and moving an image is one rename; so after a crash the
// replica opens as a copy to redo, reusing the images already moved, and
// the caller (whose intent record names the move) moves the rest again.
// Idempotent: images already in place are kept.
func Adopt(cfg Config, group string, disks []disk.Spec, images map[string]string) (*Replica, error) {
	if err := os.MkdirAll(filepath.Join(cfg.Dir, "images"), 0o700); err != nil {
		return nil, err
	}
	r := &Replica{cfg: cfg, log: cfg.Logger}
	if r.log == nil {
		r.log = slog.New(slog.DiscardHandler)
		r.cfg.Logger = r.log
	}
	r.man = manifest{Version: 1, Group: group, Disks: disks, BaseSeq: 1}
	if err := r.saveManifest(); err != nil {
		return nil, err
	}
	crash("adopt-manifest-saved")
	for name, path := range images {
		if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
			continue // moved before a crash
		}
		if err := os.Rename(path, filepath.Join(cfg.Dir, "images", name+".img")); err != nil {
			return nil, fmt.Errorf("adopt image %s: %w", name, err)
		}
		crash("adopt-image-moved")
	}
	if err := atomicfile.SyncDir(filepath.Join(cfg.Dir, "images")); err != nil {
		return nil, err
	}
	if err := r.openData(); err != nil {
		return nil, err
	}
	return r, nil
}

// WriteBase writes initial-copy data.
func (r *Replica) WriteBase(diskID uint16, off int64, p []byte) error {
	r.mu.RLock()
	defer r.mu.RUnlock()
	f := r.images[diskID]
	if f == nil {
		return fmt.Errorf("%w: id %d", ErrUnknownDisk, diskID)
	}
	for _, s := range r.man.Disks {
		if s.ID == diskID && (off < 0 || off+int64(len(p)) > s.Size) {
			return fmt.Errorf("replica: base data [%d,+%d) outside disk %q", off, len(p), s.Name)
		}
	}
	if _, err := f.WriteAt(p, off); err != nil {
		return err
	}
	if r.cfg.Observer != nil {
		r.cfg.Observer.ObserveBase(diskID, off, p)
	}
	// Start writing it back now: EndBase's fsync then finds little left,
	// and the disk works while the network does. Advisory: an error here
	// changes nothing (the fsync reports real ones).
	unix.SyncFileRange(int(f.Fd()), off, int64(len(p)), unix.SYNC_FILE_RANGE_WRITE)
	return nil
}

// EndBase marks the initial copy complete: the replica is consistent from
// endSeq on (the source's last sequence when its copy finished).
func (r *Replica) EndBase(endSeq uint64) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, f := range r.images {
		if err := f.Sync(); err != nil {
			return fmt.Errorf("sync replica image: %w", err)
		}
	}
	r.man.ConsistentSeq = max(endSeq, r.man.BaseSeq-1, 1)
	return r.saveManifest()
}

// NextSeq is the sequence number the replica wants next, or 0 if it needs
// an initial copy first.
func (r *Replica) NextSeq() uint64 {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if r.j == nil || r.man.ConsistentSeq == 0 {
		return 0
	}
	return r.j.LastSeq() + 1
}

// Append appends entries from the source, in order (the first must be
// NextSeq, or BaseSeq during the initial copy). They are not durable, and
// must not be acknowledged, until Commit.
func (r *Replica) Append(es []*journal.Entry) error {
	r.mu.RLock()
	j, committed := r.j, r.man.CommittedTo
	r.mu.RUnlock()
	if committed != "" {
		return fmt.Errorf("%w: to group %s", ErrCommitted, committed)
	}
	if j == nil {
		return ErrNotReady
	}
	if _, err := j.AppendCopies(es); err != nil {
		return err
	}
	if r.cfg.Observer != nil {
		r.cfg.Observer.ObserveEntries(es)
	}
	return nil
}

// Commit makes everything appended before the call durable, indexes it
// and returns the last sequence number it made durable: only then may the
// sender treat it as acknowledged. Appends may run concurrently; what
// they add is left to the next Commit.
func (r *Replica) Commit(ctx context.Context) (uint64, error) {
	r.mu.RLock()
	j := r.j
	r.mu.RUnlock()
	if j == nil {
		return 0, ErrNotReady
	}
	last := j.LastSeq()
	if err := j.SyncTo(ctx, last); err != nil {
		return 0, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.j != j {
		return 0, fmt.Errorf("%w: replica was reset or closed during commit", ErrNotReady)
	}
	if err := r.indexNew(last); err != nil {
		return 0, err
	}
	return last, nil
}

// Receive is Append then Commit.
func (r *Replica) Receive(ctx context.Context, es []*journal.Entry) (uint64, error) {
	if err := r.Append(es); err != nil {
		return 0, err
	}
	return r.Commit(ctx)
}

// Disks returns the replica's disks.
func (r *Replica) Disks() []disk.Spec {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return append([]disk.Spec(nil), r.man.Disks...)
}

// Status describes the replica.
type Status = api.ReplicaStatus

// Status returns the replica's state.
func (r *Replica) Status() Status {
	r.mu.RLock()
	defer r.mu.RUnlock()
	s := Status{Group: r.man.Group, Disks: r.man.Disks, BaseSeq: r.man.BaseSeq, ConsistentSeq: r.man.ConsistentSeq, FoldedSeq: r.man.FoldedSeq, Points: len(r.points)}
	if r.j != nil {
		s.LastSeq = r.j.LastSeq()
		s.JournalBytes = r.j.Size()
	}
	if r.last.Time != 0 {
		s.LastTime = time.Unix(0, r.last.Time).UTC()
	}
	for i := len(r.points) - 1; i >= 0 && (s.LastPoint.IsZero() || s.LastAppPoint.IsZero()); i-- {
		p := r.points[i]
		if p.Seq < r.firstViewable() || r.inGap(p.Seq) {
			continue
		}
		if s.LastPoint.IsZero() {
			s.LastPoint = p.Time
		}
		if p.Type == "app" && s.LastAppPoint.IsZero() {
			s.LastAppPoint = p.Time
		}
	}
	return s
}

// Points lists the recovery points in the catalog, oldest first, that
// views can be opened at (those from ConsistentSeq on).
func (r *Replica) Points() []Point {
	r.mu.RLock()
	defer r.mu.RUnlock()
	var out []Point
	for _, p := range r.points {
		if p.Seq >= r.firstViewable() && r.man.ConsistentSeq != 0 && !r.inGap(p.Seq) {
			out = append(out, p)
		}
	}
	return out
}

type gap struct{ from, to uint64 }

// inGap reports whether seq is inside a resynchronization (not a
// consistent state). Caller holds mu.
func (r *Replica) inGap(seq uint64) bool {
	for _, g := range r.gaps {
		if seq >= g.from && (g.to == 0 || seq < g.to) {
			return true
		}
	}
	return false
}

// firstViewable is the oldest sequence a view can show. Caller holds mu.
func (r *Replica) firstViewable() uint64 {
	return max(r.man.ConsistentSeq, r.man.FoldedSeq, r.man.FoldingTo)
}

// Close closes the replica.
func (r *Replica) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closeData()
	return nil
}

// Changes calls fn for every part of the disks that entries after seq
// after changed, among those the replica received, and returns the last
// sequence received. A reprotect uses it to know what the old source
// sent after the failover point. It fails with ErrNoPoint when after is
// older than the index remembers (folded into the images, or before the
// replica became consistent).
func (r *Replica) Changes(after uint64, fn func(disk string, off, n int64)) (last uint64, err error) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if r.j == nil || r.man.ConsistentSeq == 0 {
		return 0, ErrNotReady
	}
	if first := r.firstViewable(); after < first {
		return 0, fmt.Errorf("%w: changes after %d: the replica only knows them after %d", ErrNoPoint, after, first)
	}
	for _, s := range r.man.Disks {
		x := r.idx[s.ID]
		if x == nil {
			continue
		}
		for b, vs := range x.blocks {
			if len(vs) > 0 && vs[len(vs)-1].seq > after {
				fn(s.Name, b*BlockSize, min(BlockSize, s.Size-b*BlockSize))
			}
		}
		for _, op := range x.ranges {
			if op.seq > after {
				fn(s.Name, op.off, op.end-op.off)
			}
		}
	}
	return r.j.LastSeq(), nil
}
