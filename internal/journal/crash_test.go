package journal

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"testing"
)

// crashEntry is the entry a crash child writes as its n-th append (1-based),
// so that the parent can check every recovered entry's contents.
func crashEntry(n uint64) Entry {
	d := bytes.Repeat([]byte{byte(n), byte(n >> 8)}, int(1+n%2000))
	return Entry{Kind: KindWrite, Offset: n * 4096, Length: uint32(len(d)), Data: d}
}

// TestMain lets this test binary act as the writer process that
// TestKillNineWriter kills.
func TestMain(m *testing.M) {
	if dir := os.Getenv("FERRY_JOURNAL_CRASH_CHILD"); dir != "" {
		crashChild(dir)
		return
	}
	os.Exit(m.Run())
}

func crashChild(dir string) {
	j, _, err := Open(Options{Dir: dir, SegmentSize: 256 << 10})
	if err != nil {
		fmt.Println("open:", err)
		os.Exit(1)
	}
	out := bufio.NewWriter(os.Stdout)
	for {
		e := crashEntry(j.LastSeq() + 1)
		seq, err := j.Append(&e)
		if err != nil {
			fmt.Fprintln(out, "append:", err)
			out.Flush()
			os.Exit(1)
		}
		if seq%16 == 0 {
			if err := j.Sync(context.Background()); err != nil {
				os.Exit(1)
			}
			// Only now is seq acknowledged as durable.
			fmt.Fprintln(out, seq)
			out.Flush()
		}
	}
}

// TestKillNineWriter kills a writer process with SIGKILL at arbitrary moments
// and checks that every entry it acknowledged as durable survives, intact and
// in order, and that the journal goes on from there.
func TestKillNineWriter(t *testing.T) {
	dir := t.TempDir()
	for round := 0; round < 4; round++ {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), "FERRY_JOURNAL_CRASH_CHILD="+dir)
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(stdout)
		var acked uint64
		lines := 0
		for sc.Scan() {
			n, err := strconv.ParseUint(sc.Text(), 10, 64)
			if err != nil {
				t.Fatalf("child: %s", sc.Text())
			}
			acked = n
			lines++
			if lines == 40+round*25 {
				cmd.Process.Kill() // SIGKILL
				break
			}
		}
		for sc.Scan() { // acks already written before the kill count too
			if n, err := strconv.ParseUint(sc.Text(), 10, 64); err == nil {
				acked = n
			}
		}
		cmd.Wait()
		j, rec, err := Open(Options{Dir: dir, SegmentSize: 256 << 10})
		if err != nil {
			t.Fatalf("round %d: Open: %v", round, err)
		}
		if got := j.LastSeq(); got < acked {
			t.Fatalf("round %d: LastSeq %d < acknowledged %d (%+v)", round, got, acked, rec)
		}
		r, err := j.NewReader(1)
		if err != nil {
			t.Fatal(err)
		}
		for seq := uint64(1); seq <= j.LastSeq(); seq++ {
			e, ok, err := r.TryNext()
			if err != nil || !ok {
				t.Fatalf("round %d: seq %d: %v %v", round, seq, ok, err)
			}
			want := crashEntry(seq)
			if e.Seq != seq || !bytes.Equal(e.Data, want.Data) || e.Offset != want.Offset {
				t.Fatalf("round %d: seq %d content differs", round, seq)
			}
		}
		r.Close()
		j.Close()
	}
}
