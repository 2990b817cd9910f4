package ordercheck

import (
	"context"
	"errors"
	"sync"
	"testing"
)

type mem struct {
	mu sync.Mutex
	b  []byte
}

func (m *mem) WriteAt(_ context.Context, p []byte, off int64, _ bool) error {
	m.mu.Lock()
	copy(m.b[off:], p)
	m.mu.Unlock()
	return nil
}

func TestVerify(t *testing.T) {
	m := &mem{b: make([]byte, 64*RecordSize)}
	w := NewWriter(4)
	if err := w.Run(context.Background(), m, 1, 40); err != nil {
		t.Fatal(err)
	}
	top, err := Verify(m.b, 4)
	if err != nil {
		t.Fatal(err)
	}
	if want := []uint64{37, 38, 39, 40}; top[0] != want[0] || top[3] != want[3] {
		t.Fatalf("top %v, want %v", top, want)
	}
	// A hole in a lane before a present record breaks order.
	clear(m.b[9*RecordSize : 10*RecordSize]) // record 10, lane 1
	if _, err := Verify(m.b, 4); !errors.Is(err, ErrOrder) {
		t.Fatalf("hole: %v", err)
	}
	// A damaged record is reported.
	m.b[20*RecordSize+100] ^= 1
	if _, err := Verify(m.b, 4); err == nil {
		t.Fatal("damage not found")
	}
}
