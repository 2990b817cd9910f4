package replica

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/disk"
	"github.com/ferry-dr/ferry/internal/journal"
	"github.com/ferry-dr/ferry/internal/nbd"
	"github.com/ferry-dr/ferry/internal/nbd/nbdtest"
)

var _ nbd.Device = (*View)(nil)

const diskSize = 1 << 20

// source makes a group with two disks and applies n random operations,
// with a marker every 10.
func randomOps(t *testing.T, g *disk.Group, rng *rand.Rand, n int) {
	t.Helper()
	ctx := context.Background()
	a, _ := g.Disk("a")
	b, _ := g.Disk("b")
	for i := 0; i < n; i++ {
		d := a
		if rng.IntN(2) == 0 {
			d = b
		}
		off := rng.Int64N(diskSize - 1)
		ln := 1 + rng.Int64N(min(diskSize-off, 300<<10))
		var err error
		switch rng.IntN(6) {
		case 0:
			err = d.WriteZeroes(ctx, off, ln)
		case 1:
			err = d.Trim(ctx, off, ln)
		default:
			p := make([]byte, ln)
			for k := range p {
				p[k] = byte(rng.Uint32() | 1)
			}
			err = d.WriteAt(ctx, p, off)
		}
		if err != nil {
			t.Fatal(err)
		}
		if i%10 == 9 {
			if _, err := g.Mark(Marker{Type: "crash"}.Encode()); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// replay builds the disks' contents at seq by replaying the source journal
// from `from` over the given base images.
func replay(t *testing.T, j *journal.Journal, from, at uint64, base map[uint16][]byte) map[uint16][]byte {
	t.Helper()
	out := map[uint16][]byte{}
	for id, b := range base {
		out[id] = bytes.Clone(b)
	}
	r, err := j.NewReader(from)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	for seq := from; seq <= at; seq++ {
		e, ok, err := r.TryNext()
		if err != nil || !ok {
			t.Fatalf("replay %d: %v %v", seq, ok, err)
		}
		img := out[e.Disk]
		switch e.Kind {
		case journal.KindWrite:
			copy(img[e.Offset:], e.Data)
		case journal.KindZero, journal.KindTrim:
			clear(img[e.Offset : e.Offset+uint64(e.Length)])
		}
	}
	return out
}

func ship(t *testing.T, src *journal.Journal, from uint64, rep *Replica) {
	t.Helper()
	r, err := src.NewReader(from)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	var batch []*journal.Entry
	flush := func() {
		if len(batch) == 0 {
			return
		}
		last, err := rep.Receive(context.Background(), batch)
		if err != nil {
			t.Fatal(err)
		}
		if last != batch[len(batch)-1].Seq {
			t.Fatalf("Receive acked %d, want %d", last, batch[len(batch)-1].Seq)
		}
		batch = nil
	}
	for {
		e, ok, err := r.TryNext()
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			break
		}
		c := e
		c.Data = bytes.Clone(e.Data)
		batch = append(batch, &c)
		if len(batch) == 7 {
			flush()
		}
	}
	flush()
}

func readView(t *testing.T, rep *Replica, name string, at uint64) []byte {
	t.Helper()
	v, err := rep.OpenView(name, at, "")
	if err != nil {
		t.Fatalf("OpenView(%s, %d): %v", name, at, err)
	}
	defer v.Close()
	got := make([]byte, diskSize)
	if err := v.ReadAt(context.Background(), got, 0); err != nil {
		t.Fatal(err)
	}
	return got
}

// TestViewsEqualReplay replicates a group whose base copy is taken after
// some writes (the fuzzy-copy path), then checks views at many points, and
// after a reopen of the replica, against a replay of the source journal.
func TestViewsEqualReplay(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	g, err := disk.Open(disk.Config{Dir: t.TempDir(), SegmentSize: 128 << 10})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	g.CreateDisk("a", diskSize)
	g.CreateDisk("b", diskSize)
	randomOps(t, g, rng, 30)

	// Initial copy: hold the journal from S0, copy the images.
	start := g.HoldNext("test")
	src := g.Journal()
	rep, err := Open(Config{Dir: t.TempDir(), SegmentSize: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	if err := rep.Begin("g", g.Disks(), start); err != nil {
		t.Fatal(err)
	}
	base := map[uint16][]byte{}
	for _, s := range g.Disks() {
		d, _ := g.Disk(s.Name)
		img := make([]byte, s.Size)
		d.ReadAt(context.Background(), img, 0)
		base[s.ID] = img
		if err := rep.WriteBase(s.ID, 0, img); err != nil {
			t.Fatal(err)
		}
	}
	randomOps(t, g, rng, 60)
	end := src.LastSeq()
	if err := rep.EndBase(start - 1); err != nil {
		t.Fatal(err)
	}
	ship(t, src, start, rep)
	if got := rep.NextSeq(); got != end+1 {
		t.Fatalf("NextSeq = %d, want %d", got, end+1)
	}
	if pts := rep.Points(); len(pts) < 5 {
		t.Fatalf("points = %d, want >= 5", len(pts))
	}
	check := func(rep *Replica) {
		points := []uint64{start - 1, end}
		for _, p := range rep.Points() {
			points = append(points, p.Seq)
		}
		for i := 0; i < 10; i++ {
			points = append(points, start+rng.Uint64N(end-start+1))
		}
		for _, at := range points {
			want := replay(t, src, start, at, base)
			for _, s := range g.Disks() {
				if got := readView(t, rep, s.Name, at); !bytes.Equal(got, want[s.ID]) {
					t.Fatalf("view of %s at %d differs from the replay", s.Name, at)
				}
			}
		}
	}
	check(rep)
	if _, err := rep.OpenView("a", end+1, ""); err == nil {
		t.Fatal("view past the last entry opened")
	}
	if _, err := rep.OpenView("a", start-2, ""); err == nil {
		t.Fatal("view before the consistent point opened")
	}
	rep.Close()
	rep2, err := Open(Config{Dir: rep.cfg.Dir, SegmentSize: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	defer rep2.Close()
	check(rep2)
}

func TestWritableViewConformance(t *testing.T) {
	nbdtest.TestDevice(t, diskSize, func(t *testing.T) nbd.Device {
		dir := t.TempDir()
		rep, err := Open(Config{Dir: dir})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { rep.Close() })
		if err := rep.Begin("g", []disk.Spec{{ID: 1, Name: "a", Size: diskSize}}, 1); err != nil {
			t.Fatal(err)
		}
		rep.EndBase(1)
		// One entry so that the view has a point to stand on.
		p := bytes.Repeat([]byte{9}, 100)
		if _, err := rep.Receive(context.Background(), []*journal.Entry{{Seq: 1, Kind: journal.KindWrite, Disk: 1, Offset: 0, Length: 100, Data: p}}); err != nil {
			t.Fatal(err)
		}
		v, err := rep.OpenView("a", 1, filepath.Join(dir, "overlay"))
		if err != nil {
			t.Fatal(err)
		}
		// The conformance suite expects a zero device: clear the entry.
		if err := v.WriteZeroes(context.Background(), 0, 100); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			v.Close()
			if _, err := os.Stat(filepath.Join(dir, "overlay")); !os.IsNotExist(err) {
				t.Errorf("overlay not discarded: %v", err)
			}
			// The replica itself is untouched by the view's writes.
			ro, _ := rep.OpenView("a", 1, "")
			got := make([]byte, 100)
			ro.ReadAt(context.Background(), got, 0)
			if !bytes.Equal(got, p) {
				t.Error("a writable view's writes reached the replica")
			}
		})
		return v
	})
}

// TestChangesCoverDifferences: every byte where a view at a point differs
// from the last received state lies in what Changes reports after that
// point, and a writable view's Written covers its writes. A reprotect
// relies on both to send only what differs.
func TestChangesCoverDifferences(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 12))
	g, rep, start := emptyPair(t, 128<<10)
	randomOps(t, g, rng, 80)
	ship(t, g.Journal(), start, rep)
	end := g.Journal().LastSeq()
	for _, at := range []uint64{start, start + 10, end / 2, end - 3, end} {
		changed := map[string]map[int64]bool{}
		last, err := rep.Changes(at, func(d string, off, n int64) {
			if changed[d] == nil {
				changed[d] = map[int64]bool{}
			}
			for b := off / BlockSize; b*BlockSize < off+n; b++ {
				changed[d][b] = true
			}
		})
		if err != nil {
			t.Fatal(err)
		}
		if last != end {
			t.Fatalf("Changes says the last received is %d, want %d", last, end)
		}
		n := 0
		for _, name := range []string{"a", "b"} {
			then, now := readView(t, rep, name, at), readView(t, rep, name, end)
			for b := int64(0); b < diskSize/BlockSize; b++ {
				if !bytes.Equal(then[b*BlockSize:(b+1)*BlockSize], now[b*BlockSize:(b+1)*BlockSize]) {
					n++
					if !changed[name][b] {
						t.Fatalf("block %d of %s differs between %d and %d but is not reported changed", b, name, at, end)
					}
				}
			}
		}
		if at < end && n == 0 {
			t.Fatalf("no block differs between %d and %d: the test proves nothing", at, end)
		}
		if at == end && len(changed) != 0 {
			t.Fatalf("changes after the last entry: %v", changed)
		}
	}
	v, err := rep.OpenView("a", end, filepath.Join(t.TempDir(), "overlay"))
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	v.WriteAt(context.Background(), []byte("x"), 3*BlockSize+5)
	v.WriteZeroes(context.Background(), 10*BlockSize-1, 2)
	got := map[int64]bool{}
	v.Written(func(off, n int64) { got[off/BlockSize] = true })
	if want := map[int64]bool{3: true, 9: true, 10: true}; !maps.Equal(got, want) {
		t.Fatalf("Written = %v, want %v", got, want)
	}
}

// emptyPair returns a source group with two empty disks, a and b, whose
// journal is held from start, and a replica of it that is consistent
// from start-1 (an initial copy of nothing). Both close with the test.
func emptyPair(t *testing.T, segment int64) (*disk.Group, *Replica, uint64) {
	t.Helper()
	g, err := disk.Open(disk.Config{Dir: t.TempDir(), SegmentSize: segment})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	g.CreateDisk("a", diskSize)
	g.CreateDisk("b", diskSize)
	start := g.HoldNext("test")
	rep, err := Open(Config{Dir: t.TempDir(), SegmentSize: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rep.Close() })
	if err := rep.Begin("g", g.Disks(), start); err != nil {
		t.Fatal(err)
	}
	if err := rep.EndBase(start - 1); err != nil {
		t.Fatal(err)
	}
	return g, rep, start
}

// TestResyncInterruptedAndRedone: the source restarted in the middle of a
// resynchronization and began another (a second skip); the one
// resync-done that ends it makes the replica consistent again, and the
// points after it are offered while those inside are not.
func TestResyncInterruptedAndRedone(t *testing.T) {
	ctx := context.Background()
	rep, err := Open(Config{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer rep.Close()
	if err := rep.Begin("g", []disk.Spec{{ID: 1, Name: "a", Size: diskSize}}, 1); err != nil {
		t.Fatal(err)
	}
	rep.EndBase(1)
	p := bytes.Repeat([]byte{1}, 512)
	write := func(seq uint64) *journal.Entry {
		return &journal.Entry{Seq: seq, Kind: journal.KindWrite, Disk: 1, Offset: 0, Length: 512, Data: p}
	}
	mark := func(seq uint64, typ api.PointType) *journal.Entry {
		m := Marker{Type: typ, Label: fmt.Sprint(seq)}.Encode()
		return &journal.Entry{Seq: seq, Kind: journal.KindMarker, Length: uint32(len(m)), Data: m}
	}
	batches := [][]*journal.Entry{
		{write(1), mark(2, "crash")},
		{{Seq: 3, Kind: journal.KindSkip, Offset: 10}}, // a resync starts: 3..9 lost
		{write(10), mark(11, "crash")},
		{{Seq: 12, Kind: journal.KindSkip, Offset: 20}}, // the source restarted: again
		{write(20), mark(21, "crash"), mark(22, TypeResyncDone), write(23), mark(24, "crash")},
	}
	for _, b := range batches {
		if _, err := rep.Receive(ctx, b); err != nil {
			t.Fatal(err)
		}
	}
	var got []uint64
	for _, pt := range rep.Points() {
		got = append(got, pt.Seq)
	}
	if want := []uint64{2, 22, 24}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("points offered: %v, want %v (none inside either resync)", got, want)
	}
}
