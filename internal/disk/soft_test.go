package disk

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/ferry-dr/ferry/internal/journal"
)

// syncedImage records what a power loss would leave of an image: its
// content as of its last Sync.
type syncedImage struct {
	image
	path   string
	synced []byte
}

func (s *syncedImage) Sync() error {
	if err := s.image.Sync(); err != nil {
		return err
	}
	b, err := os.ReadFile(s.path)
	s.synced = b
	return err
}

// watchSyncs wraps every image of g so that powerLoss can put back what
// was last synced. The images must be synced when it is called.
func watchSyncs(tb testing.TB, g *Group) map[string]*syncedImage {
	tb.Helper()
	out := map[string]*syncedImage{}
	for _, d := range g.disks {
		s := &syncedImage{image: d.image(), path: g.imagePath(d.spec.Name)}
		if err := s.Sync(); err != nil {
			tb.Fatal(err)
		}
		d.img.Store(&imageBox{s})
		out[d.spec.Name] = s
	}
	return out
}

// powerLoss closes g as a power loss would leave its files: the images as
// of their last fsync, and the journal cut after its last durable entry
// (metadata operations, renames and trims, are taken to have persisted).
func powerLoss(tb testing.TB, g *Group, imgs map[string]*syncedImage) {
	tb.Helper()
	durable := g.j.DurableSeq()
	// Where the first entry after durable starts, if any is kept.
	var cut *journal.Loc
	if first, last := g.j.FirstSeq(), g.j.LastSeq(); last > durable && first <= last {
		r, err := g.j.NewReader(first)
		if err != nil {
			tb.Fatal(err)
		}
		for {
			e, ok, err := r.TryNext()
			if err != nil || !ok {
				tb.Fatalf("read journal: %v", err)
			}
			if e.Seq > durable {
				l := r.Loc()
				l.Off -= journal.EntryHeaderSize
				cut = &l
				break
			}
		}
		r.Close()
	}
	segs := g.j.Segments()
	g.closeFiles()
	g.j.Close()
	for name, s := range imgs {
		if err := os.WriteFile(s.path, s.synced, 0o600); err != nil {
			tb.Fatalf("restore image %s: %v", name, err)
		}
	}
	if cut == nil {
		return
	}
	jdir := filepath.Join(g.cfg.Dir, "journal")
	for _, first := range segs {
		p := filepath.Join(jdir, fmt.Sprintf("%020d.seg", first))
		switch {
		case first == cut.Seg:
			if err := os.Truncate(p, cut.Off); err != nil {
				tb.Fatal(err)
			}
		case first > cut.Seg:
			if err := os.Remove(p); err != nil {
				tb.Fatal(err)
			}
		}
	}
}

// openSmallGroup opens a group with small segments (so checkpoints trim)
// and an unpaced fold, holding one disk "a" of size bytes.
func openSmallGroup(tb testing.TB, size int64) (Config, *Group, *Disk) {
	tb.Helper()
	cfg := Config{Dir: tb.TempDir(), SegmentSize: 64 << 10, FoldRate: -1}
	g, d := openDisk(tb, cfg, size)
	return cfg, g, d
}

// softModel tracks, per block, what a power loss may leave: the value at
// the last acknowledged FLUSH, or any value written after it.
type softModel struct {
	flushed []uint64
	cur     []uint64
	later   []map[uint64]bool
}

func newSoftModel(blocks int) *softModel {
	m := &softModel{flushed: make([]uint64, blocks), cur: make([]uint64, blocks), later: make([]map[uint64]bool, blocks)}
	for i := range m.later {
		m.later[i] = map[uint64]bool{}
	}
	return m
}

func (m *softModel) write(b int, v uint64) {
	m.cur[b] = v
	m.later[b][v] = true
}

func (m *softModel) flush() {
	copy(m.flushed, m.cur)
	for i := range m.later {
		clear(m.later[i])
	}
}

// TestSoftCheckpointPowerLoss drives random writes, FLUSHes and soft and
// hard checkpoints, then loses power: every block must hold its value at
// the last FLUSH or one written after it, never an older one. It fails
// if Flush does not harden a soft checkpoint (the trimmed journal held
// writes the images had only in the page cache).
func TestSoftCheckpointPowerLoss(t *testing.T) {
	const blocks = 256
	for seed := uint64(1); seed <= 40; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			ctx := context.Background()
			cfg, g, d := openSmallGroup(t, blocks*BlockSize)
			imgs := watchSyncs(t, g)
			rng := rand.New(rand.NewPCG(seed, 7))
			m := newSoftModel(blocks)
			next := uint64(1)
			softs := 0
			for op := 0; op < 300; op++ {
				switch k := rng.IntN(100); {
				case k < 75:
					n := 1 + rng.IntN(8)
					if rng.IntN(10) == 0 {
						n = 64 // 256 KiB: applied to the image at once
					}
					b := rng.IntN(blocks - n + 1)
					p := make([]byte, n*BlockSize)
					for i := range n {
						binary.LittleEndian.PutUint64(p[i*BlockSize:], next)
						m.write(b+i, next)
						next++
					}
					if err := d.WriteAt(ctx, p, int64(b)*BlockSize); err != nil {
						t.Fatal(err)
					}
				case k < 85:
					if err := d.Flush(ctx); err != nil {
						t.Fatal(err)
					}
					m.flush()
				case k < 96:
					if err := g.checkpoint(ctx, true); err != nil {
						t.Fatal(err)
					}
					if g.man.SoftSeq > g.man.AppliedSeq {
						softs++
					}
				default:
					if err := g.Checkpoint(ctx); err != nil {
						t.Fatal(err)
					}
				}
			}
			powerLoss(t, g, imgs)
			g2, err := Open(cfg)
			if err != nil {
				t.Fatalf("reopen after power loss (%d soft checkpoints): %v", softs, err)
			}
			defer g2.Close()
			d2, _ := g2.Disk("a")
			got := make([]byte, blocks*BlockSize)
			if err := d2.ReadAt(ctx, got, 0); err != nil {
				t.Fatal(err)
			}
			for b := range blocks {
				v := binary.LittleEndian.Uint64(got[b*BlockSize:])
				if v != m.flushed[b] && !m.later[b][v] {
					t.Fatalf("block %d holds write %d: neither its value at the last FLUSH (%d) nor a later one (%d soft checkpoints)", b, v, m.flushed[b], softs)
				}
			}
		})
	}
}

// TestSoftCheckpoint: with no FLUSH since the last hard checkpoint, a
// background checkpoint trims the journal without making the images
// durable; a FLUSH then does (and a process crash loses nothing either
// way). After a FLUSH, the next background checkpoint is hard.
func TestSoftCheckpoint(t *testing.T) {
	ctx := context.Background()
	cfg, g, d := openSmallGroup(t, 1<<20)
	if err := g.Checkpoint(ctx); err != nil {
		t.Fatal(err)
	}
	a0 := g.man.AppliedSeq
	p := bytes.Repeat([]byte{7}, 64<<10)
	for i := range 8 {
		if err := d.WriteAt(ctx, p, int64(i)*int64(len(p))); err != nil {
			t.Fatal(err)
		}
	}
	if err := g.checkpoint(ctx, true); err != nil {
		t.Fatal(err)
	}
	if got, want := g.man.SoftSeq, g.j.LastSeq(); got != want || g.man.AppliedSeq != a0 {
		t.Fatalf("after a background checkpoint without FLUSH: applied %d soft %d, want applied %d soft %d", g.man.AppliedSeq, got, a0, want)
	}
	if first := g.j.FirstSeq(); first <= a0+1 {
		t.Fatalf("journal still starts at %d: the soft checkpoint trimmed nothing", first)
	}
	onDisk, err := os.ReadFile(g.manifestPath())
	if err != nil || !bytes.Contains(onDisk, []byte(`"soft_seq"`)) {
		t.Fatalf("the manifest on disk does not record the soft checkpoint: %s %v", onDisk, err)
	}
	if err := d.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if g.man.AppliedSeq != g.j.LastSeq() || g.man.SoftSeq != 0 {
		t.Fatalf("after FLUSH: applied %d soft %d, want applied %d soft 0", g.man.AppliedSeq, g.man.SoftSeq, g.j.LastSeq())
	}
	// FLUSHed writes: the next background checkpoint must be hard.
	for i := range 8 {
		d.WriteAt(ctx, p[:4096], int64(i)*4096)
	}
	if err := d.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	d.WriteAt(ctx, p[:4096], 1<<19)
	if err := g.checkpoint(ctx, true); err != nil {
		t.Fatal(err)
	}
	if g.man.AppliedSeq != g.j.LastSeq() || g.man.SoftSeq != 0 {
		t.Fatalf("checkpoint after a FLUSH: applied %d soft %d, want hard at %d", g.man.AppliedSeq, g.man.SoftSeq, g.j.LastSeq())
	}
	// A journal sync that no FLUSH asked for (a hard checkpoint's covers
	// what was appended after its fold) promises nothing: the next
	// checkpoint is soft again.
	d.WriteAt(ctx, p[:4096], 1<<19)
	if err := g.j.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	// Soft again, then a process crash: the page cache keeps what the
	// trimmed journal held, and the reopen leaves no soft state behind.
	for i := range 8 {
		d.WriteAt(ctx, bytes.Repeat([]byte{byte(9 + i)}, 64<<10), int64(i)*65536)
	}
	if err := g.checkpoint(ctx, true); err != nil {
		t.Fatal(err)
	}
	if g.man.SoftSeq <= g.man.AppliedSeq {
		t.Fatal("no soft checkpoint")
	}
	want := make([]byte, 1<<20)
	d.ReadAt(ctx, want, 0)
	g.closeFiles()
	g.j.Close()
	g2, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer g2.Close()
	if g2.man.SoftSeq != 0 || g2.man.AppliedSeq != g2.j.LastSeq() {
		t.Fatalf("after reopen: applied %d soft %d, journal at %d", g2.man.AppliedSeq, g2.man.SoftSeq, g2.j.LastSeq())
	}
	d2, _ := g2.Disk("a")
	got := make([]byte, 1<<20)
	d2.ReadAt(ctx, got, 0)
	if !bytes.Equal(got, want) {
		t.Fatal("the disk differs after a crash following a soft checkpoint")
	}
}

// countingImage counts the writes, write-back hints and syncs an image
// gets.
type countingImage struct {
	image
	writes, starts, syncs int
}

func (c *countingImage) WriteAt(p []byte, off int64) error {
	c.writes++
	return c.image.WriteAt(p, off)
}

func (c *countingImage) StartSync() { c.starts++; c.image.StartSync() }
func (c *countingImage) Sync() error {
	c.syncs++
	return c.image.Sync()
}

// TestSoftCheckpointStartsWriteBack: a soft checkpoint skips the images'
// sync but still starts their write-back as it folds, so their dirty
// pages do not pile up for the kernel to write in one burst (which stalled
// every fsync on the disk behind it: docs/benchmarks.md).
func TestSoftCheckpointStartsWriteBack(t *testing.T) {
	ctx := context.Background()
	_, g, d := openSmallGroup(t, 1<<20)
	if err := g.Checkpoint(ctx); err != nil {
		t.Fatal(err)
	}
	c := &countingImage{image: d.image()}
	d.img.Store(&imageBox{c})
	p := bytes.Repeat([]byte{5}, 64<<10)
	for i := range 8 {
		if err := d.WriteAt(ctx, p, int64(i)*int64(len(p))); err != nil {
			t.Fatal(err)
		}
	}
	if d.nidx.Load() == 0 {
		t.Fatal("the writes were not held in the index: nothing for the checkpoint to fold")
	}
	if err := g.checkpoint(ctx, true); err != nil {
		t.Fatal(err)
	}
	if g.man.SoftSeq != g.j.LastSeq() || c.syncs != 0 {
		t.Fatalf("want a soft checkpoint at %d without a sync: soft %d, %d syncs", g.j.LastSeq(), g.man.SoftSeq, c.syncs)
	}
	if c.starts == 0 {
		t.Fatal("the soft checkpoint folded into the image without starting its write-back")
	}
}
