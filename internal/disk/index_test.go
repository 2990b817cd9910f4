package disk

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// modelOp applies one random change to d and to the model m.
func modelOp(tb testing.TB, rng *rand.Rand, d *Disk, m []byte, tag byte) {
	tb.Helper()
	ctx := context.Background()
	size := int64(len(m))
	var off, n int64
	switch rng.IntN(10) {
	case 0, 1, 2, 3, 4: // whole blocks: journal-only
		n = int64(1+rng.IntN(8)) * BlockSize
		off = rng.Int64N(size/BlockSize-n/BlockSize+1) * BlockSize
	case 5, 6: // anywhere, any length: inline, edges flushed
		n = 1 + rng.Int64N(3*BlockSize)
		off = rng.Int64N(size - n + 1)
	case 7: // zero
		n = 1 + rng.Int64N(6*BlockSize)
		off = rng.Int64N(size - n + 1)
		if err := d.WriteZeroes(ctx, off, n); err != nil {
			tb.Fatal(err)
		}
		clear(m[off : off+n])
		return
	case 8: // trim
		n = 1 + rng.Int64N(6*BlockSize)
		off = rng.Int64N(size - n + 1)
		if err := d.Trim(ctx, off, n); err != nil {
			tb.Fatal(err)
		}
		clear(m[off : off+n])
		return
	case 9: // a batch of whole blocks, overlapping each other
		var ps [][]byte
		var offs []int64
		for k := 0; k < 1+rng.IntN(4); k++ {
			o := rng.Int64N(size/BlockSize) * BlockSize
			p := bytes.Repeat([]byte{tag + byte(k)}, BlockSize)
			ps, offs = append(ps, p), append(offs, o)
		}
		if err := d.WriteAtBatch(ctx, ps, offs); err != nil {
			tb.Fatal(err)
		}
		for k := range ps {
			copy(m[offs[k]:], ps[k])
		}
		return
	}
	p := make([]byte, n)
	for i := range p {
		p[i] = tag ^ byte(i>>9)
	}
	if err := d.WriteAt(ctx, p, off); err != nil {
		tb.Fatal(err)
	}
	copy(m[off:], p)
}

func checkIndexModel(tb testing.TB, d *Disk, m []byte, when string) {
	tb.Helper()
	checkModel(tb, d, m)
	// Unaligned reads across indexed and plain blocks.
	for _, r := range [][2]int64{{100, 3 * BlockSize}, {BlockSize - 1, 2}, {int64(len(m)) - 5000, 5000}} {
		p := make([]byte, r[1])
		if err := d.ReadAt(context.Background(), p, r[0]); err != nil {
			tb.Fatal(err)
		}
		if !bytes.Equal(p, m[r[0]:r[0]+r[1]]) {
			tb.Fatalf("%s: read [%d,+%d) differs from the model", when, r[0], r[1])
		}
	}
}

// TestIndexModel drives random writes of every shape, checkpoints and
// crashes against a byte-array model: reads always equal the model, with
// the backlog journal-only, partly folded, over the inline threshold, and
// after a crash that loses every image write since the last checkpoint.
func TestIndexModel(t *testing.T) {
	for _, tc := range []struct {
		name        string
		maxUnfolded int64
		// flushing: small CheckpointBytes and random Flushes, so that
		// writes switch between indexed and inline (Group.indexing).
		flushing bool
		// behind: the write-behind folder runs at random moments;
		// noBehind: there is none (the policy before write-behind).
		behind, noBehind bool
	}{
		{"journal-only", 0, false, false, false},
		{"small-backlog", 16 * BlockSize, false, false, false},
		{"inline", -1, false, false, false},
		{"index-while-flushed", 0, true, false, false},
		{"write-behind", 0, false, true, false},
		{"write-behind-small-backlog", 16 * BlockSize, false, true, false},
		{"write-behind-flushed", 0, true, true, false},
		{"no-write-behind-flushed", 0, true, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			dir := t.TempDir()
			cfg := Config{Dir: dir, SegmentSize: 256 << 10, MaxUnfolded: tc.maxUnfolded, NoWriteBehind: tc.noBehind}
			if tc.flushing || tc.behind {
				// Small: writes without a Flush for this long are
				// written behind (or inline, without write-behind).
				cfg.CheckpointBytes = 12 * BlockSize
			}
			g, err := Open(cfg)
			if err != nil {
				t.Fatal(err)
			}
			const size = 256 << 10
			d, err := g.CreateDisk("a", size)
			if err != nil {
				t.Fatal(err)
			}
			m := make([]byte, size)
			var foldedBehind int64
			seed := uint64(tc.maxUnfolded)
			if tc.behind {
				seed++
			}
			rng := rand.New(rand.NewPCG(7, seed))
			for round := 0; round < 6; round++ {
				for i := 0; i < 150; i++ {
					modelOp(t, rng, d, m, byte(round*150+i))
					if i%37 == 0 {
						checkIndexModel(t, d, m, "mid-round")
					}
					if rng.IntN(50) == 0 {
						if err := g.Checkpoint(ctx); err != nil {
							t.Fatal(err)
						}
					}
					if tc.flushing && rng.IntN(25) == 0 {
						if err := d.Flush(ctx); err != nil {
							t.Fatal(err)
						}
					}
					if tc.behind && rng.IntN(15) == 0 {
						u := g.Unfolded()
						left, err := g.FoldBehind(ctx)
						if err != nil {
							t.Fatal(err)
						}
						foldedBehind += u - left
					}
				}
				checkIndexModel(t, d, m, "end of round")
				if tc.maxUnfolded > 0 && g.Unfolded() > tc.maxUnfolded+8*BlockSize {
					t.Fatalf("backlog %d bytes, bound %d", g.Unfolded(), tc.maxUnfolded)
				}
				if tc.maxUnfolded < 0 && g.Unfolded() != 0 {
					t.Fatalf("inline mode indexed %d bytes", g.Unfolded())
				}
				if err := d.Flush(ctx); err != nil {
					t.Fatal(err)
				}
				// Crash: the images lose what they got since the last
				// checkpoint (they are restored from that moment).
				img, err := os.ReadFile(g.imagePath("a"))
				if err != nil {
					t.Fatal(err)
				}
				if round%2 == 0 {
					if err := g.Checkpoint(ctx); err != nil {
						t.Fatal(err)
					}
					img, _ = os.ReadFile(g.imagePath("a"))
					modelOp(t, rng, d, m, 0xF0)
					modelOp(t, rng, d, m, 0xF1)
					d.Flush(ctx)
				}
				g.closeFiles()
				g.j.Close()
				if round%2 == 0 {
					os.WriteFile(g.imagePath("a"), img, 0o600)
				}
				g, err = Open(cfg)
				if err != nil {
					t.Fatalf("round %d: %v", round, err)
				}
				d, _ = g.Disk("a")
				checkIndexModel(t, d, m, "after the crash")
			}
			checkFolded(t, g, d, m)
			if err := g.Close(); err != nil {
				t.Fatal(err)
			}
			if tc.behind && foldedBehind == 0 {
				t.Fatal("the write-behind folder never folded anything")
			}
		})
	}
}

// TestIndexOnlyWhileFlushed: writes are kept only in the journal while
// Flushes come at least every CheckpointBytes; a stream without them goes
// to the image at once, and the checkpoint it wants folds what was
// indexed, so the journal can be trimmed again.
func TestIndexOnlyWhileFlushed(t *testing.T) {
	ctx := context.Background()
	// Without write-behind; TestWriteBehind has the stream without Flush
	// that it indexes.
	g, d := openDisk(t, Config{Dir: t.TempDir(), SegmentSize: 64 << 10, CheckpointBytes: 8 * BlockSize, NoWriteBehind: true}, 1<<20)
	defer g.Close()
	block := func(i int) {
		t.Helper()
		if err := d.WriteAt(ctx, bytes.Repeat([]byte{byte(i)}, BlockSize), int64(i)*BlockSize); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 4 {
		block(i)
	}
	if got, want := g.Unfolded(), int64(4*BlockSize); got != want {
		t.Fatalf("unfolded %d after 4 writes, want %d (indexed)", got, want)
	}
	for i := 4; i < 40; i++ { // past CheckpointBytes without a Flush
		block(i)
	}
	u := g.Unfolded()
	if u >= 40*BlockSize {
		t.Fatalf("unfolded %d: writes without Flush stayed journal-only", u)
	}
	g.mu.Lock()
	want := g.wantCheckpoint()
	g.mu.Unlock()
	if !want {
		t.Fatalf("no checkpoint wanted with %d bytes indexed and no Flush", u)
	}
	if err := g.Checkpoint(ctx); err != nil {
		t.Fatal(err)
	}
	if g.Unfolded() != 0 {
		t.Fatalf("unfolded %d after the checkpoint", g.Unfolded())
	}
	if err := d.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	block(50)
	if got, want := g.Unfolded(), int64(BlockSize); got != want {
		t.Fatalf("unfolded %d after a Flush and a write, want %d (indexed again)", got, want)
	}
	p := make([]byte, 51*BlockSize)
	if err := d.ReadAt(ctx, p, 0); err != nil {
		t.Fatal(err)
	}
	for i := range 51 {
		want := byte(i)
		if i >= 40 && i < 50 {
			want = 0
		}
		if p[i*BlockSize] != want {
			t.Fatalf("block %d reads %d, want %d", i, p[i*BlockSize], want)
		}
	}
}

// TestIndexConcurrent runs writers, readers and checkpoints at once (for
// the race detector and the locks): each writer owns a region and checks
// its own reads; in the end the disk equals the model.
func TestIndexConcurrent(t *testing.T) {
	ctx := context.Background()
	// No Flush and small CheckpointBytes: the writes are written behind,
	// and the folder runs alongside them.
	g, err := Open(Config{Dir: t.TempDir(), SegmentSize: 256 << 10, MaxUnfolded: 64 * BlockSize, CheckpointBytes: 16 * BlockSize})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	const size, writers = 1 << 20, 4
	d, err := g.CreateDisk("a", size)
	if err != nil {
		t.Fatal(err)
	}
	m := make([]byte, size)
	stop := make(chan struct{})
	var ckpts sync.WaitGroup
	ckpts.Add(2)
	repeat := func(step func() error) { // until stop, or a failure
		defer ckpts.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if err := step(); err != nil {
				t.Error(err)
				return
			}
		}
	}
	go repeat(func() error { _, err := g.FoldBehind(ctx); return err }) // the write-behind folder
	go repeat(func() error { return g.Checkpoint(ctx) })
	var wg sync.WaitGroup
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			region := m[w*size/writers : (w+1)*size/writers]
			base := int64(w * size / writers)
			rng := rand.New(rand.NewPCG(uint64(w), 3))
			for i := 0; i < 400; i++ {
				n := int64(1+rng.IntN(4)) * BlockSize
				if rng.IntN(4) == 0 {
					n = 1 + rng.Int64N(2*BlockSize) // inline
				}
				off := rng.Int64N(int64(len(region)) - n + 1)
				if n%BlockSize == 0 {
					off &^= BlockSize - 1
				}
				p := bytes.Repeat([]byte{byte(i + 1)}, int(n))
				if err := d.WriteAt(ctx, p, base+off); err != nil {
					t.Error(err)
					return
				}
				copy(region[off:], p)
				got := make([]byte, len(region))
				if err := d.ReadAt(ctx, got, base); err != nil {
					t.Error(err)
					return
				}
				if !bytes.Equal(got, region) {
					t.Errorf("writer %d: its region differs after write %d", w, i)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(stop)
	ckpts.Wait()
	if !g.writingBehind() {
		t.Fatal("the writes were not written behind: the folder had nothing to do")
	}
	checkIndexModel(t, d, m, "after the writers")
	checkFolded(t, g, d, m)
}

// TestFoldFailsOnFullDisk: with recent writes journal-only, a full file
// system stops the fold, not the guest: the checkpoint fails with ENOSPC,
// reads still see every write, and the next checkpoint once there is room
// folds everything.
func TestFoldFailsOnFullDisk(t *testing.T) {
	ctx := context.Background()
	dir := smallTmpfs(t, "1m")
	g, err := Open(Config{Dir: dir, SegmentSize: 256 << 10})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	d, err := g.CreateDisk("a", 4<<20)
	if err != nil {
		t.Fatal(err)
	}
	m := make([]byte, 4<<20)
	var werr error
	for i := 0; i < 1000 && werr == nil; i++ {
		p := bytes.Repeat([]byte{byte(i + 1)}, BlockSize)
		off := int64(i%1024) * BlockSize
		if werr = d.WriteAt(ctx, p, off); werr == nil {
			copy(m[off:], p)
		}
	}
	if !errors.Is(werr, syscall.ENOSPC) || errors.Is(werr, ErrFailed) {
		t.Fatalf("a write on a full file system: %v, want ENOSPC from the journal, the group not failed", werr)
	}
	checkIndexModel(t, d, m, "journal full")
	if err := g.Checkpoint(ctx); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("checkpoint with no room for the images: %v, want ENOSPC", err)
	}
	if err := g.Failed(); err != nil {
		t.Fatalf("a failed fold failed the group: %v", err)
	}
	checkIndexModel(t, d, m, "fold failed")
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_REMOUNT, "size=16m"); err != nil {
		t.Fatal(err)
	}
	if err := g.Checkpoint(ctx); err != nil {
		t.Fatalf("checkpoint once there is room: %v", err)
	}
	if g.Unfolded() != 0 {
		t.Fatalf("%d bytes left unfolded", g.Unfolded())
	}
	p := bytes.Repeat([]byte{0xEE}, BlockSize)
	if err := d.WriteAt(ctx, p, 0); err != nil {
		t.Fatalf("write once there is room: %v", err)
	}
	copy(m, p)
	checkIndexModel(t, d, m, "after room was made")
}

// checkFolded folds the index and compares the image itself with m.
func checkFolded(tb testing.TB, g *Group, d *Disk, m []byte) {
	tb.Helper()
	if err := g.Checkpoint(context.Background()); err != nil {
		tb.Fatal(err)
	}
	if n := d.nidx.Load(); n != 0 {
		tb.Fatalf("%d blocks still indexed after a checkpoint", n)
	}
	got := make([]byte, len(m))
	if err := d.image().ReadAt(got, 0); err != nil {
		tb.Fatal(err)
	}
	if !bytes.Equal(got, m) {
		tb.Fatal("the folded image differs from the model")
	}
}

// TestPacedFoldHurried: the background checkpoint folds at FoldRate while
// the guest writes; an explicit Checkpoint (a commit, a role switch) must
// not wait on that rate, and neither must Close.
func TestPacedFoldHurried(t *testing.T) {
	ctx := context.Background()
	now := time.Unix(1_800_000_000, 0) // the clock never moves: the group never looks idle
	// Without write-behind, whose checkpoints do not pace (behind.go).
	g, err := Open(Config{Dir: t.TempDir(), SegmentSize: 256 << 10, FoldRate: 1, NoWriteBehind: true, Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	d, err := g.CreateDisk("a", 64<<20)
	if err != nil {
		t.Fatal(err)
	}
	m := make([]byte, 64<<20)
	// Two chunks: the paced fold sleeps (for ages, at 1 B/s) after the first.
	for b := int64(0); b < foldChunk+8; b++ {
		p := bytes.Repeat([]byte{byte(b%250 + 1)}, BlockSize)
		if err := d.WriteAt(ctx, p, b*BlockSize); err != nil {
			t.Fatal(err)
		}
		copy(m[b*BlockSize:], p)
	}
	paced := make(chan error, 1)
	go func() { paced <- g.checkpoint(ctx, true) }()
	deadline := time.Now().Add(10 * time.Second)
	for g.Unfolded() != 8*BlockSize { // first chunk folded, pacing now
		if time.Now().After(deadline) {
			t.Fatalf("paced fold did not fold its first chunk: %d bytes unfolded", g.Unfolded())
		}
		time.Sleep(5 * time.Millisecond)
	}
	select {
	case err := <-paced:
		t.Fatalf("paced checkpoint finished at 1 B/s: %v", err)
	default:
	}
	done := make(chan error, 1)
	go func() { done <- g.Checkpoint(ctx) }()
	for _, ch := range []chan error{paced, done} {
		select {
		case err := <-ch:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("an explicit Checkpoint waited on the paced fold's rate")
		}
	}
	checkFolded(t, g, d, m)
	// Close while a paced fold sleeps: it finishes at full speed.
	p := bytes.Repeat([]byte{0x5A}, BlockSize)
	for b := int64(0); b < foldChunk+8; b++ {
		if err := d.WriteAt(ctx, p, b*BlockSize); err != nil {
			t.Fatal(err)
		}
		copy(m[b*BlockSize:], p)
	}
	go func() { paced <- g.checkpoint(ctx, true) }()
	for g.Unfolded() != 8*BlockSize {
		if time.Now().After(deadline) {
			t.Fatalf("second paced fold did not start: %d bytes unfolded", g.Unfolded())
		}
		time.Sleep(5 * time.Millisecond)
	}
	closed := make(chan error, 1)
	go func() { closed <- g.Close() }()
	for _, ch := range []chan error{paced, closed} {
		select {
		case err := <-ch:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("Close waited on the paced fold's rate")
		}
	}
}
