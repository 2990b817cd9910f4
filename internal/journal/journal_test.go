package journal

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

func openT(tb testing.TB, dir string, segSize int64) *Journal {
	tb.Helper()
	j, _, err := Open(Options{Dir: dir, SegmentSize: segSize})
	if err != nil {
		tb.Fatalf("Open: %v", err)
	}
	tb.Cleanup(func() { j.Close() })
	return j
}

// payload returns deterministic bytes for entry i.
func payload(i int) []byte {
	n := 1 + (i*37)%900
	b := make([]byte, n)
	for k := range b {
		b[k] = byte(i*7 + k)
	}
	return b
}

func appendN(tb testing.TB, j *Journal, from, n int) {
	tb.Helper()
	for i := from; i < from+n; i++ {
		e := entryFor(i)
		if _, err := j.Append(&e); err != nil {
			tb.Fatalf("Append %d: %v", i, err)
		}
	}
}

func entryFor(i int) Entry {
	switch i % 5 {
	case 3:
		return Entry{Kind: KindZero, Disk: uint16(i % 3), Offset: uint64(i) * 512, Length: 4096}
	case 4:
		m := []byte(fmt.Sprintf("point-%d", i))
		return Entry{Kind: KindMarker, Length: uint32(len(m)), Data: m}
	default:
		d := payload(i)
		return Entry{Kind: KindWrite, Disk: uint16(i % 3), Offset: uint64(i) * 4096, Length: uint32(len(d)), Data: d}
	}
}

func checkEntries(tb testing.TB, j *Journal, from, to int) {
	tb.Helper()
	r, err := j.NewReader(uint64(from))
	if err != nil {
		tb.Fatalf("NewReader(%d): %v", from, err)
	}
	defer r.Close()
	for i := from; i <= to; i++ {
		got, ok, err := r.TryNext()
		if err != nil || !ok {
			tb.Fatalf("entry %d: ok=%v err=%v", i, ok, err)
		}
		want := entryFor(i - 1) // seq i holds entryFor(i-1)
		if got.Seq != uint64(i) || got.Kind != want.Kind || got.Disk != want.Disk ||
			got.Offset != want.Offset || got.Length != want.Length || !bytes.Equal(got.Data, want.Data) {
			tb.Fatalf("entry %d: got %+v", i, got)
		}
	}
	if e, ok, err := r.TryNext(); ok || err != nil {
		tb.Fatalf("after %d: got %+v ok=%v err=%v, want nothing", to, e.Seq, ok, err)
	}
}

func TestAppendReadAcrossSegments(t *testing.T) {
	dir := t.TempDir()
	j := openT(t, dir, 8<<10)
	appendN(t, j, 0, 500)
	if got := j.LastSeq(); got != 500 {
		t.Fatalf("LastSeq = %d, want 500", got)
	}
	if n := len(j.Segments()); n < 10 {
		t.Fatalf("segments = %d, want many with an 8 KiB segment size", n)
	}
	for _, from := range []int{1, 2, 17, 250, 499, 500} {
		checkEntries(t, j, from, 500)
	}
	if err := j.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := j.DurableSeq(); got != 500 {
		t.Fatalf("DurableSeq = %d, want 500", got)
	}
	j.Close()
	j2 := openT(t, dir, 8<<10)
	checkEntries(t, j2, 1, 500)
	appendN(t, j2, 500, 10)
	checkEntries(t, j2, 495, 510)
}

func TestAppendRejectsInvalid(t *testing.T) {
	j := openT(t, t.TempDir(), 0)
	tests := []Entry{
		{Kind: 0},
		{Kind: 9},
		{Kind: KindWrite, Length: 3, Data: []byte{1}},
		{Kind: KindZero, Length: 3, Data: []byte{1}},
		{Kind: KindMarker, Length: 0, Data: []byte{1}},
	}
	for _, e := range tests {
		if _, err := j.Append(&e); !errors.Is(err, ErrInvalid) {
			t.Errorf("Append(%+v) = %v, want ErrInvalid", e, err)
		}
	}
	if got := j.LastSeq(); got != 0 {
		t.Fatalf("LastSeq = %d after rejected appends, want 0", got)
	}
}

func TestReaderWaitsForAppend(t *testing.T) {
	j := openT(t, t.TempDir(), 4<<10)
	r, err := j.NewReader(1)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	done := make(chan error, 1)
	go func() {
		for i := 1; i <= 300; i++ {
			e, err := r.Next(context.Background())
			if err != nil {
				done <- err
				return
			}
			if e.Seq != uint64(i) {
				done <- fmt.Errorf("got seq %d, want %d", e.Seq, i)
				return
			}
		}
		done <- nil
	}()
	for i := 0; i < 300; i++ {
		appendN(t, j, i, 1)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := r.Next(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Next at end = %v, want deadline", err)
	}
}

func TestGroupCommitConcurrent(t *testing.T) {
	j := openT(t, t.TempDir(), 64<<10)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 200; i++ {
				e := Entry{Kind: KindWrite, Length: 512, Data: make([]byte, 512)}
				seq, err := j.Append(&e)
				if err != nil {
					errs <- err
					return
				}
				if i%4 == 0 {
					if err := j.Sync(context.Background()); err != nil {
						errs <- err
						return
					}
					if d := j.DurableSeq(); d < seq {
						errs <- fmt.Errorf("durable %d < own seq %d after Sync", d, seq)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if got := j.LastSeq(); got != 1600 {
		t.Fatalf("LastSeq = %d, want 1600", got)
	}
}

func TestTrim(t *testing.T) {
	dir := t.TempDir()
	j := openT(t, dir, 4<<10)
	appendN(t, j, 0, 200)
	segs := j.Segments()
	if len(segs) < 4 {
		t.Fatalf("want several segments, got %d", len(segs))
	}
	cut := segs[2] + 1 // inside the third segment: the first two go
	if err := j.Trim(cut); err != nil {
		t.Fatal(err)
	}
	if got := j.FirstSeq(); got != segs[2] {
		t.Fatalf("FirstSeq after Trim = %d, want %d", got, segs[2])
	}
	if _, err := j.NewReader(segs[2] - 1); !errors.Is(err, ErrTrimmed) {
		t.Fatalf("reader below trim: %v, want ErrTrimmed", err)
	}
	checkEntries(t, j, int(segs[2]), 200)
	// Trimming past the end keeps the active segment.
	if err := j.Trim(1 << 40); err != nil {
		t.Fatal(err)
	}
	if n := len(j.Segments()); n != 1 {
		t.Fatalf("segments after full trim = %d, want 1 (active)", n)
	}
	j.Close()
	j2 := openT(t, dir, 4<<10)
	if got := j2.LastSeq(); got != 200 {
		t.Fatalf("LastSeq after reopen = %d, want 200", got)
	}
	appendN(t, j2, 200, 1)
	if got := j2.LastSeq(); got != 201 {
		t.Fatalf("numbering did not continue: %d", got)
	}
}

func TestSizeAfter(t *testing.T) {
	j := openT(t, t.TempDir(), 4<<10)
	appendN(t, j, 0, 200)
	segs := j.Segments()
	if len(segs) < 4 {
		t.Fatalf("want several segments, got %d", len(segs))
	}
	tests := []struct {
		name string
		seq  uint64
		want int64
	}{
		{"before everything", 0, j.Size()},
		{"at the end", j.LastSeq(), 0},
		{"past the end", j.LastSeq() + 10, 0},
	}
	for _, tc := range tests {
		if got := j.SizeAfter(tc.seq); got != tc.want {
			t.Errorf("%s: SizeAfter(%d) = %d, want %d", tc.name, tc.seq, got, tc.want)
		}
	}
	// Inside the third segment: only the later ones count (the third
	// holds entries up to seq too), as from the seq just before the
	// fourth; trimming the first two leaves the figure as it was.
	in := segs[2] + 1
	got := j.SizeAfter(in)
	if got <= 0 || got >= j.Size() {
		t.Fatalf("SizeAfter(%d) = %d, want within (0, %d)", in, got, j.Size())
	}
	if from4 := j.SizeAfter(segs[3] - 1); from4 != got {
		t.Fatalf("SizeAfter(%d) = %d, SizeAfter(%d) = %d: want the same (the segments from the fourth)", in, got, segs[3]-1, from4)
	}
	if err := j.Trim(segs[2]); err != nil {
		t.Fatal(err)
	}
	if after := j.SizeAfter(in); after != got || j.Size() <= got {
		t.Fatalf("after Trim(%d): SizeAfter = %d (want %d), Size = %d (want more: the third segment)", segs[2], after, got, j.Size())
	}
}

// entryBounds returns the byte offsets at which each entry of a segment file
// starts, and the file size.
func entryBounds(tb testing.TB, path string) []int64 {
	tb.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		tb.Fatal(err)
	}
	var offs []int64
	off := SegmentHeaderSize
	for off < len(b) {
		if bytes.Count(b[off:min(off+EntryHeaderSize, len(b))], []byte{0}) == min(EntryHeaderSize, len(b)-off) {
			return append(offs, int64(off)) // preallocated zeros: data ends
		}
		offs = append(offs, int64(off))
		_, n, err := DecodeEntry(b[off:])
		if err != nil {
			tb.Fatalf("decode at %d: %v", off, err)
		}
		off += n
	}
	return append(offs, int64(len(b)))
}

func copyDir(tb testing.TB, src string) string {
	tb.Helper()
	dst := tb.TempDir()
	ents, _ := os.ReadDir(src)
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			tb.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, e.Name()), b, 0o600); err != nil {
			tb.Fatal(err)
		}
	}
	return dst
}

// TestRecoverTruncated cuts the last segment at every byte of its last
// entries and at every entry boundary: Open must keep exactly the whole
// entries before the cut.
func TestRecoverTruncated(t *testing.T) {
	base := t.TempDir()
	j := openT(t, base, 16<<10)
	appendN(t, j, 0, 120)
	j.Close()
	segs, _ := listSegments(base)
	last := segs[len(segs)-1]
	bounds := entryBounds(t, last.path)
	size := bounds[len(bounds)-1]
	lastBytes, err := os.ReadFile(last.path)
	if err != nil {
		t.Fatal(err)
	}
	cuts := map[int64]bool{0: true, 1: true, SegmentHeaderSize - 1: true, SegmentHeaderSize: true}
	for _, b := range bounds {
		for _, d := range []int64{-1, 0, 1, 4, EntryHeaderSize - 1, EntryHeaderSize, EntryHeaderSize + 1} {
			if c := b + d; c >= 0 && c <= size {
				cuts[c] = true
			}
		}
	}
	for c := bounds[len(bounds)-3]; c <= size; c++ { // every byte of the last two entries
		cuts[c] = true
	}
	for c := range cuts {
		dir := copyDir(t, base)
		if err := os.Truncate(filepath.Join(dir, filepath.Base(last.path)), c); err != nil {
			t.Fatal(err)
		}
		whole := 0 // whole entries before c in the last segment
		for _, b := range bounds[1:] {
			if b <= c && c >= SegmentHeaderSize {
				whole++
			}
		}
		wantLast := int(last.firstSeq) - 1 + whole
		j, rec, err := Open(Options{Dir: dir, SegmentSize: 16 << 10})
		if err != nil {
			t.Fatalf("cut %d: Open: %v", c, err)
		}
		if got := j.LastSeq(); got != uint64(wantLast) {
			t.Fatalf("cut %d: LastSeq = %d, want %d (rec %+v)", c, got, wantLast, rec)
		}
		clean := c == SegmentHeaderSize
		for _, b := range bounds {
			clean = clean || b == c
			// A cut that leaves only zero bytes of a header reads as
			// the zeros after a preallocated segment's data: clean. (The
			// CRC's first byte is 0 once in 256 runs.)
			if b < c && c-b < EntryHeaderSize && bytes.Count(lastBytes[b:c], []byte{0}) == int(c-b) {
				clean = true
			}
		}
		if clean == (rec.Reason != "") {
			t.Fatalf("cut %d of %d: recovery reason %q", c, size, rec.Reason)
		}
		checkEntries(t, j, 1, wantLast)
		// The journal goes on after recovery.
		appendN(t, j, wantLast, 3)
		checkEntries(t, j, 1, wantLast+3)
		j.Close()
	}
}

// TestRecoverCorrupt flips bytes in the header, the payload and the CRC of
// entries in a sealed segment and in the middle of the newest one: Open
// refuses with ErrDamaged, says where, and changes nothing on disk (before,
// it cut the journal there and dropped every entry after it, fsynced or
// not). Only damage to the newest segment's last entry, which a crash can
// leave, is cut as a torn tail. A read-only open reports the same damage.
func TestRecoverCorrupt(t *testing.T) {
	base := t.TempDir()
	j := openT(t, base, 16<<10)
	appendN(t, j, 0, 120)
	j.Close()
	segs, _ := listSegments(base)
	rng := rand.New(rand.NewPCG(1, 2))
	for _, si := range []int{0, len(segs) / 2, len(segs) - 1} {
		s := segs[si]
		bounds := entryBounds(t, s.path)
		newest := si == len(segs)-1
		for trial := 0; trial < 12; trial++ {
			k := rng.IntN(len(bounds) - 1) // entry index inside segment
			if trial == 11 && newest {
				k = len(bounds) - 2 // the newest entry: a torn tail
			}
			start, end := bounds[k], bounds[k+1]
			var at int64
			switch trial % 3 {
			case 0:
				at = start + rng.Int64N(4) // CRC
			case 1:
				at = start + 4 + rng.Int64N(EntryHeaderSize-4) // header fields
			default:
				at = start + rng.Int64N(end-start) // anywhere
			}
			dir := copyDir(t, base)
			p := filepath.Join(dir, filepath.Base(s.path))
			b, _ := os.ReadFile(p)
			b[at] ^= 0x5a
			os.WriteFile(p, b, 0o600)
			before := dirDigest(t, dir)
			want := int(s.firstSeq) - 1 + k
			if newest && k == len(bounds)-2 {
				j, rec, err := Open(Options{Dir: dir, SegmentSize: 16 << 10})
				if err != nil {
					t.Fatalf("torn newest entry, byte %d: %v", at, err)
				}
				if got := j.LastSeq(); got != uint64(want) || rec.Reason == "" {
					t.Fatalf("torn tail: LastSeq %d, want %d (%+v)", got, want, rec)
				}
				j.Close()
				continue
			}
			ro, rrec, err := Open(Options{Dir: dir, ReadOnly: true})
			if !errors.Is(err, ErrDamaged) || ro != nil || rrec.Damage == nil {
				t.Fatalf("seg %d byte %d: read-only open: %v %+v", si, at, err, rrec)
			}
			_, rec, err := Open(Options{Dir: dir, SegmentSize: 16 << 10})
			if !errors.Is(err, ErrDamaged) {
				t.Fatalf("seg %d entry %d byte %d: Open: %v, want ErrDamaged", si, k, at, err)
			}
			d := rec.Damage
			if d == nil || d.Segment != filepath.Base(s.path) || d.Offset != start || d.LastSeq != uint64(want) || d.FirstSeq != 1 {
				t.Fatalf("seg %d entry %d byte %d: damage %+v, want segment %s offset %d last %d", si, k, at, d, filepath.Base(s.path), start, want)
			}
			if after := dirDigest(t, dir); after != before {
				t.Fatalf("seg %d byte %d: Open changed the journal's files", si, at)
			}
		}
	}
}

// dirDigest hashes the names, sizes and contents of the segment files.
func dirDigest(t *testing.T, dir string) string {
	t.Helper()
	h := sha256.New()
	segs, err := listSegments(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range segs {
		b, err := os.ReadFile(s.path)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(h, "%s %d\n", filepath.Base(s.path), len(b))
		h.Write(b)
	}
	return fmt.Sprintf("%x", h.Sum(nil))
}

// TestRecoverBadSegmentHeader: a sealed segment with a bad header is
// damage, not a tail to cut (before, it and every later segment were
// deleted).
func TestRecoverBadSegmentHeader(t *testing.T) {
	base := t.TempDir()
	j := openT(t, base, 4<<10)
	appendN(t, j, 0, 60)
	j.Close()
	segs, _ := listSegments(base)
	p := segs[1].path
	b, _ := os.ReadFile(p)
	b[2] ^= 1
	os.WriteFile(p, b, 0o600)
	before := dirDigest(t, base)
	_, rec, err := Open(Options{Dir: base, SegmentSize: 4 << 10})
	if !errors.Is(err, ErrDamaged) || rec.Damage == nil || rec.Damage.Segment != filepath.Base(p) || rec.Damage.After != segs[2].firstSeq {
		t.Fatalf("Open: %v %+v", err, rec.Damage)
	}
	if dirDigest(t, base) != before {
		t.Fatal("Open changed the journal's files")
	}
	// A missing segment (a gap) is damage too.
	os.Remove(segs[2].path)
	if _, rec, err := Open(Options{Dir: base, SegmentSize: 4 << 10}); !errors.Is(err, ErrDamaged) || rec.Damage == nil {
		t.Fatalf("a gap between segments: %v %+v", err, rec.Damage)
	}
}

// TestReadOnlyOpen: a read-only open creates nothing, cuts nothing, and
// refuses appends; it reports a torn tail without cutting it.
func TestReadOnlyOpen(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "nope")
	if _, _, err := Open(Options{Dir: missing, ReadOnly: true}); err == nil {
		t.Fatal("read-only open of a missing journal succeeded")
	}
	if _, err := os.Stat(missing); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("read-only open created %s", missing)
	}
	dir := t.TempDir()
	j := openT(t, dir, 16<<10)
	appendN(t, j, 0, 20)
	j.Close()
	segs, _ := listSegments(dir)
	last := segs[len(segs)-1].path
	fi, _ := os.Stat(last)
	bounds := entryBounds(t, last)
	os.Truncate(last, bounds[len(bounds)-2]+10) // tear the newest entry
	before := dirDigest(t, dir)
	ro, rec, err := Open(Options{Dir: dir, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if rec.Reason == "" || rec.TruncatedBytes != 10 {
		t.Errorf("torn tail not reported: %+v (file was %d bytes)", rec, fi.Size())
	}
	if _, err := ro.Append(&Entry{Kind: KindWrite, Length: 512, Data: make([]byte, 512)}); !errors.Is(err, ErrReadOnly) {
		t.Errorf("append to a read-only journal: %v", err)
	}
	ro.Close()
	if dirDigest(t, dir) != before {
		t.Fatal("a read-only open changed the journal")
	}
}

func FuzzDecodeEntry(f *testing.F) {
	for i := 0; i < 5; i++ {
		e := entryFor(i)
		e.Seq = uint64(i + 1)
		f.Add(AppendEntry(nil, &e))
	}
	f.Add([]byte{})
	f.Add(make([]byte, EntryHeaderSize))
	f.Fuzz(func(t *testing.T, b []byte) {
		e, n, err := DecodeEntry(b)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error %v does not wrap ErrCorrupt", err)
			}
			return
		}
		if n > len(b) || n < EntryHeaderSize {
			t.Fatalf("consumed %d of %d", n, len(b))
		}
		// A valid entry re-encodes to the same bytes.
		if got := AppendEntry(nil, &e); !bytes.Equal(got, b[:n]) {
			t.Fatalf("re-encode differs")
		}
	})
}

func TestSecondOpenIsRefused(t *testing.T) {
	dir := t.TempDir()
	j := openT(t, dir, 0)
	if _, _, err := Open(Options{Dir: dir}); !errors.Is(err, ErrLocked) {
		t.Fatalf("second Open: %v, want ErrLocked", err)
	}
	j.Close()
	j2, _, err := Open(Options{Dir: dir})
	if err != nil {
		t.Fatalf("Open after Close: %v", err)
	}
	j2.Close()
}

// TestRecycledSegments trims, reuses the freed files for new segments and
// reopens without a clean Close: stale entries in recycled files must read
// as the end of the data, never as entries.
func TestRecycledSegments(t *testing.T) {
	dir := t.TempDir()
	j, _, err := Open(Options{Dir: dir, SegmentSize: 8 << 10, Recycle: 4})
	if err != nil {
		t.Fatal(err)
	}
	appendN(t, j, 0, 200)
	if err := j.Trim(j.LastSeq()); err != nil {
		t.Fatal(err)
	}
	free, _ := filepath.Glob(filepath.Join(dir, "*.free"))
	if len(free) != 4 {
		t.Fatalf("free files = %d, want 4", len(free))
	}
	first := j.FirstSeq()
	appendN(t, j, 200, 30) // new segments reuse the free files
	if err := j.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	if free, _ := filepath.Glob(filepath.Join(dir, "*.free")); len(free) >= 4 {
		t.Fatalf("free files not reused: %d left", len(free))
	}
	// Simulate a crash: reopen from a copy taken while open.
	crashed := copyDir(t, dir)
	j.Close()
	j2, rec, err := Open(Options{Dir: crashed, SegmentSize: 8 << 10, Recycle: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer j2.Close()
	if got := j2.LastSeq(); got != 230 {
		t.Fatalf("LastSeq after crash = %d, want 230 (%+v)", got, rec)
	}
	checkEntries(t, j2, int(first), 230)
}

// TestTrimWithoutSync: a journal that is appended to and trimmed but
// never synced (a stream without FLUSH, whose checkpoints are soft) keeps
// no descriptor of the segments it trimmed, and a later Sync still works.
func TestTrimWithoutSync(t *testing.T) {
	j, _, err := Open(Options{Dir: t.TempDir(), SegmentSize: 8 << 10, Recycle: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	for round := 0; round < 50; round++ {
		appendN(t, j, int(j.LastSeq()), 40)
		if err := j.Trim(j.LastSeq()); err != nil {
			t.Fatal(err)
		}
		j.mu.Lock()
		n, segs := len(j.pending), len(j.segs)
		j.mu.Unlock()
		if n >= segs {
			t.Fatalf("round %d: %d unsynced files kept for %d segments", round, n, segs)
		}
	}
	if err := j.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got, want := j.DurableSeq(), j.LastSeq(); got != want {
		t.Fatalf("durable %d after Sync, want %d", got, want)
	}
}

// TestRecycledSealedSegments: a recycled file sealed as a segment keeps
// its previous life's bytes after the new data, cut mid-entry where the
// sizes differ. The next segment proves where it ended, so reopening finds
// no damage; a gap after it still is damage.
func TestRecycledSealedSegments(t *testing.T) {
	dir := t.TempDir()
	opts := Options{Dir: dir, SegmentSize: 8 << 10, Recycle: 8}
	j, _, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	big := func(n int) *Entry {
		return &Entry{Kind: KindWrite, Offset: 0, Length: uint32(n), Data: bytes.Repeat([]byte{byte(n)}, n)}
	}
	for i := 0; i < 600; i++ { // small entries fill each file to its end
		if _, err := j.Append(big(100)); err != nil {
			t.Fatal(err)
		}
	}
	if err := j.Trim(j.LastSeq()); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 60; i++ { // other sizes: boundaries do not line up
		if _, err := j.Append(big(1700 + 37*i)); err != nil {
			t.Fatal(err)
		}
	}
	last := j.LastSeq()
	if err := j.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	crashed := copyDir(t, dir)
	j.Close()
	j2, _, err := Open(Options{Dir: crashed, SegmentSize: 8 << 10, Recycle: 8})
	if err != nil {
		t.Fatalf("reopen with recycled sealed segments: %v", err)
	}
	if got := j2.LastSeq(); got != last {
		t.Fatalf("LastSeq = %d, want %d", got, last)
	}
	segs := j2.Segments()
	j2.Close()
	// A lost segment in the middle is a gap, not a stale tail.
	os.Remove(filepath.Join(crashed, segName(segs[len(segs)/2])))
	if _, _, err := Open(Options{Dir: crashed, SegmentSize: 8 << 10}); !errors.Is(err, ErrDamaged) {
		t.Fatalf("reopen with a segment missing: %v, want ErrDamaged", err)
	}
}

func TestAppendBatchAcrossSegments(t *testing.T) {
	j := openT(t, t.TempDir(), 6<<10)
	i := 0
	for _, n := range []int{1, 7, 40, 3, 100, 2} {
		es := make([]*Entry, n)
		for k := range es {
			e := entryFor(i + k)
			es[k] = &e
		}
		last, err := j.AppendBatch(es)
		if err != nil {
			t.Fatal(err)
		}
		i += n
		if last != uint64(i) || es[n-1].Seq != uint64(i) || es[0].Seq != uint64(i-n+1) {
			t.Fatalf("batch of %d: last %d, seqs %d..%d", n, last, es[0].Seq, es[n-1].Seq)
		}
	}
	checkEntries(t, j, 1, i)
	bad := []*Entry{{Kind: KindWrite, Length: 1, Data: []byte{1}}, {Kind: 0}}
	if _, err := j.AppendBatch(bad); !errors.Is(err, ErrInvalid) {
		t.Fatalf("invalid batch: %v", err)
	}
	if got := j.LastSeq(); got != uint64(i) {
		t.Fatalf("invalid batch recorded something: last %d", got)
	}
}

// TestCopiesKeepSeq copies a journal into another that starts at the same
// sequence, as a replica does, and reads payloads back by location.
func TestCopiesKeepSeq(t *testing.T) {
	src := openT(t, t.TempDir(), 8<<10)
	appendN(t, src, 0, 50)
	src.Trim(20)
	from := src.FirstSeq()
	dst, _, err := Open(Options{Dir: t.TempDir(), SegmentSize: 8 << 10, FirstSeq: from})
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	r, _ := src.NewReader(from)
	defer r.Close()
	var batch []*Entry
	for {
		e, ok, err := r.TryNext()
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			break
		}
		c := e
		c.Data = append([]byte(nil), e.Data...)
		batch = append(batch, &c)
	}
	if _, err := dst.AppendCopies(batch[1:]); !errors.Is(err, ErrInvalid) {
		t.Fatalf("copy with a gap: %v, want ErrInvalid", err)
	}
	if _, err := dst.AppendCopies(batch); err != nil {
		t.Fatal(err)
	}
	rd, _ := dst.NewReader(from)
	defer rd.Close()
	for _, want := range batch {
		got, ok, err := rd.TryNext()
		if !ok || err != nil || got.Seq != want.Seq || got.Time != want.Time || !bytes.Equal(got.Data, want.Data) {
			t.Fatalf("copy of seq %d: %+v %v %v", want.Seq, got.Seq, ok, err)
		}
		if len(want.Data) > 3 {
			p := make([]byte, 3)
			if err := dst.ReadData(rd.Loc(), p, 1); err != nil || !bytes.Equal(p, want.Data[1:4]) {
				t.Fatalf("ReadData seq %d: %v", want.Seq, err)
			}
		}
	}
}

func TestSkipEntries(t *testing.T) {
	dir := t.TempDir()
	j, _, err := Open(Options{Dir: dir, SegmentSize: 4 << 10, FirstSeq: 10})
	if err != nil {
		t.Fatal(err)
	}
	w := func(seq uint64) *Entry {
		return &Entry{Seq: seq, Time: int64(seq), Kind: KindWrite, Length: 3, Data: []byte("abc")}
	}
	es := []*Entry{w(10), w(11), {Seq: 12, Kind: KindSkip, Offset: 50}, w(50), w(51)}
	if _, err := j.AppendCopies(es); err != nil {
		t.Fatal(err)
	}
	if _, err := j.AppendCopies([]*Entry{w(52), {Seq: 53, Kind: KindSkip, Offset: 53}}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("skip to itself: %v", err)
	}
	if _, err := j.Append(&Entry{Kind: KindSkip, Offset: 99}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("skip via Append: %v", err)
	}
	if got := j.LastSeq(); got != 51 {
		t.Fatalf("LastSeq %d, want 51", got)
	}
	check := func(j *Journal) {
		for _, tc := range []struct {
			from uint64
			want []uint64
		}{{10, []uint64{10, 11, 12, 50, 51}}, {12, []uint64{12, 50, 51}}, {30, []uint64{50, 51}}, {51, []uint64{51}}} {
			r, err := j.NewReader(tc.from)
			if err != nil {
				t.Fatal(err)
			}
			var got []uint64
			for {
				e, ok, err := r.TryNext()
				if err != nil {
					t.Fatalf("from %d: %v", tc.from, err)
				}
				if !ok {
					break
				}
				got = append(got, e.Seq)
			}
			r.Close()
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Fatalf("from %d: %v, want %v", tc.from, got, tc.want)
			}
		}
	}
	check(j)
	j.Close()
	j2, rec, err := Open(Options{Dir: dir, SegmentSize: 4 << 10})
	if err != nil || rec.Reason != "" {
		t.Fatalf("reopen: %v %+v", err, rec)
	}
	defer j2.Close()
	check(j2)
	if _, err := j2.AppendCopies([]*Entry{w(52)}); err != nil {
		t.Fatal(err)
	}
}

// TestTimesNeverGoBack: with the clock stepped back, before and after a
// reopen, no entry is stamped before the one it follows.
func TestTimesNeverGoBack(t *testing.T) {
	dir := t.TempDir()
	now := time.Unix(1_000_000, 0)
	clk := func() time.Time { return now }
	j, _, err := Open(Options{Dir: dir, Now: clk})
	if err != nil {
		t.Fatal(err)
	}
	appendN(t, j, 0, 3)
	now = now.Add(-time.Hour)
	appendN(t, j, 3, 3)
	j.Close()
	now = now.Add(-time.Hour)
	j, _, err = Open(Options{Dir: dir, Now: clk})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	appendN(t, j, 6, 3)
	var prev int64
	for seq := uint64(1); seq <= j.LastSeq(); seq++ {
		tm, err := j.EntryTime(seq)
		if err != nil {
			t.Fatal(err)
		}
		if tm < prev {
			t.Fatalf("entry %d stamped %v, before the entry it follows (%v)", seq, time.Unix(0, tm), time.Unix(0, prev))
		}
		prev = tm
	}
	if want := time.Unix(1_000_000, 0).UnixNano(); prev != want {
		t.Fatalf("last entry stamped %v, want the newest time seen %v", time.Unix(0, prev), time.Unix(0, want))
	}
}

// TestAppendBatchAllocatesNothing: a burst of small writes appends with
// no allocation once the journal's scratch has grown (the iovec array
// was made anew at every append).
func TestAppendBatchAllocatesNothing(t *testing.T) {
	j := openT(t, t.TempDir(), 64<<20)
	es := make([]*Entry, 16)
	for i := range es {
		es[i] = &Entry{Kind: KindWrite, Disk: 1, Offset: uint64(i) * 4096, Length: 4096, Data: make([]byte, 4096)}
	}
	if _, err := j.AppendBatch(es); err != nil { // grows the scratch
		t.Fatal(err)
	}
	got := testing.AllocsPerRun(50, func() {
		if _, err := j.AppendBatch(es); err != nil {
			t.Fatal(err)
		}
	})
	if got != 0 {
		t.Errorf("AppendBatch of %d entries: %v allocations, want 0", len(es), got)
	}
}
