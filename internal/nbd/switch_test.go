package nbd

import (
	"bytes"
	"context"
	"testing"
	"time"
)

// TestSwitch moves a connected client from one device to another: what
// it wrote before is carried over by the switcher, what it writes after
// lands on the new device only, and the connection never drops.
func TestSwitch(t *testing.T) {
	ctx := context.Background()
	old, next := newMem(1<<20), &batchMem{memDevice: newMem(1 << 20)}
	sw := NewSwitch(old)
	_, sock := startServer(t, Export{Name: "vda", Size: 1 << 20, Device: sw})
	c := dialT(t, sock, "vda")
	if err := c.WriteAt(ctx, bytes.Repeat([]byte{1}, 4096), 0, false); err != nil {
		t.Fatal(err)
	}
	sw.Pause()
	// While paused, a request waits.
	done := make(chan error, 1)
	go func() { done <- c.WriteAt(ctx, bytes.Repeat([]byte{2}, 4096), 4096, true) }()
	select {
	case err := <-done:
		t.Fatalf("a write completed while paused: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	copy(next.b, old.b) // what a commit does: the new device holds the old one's data
	sw.Resume(next)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 8192)
	if err := c.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	want := append(bytes.Repeat([]byte{1}, 4096), bytes.Repeat([]byte{2}, 4096)...)
	if !bytes.Equal(got, want) {
		t.Fatal("data after the switch differs")
	}
	if old.b[4096] != 0 || next.b[4096] != 2 {
		t.Fatalf("the write after the switch went to the old device (old %d, new %d)", old.b[4096], next.b[4096])
	}
	if next.flushes == 0 {
		t.Fatal("the FUA write was not flushed on the new device")
	}
	if err := sw.WriteAtBatch(ctx, [][]byte{{3}, {4}}, []int64{0, 1}); err != nil || next.batches != 1 || next.b[1] != 4 {
		t.Fatalf("a batch did not reach the new device's batching: %v, %d batches", err, next.batches)
	}
}
