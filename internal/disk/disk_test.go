package disk

import (
	"bytes"
	"context"
	"os"
	"testing"

	"github.com/ferry-dr/ferry/internal/journal"
	"github.com/ferry-dr/ferry/internal/nbd"
	"github.com/ferry-dr/ferry/internal/nbd/nbdtest"
)

var (
	_ nbd.Device      = (*Disk)(nil)
	_ nbd.BatchWriter = (*Disk)(nil)

	_ nbd.JournalingBatchWriter = (*Disk)(nil)
)

func openGroup(tb testing.TB, dir string) *Group {
	tb.Helper()
	g, err := Open(Config{Dir: dir, SegmentSize: 256 << 10})
	if err != nil {
		tb.Fatalf("Open: %v", err)
	}
	return g
}

// openDisk opens a group with cfg and creates its disk "a" of size
// bytes. Closing the group is the caller's: some tests close it their
// own way.
func openDisk(tb testing.TB, cfg Config, size int64) (*Group, *Disk) {
	tb.Helper()
	g, err := Open(cfg)
	if err != nil {
		tb.Fatalf("Open: %v", err)
	}
	d, err := g.CreateDisk("a", size)
	if err != nil {
		tb.Fatalf("CreateDisk: %v", err)
	}
	return g, d
}

func TestDiskConformance(t *testing.T) {
	nbdtest.TestDevice(t, 2<<20, func(t *testing.T) nbd.Device {
		g := openGroup(t, t.TempDir())
		d, err := g.CreateDisk("vda", 2<<20)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			// Invariant: the image equals the journal replayed from the
			// start (nothing was trimmed: no checkpoint ran).
			checkReplayEqualsImage(t, g, d)
			g.Close()
		})
		return d
	})
}

// checkReplayEqualsImage replays the whole journal onto a zero buffer and
// compares it with the disk's image.
func checkReplayEqualsImage(tb testing.TB, g *Group, d *Disk) {
	tb.Helper()
	ref := make([]byte, d.Size())
	r, err := g.Journal().NewReader(1)
	if err != nil {
		tb.Fatal(err)
	}
	defer r.Close()
	for {
		e, ok, err := r.TryNext()
		if err != nil {
			tb.Fatal(err)
		}
		if !ok {
			break
		}
		if e.Disk != d.Spec().ID {
			continue
		}
		switch e.Kind {
		case journal.KindWrite:
			copy(ref[e.Offset:], e.Data)
		case journal.KindZero, journal.KindTrim:
			clear(ref[e.Offset : e.Offset+uint64(e.Length)])
		}
	}
	got := make([]byte, d.Size())
	if err := d.ReadAt(context.Background(), got, 0); err != nil {
		tb.Fatal(err)
	}
	if !bytes.Equal(got, ref) {
		tb.Fatal("the disk's reads differ from the journal replayed")
	}
	// Folded, the image itself holds the same bytes (the index is empty).
	g.ckptMu.Lock()
	_, err = g.foldIndex(context.Background(), false)
	g.ckptMu.Unlock()
	if err != nil {
		tb.Fatal(err)
	}
	if n := d.nidx.Load(); n != 0 {
		tb.Fatalf("%d blocks still indexed after the fold", n)
	}
	if err := d.image().ReadAt(got, 0); err != nil {
		tb.Fatal(err)
	}
	if !bytes.Equal(got, ref) {
		tb.Fatal("the folded image differs from the journal replayed")
	}
}

// TestReplayAfterLostImageWrites simulates a crash in which the page cache
// holding image writes is lost but the flushed journal survives: reopening
// must replay the journal into the image.
func TestReplayAfterLostImageWrites(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	g := openGroup(t, dir)
	a, _ := g.CreateDisk("a", 1<<20)
	b, _ := g.CreateDisk("b", 1<<20)
	a.WriteAt(ctx, bytes.Repeat([]byte{1}, 8192), 0)
	if err := g.Checkpoint(ctx); err != nil {
		t.Fatal(err)
	}
	ckpt := g.AppliedSeq()
	imgA, _ := os.ReadFile(g.imagePath("a"))
	imgB, _ := os.ReadFile(g.imagePath("b"))
	// Writes after the checkpoint, made durable only in the journal.
	a.WriteAt(ctx, bytes.Repeat([]byte{2}, 4096), 4096)
	b.WriteAt(ctx, bytes.Repeat([]byte{3}, 100), 500)
	a.WriteZeroes(ctx, 0, 512)
	b.Trim(ctx, 500, 50)
	if err := a.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	want := map[string][]byte{}
	for _, d := range []*Disk{a, b} {
		w := make([]byte, 1<<20)
		d.ReadAt(ctx, w, 0)
		want[d.Spec().Name] = w
	}
	// Crash: no checkpoint at close, and the images lose everything since
	// the last one.
	g.closeFiles()
	g.j.Close()
	os.WriteFile(g.imagePath("a"), imgA, 0o600)
	os.WriteFile(g.imagePath("b"), imgB, 0o600)

	g2 := openGroup(t, dir)
	defer g2.Close()
	if g2.AppliedSeq() <= ckpt {
		t.Fatalf("applied seq %d not advanced past %d by replay", g2.AppliedSeq(), ckpt)
	}
	for name, w := range want {
		d, err := g2.Disk(name)
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, 1<<20)
		d.ReadAt(ctx, got, 0)
		if !bytes.Equal(got, w) {
			t.Fatalf("disk %s differs after replay", name)
		}
	}
}

func TestCheckpointTrimsAndHolds(t *testing.T) {
	ctx := context.Background()
	g := openGroup(t, t.TempDir())
	defer g.Close()
	d, _ := g.CreateDisk("a", 4<<20)
	p := make([]byte, 64<<10)
	for i := 0; i < 40; i++ {
		d.WriteAt(ctx, p, int64(i%60)*65536)
	}
	g.Hold("shipper", 5)
	if err := g.Checkpoint(ctx); err != nil {
		t.Fatal(err)
	}
	if first := g.Journal().FirstSeq(); first > 5 {
		t.Fatalf("journal trimmed to %d past the hold at 5", first)
	}
	g.Hold("shipper", 0)
	for i := 0; i < 40; i++ {
		d.WriteAt(ctx, p, int64(i%60)*65536)
	}
	if err := g.Checkpoint(ctx); err != nil {
		t.Fatal(err)
	}
	if first, last := g.Journal().FirstSeq(), g.Journal().LastSeq(); first <= 40 || first > last+1 {
		t.Fatalf("after release: journal %d..%d, want old segments trimmed", first, last)
	}
}

func TestBadInput(t *testing.T) {
	ctx := context.Background()
	g := openGroup(t, t.TempDir())
	defer g.Close()
	d, _ := g.CreateDisk("a", 1<<20)
	if _, err := g.CreateDisk("a", 1<<20); err == nil {
		t.Fatal("duplicate disk created")
	}
	for _, name := range []string{"", "../x", "a/b"} {
		if _, err := g.CreateDisk(name, 1); err == nil {
			t.Fatalf("disk %q created", name)
		}
	}
	if err := d.WriteAt(ctx, make([]byte, 10), 1<<20-5); err == nil {
		t.Fatal("write past end accepted")
	}
	if err := d.WriteZeroes(ctx, -1, 5); err == nil {
		t.Fatal("negative offset accepted")
	}
	if got := g.Journal().LastSeq(); got != 0 {
		t.Fatalf("rejected requests journaled: last seq %d", got)
	}
	if _, err := Open(Config{Dir: g.cfg.Dir}); err == nil {
		t.Fatal("second Open of a live group succeeded")
	}
}

// TestDataRanges: the ranges cover every written byte and leave out the
// big holes between them.
func TestDataRanges(t *testing.T) {
	ctx := context.Background()
	g := openGroup(t, t.TempDir())
	defer g.Close()
	d, err := g.CreateDisk("vda", 64<<20)
	if err != nil {
		t.Fatal(err)
	}
	offs := []int64{0, 10 << 20, 40<<20 + 4096, 64<<20 - 4096}
	for _, off := range offs {
		if err := d.WriteAt(ctx, bytes.Repeat([]byte{7}, 4096), off); err != nil {
			t.Fatal(err)
		}
	}
	var covered int64
	var last int64 = -1
	err = d.DataRanges(func(off, n int64) error {
		if off < last || n <= 0 || off+n > d.Size() {
			t.Fatalf("range [%d,+%d) out of order or out of the disk", off, n)
		}
		last = off + n
		covered += n
		for _, w := range offs {
			if w >= off && w < off+n && w+4096 > off+n {
				t.Fatalf("range [%d,+%d) cuts the write at %d", off, n, w)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range offs {
		found := false
		d.DataRanges(func(off, n int64) error {
			found = found || (w >= off && w+4096 <= off+n)
			return nil
		})
		if !found {
			t.Fatalf("the write at %d is in no range", w)
		}
	}
	if covered >= d.Size()/2 {
		t.Fatalf("the ranges cover %d of %d bytes: holes not skipped", covered, d.Size())
	}
}
