// Package disk implements ferry's write-capturing disks: a consistency
// group of sparse raw disk images that share one write journal.
//
// Every write, zero and trim to any disk of a group is appended to the
// group's journal under one lock, so the journal order is exactly the
// order in which the disks changed. Recent writes of whole blocks live
// only in the journal, found through a block index (index.go); the rest
// is applied to the disk's sparse image at once. The images are written
// through the page cache and are not fsynced on FLUSH: the journal is the
// write-ahead log. FLUSH and FUA make the journal durable (one
// group-committed fdatasync of a sequential file). A checkpoint folds the
// index into the images, fsyncs them, records the journal sequence they
// contain, and lets the journal drop segments that are no longer needed.
// After a crash, Open replays the journal from the last checkpoint into
// the images, so every write acknowledged as durable is there again.
//
// docs/architecture.md ("Write path") says why recent writes are not
// written to the image at once.
package disk

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/atomicfile"
	"github.com/ferry-dr/ferry/internal/journal"
	"golang.org/x/sys/unix"
)

// Sentinel errors.
var (
	ErrUnknownDisk = errors.New("disk: unknown disk")
	ErrExists      = errors.New("disk: already exists")
	ErrFailed      = errors.New("disk: group failed")
	ErrClosed      = errors.New("disk: group closed")
	ErrRange       = errors.New("disk: out of range")
)

// Spec describes one disk of a group.
type Spec = api.DiskSpec

// Config configures a Group.
type Config struct {
	// Dir holds the manifest, the images and the journal.
	Dir string
	// SegmentSize of the journal (default 64 MiB).
	SegmentSize int64
	// CheckpointInterval is how often the background loop checkpoints;
	// 0: only when CheckpointBytes were journaled.
	CheckpointInterval time.Duration
	// CheckpointBytes: the background loop also checkpoints as soon as this
	// many bytes were journaled since the last checkpoint (default 64 MiB).
	// Small is fast: trimmed segments are recycled while their pages are
	// still cached (and, after a soft checkpoint, still dirty), so the
	// journal's page-cache footprint stays near twice this size
	// (docs/benchmarks.md has the measurements); it also bounds the
	// replay after a crash.
	CheckpointBytes int64
	// OpenBase opens the base of a layered group (one a commit created);
	// nil if the caller has none.
	OpenBase func(ref BaseRef) (Base, error)
	// FoldRate bounds the background folds, in bytes per second (default
	// 128 MiB/s; negative: unbounded): a layered group's fold into a
	// plain image, and the background checkpoint's fold of recent writes
	// while the guest writes (an idle group's goes at full speed).
	FoldRate int64
	// NoFold keeps Start from running the background fold: tests drive
	// it with FoldStep.
	NoFold bool
	// NoWriteBehind sends writes that no FLUSH follows to the images at
	// once, as before write-behind (behind.go); tests of that path set it.
	NoWriteBehind bool
	// MaxUnfolded bounds the bytes of recent writes kept only in the
	// journal (index.go); past it, writes go to the images at once until
	// a checkpoint folds the backlog. 0: 4 GiB; negative: every write goes
	// to the image at once.
	MaxUnfolded int64
	// FoldIdle: the background loop folds the backlog once no write came
	// for this long (default 1 s; negative: never, only by size).
	FoldIdle time.Duration
	Logger   *slog.Logger
	Now      func() time.Time
}

type manifest struct {
	// Version 1: plain images; 2: Base is set (older ferry must not open
	// a layered group as if its top layers were whole images).
	Version    int    `json:"version"`
	Disks      []Spec `json:"disks"`
	AppliedSeq uint64 `json:"applied_seq"`
	// SoftSeq, when above AppliedSeq, records a soft checkpoint: every
	// entry up to it was in the images' page cache (not fsynced) when the
	// journal before it was trimmed, and no entry after AppliedSeq was
	// ever acknowledged as durable. The journal may then begin anywhere up
	// to SoftSeq+1 (docs/architecture.md, "Soft checkpoints").
	SoftSeq uint64 `json:"soft_seq,omitempty"`
	// Base: the disks are layered over this base until the fold is done.
	Base *BaseRef `json:"base,omitempty"`
}

// Group is an open consistency group.
type Group struct {
	cfg Config
	log *slog.Logger
	j   *journal.Journal

	// mu orders journal appends: an entry is appended and indexed or
	// applied while mu is held, so the disks' reads always equal the
	// journal replayed to LastSeq.
	mu     sync.Mutex
	disks  map[uint16]*Disk
	man    manifest
	failed error
	// unapplied: the failure was applying this entry to its image, and
	// the journal holds it and the rest; Resume can apply them in place.
	unapplied uint64
	// ackedUnapplied: that failure came after a batch was acknowledged
	// early (WriteAtBatchJournaled), so reads fail until Resume.
	ackedUnapplied atomic.Bool
	// ackedApplying: a batch acknowledged once journaled is being applied
	// (set and cleared under mu); Flush then waits for mu.
	ackedApplying atomic.Bool
	closed        bool
	appended      int64        // journal bytes appended since the last checkpoint began
	lastWrite     atomic.Int64 // UnixNano of the last append, for the idle fold
	// total counts the journal bytes appended since the group opened, and
	// flushMark is total at the last Flush: writes are indexed only while
	// Flushes keep the journal's pages clean (Group.indexing).
	total, flushMark atomic.Int64

	ckptMu sync.Mutex // one checkpoint at a time
	// manMu is held by every change of the manifest, before mu, so that
	// the manifest's fsync runs without mu: writes go on meanwhile (a
	// soft checkpoint every 64 MiB of writes held them up by 8 % of the
	// time). It also orders a soft checkpoint's decision against Flush: a
	// Flush that synced the journal takes it before it answers, so either
	// its sync came first (and the checkpoint sees the journal durable
	// past AppliedSeq and goes hard) or it sees the soft state and hardens
	// it.
	manMu sync.Mutex
	// promised is the highest sequence a Flush made durable: what a FLUSH
	// or FUA may have acknowledged. A checkpoint's own journal sync is not
	// a promise (it covers entries appended after its fold, and counting
	// it would keep every later checkpoint hard under steady writes).
	promised atomic.Uint64
	// soft is set (under manMu) before a soft checkpoint reads promised,
	// and cleared once no soft state is left, so a Flush that finds it
	// clear skips manMu: a Flush stores promised and then loads soft, a
	// soft checkpoint stores soft and then loads promised, and of two
	// such pairs one always sees the other's store.
	soft atomic.Bool
	// urgent counts unpaced checkpoints waiting: a paced fold then stops
	// pacing, so an explicit Checkpoint never waits on the rate.
	urgent atomic.Int32
	hurry  chan struct{} // wakes a pacing fold when urgent rises

	holdMu sync.Mutex
	holds  map[string]uint64

	observer func(e *journal.Entry) // sees every applied change, under mu

	// base of a layered group (nil when the images are plain); fold is
	// the background fold's progress.
	base     Base
	foldMu   sync.Mutex                 // one fold step at a time
	foldLeft atomic.Pointer[FoldStatus] // read by status without waiting for a step

	// The block indices of journal-only writes (index.go).
	idxMu    sync.RWMutex
	imgMu    sync.Mutex   // image writes: inline applies and the fold
	readMu   sync.RWMutex // reads of journal data (shared) vs. trims
	unfolded atomic.Int64 // bytes indexed
	locs     []journal.Loc
	foldBuf  []byte // under imgMu
	// foldItems is foldBlocks' scratch, under imgMu: the folder calls it
	// hundreds of times a second.
	foldItems []foldItem

	// Write-behind (behind.go): behindQ lists the blocks indexed since the
	// folder last took it, in journal order (under idxMu); behindKick
	// wakes the folder.
	behind     bool // fixed at Open
	behindQ    []behindItem
	behindKick chan struct{}
	// behindSpare is the queue's other array, for the folder to swap in.
	behindSpare []behindItem

	stop chan struct{}
	kick chan struct{} // asks the loop for a checkpoint now
	wg   sync.WaitGroup
}

// Disk is one disk of a group. It implements nbd.Device.
type Disk struct {
	g    *Group
	spec Spec
	// img is replaced once, when a fold ends, while reads may run.
	img atomic.Pointer[imageBox]
	// idx: block -> latest journal-only bytes (index.go), under g.idxMu;
	// nidx is len(idx), read without the lock.
	idx  map[int64]slot
	nidx atomic.Int64
}

type imageBox struct{ image }

func newDisk(g *Group, s Spec, img image) *Disk {
	d := &Disk{g: g, spec: s, idx: map[int64]slot{}}
	d.img.Store(&imageBox{img})
	return d
}

func (d *Disk) image() image { return d.img.Load().image }

// Open opens the group in cfg.Dir, creating the directory and manifest if
// needed, and replays the journal into the images past the last checkpoint.
func Open(cfg Config) (*Group, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.CheckpointBytes <= 0 {
		cfg.CheckpointBytes = 64 << 20
	}
	if err := os.MkdirAll(filepath.Join(cfg.Dir, "images"), 0o700); err != nil {
		return nil, fmt.Errorf("create group dir: %w", err)
	}
	g := &Group{cfg: cfg, log: cfg.Logger, disks: map[uint16]*Disk{}, holds: map[string]uint64{}, stop: make(chan struct{}), kick: make(chan struct{}, 1), hurry: make(chan struct{}, 1), behindKick: make(chan struct{}, 1)}
	g.behind = !cfg.NoWriteBehind && g.maxUnfolded() > 0
	if err := g.loadManifest(); err != nil {
		return nil, err
	}
	// An empty journal starts after what the images hold (a reseeded
	// group's are ahead of 0).
	j, rec, err := journal.Open(journal.Options{
		Dir: filepath.Join(cfg.Dir, "journal"), SegmentSize: cfg.SegmentSize, Now: cfg.Now, Logger: cfg.Logger,
		FirstSeq: max(g.man.AppliedSeq, g.man.SoftSeq) + 1,
	})
	if err != nil {
		return nil, fmt.Errorf("open journal: %w", err)
	}
	if rec.Reason != "" {
		g.log.Warn("journal recovered", "reason", rec.Reason, "last_seq", rec.LastSeq, "truncated_bytes", rec.TruncatedBytes)
	}
	g.j = j
	if err := g.openBase(); err != nil {
		j.Close()
		return nil, err
	}
	for _, s := range g.man.Disks {
		if err := g.openImage(s); err != nil {
			g.closeFiles()
			j.Close()
			return nil, err
		}
	}
	if err := g.replay(); err != nil {
		g.closeFiles()
		j.Close()
		return nil, err
	}
	return g, nil
}

func (g *Group) manifestPath() string { return filepath.Join(g.cfg.Dir, "group.json") }

// Failed returns the error that stopped the group, or nil: a failed group
// refuses every write until it is reopened (which replays its journal).
func (g *Group) Failed() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.failed
}

// Resume brings a group that failed applying a write to its image (a
// full file system) back into service in place, once there is room:
// the entries the images lack are applied from the journal, in order, and
// writes are taken again. It fails, changing nothing, while that still
// fails, and for any other failure (a failed fsync: only a reopen, which
// replays the journal, is safe). Resume of a group that did not fail does
// nothing.
func (g *Group) Resume() error {
	g.ckptMu.Lock() // a checkpoint's fold must not miss what Resume indexes
	defer g.ckptMu.Unlock()
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.failed == nil {
		return nil
	}
	if g.unapplied == 0 {
		return fmt.Errorf("%w: only a reopen (restart the agent) recovers from this failure", g.failed)
	}
	last := g.j.LastSeq()
	r, err := g.j.NewReader(g.unapplied)
	if err != nil {
		return fmt.Errorf("resume: %w", err)
	}
	defer r.Close()
	for seq := g.unapplied; seq <= last; seq++ {
		e, ok, err := r.TryNext()
		if err != nil || !ok {
			return fmt.Errorf("resume at %d: entry unreadable: %v", seq, err)
		}
		if err := g.applyEntry(&e, r.Loc()); err != nil {
			g.unapplied = seq
			return fmt.Errorf("resume at %d: %w", seq, err)
		}
	}
	g.log.Info("group resumed: the images caught up with the journal", "from", g.unapplied, "to", last)
	g.failed, g.unapplied = nil, 0
	g.ackedUnapplied.Store(false)
	return nil
}

// ErrNoGroup: the directory holds no disk group.
var ErrNoGroup = errors.New("disk: no group")

// ReadSpecs lists the disks of the group in dir without opening it:
// nothing is created, recovered or written (for tools that only look).
func ReadSpecs(dir string) ([]Spec, error) {
	b, err := os.ReadFile(filepath.Join(dir, "group.json"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w in %s", ErrNoGroup, dir)
	}
	if err != nil {
		return nil, err
	}
	var m manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("parse manifest in %s: %w", dir, err)
	}
	return m.Disks, nil
}

func (g *Group) loadManifest() error {
	b, err := os.ReadFile(g.manifestPath())
	if errors.Is(err, os.ErrNotExist) {
		g.man = manifest{Version: 1}
		return g.saveManifest(g.man)
	}
	if err != nil {
		return fmt.Errorf("read manifest: %w", err)
	}
	if err := json.Unmarshal(b, &g.man); err != nil {
		return fmt.Errorf("parse manifest %s: %w", g.manifestPath(), err)
	}
	if g.man.Version != 1 && g.man.Version != 2 {
		return fmt.Errorf("manifest %s: unsupported version %d", g.manifestPath(), g.man.Version)
	}
	return nil
}

// saveManifest writes m atomically and durably.
func (g *Group) saveManifest(m manifest) error {
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(g.manifestPath(), b, 0o600); err != nil {
		return fmt.Errorf("save manifest: %w", err)
	}
	return nil
}

func (g *Group) imagePath(name string) string {
	return filepath.Join(g.cfg.Dir, "images", name+".img")
}

func (g *Group) openImage(s Spec) error {
	if g.base != nil {
		return g.openLayered(s)
	}
	f, err := os.OpenFile(g.imagePath(s.Name), os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("open image of disk %q: %w", s.Name, err)
	}
	g.disks[s.ID] = newDisk(g, s, plainImage{f})
	return nil
}

// replay applies journal entries newer than the last checkpoint.
func (g *Group) replay() error {
	from := g.man.AppliedSeq + 1
	last := g.j.LastSeq()
	soft := g.man.SoftSeq > g.man.AppliedSeq
	if first := g.j.FirstSeq(); first > from && from <= last {
		// After a soft checkpoint the journal may begin later: what it
		// trimmed was in the images' page cache, and was never promised
		// durable (a power loss may lose it, as NBD allows).
		if !soft || first > g.man.SoftSeq+1 {
			return fmt.Errorf("journal starts at seq %d but the images hold only up to %d: entries are missing", first, max(g.man.AppliedSeq, g.man.SoftSeq))
		}
		from = first
	}
	if from > last {
		if soft { // leave no soft state behind an open
			return g.checkpoint(context.Background(), false)
		}
		return nil
	}
	r, err := g.j.NewReader(from)
	if err != nil {
		return fmt.Errorf("replay: %w", err)
	}
	defer r.Close()
	n := 0
	for seq := from; seq <= last; seq++ {
		e, ok, err := r.TryNext()
		if err != nil || !ok {
			return fmt.Errorf("replay seq %d: %v", seq, err)
		}
		if err := g.applyImage(&e); err != nil {
			return fmt.Errorf("replay seq %d: %w", seq, err)
		}
		n++
	}
	g.log.Info("journal replayed into images", "from", from, "to", last, "entries", n)
	return g.checkpoint(context.Background(), false)
}

// CreateDisk adds a disk of size bytes to the group and returns it. The
// image is a sparse file.
func (g *Group) CreateDisk(name string, size int64) (*Disk, error) {
	if name == "" || filepath.Base(name) != name || size <= 0 {
		return nil, fmt.Errorf("create disk %q size %d: invalid name or size", name, size)
	}
	g.manMu.Lock()
	defer g.manMu.Unlock()
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.base != nil {
		return nil, fmt.Errorf("%w: disk %q: the group's fold is still running", ErrExists, name)
	}
	var id uint16 = 1
	for _, s := range g.man.Disks {
		if s.Name == name {
			return nil, fmt.Errorf("%w: disk %q", ErrExists, name)
		}
		id = max(id, s.ID+1)
	}
	f, err := os.OpenFile(g.imagePath(name), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create image of disk %q: %w", name, err)
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return nil, fmt.Errorf("size image of disk %q: %w", name, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return nil, err
	}
	s := Spec{ID: id, Name: name, Size: size}
	m := g.man
	m.Disks = append(append([]Spec(nil), m.Disks...), s)
	if err := g.saveManifest(m); err != nil {
		f.Close()
		os.Remove(g.imagePath(name))
		return nil, err
	}
	g.man = m
	d := newDisk(g, s, plainImage{f})
	g.disks[id] = d
	return d, nil
}

// Disk returns the disk named name.
func (g *Group) Disk(name string) (*Disk, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, d := range g.disks {
		if d.spec.Name == name {
			return d, nil
		}
	}
	return nil, fmt.Errorf("%w: %q", ErrUnknownDisk, name)
}

// Disks lists the group's disks.
func (g *Group) Disks() []Spec {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]Spec(nil), g.man.Disks...)
}

// Journal returns the group's journal (for readers such as the shipper).
func (g *Group) Journal() *journal.Journal { return g.j }

// apply appends e to the journal and applies it to the image, in one step
// with respect to every other apply.
func (g *Group) apply(e *journal.Entry) (uint64, error) {
	one := [1]*journal.Entry{e}
	if err := g.applyBatch(one[:], nil); err != nil {
		return 0, err
	}
	return e.Seq, nil
}

// applyBatch appends es to the journal with one write and applies them to
// the images in order, in one step with respect to every other apply. If
// journaled is not nil, it is called between the two (with mu held): the
// writes may be acknowledged from then on (nbd.JournalingBatchWriter).
func (g *Group) applyBatch(es []*journal.Entry, journaled func()) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return ErrClosed
	}
	if g.failed != nil {
		return g.failed
	}
	if cap(g.locs) < len(es) {
		g.locs = make([]journal.Loc, len(es))
	}
	locs := g.locs[:len(es)]
	if _, err := g.j.AppendBatchLocs(es, locs); err != nil {
		return fmt.Errorf("journal %s: %w", es[0].Kind, err)
	}
	if journaled != nil {
		// Set before the acknowledgement, cleared once applied: a Flush
		// that follows the acknowledgement sees it.
		g.ackedApplying.Store(true)
		defer g.ackedApplying.Store(false)
		journaled()
	}
	for i, e := range es {
		g.appended += journal.EntryHeaderSize + int64(len(e.Data))
		g.total.Add(journal.EntryHeaderSize + int64(len(e.Data)))
		if g.observer != nil && e.Kind != journal.KindMarker {
			g.observer(e)
		}
		if err := g.applyEntry(e, locs[i]); err != nil {
			// The journal holds entries the image lacks, from this one
			// on: Resume applies them (once space is freed), or a reopen
			// replays them.
			g.unapplied = e.Seq
			if journaled != nil {
				// Acknowledged, and not in the image: reads must not
				// show the older bytes until Resume applies them.
				g.ackedUnapplied.Store(true)
			}
			g.failed = fmt.Errorf("%w: apply seq %d to image: %w; free space: the group resumes by itself (the agent retries every few seconds)", ErrFailed, e.Seq, err)
			return g.failed
		}
	}
	g.lastWrite.Store(g.cfg.Now().UnixNano())
	if g.unfolded.Load() >= behindFrom && g.writingBehind() {
		select {
		case g.behindKick <- struct{}{}:
		default:
		}
	}
	if g.wantCheckpoint() {
		select {
		case g.kick <- struct{}{}:
		default:
		}
	}
	return nil
}

func (g *Group) applyImage(e *journal.Entry) error {
	if e.Kind == journal.KindMarker {
		return nil
	}
	d := g.disks[e.Disk]
	if d == nil {
		return fmt.Errorf("%w: id %d", ErrUnknownDisk, e.Disk)
	}
	switch e.Kind {
	case journal.KindWrite:
		return d.image().WriteAt(e.Data, int64(e.Offset))
	case journal.KindZero, journal.KindTrim:
		return d.image().Zero(int64(e.Offset), int64(e.Length))
	}
	return nil
}

func fdatasync(f *os.File) error { return unix.Fdatasync(int(f.Fd())) }

// startSync starts the write-back of f's dirty pages (sync_file_range
// with SYNC_FILE_RANGE_WRITE: no wait, no metadata). Advisory: a file
// system without it just syncs later.
func startSync(f *os.File) { _ = unix.SyncFileRange(int(f.Fd()), 0, 0, unix.SYNC_FILE_RANGE_WRITE) }

// zeroRange makes the range read as zero, deallocating it where the file
// system can.
func zeroRange(f *os.File, off, n int64) error {
	if n == 0 {
		return nil
	}
	err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.ENOSYS) {
		return fmt.Errorf("punch hole: %w", err)
	}
	zero := make([]byte, min(n, 1<<20))
	for n > 0 {
		k := min(n, int64(len(zero)))
		if _, err := f.WriteAt(zero[:k], off); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

// Mark appends a marker entry (a recovery point) with payload p and returns
// its sequence number. It is not durable until Flush.
func (g *Group) Mark(p []byte) (uint64, error) {
	return g.apply(&journal.Entry{Kind: journal.KindMarker, Length: uint32(len(p)), Data: p})
}

// Flush makes every entry appended so far durable.
func (g *Group) Flush(ctx context.Context) error {
	// A batch acknowledged once journaled is applied under mu: waiting for
	// mu once makes every write acknowledged before this Flush began
	// visible to the reads after it, on any connection (multi-conn).
	// Only while such a batch is being applied: the wait held FLUSHes
	// behind every batch, for 5-20 % fewer of them (docs/benchmarks.md).
	if g.ackedApplying.Load() {
		g.mu.Lock()
		g.mu.Unlock() //nolint:staticcheck // an empty critical section: a barrier
	}
	last := g.j.LastSeq()
	if err := g.j.Sync(ctx); err != nil {
		return fmt.Errorf("flush journal: %w", err)
	}
	for p := g.promised.Load(); p < last && !g.promised.CompareAndSwap(p, last); p = g.promised.Load() {
	}
	g.flushMark.Store(g.total.Load())
	if !g.soft.Load() {
		return nil // the common case waits for no manifest write
	}
	return g.harden()
}

// harden turns a soft checkpoint into a hard one: the journal before
// SoftSeq is gone, so the images must hold those entries durably before a
// FLUSH that covers them is answered. The first Flush after a soft
// checkpoint pays the images' fsync, as a FLUSH to any write-back cache
// does; the others find nothing to do.
func (g *Group) harden() error {
	g.manMu.Lock()
	defer g.manMu.Unlock()
	g.mu.Lock()
	soft := g.man.SoftSeq
	if soft <= g.man.AppliedSeq {
		g.mu.Unlock()
		g.soft.Store(false) // a soft checkpoint that went hard
		return nil
	}
	disks := g.diskList()
	g.mu.Unlock()
	if err := g.syncImages(disks); err != nil {
		return err
	}
	if err := g.updateManifest(func(m *manifest) {
		m.AppliedSeq, m.SoftSeq = max(m.AppliedSeq, soft), 0
	}); err != nil {
		return fmt.Errorf("flush: %w", err)
	}
	g.soft.Store(false)
	return nil
}

// updateManifest applies change to a copy of the manifest, saves it
// durably without holding mu, and then makes it the group's. Caller holds
// manMu, not mu.
func (g *Group) updateManifest(change func(m *manifest)) error {
	g.mu.Lock()
	m := g.man
	g.mu.Unlock()
	change(&m)
	if err := g.saveManifest(m); err != nil {
		return err
	}
	g.mu.Lock()
	g.man = m
	g.mu.Unlock()
	return nil
}

// diskList returns the group's disks. Caller holds mu.
func (g *Group) diskList() []*Disk {
	disks := make([]*Disk, 0, len(g.disks))
	for _, d := range g.disks {
		disks = append(disks, d)
	}
	return disks
}

// syncImages fsyncs the images; a failure fails the group (the page
// cache may have dropped what it could not write).
func (g *Group) syncImages(disks []*Disk) error {
	for _, d := range disks {
		if err := d.image().Sync(); err != nil {
			g.mu.Lock()
			defer g.mu.Unlock()
			g.failed = fmt.Errorf("%w: fsync image %q: %w", ErrFailed, d.spec.Name, err)
			return g.failed
		}
	}
	return nil
}

// Hold keeps the journal from being trimmed at or after seq on behalf of
// holder (the replication shipper holds what it has not shipped). A seq of
// 0 releases the hold.
func (g *Group) Hold(holder string, seq uint64) {
	g.holdMu.Lock()
	defer g.holdMu.Unlock()
	if seq == 0 {
		delete(g.holds, holder)
		return
	}
	g.holds[holder] = seq
}

// HoldNext holds the journal from the next entry to be appended on behalf
// of holder and returns that sequence number. Taken under the group lock,
// it splits history exactly: every entry before it is already in what the
// disks read (ReadAt, DataRanges), every entry from it on is still in the
// journal. An initial copy of the disks starts with it.
func (g *Group) HoldNext(holder string) uint64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	next := g.j.LastSeq() + 1
	g.Hold(holder, next)
	return next
}

// Observe installs fn (nil removes it) to be called, in journal order and
// under the group's lock, with every write, zero and trim applied from now
// on, and returns the sequence number of the first entry it will see. The
// replication shipper uses it to keep a dirty-block bitmap once the journal
// may no longer grow. fn must be quick and must not call the group.
func (g *Group) Observe(fn func(e *journal.Entry)) uint64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.observer = fn
	return g.j.LastSeq() + 1
}

// AppendResync journals the current content of [off, off+n) of disk id as
// a write flagged journal.FlagResync, without changing the image, and
// returns its sequence number. Taken under the group's lock, the entry is
// ordered correctly with concurrent guest writes: it carries exactly the
// data the disk holds at its place in the journal.
func (g *Group) AppendResync(id uint16, off, n int64) (uint64, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.failed != nil {
		return 0, g.failed
	}
	d := g.disks[id]
	if d == nil {
		return 0, fmt.Errorf("%w: id %d", ErrUnknownDisk, id)
	}
	if err := d.check(off, n); err != nil {
		return 0, err
	}
	p := make([]byte, n)
	if err := d.ReadAt(context.Background(), p, off); err != nil {
		return 0, fmt.Errorf("resync read: %w", err)
	}
	e := journal.Entry{Kind: journal.KindWrite, Flags: journal.FlagResync, Disk: id, Offset: uint64(off), Length: uint32(n), Data: p}
	seq, err := g.j.Append(&e)
	if err != nil {
		return 0, err
	}
	g.appended += journal.EntryHeaderSize + n
	return seq, nil
}

// Checkpoint makes the images durable up to the journal's current end,
// records that in the manifest and trims journal segments no holder needs.
// It goes at full speed, and hurries a paced background checkpoint it
// waits for.
func (g *Group) Checkpoint(ctx context.Context) error {
	return g.checkpoint(ctx, false)
}

// checkpoint: paced, the fold goes at FoldRate while the guest writes.
func (g *Group) checkpoint(ctx context.Context, paced bool) error {
	if !paced {
		g.urgent.Add(1)
		defer g.urgent.Add(-1)
		select {
		case g.hurry <- struct{}{}:
		default:
		}
	}
	g.ckptMu.Lock()
	defer g.ckptMu.Unlock()
	if paced {
		select { // drop a token whose unpaced checkpoint ran already
		case <-g.hurry:
		default:
		}
	}
	t0, u0 := g.cfg.Now(), g.unfolded.Load()
	// every entry <= seq is in the images' page cache after the fold
	seq, err := g.foldIndex(ctx, paced)
	if err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	t1 := g.cfg.Now()
	defer func() {
		g.log.Debug("checkpoint", "seq", seq, "unfolded_before", u0, "unfolded_after", g.unfolded.Load(),
			"fold", t1.Sub(t0), "total", g.cfg.Now().Sub(t0))
	}()
	g.mu.Lock()
	if g.failed != nil {
		g.mu.Unlock()
		return g.failed
	}
	disks := g.diskList()
	m := g.man
	g.appended = 0
	// The maps of layered disks are taken with seq, before the sync: every
	// block they put in top got there by a write up to seq.
	maps := map[*Disk]BlockSet{}
	for _, d := range disks {
		if l, ok := d.image().(*layered); ok {
			maps[d] = l.snapshot()
		}
	}
	g.mu.Unlock()
	if seq == m.AppliedSeq && len(maps) == 0 || seq == m.SoftSeq && paced {
		return nil
	}
	if paced && len(maps) == 0 {
		if done, err := g.softCheckpoint(seq); done {
			return err
		}
	}
	if err := g.syncImages(disks); err != nil {
		return err
	}
	for d, s := range maps {
		if err := saveMap(g.mapPath(d.spec.Name), s); err != nil {
			return fmt.Errorf("checkpoint: %w", err)
		}
	}
	// The manifest must not claim entries that are not durable in the
	// journal either, or a crash could leave the image ahead of the log
	// that a replica replays.
	if err := g.j.SyncTo(ctx, seq); err != nil {
		return err
	}
	g.manMu.Lock()
	err = g.updateManifest(func(m *manifest) { m.AppliedSeq, m.SoftSeq = max(m.AppliedSeq, seq), 0 })
	if err == nil {
		g.soft.Store(false)
	}
	g.manMu.Unlock()
	if err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	return g.trim(seq)
}

// softCheckpoint records seq as a soft checkpoint and trims the journal
// before it, without an fsync, when no Flush made anything after
// AppliedSeq durable (no FLUSH or FUA since the last hard checkpoint): then
// nothing trimmed was promised, and a process crash keeps the page cache
// that holds it. done is false when the checkpoint must be hard.
//
// Why: a stream of writes without FLUSH (bench/nbd.sh write1m) otherwise
// pays an fsync of the images and the journal at every CheckpointBytes,
// writing each byte to the disk twice where a plain write-back server
// writes nothing until asked (docs/benchmarks.md).
func (g *Group) softCheckpoint(seq uint64) (done bool, err error) {
	g.manMu.Lock()
	defer g.manMu.Unlock()
	g.soft.Store(true) // before promised is read (see the field)
	g.mu.Lock()
	hard := g.promised.Load() > g.man.AppliedSeq || g.failed != nil
	g.mu.Unlock()
	if hard {
		return false, nil
	}
	if err := g.updateManifest(func(m *manifest) { m.SoftSeq = seq }); err != nil {
		return true, fmt.Errorf("soft checkpoint: %w", err)
	}
	return true, g.trim(seq)
}

// trim drops the journal before seq+1 that no holder needs.
func (g *Group) trim(seq uint64) error {
	keep := seq + 1
	g.holdMu.Lock()
	for _, h := range g.holds {
		keep = min(keep, h)
	}
	g.holdMu.Unlock()
	g.readMu.Lock() // no read is between its index lookup and its journal read
	defer g.readMu.Unlock()
	return g.j.Trim(keep)
}

// AppliedSeq is the journal sequence the images are durable up to.
func (g *Group) AppliedSeq() uint64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.man.AppliedSeq
}

// Start runs the background checkpoint loop: a checkpoint as soon as
// CheckpointBytes were journaled since the last, and every
// CheckpointInterval if that is set; and the write-behind folder
// (behind.go). Tests that drive checkpoints and folds step by step do not
// call Start.
func (g *Group) Start(ctx context.Context) {
	g.mu.Lock()
	layered := g.base != nil
	g.mu.Unlock()
	if layered && !g.cfg.NoFold {
		g.wg.Add(1)
		go func() {
			defer g.wg.Done()
			g.foldLoop(ctx)
		}()
	}
	if g.behind {
		g.wg.Add(1)
		go func() {
			defer g.wg.Done()
			g.behindLoop(ctx)
		}()
	}
	g.wg.Add(1)
	go func() {
		defer g.wg.Done()
		var tick, idle <-chan time.Time
		if g.cfg.CheckpointInterval > 0 {
			t := time.NewTicker(g.cfg.CheckpointInterval)
			defer t.Stop()
			tick = t.C
		}
		if g.cfg.FoldIdle >= 0 && g.maxUnfolded() > 0 {
			t := time.NewTicker(max(g.cfg.FoldIdle/2, 50*time.Millisecond))
			defer t.Stop()
			idle = t.C
		}
		for {
			select {
			case <-ctx.Done():
				return
			case <-g.stop:
				return
			case <-tick:
			case <-g.kick:
				// A kick sent while the last checkpoint ran, before it
				// reset the count, asks for nothing more.
				g.mu.Lock()
				want := g.wantCheckpoint()
				g.mu.Unlock()
				if !want {
					continue
				}
			case <-idle:
				if g.unfolded.Load() == 0 || g.cfg.Now().UnixNano()-g.lastWrite.Load() < int64(g.foldIdle()) {
					continue
				}
			}
			if err := g.checkpoint(ctx, true); err != nil && ctx.Err() == nil {
				g.log.Error("checkpoint failed", "err", err)
			}
		}
	}()
}

// Close stops the background loop, checkpoints and closes everything.
func (g *Group) Close() error {
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return nil
	}
	g.mu.Unlock()
	close(g.stop)
	g.wg.Wait()
	err := g.checkpoint(context.Background(), false)
	g.mu.Lock()
	g.closed = true
	g.mu.Unlock()
	g.closeFiles()
	if jerr := g.j.Close(); err == nil {
		err = jerr
	}
	return err
}

func (g *Group) closeFiles() {
	for _, d := range g.disks {
		d.image().Close()
	}
	if g.base != nil {
		g.base.Close()
	}
}

// Spec returns the disk's description.
func (d *Disk) Spec() Spec { return d.spec }

// Size returns the disk's size in bytes.
func (d *Disk) Size() int64 { return d.spec.Size }

func (d *Disk) check(off, n int64) error {
	if off < 0 || n < 0 || off+n > d.spec.Size || off+n < off {
		return fmt.Errorf("%w: [%d, +%d) of disk %q (size %d)", ErrRange, off, n, d.spec.Name, d.spec.Size)
	}
	return nil
}

// ReadAt reads len(p) bytes at off from the image.
func (d *Disk) ReadAt(_ context.Context, p []byte, off int64) error {
	if err := d.check(off, int64(len(p))); err != nil {
		return err
	}
	if d.g.ackedUnapplied.Load() {
		return fmt.Errorf("%w: acknowledged writes are not in the image yet; the group resumes once there is room", ErrFailed)
	}
	if d.nidx.Load() == 0 || len(p) == 0 {
		return d.image().ReadAt(p, off)
	}
	return d.readMerged(p, off)
}

// DataRanges calls fn, in order of offset, for the parts of the disk that
// may hold data: the holes of a sparse image, which read as zero, are
// left out (a layered disk reports all of it). A write that lands in a
// hole after it was skipped is in the journal: an initial copy, which
// holds the journal from its start, replays it.
func (d *Disk) DataRanges(fn func(off, n int64) error) error {
	p, ok := d.image().(plainImage)
	if !ok {
		return fn(0, d.spec.Size)
	}
	if d.nidx.Load() == 0 {
		return p.dataRanges(d.spec.Size, fn)
	}
	// Journal-only blocks are data too, whatever the image holds there.
	var rs [][2]int64
	if err := p.dataRanges(d.spec.Size, func(off, n int64) error {
		rs = append(rs, [2]int64{off, off + n})
		return nil
	}); err != nil {
		return err
	}
	for _, r := range unionRanges(rs, d.indexedRanges()) {
		if err := fn(r[0], r[1]-r[0]); err != nil {
			return err
		}
	}
	return nil
}

// WriteAt journals and applies a write.
func (d *Disk) WriteAt(_ context.Context, p []byte, off int64) error {
	if err := d.check(off, int64(len(p))); err != nil {
		return err
	}
	if len(p) > journal.MaxPayload {
		return fmt.Errorf("%w: write of %d bytes exceeds the journal's entry limit", ErrRange, len(p))
	}
	_, err := d.g.apply(&journal.Entry{Kind: journal.KindWrite, Disk: d.spec.ID, Offset: uint64(off), Length: uint32(len(p)), Data: p})
	return err
}

// WriteAtBatch journals ps[i] at offs[i] for all i with one journal
// append and applies them in order (nbd.BatchWriter). A range error
// rejects the whole batch before anything is journaled.
func (d *Disk) WriteAtBatch(_ context.Context, ps [][]byte, offs []int64) error {
	if len(ps) != len(offs) {
		return fmt.Errorf("%w: %d payloads for %d offsets", ErrRange, len(ps), len(offs))
	}
	return d.writeBatch(ps, offs, nil)
}

// WriteAtBatchJournaled is WriteAtBatch that calls journaled once the
// batch is in the journal, before it is applied to the image
// (nbd.JournalingBatchWriter). The group's Flush waits for that apply.
func (d *Disk) WriteAtBatchJournaled(_ context.Context, ps [][]byte, offs []int64, journaled func()) error {
	if len(ps) != len(offs) {
		return fmt.Errorf("%w: %d payloads for %d offsets", ErrRange, len(ps), len(offs))
	}
	return d.writeBatch(ps, offs, journaled)
}

func (d *Disk) writeBatch(ps [][]byte, offs []int64, journaled func()) error {
	for i, p := range ps {
		if err := d.check(offs[i], int64(len(p))); err != nil {
			return err
		}
	}
	b := batchPool.Get().(*batch)
	defer b.put()
	es, ptrs := b.grow(len(ps))
	for i, p := range ps {
		es[i] = journal.Entry{Kind: journal.KindWrite, Disk: d.spec.ID, Offset: uint64(offs[i]), Length: uint32(len(p)), Data: p}
		ptrs[i] = &es[i]
	}
	return d.g.applyBatch(ptrs, journaled)
}

// batch is the scratch of one WriteAtBatch: the entries of a burst of
// 4 KiB writes are otherwise two allocations a burst, and the garbage
// collector's share of the process grows with the write rate.
type batch struct {
	es   []journal.Entry // the entries in use: len is the batch's
	ptrs []*journal.Entry
}

var batchPool = sync.Pool{New: func() any { return new(batch) }}

func (b *batch) grow(n int) ([]journal.Entry, []*journal.Entry) {
	if cap(b.es) < n {
		b.es, b.ptrs = make([]journal.Entry, n), make([]*journal.Entry, n)
	}
	b.es, b.ptrs = b.es[:n], b.ptrs[:n]
	return b.es, b.ptrs
}

// put drops the payloads (they belong to the caller) and gives b back.
func (b *batch) put() {
	clear(b.es)
	clear(b.ptrs)
	batchPool.Put(b)
}

// WriteZeroes journals and applies a zeroing.
func (d *Disk) WriteZeroes(_ context.Context, off, n int64) error {
	return d.zeroLike(journal.KindZero, off, n)
}

// Trim journals and applies a discard; the range then reads as zero.
func (d *Disk) Trim(_ context.Context, off, n int64) error {
	return d.zeroLike(journal.KindTrim, off, n)
}

func (d *Disk) zeroLike(k journal.Kind, off, n int64) error {
	if err := d.check(off, n); err != nil {
		return err
	}
	for n > 0 { // an entry's length is 32 bits
		k32 := min(n, 1<<30)
		if _, err := d.g.apply(&journal.Entry{Kind: k, Disk: d.spec.ID, Offset: uint64(off), Length: uint32(k32)}); err != nil {
			return err
		}
		off += k32
		n -= k32
	}
	return nil
}

// Flush makes every write to any disk of the group durable.
func (d *Disk) Flush(ctx context.Context) error { return d.g.Flush(ctx) }
