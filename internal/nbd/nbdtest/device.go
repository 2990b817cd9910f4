// Package nbdtest holds the conformance suite for nbd.Device
// implementations: every implementation runs TestDevice.
package nbdtest

import (
	"bytes"
	"context"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/ferry-dr/ferry/internal/nbd"
)

// TestDevice checks the nbd.Device contract against devices made by newDev,
// each of the given size (at least 1 MiB), initially all zero.
func TestDevice(t *testing.T, size int64, newDev func(t *testing.T) nbd.Device) {
	ctx := context.Background()
	t.Run("zero initially", func(t *testing.T) {
		d := newDev(t)
		got := make([]byte, 64<<10)
		if err := d.ReadAt(ctx, got, size-int64(len(got))); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, make([]byte, len(got))) {
			t.Fatal("new device is not zero")
		}
	})
	t.Run("write read zero trim", func(t *testing.T) {
		d := newDev(t)
		ref := make([]byte, size)
		rng := rand.New(rand.NewPCG(3, 4))
		bw, canBatch := d.(nbd.BatchWriter)
		for i := 0; i < 300; i++ {
			off := rng.Int64N(size - 1)
			n := 1 + rng.Int64N(min(size-off, 200<<10))
			if canBatch && rng.IntN(5) == 0 {
				// A batch of overlapping writes applies in order.
				var ps [][]byte
				var offs []int64
				for k := 0; k < 1+rng.IntN(20); k++ {
					o := off + rng.Int64N(n)
					p := make([]byte, 1+rng.Int64N(size-o))
					p = p[:min(len(p), 64<<10)]
					for x := range p {
						p[x] = byte(rng.Uint32())
					}
					ps, offs = append(ps, p), append(offs, o)
				}
				if err := bw.WriteAtBatch(ctx, ps, offs); err != nil {
					t.Fatalf("WriteAtBatch: %v", err)
				}
				for k, p := range ps {
					copy(ref[offs[k]:], p)
				}
				continue
			}
			switch rng.IntN(4) {
			case 0, 1:
				p := make([]byte, n)
				for k := range p {
					p[k] = byte(rng.Uint32())
				}
				if err := d.WriteAt(ctx, p, off); err != nil {
					t.Fatalf("WriteAt: %v", err)
				}
				copy(ref[off:], p)
			case 2:
				if err := d.WriteZeroes(ctx, off, n); err != nil {
					t.Fatalf("WriteZeroes: %v", err)
				}
				clear(ref[off : off+n])
			case 3:
				// Trim's contents are the device's choice; ferry's devices
				// promise zero, and the conformance suite holds them to it.
				if err := d.Trim(ctx, off, n); err != nil {
					t.Fatalf("Trim: %v", err)
				}
				clear(ref[off : off+n])
			}
			if i%50 == 0 {
				if err := d.Flush(ctx); err != nil {
					t.Fatalf("Flush: %v", err)
				}
			}
		}
		got := make([]byte, size)
		if err := d.ReadAt(ctx, got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, ref) {
			t.Fatal("device content differs from reference")
		}
	})
	t.Run("concurrent", func(t *testing.T) {
		d := newDev(t)
		var wg sync.WaitGroup
		for g := 0; g < 8; g++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				p := bytes.Repeat([]byte{byte(g + 1)}, 4096)
				for i := 0; i < 50; i++ {
					off := int64(g)*4096 + int64(i%4)*65536
					if err := d.WriteAt(ctx, p, off); err != nil {
						t.Error(err)
						return
					}
					q := make([]byte, 4096)
					if err := d.ReadAt(ctx, q, off); err != nil || !bytes.Equal(p, q) {
						t.Errorf("read own write: %v", err)
						return
					}
					if i%10 == 0 {
						if err := d.Flush(ctx); err != nil {
							t.Error(err)
							return
						}
					}
				}
			}()
		}
		wg.Wait()
	})
}
