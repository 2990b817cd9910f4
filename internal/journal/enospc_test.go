package journal

import (
	"errors"
	"os"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// TestFullDiskAtNewSegment: when the file system fills just as the
// journal starts a new segment, the append fails with ENOSPC (which the
// NBD server passes to the guest as ENOSPC), the journal is not marked
// failed, nothing half-made is left, and once space is freed the next
// append succeeds without a reopen. It needs a small tmpfs (root).
func TestFullDiskAtNewSegment(t *testing.T) {
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=200k"); err != nil {
		t.Fatalf("mount a small tmpfs (the test runs as root, as make test does): %v", err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	j, _, err := Open(Options{Dir: dir, SegmentSize: 128 << 10, Recycle: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	data := make([]byte, 4096)
	var full error
	for i := 0; i < 100; i++ {
		if _, err := j.Append(&Entry{Kind: KindWrite, Offset: uint64(i) * 4096, Length: 4096, Data: data}); err != nil {
			full = err
			break
		}
	}
	if !errors.Is(full, syscall.ENOSPC) {
		t.Fatalf("append on a full file system: %v, want ENOSPC", full)
	}
	if errors.Is(full, ErrFailed) {
		t.Fatalf("the journal was marked failed: %v", full)
	}
	last := j.LastSeq()
	segs, _ := listSegments(dir)
	if len(segs) != 1 {
		t.Fatalf("%d segment files after the failed start of one, want 1", len(segs))
	}
	// Free space: the same journal goes on.
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_REMOUNT, "size=1m"); err != nil {
		t.Fatal(err)
	}
	seq, err := j.Append(&Entry{Kind: KindWrite, Offset: 0, Length: 4096, Data: data})
	if err != nil || seq != last+1 {
		t.Fatalf("append after space was freed: seq %d, %v; want %d", seq, err, last+1)
	}
	if err := j.Sync(t.Context()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); err != nil {
		t.Fatal(err)
	}
}
