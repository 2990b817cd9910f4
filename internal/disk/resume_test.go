package disk

import (
	"bytes"
	"context"
	"errors"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// TestResumeAfterFullDisk: the file system fills while images are being
// written (the journal's segment is preallocated, the sparse image is
// not): the failed write reports ENOSPC, the group refuses writes and says
// why, Resume fails while there is still no room, and once space is freed
// Resume brings the group back without a reopen, with every write that
// reached the journal in the image. It needs a small tmpfs (root).
func TestResumeAfterFullDisk(t *testing.T) {
	ctx := context.Background()
	dir, g, d := fullingGroup(t)
	want := make([]byte, 4<<20)
	var full error
	n := 0
	for i := 0; i < 200; i++ {
		p := bytes.Repeat([]byte{byte(i + 1)}, 4096)
		err := d.WriteAt(ctx, p, int64(i)*8192)
		if err != nil {
			full = err
			// In the journal (its segment had room), not in the image.
			copy(want[i*8192:], p)
			break
		}
		copy(want[i*8192:], p)
		n++
	}
	if !errors.Is(full, syscall.ENOSPC) || !errors.Is(full, ErrFailed) {
		t.Fatalf("write on a full file system: %v, want a failed group with ENOSPC", full)
	}
	if err := d.WriteAt(ctx, make([]byte, 512), 0); !errors.Is(err, ErrFailed) {
		t.Fatalf("a write to the failed group: %v", err)
	}
	if err := g.Resume(); err == nil {
		t.Fatal("Resume succeeded with the file system still full")
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_REMOUNT, "size=8m"); err != nil {
		t.Fatal(err)
	}
	if err := g.Resume(); err != nil {
		t.Fatalf("Resume once space is free: %v", err)
	}
	if err := g.Failed(); err != nil {
		t.Fatalf("still failed after Resume: %v", err)
	}
	p := bytes.Repeat([]byte{0xEE}, 4096)
	if err := d.WriteAt(ctx, p, 4<<20-4096); err != nil {
		t.Fatalf("write after Resume: %v", err)
	}
	copy(want[4<<20-4096:], p)
	if err := d.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4<<20)
	if err := d.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("after %d writes, a full disk and Resume, the disk differs from what was written", n)
	}
	checkReplayEqualsImage(t, g, d)
}

// fullingGroup opens a group with a 4 MiB disk on a 384 KiB tmpfs, so
// that the sparse image's writes soon fail with ENOSPC. Writes are inline:
// the image write is what fails (TestFoldFailsOnFullDisk covers
// journal-only writes).
func fullingGroup(t *testing.T) (string, *Group, *Disk) {
	t.Helper()
	dir := smallTmpfs(t, "384k")
	g, d := openDisk(t, Config{Dir: dir, SegmentSize: 256 << 10, MaxUnfolded: -1}, 4<<20)
	t.Cleanup(func() { g.Close() })
	return dir, g, d
}

// smallTmpfs mounts a tmpfs of size on a temporary directory (the tests
// run as root, as make test does) for tests that fill a file system.
func smallTmpfs(tb testing.TB, size string) string {
	tb.Helper()
	dir := tb.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size="+size); err != nil {
		tb.Fatalf("mount a small tmpfs (the test runs as root, as make test does): %v", err)
	}
	tb.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	return dir
}

// TestResumeAfterAcknowledgedWrite: a batch acknowledged once journaled
// (WriteAtBatchJournaled) whose image write then fails on a full file
// system. Its writes were acknowledged, so no read may show the older
// bytes: reads fail until Resume, and after it they return the batch.
func TestResumeAfterAcknowledgedWrite(t *testing.T) {
	ctx := context.Background()
	dir, g, d := fullingGroup(t)
	want := make([]byte, 4<<20)
	var full error
	acked := false
	for i := 0; i < 200 && full == nil; i++ {
		p := bytes.Repeat([]byte{byte(i + 1)}, 4096)
		acked = false
		full = d.WriteAtBatchJournaled(ctx, [][]byte{p}, []int64{int64(i) * 8192}, func() { acked = true })
		copy(want[i*8192:], p) // journaled either way: the segment had room
	}
	if !errors.Is(full, syscall.ENOSPC) || !acked {
		t.Fatalf("batch on a full file system: %v, acknowledged %v; want ENOSPC after the acknowledgement", full, acked)
	}
	if err := d.ReadAt(ctx, make([]byte, 4096), 0); !errors.Is(err, ErrFailed) {
		t.Fatalf("read while an acknowledged write is missing from the image: %v, want ErrFailed", err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_REMOUNT, "size=8m"); err != nil {
		t.Fatal(err)
	}
	if err := g.Resume(); err != nil {
		t.Fatalf("Resume once space is free: %v", err)
	}
	got := make([]byte, 4<<20)
	if err := d.ReadAt(ctx, got, 0); err != nil {
		t.Fatalf("read after Resume: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("after Resume the disk differs from what was acknowledged")
	}
	checkReplayEqualsImage(t, g, d)
}
