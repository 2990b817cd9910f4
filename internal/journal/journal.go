// Package journal is ferry's write journal: an ordered, checksummed,
// append-only log of every write applied to the disks of one consistency
// group, split into segment files of bounded size.
//
// The order of entries is the order in which the writes were applied, so
// every prefix of the journal is a state the disks could have had after a
// crash. Durability is explicit: Append puts an entry in the operating
// system's page cache; Sync makes every appended entry durable, sharing one
// fsync among all concurrent callers (group commit). Open recovers from a
// crash by cutting the journal at the first entry that is torn or corrupt.
//
// The on-disk format is specified in docs/journal-format.md.
package journal

import (
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math/bits"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Options configure a Journal.
type Options struct {
	// Dir holds the segment files. It is created if missing.
	Dir string
	// SegmentSize is the size past which the active segment is sealed and a
	// new one started. Default 64 MiB.
	SegmentSize int64
	// Now is the clock used to stamp entries. Default time.Now.
	Now func() time.Time
	// Logger receives recovery reports. Default: discard.
	Logger *slog.Logger
	// FirstSeq is the sequence number of the first entry of a new, empty
	// journal (default 1). A replica starts where its source's journal
	// stood when the initial copy began.
	FirstSeq uint64
	// Recycle is how many trimmed segment files are kept for reuse instead
	// of being deleted (default 2; negative: none). Overwriting a file whose
	// blocks are allocated and often still in the page cache is several
	// times cheaper than appending to a new one, and its fdatasync need not
	// update file-system metadata. More than a couple costs memory: after a
	// soft checkpoint a trimmed file's pages are still dirty, and a deleted
	// file's dirty pages are dropped, where a kept one's count towards the
	// kernel's write-back threshold (32 kept files once pushed a 2 GiB
	// disk's writes past it: 1.0-1.7 GB/s of write-back for data already
	// trimmed, and half the write rate).
	Recycle int
	// ReadOnly opens an existing journal only to read it: nothing is
	// created, cut, synced or removed, and every append fails with
	// ErrReadOnly. Recovery then reports what a writable open would cut
	// (a torn tail) without cutting it.
	ReadOnly bool
}

// Recovery says what Open found and did.
type Recovery struct {
	Segments       int    // segment files kept
	FirstSeq       uint64 // first entry kept (0 if empty)
	LastSeq        uint64 // last entry kept (0 if empty)
	TruncatedBytes int64  // bytes cut from the tail
	DroppedFiles   int    // whole segment files removed after the cut
	Reason         string // why the tail was cut, "" if it was clean
	// Damage, when Open fails with ErrDamaged, says where: nothing was
	// cut or removed.
	Damage *Damage
}

// Damage locates corruption that is not a torn tail: a bad entry in a
// segment other than the newest, a gap between segments, or a bad entry
// in the newest segment followed by valid later entries.
type Damage struct {
	Segment  string // file name of the segment
	Offset   int64  // byte offset of the first bad entry in it
	FirstSeq uint64 // the journal's entries from FirstSeq ...
	LastSeq  uint64 // ... to LastSeq are intact and before the damage
	// After is the first valid sequence number found after the damage (0
	// if none): the entries from there on are intact too.
	After  uint64
	Reason string
}

func (d *Damage) String() string {
	s := fmt.Sprintf("segment %s at offset %d: %s; entries %d..%d before it are intact", d.Segment, d.Offset, d.Reason, d.FirstSeq, d.LastSeq)
	if d.After != 0 {
		s += fmt.Sprintf(", and valid entries follow from %d", d.After)
	}
	return s
}

type segment struct {
	firstSeq uint64
	path     string
	// size is the number of valid bytes, published after each append so
	// that readers never see a half-written entry.
	size atomic.Int64
	// lastSeq is the sequence before the one that follows the segment:
	// the last entry's, or the last skipped one's when it ends with a skip
	// (firstSeq-1 when empty).
	lastSeq atomic.Uint64
	sealed  atomic.Bool
}

type pendingFile struct {
	firstSeq uint64
	f        *os.File
}

// Journal is an open journal. Its methods are safe for concurrent use.
type Journal struct {
	opts Options
	log  *slog.Logger

	mu     sync.Mutex
	segs   []*segment // ascending firstSeq; last is active
	active *os.File
	// pending: sealed segment files not yet fsynced. Trim closes those of
	// the segments it drops: a trimmed segment never needs its sync, and
	// a journal that is never synced (a stream without FLUSH) must not
	// keep a descriptor per segment it ever wrote.
	pending []pendingFile
	dirty   bool   // a segment file was created since the directory was synced
	next    uint64 // next sequence to assign
	closed  bool
	failed  error
	notify  chan struct{} // closed and replaced on append when waiters is set
	waiters bool
	// restartAt is where numbering resumes when recovery removed every
	// segment; 0 means from 1.
	restartAt uint64
	lock      *os.File            // flock held while open
	free      []string            // recyclable segment files
	rfMu      sync.Mutex          // guards readFiles (not mu: reads must not wait for appends)
	readFiles map[uint64]*os.File // ReadData handles by segment

	syncMu   sync.Mutex
	syncCond *sync.Cond
	syncing  bool
	durable  uint64 // every entry with Seq <= durable is on stable storage
	syncErr  error

	lastTime int64 // the newest entry's time: no entry is stamped before it

	// Reused by AppendBatch under mu.
	hdrs   []byte
	iov    [][]byte
	iovecs []unix.Iovec
}

const (
	segSuffix  = ".seg"
	freeSuffix = ".free"
)

func segName(firstSeq uint64) string { return fmt.Sprintf("%020d%s", firstSeq, segSuffix) }

// Open opens or creates the journal in opts.Dir, recovering from a crash:
// it scans every segment, and cuts the journal at the first entry that is
// torn, fails its checksum or breaks the sequence, removing what follows.
// What it did is returned in Recovery.
func Open(opts Options) (_ *Journal, _ Recovery, err error) {
	if opts.SegmentSize <= 0 {
		opts.SegmentSize = 64 << 20
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Recycle == 0 {
		opts.Recycle = 2
	}
	j := &Journal{opts: opts, log: opts.Logger, notify: make(chan struct{})}
	j.syncCond = sync.NewCond(&j.syncMu)
	if opts.ReadOnly {
		return openReadOnly(j)
	}
	if err := os.MkdirAll(opts.Dir, 0o700); err != nil {
		return nil, Recovery{}, fmt.Errorf("create journal dir: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(opts.Dir, "LOCK"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, Recovery{}, fmt.Errorf("open journal lock: %w", err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, Recovery{}, fmt.Errorf("%w: %s (stop the process using it first)", ErrLocked, opts.Dir)
		}
		return nil, Recovery{}, fmt.Errorf("lock journal: %w", err)
	}
	j.lock = lock
	defer func() {
		if err != nil {
			lock.Close()
		}
	}()
	rec, err := j.recover()
	if err != nil {
		return nil, rec, err
	}
	if len(j.segs) == 0 {
		first := max(j.restartAt, opts.FirstSeq, 1)
		if err := j.startSegment(first); err != nil {
			return nil, rec, err
		}
		j.next = first
	} else {
		last := j.segs[len(j.segs)-1]
		j.next = last.lastSeq.Load() + 1
		f, err := os.OpenFile(last.path, os.O_RDWR, 0)
		if err != nil {
			return nil, rec, fmt.Errorf("open active segment: %w", err)
		}
		j.active = f
	}
	// Everything that survived recovery is on disk (recover synced it).
	j.durable = j.next - 1
	if !opts.ReadOnly && j.next > 1 && j.segs[0].firstSeq < j.next {
		// New entries are never stamped before the last one, even if the
		// clock is behind after a restart (package clock).
		if t, err := j.EntryTime(j.next - 1); err == nil {
			j.lastTime = t
		}
	}
	return j, rec, nil
}

func listSegments(dir string) ([]*segment, error) {
	names, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("list journal dir: %w", err)
	}
	var segs []*segment
	for _, de := range names {
		name := de.Name()
		if !strings.HasSuffix(name, segSuffix) {
			continue
		}
		n, err := strconv.ParseUint(strings.TrimSuffix(name, segSuffix), 10, 64)
		if err != nil || n == 0 {
			continue
		}
		segs = append(segs, &segment{firstSeq: n, path: filepath.Join(dir, name)})
	}
	slices.SortFunc(segs, func(a, b *segment) int { return cmp.Compare(a.firstSeq, b.firstSeq) })
	return segs, nil
}

// recover scans all segments in order and cuts at the first bad entry.
func (j *Journal) recover() (Recovery, error) {
	var rec Recovery
	segs, err := listSegments(j.opts.Dir)
	if err != nil {
		return rec, err
	}
	free, _ := filepath.Glob(filepath.Join(j.opts.Dir, "*"+freeSuffix))
	for _, f := range free {
		if len(j.free) < j.opts.Recycle {
			j.free = append(j.free, f)
		} else {
			os.Remove(f)
		}
	}
	expect := uint64(0) // next expected seq; 0 = take the first segment's
	cut := -1           // index of the segment holding the cut
	var cutAt int64
	damage := func(s *segment, off int64, after uint64, reason string) (Recovery, error) {
		d := &Damage{Segment: filepath.Base(s.path), Offset: off, LastSeq: expect - 1, After: after, Reason: reason}
		if len(segs) > 0 {
			d.FirstSeq = segs[0].firstSeq
		}
		rec.Damage = d
		j.log.Error("journal damaged: nothing was cut", "dir", j.opts.Dir, "damage", d.String())
		return rec, fmt.Errorf("%w: %s", ErrDamaged, d)
	}
	for i, s := range segs {
		if expect != 0 && s.firstSeq != expect {
			// A gap (or overlap) between segments is never a torn tail.
			return damage(s, 0, s.firstSeq, fmt.Sprintf("the segment starts at %d, want %d", s.firstSeq, expect))
		}
		valid, last, reason, err := scanSegment(s)
		if err != nil {
			return rec, err
		}
		s.size.Store(valid)
		s.lastSeq.Store(last)
		expect = last + 1
		if reason != "" {
			// Only the newest segment may end torn: a crash can tear what
			// was being written, never what a later segment followed.
			if i < len(segs)-1 {
				if segs[i+1].firstSeq == expect {
					// The next segment starts right after the last
					// valid entry: this one was sealed there, and what
					// follows is a recycled file's stale bytes, cut
					// mid-entry.
					continue
				}
				return damage(s, valid, segs[i+1].firstSeq, reason)
			}
			if after, ok := laterEntry(s.path, valid, expect); ok {
				return damage(s, valid, after, reason)
			}
			cut, cutAt = i, valid
			rec.Reason = reason
			break
		}
	}
	if cut >= 0 && j.opts.ReadOnly {
		// Report what a writable open would cut; touch nothing.
		fi, err := os.Stat(segs[cut].path)
		if err == nil {
			rec.TruncatedBytes = fi.Size() - max(cutAt, 0)
		}
		cut = -1
	}
	if cut >= 0 {
		keep, drop := segs[:cut+1], segs[cut+1:]
		if cutAt < SegmentHeaderSize { // nothing usable in segs[cut] at all
			keep, drop = segs[:cut], segs[cut:]
		}
		if len(keep) == 0 {
			// Continue numbering where the lost segment began, so that
			// sequence numbers are never reused.
			j.restartAt = segs[cut].firstSeq
		}
		if cutAt >= SegmentHeaderSize {
			fi, err := os.Stat(segs[cut].path)
			if err != nil {
				return rec, fmt.Errorf("stat segment: %w", err)
			}
			rec.TruncatedBytes += fi.Size() - cutAt
			if err := truncateSync(segs[cut].path, cutAt); err != nil {
				return rec, err
			}
		}
		for _, s := range drop {
			if fi, err := os.Stat(s.path); err == nil {
				rec.TruncatedBytes += fi.Size()
			}
			if err := os.Remove(s.path); err != nil {
				return rec, fmt.Errorf("remove segment after cut: %w", err)
			}
			rec.DroppedFiles++
		}
		segs = keep
		if err := syncDir(j.opts.Dir); err != nil {
			return rec, err
		}
		j.log.Warn("journal tail cut during recovery", "reason", rec.Reason,
			"truncated_bytes", rec.TruncatedBytes, "dropped_files", rec.DroppedFiles)
	}
	// Make everything kept durable: a crash may have left it only in the page
	// cache of a previous incarnation, which is gone, but we cannot know what
	// the disk holds unless we sync it now.
	for _, s := range segs {
		if j.opts.ReadOnly {
			break
		}
		if err := syncFile(s.path); err != nil {
			return rec, err
		}
	}
	for i, s := range segs {
		s.sealed.Store(i < len(segs)-1)
	}
	j.segs = segs
	rec.Segments = len(segs)
	if len(segs) > 0 {
		rec.FirstSeq = segs[0].firstSeq
		rec.LastSeq = segs[len(segs)-1].lastSeq.Load()
		if rec.LastSeq < rec.FirstSeq {
			rec.FirstSeq, rec.LastSeq = 0, 0
		}
	}
	return rec, nil
}

// scanSegment validates s entry by entry. It returns the length of the valid
// prefix, the last valid seq (firstSeq-1 if none) and, if the segment does not
// end cleanly, why.
func scanSegment(s *segment) (valid int64, last uint64, reason string, err error) {
	f, err := os.Open(s.path)
	if err != nil {
		return 0, 0, "", fmt.Errorf("open segment %s: %w", s.path, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return 0, 0, "", fmt.Errorf("stat segment: %w", err)
	}
	size := fi.Size()
	last = s.firstSeq - 1 // (for the early returns below)
	hb := make([]byte, SegmentHeaderSize)
	if _, err := f.ReadAt(hb, 0); err != nil {
		return 0, last, "segment header torn", nil
	}
	first, err := decodeSegmentHeader(hb)
	if err != nil {
		return 0, last, err.Error(), nil
	}
	if first != s.firstSeq {
		return 0, last, fmt.Sprintf("segment header says first seq %d, name says %d", first, s.firstSeq), nil
	}
	r := newEntryScanner(f, SegmentHeaderSize, size)
	expect := s.firstSeq
	for {
		e, n, err := r.next()
		if err != nil {
			if err == errEOF || r.zeroAt(r.off) {
				// The end of the file, or of the data in a preallocated
				// one: a clean end.
				return r.off, expect - 1, "", nil
			}
			return r.off, expect - 1, fmt.Sprintf("at offset %d: %v", r.off, err), nil
		}
		if e.Seq < expect {
			// A whole entry from the file's previous life as another
			// segment (it was recycled): the data ends here.
			return r.off, expect - 1, "", nil
		}
		if e.Seq != expect {
			return r.off, expect - 1, fmt.Sprintf("at offset %d: seq %d, want %d", r.off, e.Seq, expect), nil
		}
		expect = e.NextSeq()
		r.off += n
	}
}

func (j *Journal) startSegment(firstSeq uint64) error {
	s := &segment{firstSeq: firstSeq, path: filepath.Join(j.opts.Dir, segName(firstSeq))}
	flags := os.O_RDWR | os.O_CREATE | os.O_TRUNC
	if n := len(j.free); n > 0 {
		// Reuse a trimmed file: stale entries past the new tail are told
		// apart by their sequence numbers (always lower than this
		// segment's), so recovery never mistakes them for new ones.
		if err := os.Rename(j.free[n-1], s.path); err == nil {
			flags = os.O_RDWR
		}
		j.free = j.free[:n-1]
	}
	f, err := os.OpenFile(s.path, flags, 0o600)
	if err != nil {
		return fmt.Errorf("create segment %d: %w", firstSeq, err)
	}
	fail := func(err error) error {
		f.Close()
		os.Remove(s.path) // no half-made segment for recovery to find
		return err
	}
	// Allocate the whole segment up front: writing into allocated blocks
	// costs a fraction of extending a file block by block (measured here:
	// 6 GB/s against 0.5-1.2 GB/s). The zeros after the data read as the
	// end of the segment (docs/journal-format.md).
	if err := unix.Fallocate(int(f.Fd()), 0, 0, j.opts.SegmentSize); err != nil &&
		!errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.ENOSYS) {
		return fail(fmt.Errorf("preallocate segment %d: %w", firstSeq, err))
	}
	if _, err := f.WriteAt(encodeSegmentHeader(firstSeq, j.opts.Now().UnixNano()), 0); err != nil {
		return fail(fmt.Errorf("write segment %d header: %w", firstSeq, err))
	}
	s.size.Store(SegmentHeaderSize)
	s.lastSeq.Store(firstSeq - 1)
	if j.active != nil {
		j.pending = append(j.pending, pendingFile{j.segs[len(j.segs)-1].firstSeq, j.active})
		j.segs[len(j.segs)-1].sealed.Store(true)
	}
	j.active = f
	j.segs = append(j.segs, s)
	j.dirty = true
	return nil
}

// Append records e at the end of the journal, assigning e.Seq and e.Time,
// and returns the sequence number. The entry is in the page cache, not yet
// durable: call Sync. e.Data is not retained. Append fails with ErrInvalid
// for a malformed entry, ErrClosed after Close and ErrFailed after an I/O
// error; a failed Append records nothing.
func (j *Journal) Append(e *Entry) (uint64, error) {
	one := [1]*Entry{e}
	return j.AppendBatch(one[:])
}

// AppendBatch records the entries in order as Append does, with as few
// writes as possible, and returns the sequence number of the last. Either
// all are recorded or, on error, none is valid (ErrInvalid: nothing
// written; ErrFailed: the journal refuses all further work).
func (j *Journal) AppendBatch(es []*Entry) (uint64, error) {
	return j.appendBatch(es, false, nil)
}

// AppendBatchLocs is AppendBatch that also sets locs[i] to where the
// payload of es[i] lies, for ReadData (len(locs) must be len(es)). The
// locations are valid once AppendBatchLocs returns without error, until
// the entry is trimmed.
func (j *Journal) AppendBatchLocs(es []*Entry, locs []Loc) (uint64, error) {
	if len(locs) != len(es) {
		return 0, fmt.Errorf("%w: %d locations for %d entries", ErrInvalid, len(locs), len(es))
	}
	return j.appendBatch(es, false, locs)
}

// AppendCopies appends entries taken from another journal (a replica
// receiving its source's journal), keeping their Seq and Time: the first
// must be LastSeq()+1 and the rest must follow densely, else ErrInvalid
// and nothing is written.
func (j *Journal) AppendCopies(es []*Entry) (uint64, error) {
	return j.appendBatch(es, true, nil)
}

func (j *Journal) appendBatch(es []*Entry, keep bool, locs []Loc) (uint64, error) {
	for _, e := range es {
		if e.Kind == KindSkip && (!keep || e.Offset <= e.Seq || e.Length != 0) {
			return 0, fmt.Errorf("%w: skip entries are only copied, with Offset > Seq", ErrInvalid)
		}
		if !e.Kind.valid() || len(e.Data) > MaxPayload ||
			(e.Kind == KindWrite || e.Kind == KindMarker) && int(e.Length) != len(e.Data) ||
			(e.Kind == KindZero || e.Kind == KindTrim) && len(e.Data) != 0 {
			return 0, fmt.Errorf("%w: kind %s length %d payload %d", ErrInvalid, e.Kind, e.Length, len(e.Data))
		}
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.closed {
		return 0, ErrClosed
	}
	if j.failed != nil {
		return 0, j.failed
	}
	if keep {
		want := j.next
		for _, e := range es {
			if e.Seq != want {
				return 0, fmt.Errorf("%w: copied entry has seq %d, want %d", ErrInvalid, e.Seq, want)
			}
			want = e.NextSeq()
		}
	}
	now := max(j.opts.Now().UnixNano(), j.lastTime)
	if !keep {
		j.lastTime = now
	}
	if need := EntryHeaderSize * len(es); cap(j.hdrs) < need {
		j.hdrs = make([]byte, need)
	}
	for i := 0; i < len(es); {
		seg := j.segs[len(j.segs)-1]
		off := seg.size.Load()
		end := off
		iov := j.iov[:0]
		first := i
		// Entries that fit in the active segment, up to the kernel's
		// iovec limit.
		for ; i < len(es) && len(iov) < 1000; i++ {
			e := es[i]
			n := int64(EntryHeaderSize + len(e.Data))
			if end > SegmentHeaderSize && end+n > j.opts.SegmentSize {
				break
			}
			if !keep {
				e.Seq = j.next + uint64(i-first)
				e.Time = now
			}
			h := j.hdrs[i*EntryHeaderSize : (i+1)*EntryHeaderSize]
			encodeHeader(h, e)
			if locs != nil {
				locs[i] = Loc{Seg: seg.firstSeq, Off: end + EntryHeaderSize}
			}
			iov = append(iov, h)
			if len(e.Data) > 0 {
				iov = append(iov, e.Data)
			}
			end += n
		}
		j.iov = iov
		if i == first {
			if err := j.startSegment(j.next); err != nil {
				// Nothing was written and the new file is gone: the
				// journal is as it was, so a later append (once space
				// is freed) may succeed. The error keeps its cause
				// (ENOSPC reaches the guest as ENOSPC).
				return 0, fmt.Errorf("append seq %d: %w", j.next, err)
			}
			continue
		}
		if err := j.writeFullv(iov, off, end-off); err != nil {
			// Leave no half entry behind for a reader. If the file is
			// cut back cleanly and the cause is space (ENOSPC, EDQUOT,
			// EFBIG), the journal is exactly as before the append: the
			// error is returned (the guest sees ENOSPC) and a later
			// append, once space is freed, goes on. Otherwise the
			// journal cannot go on past an unknown state.
			terr := j.active.Truncate(off)
			if terr == nil && spaceError(err) {
				return 0, fmt.Errorf("append seq %d: %w", j.next, err)
			}
			j.failed = fmt.Errorf("%w: append seq %d: %w", ErrFailed, j.next, err)
			return 0, j.failed
		}
		j.next = es[i-1].NextSeq()
		seg.lastSeq.Store(j.next - 1)
		seg.size.Store(end)
	}
	if j.waiters {
		close(j.notify)
		j.notify = make(chan struct{})
		j.waiters = false
	}
	return j.next - 1, nil
}

// spaceError reports whether err says the file system (or a limit) has no
// room: nothing is wrong with what was written before.
func spaceError(err error) bool {
	return errors.Is(err, unix.ENOSPC) || errors.Is(err, unix.EDQUOT) || errors.Is(err, unix.EFBIG)
}

// writeFullv writes all of iov (want bytes) at off in the active
// segment. Caller holds mu.
func (j *Journal) writeFullv(iov [][]byte, off, want int64) error {
	f := j.active
	n, err := j.pwritev(int(f.Fd()), iov, off)
	if err != nil {
		return err
	}
	if int64(n) == want {
		return nil
	}
	// Short writes to a regular file happen only near ENOSPC; finish the
	// rest plainly and let the error, if any, come from there.
	var flat []byte
	for _, b := range iov {
		flat = append(flat, b...)
	}
	_, err = f.WriteAt(flat[n:], off+int64(n))
	return err
}

// pwritev is unix.Pwritev on j.iovecs: that one makes its iovec array
// anew at every call, two or three allocations per append of a burst of
// small writes. Caller holds mu.
func (j *Journal) pwritev(fd int, iov [][]byte, off int64) (int, error) {
	vs := j.iovecs[:0]
	for _, b := range iov {
		if len(b) == 0 {
			continue
		}
		v := unix.Iovec{Base: &b[0]}
		v.SetLen(len(b))
		vs = append(vs, v)
	}
	j.iovecs = vs
	if len(vs) == 0 {
		return 0, nil
	}
	defer clear(vs) // no payload kept reachable from the scratch
	for {
		n, _, errno := unix.Syscall6(unix.SYS_PWRITEV, uintptr(fd), uintptr(unsafe.Pointer(&vs[0])), uintptr(len(vs)), uintptr(off), uintptr(uint64(off)>>(bits.UintSize/2)>>(bits.UintSize/2)), 0)
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return 0, errno
		}
		return int(n), nil
	}
}

// LastSeq returns the sequence number of the last appended entry, 0 if none.
func (j *Journal) LastSeq() uint64 {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.next - 1
}

// FirstSeq returns the sequence number of the oldest entry still in the
// journal (after trimming), or LastSeq()+1 if the journal holds none.
func (j *Journal) FirstSeq() uint64 {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.segs[0].firstSeq
}

// DurableSeq returns the highest sequence known to be on stable storage.
func (j *Journal) DurableSeq() uint64 {
	j.syncMu.Lock()
	defer j.syncMu.Unlock()
	return j.durable
}

// Sync makes every entry appended before the call durable. Concurrent calls
// share fsyncs: one caller syncs on behalf of all that are waiting. Sync does
// not return before durability even if ctx is done (an fsync cannot be
// abandoned halfway); ctx only stops a caller that is still waiting for
// another's fsync. After an fsync error every later call fails with
// ErrFailed.
func (j *Journal) Sync(ctx context.Context) error {
	j.mu.Lock()
	target := j.next - 1
	j.mu.Unlock()
	return j.SyncTo(ctx, target)
}

// SyncTo makes every entry with Seq <= seq durable; see Sync.
func (j *Journal) SyncTo(ctx context.Context, seq uint64) error {
	j.syncMu.Lock()
	defer j.syncMu.Unlock()
	for j.durable < seq {
		if j.syncErr != nil {
			return j.syncErr
		}
		if j.syncing {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			j.syncCond.Wait()
			continue
		}
		j.syncing = true
		j.syncMu.Unlock()
		upto, err := j.syncOnce()
		j.syncMu.Lock()
		j.syncing = false
		if err != nil {
			j.syncErr = err
		} else if upto > j.durable {
			j.durable = upto
		}
		j.syncCond.Broadcast()
	}
	return nil
}

// syncOnce fsyncs everything appended so far and returns the seq it covers.
func (j *Journal) syncOnce() (uint64, error) {
	j.mu.Lock()
	if j.failed != nil {
		j.mu.Unlock()
		return 0, j.failed
	}
	if j.closed {
		j.mu.Unlock()
		return 0, ErrClosed
	}
	upto := j.next - 1
	pending := j.pending
	j.pending = nil
	active := j.active
	dirty := j.dirty
	j.dirty = false
	j.mu.Unlock()

	fail := func(err error) (uint64, error) {
		err = fmt.Errorf("%w: %w", ErrFailed, err)
		j.mu.Lock()
		j.failed = err
		j.mu.Unlock()
		return 0, err
	}
	for _, p := range pending {
		f := p.f
		if err := unix.Fdatasync(int(f.Fd())); err != nil {
			return fail(fmt.Errorf("fsync sealed segment: %w", err))
		}
		f.Close()
	}
	if err := unix.Fdatasync(int(active.Fd())); err != nil {
		return fail(fmt.Errorf("fsync active segment: %w", err))
	}
	if dirty {
		if err := syncDir(j.opts.Dir); err != nil {
			return fail(err)
		}
	}
	return upto, nil
}

// Trim removes whole segments all of whose entries have Seq < seq. The
// active segment is never removed. Open readers keep reading what they hold
// open. Trim is idempotent.
func (j *Journal) Trim(seq uint64) error {
	j.mu.Lock()
	var drop []*segment
	for len(j.segs) > 1 && j.segs[1].firstSeq <= seq {
		drop = append(drop, j.segs[0])
		j.rfMu.Lock()
		if f := j.readFiles[j.segs[0].firstSeq]; f != nil {
			f.Close()
			delete(j.readFiles, j.segs[0].firstSeq)
		}
		j.rfMu.Unlock()
		j.pending = slices.DeleteFunc(j.pending, func(p pendingFile) bool {
			if p.firstSeq == j.segs[0].firstSeq {
				p.f.Close()
				return true
			}
			return false
		})
		j.segs = j.segs[1:]
	}
	j.mu.Unlock()
	for _, s := range drop {
		j.mu.Lock()
		recycle := len(j.free) < j.opts.Recycle && !j.closed
		j.mu.Unlock()
		if recycle {
			free := strings.TrimSuffix(s.path, segSuffix) + freeSuffix
			if err := os.Rename(s.path, free); err == nil {
				j.mu.Lock()
				j.free = append(j.free, free)
				j.mu.Unlock()
				continue
			}
		}
		if err := os.Remove(s.path); err != nil && !os.IsNotExist(err) {
			return fmt.Errorf("trim segment %d: %w", s.firstSeq, err)
		}
	}
	return nil
}

// Close syncs and closes the journal. Readers fail with ErrClosed when they
// would wait for new entries.
func (j *Journal) Close() error {
	var err error
	if !j.opts.ReadOnly {
		err = j.Sync(context.Background())
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.closed {
		return nil
	}
	j.closed = true
	close(j.notify)
	j.rfMu.Lock()
	for _, f := range j.readFiles {
		f.Close()
	}
	j.readFiles = nil
	j.rfMu.Unlock()
	if j.opts.ReadOnly { // nothing written, nothing to sync or cut
		if j.lock != nil {
			j.lock.Close()
		}
		return nil
	}
	for _, p := range j.pending {
		p.f.Close()
	}
	// A recycled active segment has stale bytes past its end; cut them so a
	// clean reopen finds a clean tail.
	if err == nil {
		if terr := j.active.Truncate(j.segs[len(j.segs)-1].size.Load()); terr == nil {
			_ = j.active.Sync()
		}
	}
	if cerr := j.active.Close(); err == nil && cerr != nil {
		err = cerr
	}
	j.lock.Close()
	if err == ErrClosed {
		err = nil
	}
	return err
}

// Segments returns the first sequence numbers of the segments on disk.
func (j *Journal) Segments() []uint64 {
	j.mu.Lock()
	defer j.mu.Unlock()
	out := make([]uint64, len(j.segs))
	for i, s := range j.segs {
		out[i] = s.firstSeq
	}
	return out
}

// Size returns the bytes of journal held on disk.
func (j *Journal) Size() int64 {
	j.mu.Lock()
	defer j.mu.Unlock()
	var n int64
	for _, s := range j.segs {
		n += s.size.Load()
	}
	return n
}

// SizeAfter returns the bytes of the segments that hold only entries
// after seq: a lower bound of what a holder at seq+1 keeps on disk,
// exact to within the one segment that holds both seq and later entries
// (which may be mostly entries up to seq: counting it whole made a large
// active segment look like lag). It counts whole segments, the unit Trim
// frees.
func (j *Journal) SizeAfter(seq uint64) int64 {
	j.mu.Lock()
	defer j.mu.Unlock()
	var n int64
	for _, s := range j.segs {
		if s.firstSeq > seq && s.lastSeq.Load() >= s.firstSeq {
			n += s.size.Load()
		}
	}
	return n
}

func truncateSync(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("open segment for truncate: %w", err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		return fmt.Errorf("truncate segment: %w", err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync truncated segment: %w", err)
	}
	return nil
}

func syncFile(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", path, err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", path, err)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open dir %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync dir %s: %w", dir, err)
	}
	return nil
}

// laterEntry looks for an intact entry with a sequence number of at least
// minSeq anywhere after off in the segment at path: if there is one, the
// bad bytes at off are corruption in the middle, not a torn tail, and
// cutting there would drop entries that may have been acknowledged. Stale
// entries of a recycled file have lower sequence numbers and do not count.
func laterEntry(path string, off int64, minSeq uint64) (uint64, bool) {
	f, err := os.Open(path)
	if err != nil {
		return 0, false
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return 0, false
	}
	const chunk = 4 << 20
	buf := make([]byte, chunk+EntryHeaderSize)
	for base := off + 1; base < fi.Size(); base += chunk {
		n, _ := f.ReadAt(buf, base)
		if n < EntryHeaderSize {
			return 0, false
		}
		b := buf[:n]
		for i := 0; i < chunk && i+EntryHeaderSize <= len(b); i++ {
			// Cheap rejections first: kind, sequence range, size.
			if k := Kind(b[i+4]); !k.valid() {
				continue
			}
			seq := binary.LittleEndian.Uint64(b[i+8:])
			if seq < minSeq || seq > minSeq+1<<32 {
				continue
			}
			d, err := decodeHeader(b[i : i+EntryHeaderSize])
			at := base + int64(i)
			if err != nil || at+EntryHeaderSize+int64(d.payloadLen) > fi.Size() {
				continue
			}
			whole := make([]byte, EntryHeaderSize+int(d.payloadLen))
			if _, err := f.ReadAt(whole, at); err != nil {
				continue
			}
			if e, _, err := DecodeEntry(whole); err == nil {
				return e.Seq, true
			}
		}
	}
	return 0, false
}

// openReadOnly opens an existing journal for reading only.
func openReadOnly(j *Journal) (*Journal, Recovery, error) {
	if _, err := os.Stat(j.opts.Dir); err != nil {
		return nil, Recovery{}, fmt.Errorf("no journal in %s: %w", j.opts.Dir, err)
	}
	// A shared lock, if the journal has a lock file: a writer holding it
	// is told apart from a crashed one.
	if lock, err := os.Open(filepath.Join(j.opts.Dir, "LOCK")); err == nil {
		if err := unix.Flock(int(lock.Fd()), unix.LOCK_SH|unix.LOCK_NB); err != nil {
			lock.Close()
			if errors.Is(err, unix.EWOULDBLOCK) {
				return nil, Recovery{}, fmt.Errorf("%w: %s (stop the process using it first)", ErrLocked, j.opts.Dir)
			}
			return nil, Recovery{}, fmt.Errorf("lock journal: %w", err)
		}
		j.lock = lock
	}
	rec, err := j.recover()
	if err != nil {
		if j.lock != nil {
			j.lock.Close()
		}
		return nil, rec, err
	}
	if len(j.segs) == 0 {
		if j.lock != nil {
			j.lock.Close()
		}
		return nil, rec, fmt.Errorf("no journal in %s: no segment", j.opts.Dir)
	}
	last := j.segs[len(j.segs)-1]
	j.next = last.lastSeq.Load() + 1
	j.durable = j.next - 1
	j.failed = ErrReadOnly
	return j, rec, nil
}
