package replica

import (
	"bytes"
	"context"
	"testing"

	"github.com/ferry-dr/ferry/internal/disk"
)

// TestBeginCrashSafe: Begin replaces a consistent replica's files (a new
// initial copy). Killed at each of its steps, the replica reopens (before,
// a crash between deleting the images and writing the manifest left a
// manifest naming missing files, and the agent would not start), offers no
// point, asks for a copy again, and a second Begin completes.
func TestBeginCrashSafe(t *testing.T) {
	const size = 64 << 10
	specs := []disk.Spec{{ID: 1, Name: "a", Size: size}}
	for _, point := range []string{"begin-intent-saved", "begin-old-data-removed", "begin-images-created"} {
		t.Run(point, func(t *testing.T) {
			dir := t.TempDir()
			rep, err := Open(Config{Dir: dir})
			if err != nil {
				t.Fatal(err)
			}
			if err := rep.Begin("g", specs, 1); err != nil {
				t.Fatal(err)
			}
			rep.WriteBase(1, 0, bytes.Repeat([]byte{7}, size))
			if err := rep.EndBase(1); err != nil {
				t.Fatal(err)
			}
			if rep.NextSeq() == 0 {
				t.Fatal("a finished copy asks for another")
			}
			type died struct{}
			CrashPoint = func(name string) {
				if name == point {
					panic(died{})
				}
			}
			func() {
				defer func() {
					if r := recover(); r == nil {
						t.Fatalf("crash point %s not reached", point)
					}
				}()
				rep.BeginDelta("g", specs, 10)
			}()
			CrashPoint = nil
			// The process died: its open files go with it.
			rep.closeData()
			again, err := Open(Config{Dir: dir})
			if err != nil {
				t.Fatalf("reopen after a crash at %s: %v", point, err)
			}
			defer again.Close()
			if got := again.NextSeq(); got != 0 {
				t.Fatalf("after a crash at %s NextSeq = %d, want 0 (copy again)", point, got)
			}
			if pts := again.Points(); len(pts) != 0 {
				t.Fatalf("a half-replaced replica offers points: %v", pts)
			}
			if err := again.Begin("g", specs, 10); err != nil {
				t.Fatal(err)
			}
			again.WriteBase(1, 0, bytes.Repeat([]byte{9}, size))
			if err := again.EndBase(10); err != nil {
				t.Fatal(err)
			}
			if _, err := again.Commit(context.Background()); err != nil {
				t.Fatal(err)
			}
			if again.NextSeq() != 10 {
				t.Fatalf("after the second copy NextSeq = %d, want 10 (the journal goes on where the copy began)", again.NextSeq())
			}
		})
	}
}
