package nbd

import (
	"context"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// batchDev is a FileDevice that also batches.
type batchDev struct{ *FileDevice }

func (b batchDev) WriteAtBatch(ctx context.Context, ps [][]byte, offs []int64) error {
	for i := range ps {
		if err := b.WriteAt(ctx, ps[i], offs[i]); err != nil {
			return err
		}
	}
	return nil
}

func TestObserve(t *testing.T) {
	fd, err := OpenFile(filepath.Join(t.TempDir(), "d"), 1<<20, false)
	if err != nil {
		t.Fatal(err)
	}
	defer fd.Close()
	ctx := context.Background()
	for _, tc := range []struct {
		name  string
		dev   Device
		batch bool
	}{{"plain", fd, false}, {"batching", batchDev{fd}, true}} {
		t.Run(tc.name, func(t *testing.T) {
			var mu sync.Mutex
			got := map[string]int64{}
			var errs int
			d := Observe(tc.dev, func(op string, n int64, _ time.Duration, err error) {
				mu.Lock()
				defer mu.Unlock()
				got[op] += n
				if err != nil {
					errs++
				}
			})
			if _, ok := d.(BatchWriter); ok != tc.batch {
				t.Fatalf("wrapper batches: %v, want %v", ok, tc.batch)
			}
			d.WriteAt(ctx, make([]byte, 4096), 0)
			d.ReadAt(ctx, make([]byte, 512), 0)
			d.WriteZeroes(ctx, 0, 8192)
			d.Trim(ctx, 0, 4096)
			d.Flush(ctx)
			if bw, ok := d.(BatchWriter); ok {
				bw.WriteAtBatch(ctx, [][]byte{make([]byte, 100), make([]byte, 200)}, []int64{0, 4096})
			}
			if err := d.ReadAt(ctx, make([]byte, 10), 1<<20); err == nil {
				t.Fatal("read past the end succeeded")
			}
			want := map[string]int64{"write": 4096, "read": 522, "write_zeroes": 8192, "trim": 4096, "flush": 0}
			if tc.batch {
				want["write"] += 300
			}
			for op, n := range want {
				if got[op] != n {
					t.Errorf("%s: %d bytes observed, want %d", op, got[op], n)
				}
			}
			if _, ok := got["flush"]; !ok {
				t.Error("flush not observed")
			}
			if errs != 1 {
				t.Errorf("%d errors observed, want 1", errs)
			}
		})
	}
}
