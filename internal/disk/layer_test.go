package disk

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/nbd"
	"github.com/ferry-dr/ferry/internal/nbd/nbdtest"
)

// fileBase is a Base for tests: image files plus writes not yet in them
// (a replica's journal up to the point), which FlattenStep applies.
type fileBase struct {
	dir string

	mu      sync.Mutex
	pending []pendingWrite // in order; the first applied ones are in the files
	applied int
}

type pendingWrite struct {
	id  uint16
	off int64
	p   []byte
}

var _ Base = (*fileBase)(nil)

func (b *fileBase) ImagePath(id uint16) string {
	return filepath.Join(b.dir, fmt.Sprintf("%d.img", id))
}

func (b *fileBase) ReadAt(id uint16, p []byte, off int64) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	f, err := os.Open(b.ImagePath(id))
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := f.ReadAt(p, off); err != nil {
		return err
	}
	for _, w := range b.pending[b.applied:] {
		if w.id != id {
			continue
		}
		s, e := max(off, w.off), min(off+int64(len(p)), w.off+int64(len(w.p)))
		if s < e {
			copy(p[s-off:e-off], w.p[s-w.off:e-w.off])
		}
	}
	return nil
}

func (b *fileBase) Flat() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.applied == len(b.pending)
}

func (b *fileBase) FlattenStep(_ context.Context, max int) (uint64, int64, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	var wrote int64
	for ; max > 0 && b.applied < len(b.pending); max-- {
		w := b.pending[b.applied]
		f, err := os.OpenFile(b.ImagePath(w.id), os.O_RDWR, 0)
		if err != nil {
			return 0, wrote, err
		}
		_, err = f.WriteAt(w.p, w.off)
		f.Close()
		if err != nil {
			return 0, wrote, err
		}
		wrote += int64(len(w.p))
		b.applied++
	}
	// Durable like a replica's folded sequence: flat stays flat.
	if err := os.WriteFile(filepath.Join(b.dir, "applied"), []byte(fmt.Sprint(b.applied)), 0o600); err != nil {
		return 0, wrote, err
	}
	return uint64(len(b.pending) - b.applied), wrote, nil
}

// load reads how many pending writes an earlier process applied.
func (b *fileBase) load() {
	if s, err := os.ReadFile(filepath.Join(b.dir, "applied")); err == nil {
		fmt.Sscan(string(s), &b.applied)
	}
}

func (b *fileBase) Release() error { return os.RemoveAll(b.dir) }
func (b *fileBase) Close() error   { return nil }

// layeredFixture builds a layered group with one disk "vda" of size bytes
// in dir/group: a base of random content with `pending` writes to fold,
// and a top layer holding `top` random blocks. It returns the disk's
// content (the model) and the config that opens the group.
func layeredFixture(tb testing.TB, dir string, size int64, pending, top int, seed uint64) ([]byte, *fileBase, Config) {
	tb.Helper()
	rng := rand.New(rand.NewPCG(seed, 1))
	model := make([]byte, size)
	for i := range model[:size/2] {
		model[i] = byte(rng.Uint32())
	}
	base := &fileBase{dir: filepath.Join(dir, "base")}
	os.MkdirAll(base.dir, 0o700)
	if err := os.WriteFile(base.ImagePath(1), model, 0o600); err != nil {
		tb.Fatal(err)
	}
	for range pending {
		off := rng.Int64N(size - 1)
		p := make([]byte, 1+rng.Int64N(min(size-off, 20000)))
		for i := range p {
			p[i] = byte(rng.Uint32())
		}
		base.pending = append(base.pending, pendingWrite{1, off, p})
		copy(model[off:], p)
	}
	topFile := make([]byte, size)
	set := NewBlockSet(size)
	for range top {
		b := rng.Int64N((size + BlockSize - 1) / BlockSize)
		set.Add(b)
		end := min(size, (b+1)*BlockSize)
		for i := b * BlockSize; i < end; i++ {
			topFile[i] = byte(rng.Uint32())
			model[i] = topFile[i]
		}
	}
	topPath := filepath.Join(dir, "overlay")
	if err := os.WriteFile(topPath, topFile, 0o600); err != nil {
		tb.Fatal(err)
	}
	gdir := filepath.Join(dir, "group")
	if err := CreateLayered(gdir, []Spec{{ID: 1, Name: "vda", Size: size}}, map[uint16]Layer{1: {Path: topPath, Present: set}},
		BaseRef{Name: "base", Seq: 7}); err != nil {
		tb.Fatal(err)
	}
	cfg := Config{Dir: gdir, SegmentSize: 256 << 10, NoFold: true, OpenBase: func(ref BaseRef) (Base, error) {
		if ref.Name != "base" || ref.Seq != 7 {
			return nil, fmt.Errorf("unexpected base %+v", ref)
		}
		if _, err := os.Stat(base.dir); err != nil {
			return nil, err
		}
		base.load()
		return base, nil
	}}
	return model, base, cfg
}

func checkModel(tb testing.TB, d *Disk, model []byte) {
	tb.Helper()
	got := make([]byte, len(model))
	if err := d.ReadAt(context.Background(), got, 0); err != nil {
		tb.Fatal(err)
	}
	if !bytes.Equal(got, model) {
		for i := range got {
			if got[i] != model[i] {
				tb.Fatalf("disk differs from the model at byte %d (block %d)", i, i/BlockSize)
			}
		}
	}
}

func TestLayeredConformance(t *testing.T) {
	for _, flat := range []bool{false, true} {
		t.Run(fmt.Sprintf("flat=%v", flat), func(t *testing.T) {
			nbdtest.TestDevice(t, 2<<20, func(t *testing.T) nbd.Device {
				dir := t.TempDir()
				// An all-zero base and an empty top: the device starts zero.
				base := &fileBase{dir: filepath.Join(dir, "base")}
				os.MkdirAll(base.dir, 0o700)
				os.WriteFile(base.ImagePath(1), make([]byte, 2<<20), 0o600)
				if !flat {
					base.pending = []pendingWrite{{1, 100, make([]byte, 5000)}}
				}
				os.WriteFile(filepath.Join(dir, "top"), nil, 0o600)
				os.Truncate(filepath.Join(dir, "top"), 2<<20)
				gdir := filepath.Join(dir, "g")
				if err := CreateLayered(gdir, []Spec{{ID: 1, Name: "vda", Size: 2 << 20}},
					map[uint16]Layer{1: {Path: filepath.Join(dir, "top"), Present: NewBlockSet(2 << 20)}}, BaseRef{Name: "b"}); err != nil {
					t.Fatal(err)
				}
				g, err := Open(Config{Dir: gdir, NoFold: true, OpenBase: func(BaseRef) (Base, error) { return base, nil }})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { g.Close() })
				d, _ := g.Disk("vda")
				return d
			})
		})
	}
}

// TestLayeredFold writes, zeroes and trims at random while the fold runs
// step by step, with checkpoints and reopens in between, and compares the
// disk with a model all along; at the end the images are plain and the
// base is gone.
func TestLayeredFold(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	e, b := foldEntries, foldBlocks
	foldEntries, foldBlocks = 40, 8
	t.Cleanup(func() { foldEntries, foldBlocks = e, b })
	const size = 3<<20 + 2048 // a short last block
	model, base, cfg := layeredFixture(t, dir, size, 3000, 300, 1)
	g, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	d, _ := g.Disk("vda")
	checkModel(t, d, model)
	rng := rand.New(rand.NewPCG(9, 9))
	steps := 0
	for done := false; !done; {
		for range 5 {
			off := rng.Int64N(size - 1)
			n := 1 + rng.Int64N(min(size-off, 3*BlockSize))
			switch rng.IntN(4) {
			case 0:
				if err := d.WriteZeroes(ctx, off, n); err != nil {
					t.Fatal(err)
				}
				clear(model[off : off+n])
			case 1:
				if err := d.Trim(ctx, off, n); err != nil {
					t.Fatal(err)
				}
				clear(model[off : off+n])
			default:
				p := make([]byte, n)
				for i := range p {
					p[i] = byte(rng.Uint32())
				}
				if err := d.WriteAt(ctx, p, off); err != nil {
					t.Fatal(err)
				}
				copy(model[off:], p)
			}
		}
		_, done, err = g.FoldStep(ctx)
		if err != nil {
			t.Fatal(err)
		}
		steps++
		if steps%7 == 0 {
			checkModel(t, d, model)
		}
		if steps%11 == 0 && !done {
			if err := g.Close(); err != nil {
				t.Fatal(err)
			}
			if g, err = Open(cfg); err != nil {
				t.Fatal(err)
			}
			d, _ = g.Disk("vda")
			checkModel(t, d, model)
		}
		if steps > 10000 {
			t.Fatal("the fold does not end")
		}
	}
	checkModel(t, d, model)
	if g.Layered() || g.Fold().Phase != api.FoldDone {
		t.Fatalf("after the fold: layered %v, %+v", g.Layered(), g.Fold())
	}
	if _, err := os.Stat(base.dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("base not released: %v", err)
	}
	if _, err := os.Stat(filepath.Join(cfg.Dir, "images", "vda.top")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("top layer left: %v", err)
	}
	g.Close()
	plain := cfg
	plain.OpenBase = nil // a plain group needs no base
	g, err = Open(plain)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	d, _ = g.Disk("vda")
	checkModel(t, d, model)
	t.Logf("fold took %d steps", steps)
}

// TestLayeredCrash kills a process (the test binary as a child) at each
// crash point of the fold's end and in the middle of the fold, and checks
// that the reopened group holds exactly what was acknowledged.
func TestLayeredCrash(t *testing.T) {
	for _, point := range []string{"midway", "finish-intent-saved", "finish-image-moved", "finish-plain-saved"} {
		t.Run(point, func(t *testing.T) {
			dir := t.TempDir()
			model, base, cfg := layeredFixture(t, dir, 1<<20, 200, 40, 2)
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), "FERRY_DISK_CRASH_CHILD="+point+":"+dir)
			out, err := cmd.CombinedOutput()
			if ee := (*exec.ExitError)(nil); !errors.As(err, &ee) || ee.ExitCode() != 3 {
				t.Fatalf("child did not die at %s: %v\n%s", point, err, out)
			}
			// The child wrote block 5 and block 200 with 0xAB and flushed.
			copy(model[5*BlockSize:], bytes.Repeat([]byte{0xAB}, BlockSize))
			copy(model[200*BlockSize:], bytes.Repeat([]byte{0xAB}, 100))
			base.load()
			if point != "midway" && base.applied != len(base.pending) {
				t.Fatalf("the base was not flat at %s", point)
			}
			g, err := Open(cfg)
			if err != nil {
				t.Fatal(err)
			}
			d, _ := g.Disk("vda")
			checkModel(t, d, model)
			if err := g.FinishFold(context.Background()); err != nil {
				t.Fatal(err)
			}
			checkModel(t, d, model)
			g.Close()
		})
	}
}

// crashChild is the child of TestLayeredCrash: it opens the group, writes
// and flushes, folds and dies at the named point.
func crashChild(arg string) {
	point, dir, _ := strings.Cut(arg, ":")
	ctx := context.Background()
	_, base, cfg := layeredFixtureNoCreate(dir)
	CrashPoint = func(name string) {
		if name == point {
			os.Exit(3)
		}
	}
	g, err := Open(cfg)
	if err != nil {
		fmt.Println("open:", err)
		os.Exit(1)
	}
	d, _ := g.Disk("vda")
	if err := d.WriteAt(ctx, bytes.Repeat([]byte{0xAB}, BlockSize), 5*BlockSize); err != nil {
		os.Exit(1)
	}
	if err := d.WriteAt(ctx, bytes.Repeat([]byte{0xAB}, 100), 200*BlockSize); err != nil {
		os.Exit(1)
	}
	if err := d.Flush(ctx); err != nil {
		os.Exit(1)
	}
	if point == "midway" {
		base.FlattenStep(ctx, 50)
		g.FoldStep(ctx)
		g.Checkpoint(ctx)
		os.Exit(3)
	}
	if err := g.FinishFold(ctx); err != nil {
		fmt.Println("fold:", err)
	}
	os.Exit(1)
}

// layeredFixtureNoCreate rebuilds the fixture's base (same seed) for a
// group that already exists in dir.
func layeredFixtureNoCreate(dir string) ([]byte, *fileBase, Config) {
	tmp, _ := os.MkdirTemp("", "fixture")
	defer os.RemoveAll(tmp)
	var tb fakeTB
	_, base, _ := layeredFixture(&tb, tmp, 1<<20, 200, 40, 2)
	b := &fileBase{dir: filepath.Join(dir, "base"), pending: base.pending}
	b.load()
	cfg := Config{Dir: filepath.Join(dir, "group"), SegmentSize: 256 << 10, NoFold: true,
		OpenBase: func(BaseRef) (Base, error) { return b, nil }}
	return nil, b, cfg
}

// fakeTB lets the child process reuse layeredFixture.
type fakeTB struct{ testing.TB }

func (fakeTB) Helper()                   {}
func (fakeTB) Fatal(args ...any)         { fmt.Println(args...); os.Exit(1) }
func (fakeTB) Fatalf(f string, a ...any) { fmt.Printf(f+"\n", a...); os.Exit(1) }
