package journal

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
)

var errEOF = errors.New("end of valid data")

// entryScanner reads entries from a segment file between off and limit
// through a buffer. Entry.Data aliases the buffer until the next call.
type entryScanner struct {
	f     *os.File
	off   int64 // file offset of the next entry
	limit int64 // bytes of the file that may be read
	buf   []byte
	bOff  int64 // file offset of buf[0]
	bLen  int   // valid bytes in buf
}

func newEntryScanner(f *os.File, off, limit int64) *entryScanner {
	return &entryScanner{f: f, off: off, limit: limit, buf: make([]byte, 1<<20)}
}

// window makes bytes [off, off+n) available and returns them.
func (s *entryScanner) window(off int64, n int) ([]byte, error) {
	if off+int64(n) > s.limit {
		return nil, errEOF
	}
	if off >= s.bOff && off+int64(n) <= s.bOff+int64(s.bLen) {
		i := int(off - s.bOff)
		return s.buf[i : i+n], nil
	}
	if n > len(s.buf) {
		s.buf = make([]byte, n+EntryHeaderSize)
	}
	want := min(int64(len(s.buf)), s.limit-off)
	m, err := s.f.ReadAt(s.buf[:want], off)
	if m < n {
		if err == nil || err == io.EOF {
			err = errEOF
		}
		return nil, err
	}
	s.bOff, s.bLen = off, m
	return s.buf[:n], nil
}

// zeroAt reports whether a whole entry header's worth of zero bytes starts
// at off (the unwritten end of a preallocated segment).
func (s *entryScanner) zeroAt(off int64) bool {
	b, err := s.window(off, EntryHeaderSize)
	if err != nil {
		// Fewer than a header's bytes left: zero if all that remain are.
		n := s.limit - off
		if n <= 0 || n >= EntryHeaderSize {
			return false
		}
		b = make([]byte, n)
		if _, err := s.f.ReadAt(b, off); err != nil {
			return false
		}
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// next decodes the entry at s.off without advancing; the caller adds n.
// A partial entry before limit yields an error that is not errEOF.
func (s *entryScanner) next() (Entry, int64, error) {
	if s.off == s.limit {
		return Entry{}, 0, errEOF
	}
	h, err := s.window(s.off, EntryHeaderSize)
	if err == errEOF {
		return Entry{}, 0, fmt.Errorf("%w: torn entry header", ErrCorrupt)
	} else if err != nil {
		return Entry{}, 0, err
	}
	d, err := decodeHeader(h)
	if err != nil {
		return Entry{}, 0, err
	}
	n := EntryHeaderSize + int(d.payloadLen)
	b, err := s.window(s.off, n)
	if err == errEOF {
		return Entry{}, 0, fmt.Errorf("%w: torn entry seq %d", ErrCorrupt, d.e.Seq)
	} else if err != nil {
		return Entry{}, 0, err
	}
	if err := d.verify(b, b[EntryHeaderSize:]); err != nil {
		return Entry{}, 0, err
	}
	e := d.e
	if d.payloadLen > 0 {
		e.Data = b[EntryHeaderSize:n]
	}
	return e, int64(n), nil
}

// Reader streams entries in order from a starting sequence number. A Reader
// is not safe for concurrent use; many Readers may read one Journal at once
// and alongside Append.
type Reader struct {
	j    *Journal
	seg  *segment
	f    *os.File
	sc   *entryScanner
	next uint64 // next seq to return
	last Loc    // where the payload of the entry returned last lies
}

// Loc locates an entry's payload on disk: the segment (by its first
// sequence number) and the byte offset of the payload in its file.
type Loc struct {
	Seg uint64
	Off int64
}

// Loc returns where the payload of the entry returned last lies, for
// ReadData.
func (r *Reader) Loc() Loc { return r.last }

// NewReader returns a Reader positioned at entry from (at least 1). It fails
// with ErrTrimmed if from is older than the oldest entry kept. from may be
// LastSeq()+1, in which case Next waits for the next append.
func (j *Journal) NewReader(from uint64) (*Reader, error) {
	if from == 0 {
		from = 1
	}
	j.mu.Lock()
	if j.closed {
		j.mu.Unlock()
		return nil, ErrClosed
	}
	if next := j.next; from > next {
		j.mu.Unlock()
		return nil, fmt.Errorf("journal: reader from seq %d beyond last %d", from, next-1)
	}
	if first := j.segs[0].firstSeq; from < first {
		j.mu.Unlock()
		return nil, fmt.Errorf("%w: want seq %d, oldest kept is %d", ErrTrimmed, from, first)
	}
	var seg *segment
	for _, s := range j.segs {
		if s.firstSeq <= from {
			seg = s
		}
	}
	j.mu.Unlock()
	r := &Reader{j: j, next: from}
	if err := r.open(seg); err != nil {
		return nil, err
	}
	return r, nil
}

func (r *Reader) open(s *segment) error {
	f, err := os.Open(s.path)
	if err != nil {
		if os.IsNotExist(err) {
			return fmt.Errorf("%w: segment %d removed", ErrTrimmed, s.firstSeq)
		}
		return fmt.Errorf("open segment %d: %w", s.firstSeq, err)
	}
	if r.f != nil {
		r.f.Close()
	}
	r.seg, r.f = s, f
	if r.sc == nil {
		r.sc = newEntryScanner(f, SegmentHeaderSize, s.size.Load())
	} else {
		r.sc.f, r.sc.off, r.sc.limit, r.sc.bOff, r.sc.bLen = f, SegmentHeaderSize, s.size.Load(), 0, 0
	}
	return nil
}

// Next returns the next entry, waiting for one to be appended if needed until
// ctx is done. Entry.Data is valid until the next call. It returns ErrClosed
// if the journal is closed while waiting and an ErrCorrupt error if the bytes
// on disk are damaged.
func (r *Reader) Next(ctx context.Context) (Entry, error) {
	for {
		e, ok, err := r.TryNext()
		if err != nil || ok {
			return e, err
		}
		if err := r.wait(ctx); err != nil {
			return Entry{}, err
		}
	}
}

// TryNext returns the next entry if one is there, without waiting.
func (r *Reader) TryNext() (Entry, bool, error) {
	for {
		sealed := r.seg.sealed.Load()
		limit := r.seg.size.Load()
		if r.sc.off < limit {
			r.sc.limit = limit
			e, n, err := r.sc.next()
			if err != nil {
				return Entry{}, false, fmt.Errorf("read segment %d at %d: %w", r.seg.firstSeq, r.sc.off, err)
			}
			r.last = Loc{Seg: r.seg.firstSeq, Off: r.sc.off + EntryHeaderSize}
			r.sc.off += n
			if e.Seq < r.next {
				// Seeking to the start position; a skip may jump over it.
				if e.Kind == KindSkip && e.Offset > r.next {
					r.next = e.Offset
				}
				continue
			}
			if e.Seq != r.next {
				return Entry{}, false, fmt.Errorf("%w: seq %d where %d expected", ErrCorrupt, e.Seq, r.next)
			}
			r.next = e.NextSeq()
			return e, true, nil
		}
		if !sealed {
			return Entry{}, false, nil
		}
		nextSeg := r.j.segmentAt(r.next)
		if nextSeg == nil || nextSeg == r.seg {
			return Entry{}, false, fmt.Errorf("%w: no segment holds seq %d", ErrTrimmed, r.next)
		}
		if err := r.open(nextSeg); err != nil {
			return Entry{}, false, err
		}
	}
}

func (r *Reader) wait(ctx context.Context) error {
	j := r.j
	j.mu.Lock()
	if j.closed {
		j.mu.Unlock()
		return ErrClosed
	}
	if j.next > r.next {
		j.mu.Unlock()
		return nil
	}
	j.waiters = true
	ch := j.notify
	j.mu.Unlock()
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// segmentAt returns the segment whose range starts at seq, or nil.
func (j *Journal) segmentAt(seq uint64) *segment {
	j.mu.Lock()
	defer j.mu.Unlock()
	for _, s := range j.segs {
		if s.firstSeq == seq {
			return s
		}
	}
	return nil
}

// Close releases the reader's file.
func (r *Reader) Close() error {
	if r.f == nil {
		return nil
	}
	err := r.f.Close()
	r.f = nil
	return err
}

// ReadData reads len(p) bytes of payload at loc (from Reader.Loc) plus off.
// The caller must make sure the segment is not trimmed meanwhile (hold it).
// Safe for concurrent use.
func (j *Journal) ReadData(loc Loc, p []byte, off int64) error {
	f, err := j.segFile(loc.Seg)
	if err != nil {
		return err
	}
	if _, err := f.ReadAt(p, loc.Off+off); err != nil {
		return fmt.Errorf("read journal data in segment %d: %w", loc.Seg, err)
	}
	return nil
}

// segFile returns a cached read-only handle of a live segment.
func (j *Journal) segFile(first uint64) (*os.File, error) {
	j.rfMu.Lock()
	f := j.readFiles[first]
	j.rfMu.Unlock()
	if f != nil {
		return f, nil
	}
	j.mu.Lock()
	path := ""
	for _, s := range j.segs {
		if s.firstSeq == first {
			path = s.path
			break
		}
	}
	closed := j.closed
	j.mu.Unlock()
	if closed {
		return nil, ErrClosed
	}
	if path == "" {
		return nil, fmt.Errorf("%w: segment %d", ErrTrimmed, first)
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open segment %d: %w", first, err)
	}
	j.rfMu.Lock()
	defer j.rfMu.Unlock()
	if g := j.readFiles[first]; g != nil { // opened meanwhile
		f.Close()
		return g, nil
	}
	if j.readFiles == nil {
		j.readFiles = map[uint64]*os.File{}
	}
	j.readFiles[first] = f
	return f, nil
}

// EntryTime returns the time entry seq was appended. It reads from the
// start of the entry's segment, so it is for status reports, not hot paths.
func (j *Journal) EntryTime(seq uint64) (int64, error) {
	r, err := j.NewReader(seq)
	if err != nil {
		return 0, err
	}
	defer r.Close()
	e, ok, err := r.TryNext()
	if err != nil {
		return 0, err
	}
	if !ok {
		return 0, fmt.Errorf("journal: no entry %d yet", seq)
	}
	return e.Time, nil
}
