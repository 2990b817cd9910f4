package disk

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// TestMain lets the test binary act as the child of TestJournalWriteFails.
func TestMain(m *testing.M) {
	if dir := os.Getenv("FERRY_DISK_FULL_CHILD"); dir != "" {
		fullChild(dir)
		return
	}
	if arg := os.Getenv("FERRY_DISK_CRASH_CHILD"); arg != "" {
		crashChild(arg)
		return
	}
	os.Exit(m.Run())
}

// fullChild writes 4 KiB blocks through a group whose files may not grow
// past 128 KiB (RLIMIT_FSIZE), reporting each block acknowledged durable,
// then the error, then the error of one more write.
func fullChild(dir string) {
	ctx := context.Background()
	g, err := Open(Config{Dir: dir, SegmentSize: 256 << 10})
	if err != nil {
		fmt.Println("open:", err)
		os.Exit(1)
	}
	d, err := g.Disk("a")
	if err != nil {
		fmt.Println("disk:", err)
		os.Exit(1)
	}
	signal.Ignore(syscall.SIGXFSZ) // get EFBIG instead of being killed
	lim := syscall.Rlimit{Cur: 128 << 10, Max: 128 << 10}
	if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &lim); err != nil {
		fmt.Println("setrlimit:", err)
		os.Exit(1)
	}
	for i := 1; i < 1000; i++ {
		p := bytes.Repeat([]byte{byte(i)}, 4096)
		err := d.WriteAt(ctx, p, int64(i%16)*4096)
		if err == nil {
			err = d.Flush(ctx)
		}
		if err != nil {
			fmt.Printf("err %v\n", err)
			err2 := d.WriteAt(ctx, p, 0)
			fmt.Printf("err2 %v\n", err2)
			os.Exit(0)
		}
		fmt.Printf("ok %d\n", i)
	}
	fmt.Println("never failed")
	os.Exit(0)
}

// TestJournalWriteFails runs out of file space under a writer: the write
// that fails gets a clear error, later writes fail too (the journal does not
// go on past an unknown state), and everything acknowledged as durable is
// there after reopening.
func TestJournalWriteFails(t *testing.T) {
	dir := t.TempDir()
	g := openGroup(t, dir)
	if _, err := g.CreateDisk("a", 1<<20); err != nil {
		t.Fatal(err)
	}
	g.Close()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "FERRY_DISK_FULL_CHILD="+dir)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	acked := map[int]int{} // slot -> last acknowledged i
	nAcked := 0
	var errLine, err2Line string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "ok "):
			i, _ := strconv.Atoi(line[3:])
			acked[i%16] = i
			nAcked++
		case strings.HasPrefix(line, "err "):
			errLine = line
		case strings.HasPrefix(line, "err2 "):
			err2Line = line
		}
	}
	if errLine == "" || len(acked) == 0 {
		t.Fatalf("child output:\n%s", out)
	}
	if !strings.Contains(errLine, "journal") || !strings.Contains(errLine, "file too large") {
		t.Fatalf("error does not say what failed: %q", errLine)
	}
	if err2Line == "err2 <nil>" {
		t.Fatal("a write after the failure succeeded")
	}
	g2 := openGroup(t, dir)
	defer g2.Close()
	d, _ := g2.Disk("a")
	for slot, i := range acked {
		got := make([]byte, 4096)
		if err := d.ReadAt(context.Background(), got, int64(slot)*4096); err != nil {
			t.Fatal(err)
		}
		// The failed write may have reached the journal (it was never
		// acknowledged); an acknowledged one must be there.
		if got[0] != byte(i) && got[0] != byte(i+16) {
			t.Fatalf("slot %d holds %d, want acknowledged %d", slot, got[0], i)
		}
		if !bytes.Equal(got, bytes.Repeat(got[:1], 4096)) {
			t.Fatalf("slot %d torn", slot)
		}
	}
	t.Logf("%d writes acknowledged before: %s", nAcked, errLine)
}
