package disk

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// writeBlocks writes blocks [from, to) of d, block i filled with byte(i+1).
func writeBlocks(tb testing.TB, d *Disk, from, to int) {
	tb.Helper()
	for i := from; i < to; i++ {
		if err := d.WriteAt(context.Background(), bytes.Repeat([]byte{byte(i + 1)}, BlockSize), int64(i)*BlockSize); err != nil {
			tb.Fatal(err)
		}
	}
}

// checkImageBlocks fails unless the image file itself (not the index)
// holds blocks [from, to) as writeBlocks wrote them.
func checkImageBlocks(tb testing.TB, g *Group, name string, from, to int) {
	tb.Helper()
	img, err := os.ReadFile(g.imagePath(name))
	if err != nil {
		tb.Fatal(err)
	}
	for i := from; i < to; i++ {
		if got, want := img[i*BlockSize], byte(i+1); got != want || img[(i+1)*BlockSize-1] != want {
			tb.Fatalf("image block %d holds %d, want %d", i, got, want)
		}
	}
}

// TestWriteBehindStep: a stream without FLUSH is kept only in the journal
// up to the write-behind bound (here MaxUnfolded), beyond which writes go
// to the image at once; FoldBehind then writes the backlog to the image.
func TestWriteBehindStep(t *testing.T) {
	ctx := context.Background()
	const bound = 64
	g, d := openDisk(t, Config{Dir: t.TempDir(), SegmentSize: 256 << 10, CheckpointBytes: 8 * BlockSize, MaxUnfolded: bound * BlockSize}, 1<<20)
	defer g.Close()
	writeBlocks(t, d, 0, 100)
	if g.indexing() {
		t.Fatal("the stream counts as flushed: the test needs one without FLUSH")
	}
	if got, want := g.Unfolded(), int64(bound*BlockSize); got != want {
		t.Fatalf("unfolded %d after 100 writes without FLUSH, want the bound %d", got, want)
	}
	checkImageBlocks(t, g, "a", bound, 100) // past the bound: at once
	left, err := g.FoldBehind(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// The first few writes came while the stream still counted as
	// flushed (Group.indexing), so they were not queued: the checkpoint
	// folds those.
	if left > 8*BlockSize || left != g.Unfolded() {
		t.Fatalf("FoldBehind left %d bytes (unfolded %d)", left, g.Unfolded())
	}
	checkImageBlocks(t, g, "a", 8, 100)
	if left, err := g.FoldBehind(ctx); err != nil || left != g.Unfolded() {
		t.Fatalf("a second FoldBehind: left %d, %v", left, err)
	}
	if err := g.Checkpoint(ctx); err != nil {
		t.Fatal(err)
	}
	if g.Unfolded() != 0 {
		t.Fatalf("unfolded %d after a checkpoint", g.Unfolded())
	}
	checkImageBlocks(t, g, "a", 0, 100)
}

// batchThreads counts the process's threads whose scheduling policy is
// SCHED_BATCH (field 41 of /proc/self/task/*/stat).
func batchThreads(tb testing.TB) int {
	tb.Helper()
	stats, err := filepath.Glob("/proc/self/task/*/stat")
	if err != nil {
		tb.Fatal(err)
	}
	n := 0
	for _, p := range stats {
		b, err := os.ReadFile(p)
		if err != nil {
			continue // the thread ended
		}
		// The fields after the command's closing parenthesis start at
		// field 3 (the command may hold spaces).
		f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
		if len(f) > 41-3 && f[41-3] == strconv.Itoa(unix.SCHED_BATCH) {
			n++
		}
	}
	return n
}

// TestWriteBehindFolder: the folder wakes once the backlog of a stream
// without FLUSH passes behindFrom and folds the oldest blocks, with no
// checkpoint (only the folder runs, not Start's checkpoint loop), on a
// SCHED_BATCH thread. A read meanwhile sees every write.
func TestWriteBehindFolder(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	g, d := openDisk(t, Config{Dir: t.TempDir(), CheckpointBytes: 8 * BlockSize}, 8<<20)
	batch0 := batchThreads(t)
	done := make(chan struct{})
	go func() {
		defer close(done)
		g.behindLoop(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
		if err := g.Close(); err != nil {
			t.Error(err)
		}
	})
	const n = 2 * behindFrom / BlockSize
	writeBlocks(t, d, 0, n)
	deadline := time.Now().Add(10 * time.Second)
	for g.Unfolded() >= behindFrom {
		if time.Now().After(deadline) {
			t.Fatalf("the folder did not run: %d bytes unfolded", g.Unfolded())
		}
		time.Sleep(2 * time.Millisecond)
	}
	if got := batchThreads(t); got <= batch0 {
		t.Errorf("%d SCHED_BATCH threads with the folder running, %d before: want one more", got, batch0)
	}
	// The oldest first; the first few came while the stream still counted
	// as flushed (Group.indexing), not queued: a checkpoint folds those.
	checkImageBlocks(t, g, "a", 16, n-behindFrom/BlockSize)
	p := make([]byte, n*BlockSize)
	if err := d.ReadAt(ctx, p, 0); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		if p[i*BlockSize] != byte(i+1) {
			t.Fatalf("block %d reads %d, want %d", i, p[i*BlockSize], byte(i+1))
		}
	}
}

// TestNoWriteBehind: NoWriteBehind keeps the policy before write-behind, a
// stream without FLUSH going to the image at once.
func TestNoWriteBehind(t *testing.T) {
	g, d := openDisk(t, Config{Dir: t.TempDir(), SegmentSize: 256 << 10, CheckpointBytes: 8 * BlockSize, NoWriteBehind: true}, 1<<20)
	defer g.Close()
	writeBlocks(t, d, 0, 20)
	if got, want := g.Unfolded(), int64(9*BlockSize); got > want {
		t.Fatalf("unfolded %d: the stream without FLUSH was indexed past CheckpointBytes", got)
	}
	checkImageBlocks(t, g, "a", 10, 20)
}

// TestWriteBehindOverwrites: a block overwritten while it waits is folded
// once, by the last of its queued writes.
func TestWriteBehindOverwrites(t *testing.T) {
	ctx := context.Background()
	g, d := openDisk(t, Config{Dir: t.TempDir(), SegmentSize: 1 << 20, CheckpointBytes: 8 * BlockSize}, 1<<20)
	defer g.Close()
	writeBlocks(t, d, 0, 16) // past CheckpointBytes: written behind from here
	if _, err := g.FoldBehind(ctx); err != nil {
		t.Fatal(err)
	}
	if err := g.Checkpoint(ctx); err != nil {
		t.Fatal(err)
	}
	c := &countingImage{image: d.image()}
	d.img.Store(&imageBox{c})
	for i := range 100 {
		if err := d.WriteAt(ctx, bytes.Repeat([]byte{byte(i)}, BlockSize), 5*BlockSize); err != nil {
			t.Fatal(err)
		}
	}
	if !g.writingBehind() || g.Unfolded() != BlockSize {
		t.Fatalf("writing behind %v, unfolded %d: want the block indexed", g.writingBehind(), g.Unfolded())
	}
	if _, err := g.FoldBehind(ctx); err != nil {
		t.Fatal(err)
	}
	if c.writes != 1 || g.Unfolded() != 0 {
		t.Fatalf("%d image writes for 100 queued overwrites of one block (unfolded %d), want 1", c.writes, g.Unfolded())
	}
	p := make([]byte, BlockSize)
	if err := c.image.ReadAt(p, 5*BlockSize); err != nil || p[0] != 99 {
		t.Fatalf("the image's block holds %d (%v), want the last write, 99", p[0], err)
	}
}

// TestWriteBehindDisks: the writes of a group's disks interleave in the
// queue; FoldBehind folds each disk's blocks into its own image.
func TestWriteBehindDisks(t *testing.T) {
	ctx := context.Background()
	g, a := openDisk(t, Config{Dir: t.TempDir(), SegmentSize: 1 << 20, CheckpointBytes: 8 * BlockSize}, 1<<20)
	defer g.Close()
	b, err := g.CreateDisk("b", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 64 {
		writeBlocks(t, a, i, i+1)
		writeBlocks(t, b, 63-i, 64-i)
	}
	if left, err := g.FoldBehind(ctx); err != nil || left > 8*BlockSize {
		t.Fatalf("FoldBehind: %d bytes left, %v", left, err)
	}
	checkImageBlocks(t, g, "a", 8, 64)
	checkImageBlocks(t, g, "b", 0, 56)
	if err := g.Checkpoint(ctx); err != nil { // the few indexed before write-behind began
		t.Fatal(err)
	}
	checkImageBlocks(t, g, "a", 0, 64)
	checkImageBlocks(t, g, "b", 0, 64)
}
