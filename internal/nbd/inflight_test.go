package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"io"
	"runtime"
	"sync/atomic"
	"testing"
	"time"
)

// slowFlush is a device whose Flush takes as long as a real fsync may.
type slowFlush struct {
	*memDevice
	calls atomic.Int64
}

func (s *slowFlush) Flush(ctx context.Context) error {
	s.calls.Add(1)
	time.Sleep(200 * time.Microsecond)
	return nil
}

// TestPipelinedFlushesBounded: 200,000 FLUSH requests sent back to back
// are all answered, in a bounded number of goroutines and bounded memory:
// the server stops reading a connection whose flushes are behind instead
// of starting a goroutine per request (which once took an agent to
// 199,946 goroutines and 574 MB).
func TestPipelinedFlushesBounded(t *testing.T) {
	const n = 200_000
	dev := &slowFlush{memDevice: newMem(1 << 20)}
	_, sock := startServer(t, Export{Name: "d", Size: 1 << 20, Device: dev})
	nc := rawConn(t, sock)
	nc.SetDeadline(time.Now().Add(2 * time.Minute))
	nc.Write([]byte{0, 0, 0, flagFixedNewstyle | flagNoZeroes})
	sendOpt(nc, OptGo, appendInfoRequest(nil, "d"))
	for {
		typ, _ := readOptReply(t, nc)
		if typ == repAck {
			break
		}
	}
	runtime.GC()
	baseG := runtime.NumGoroutine()
	var base runtime.MemStats
	runtime.ReadMemStats(&base)

	var maxG int
	var maxHeap uint64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		var ms runtime.MemStats
		for {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
			maxG = max(maxG, runtime.NumGoroutine())
			runtime.ReadMemStats(&ms)
			maxHeap = max(maxHeap, ms.HeapInuse)
		}
	}()
	werr := make(chan error, 1)
	go func() {
		bw := bufio.NewWriterSize(nc, 64<<10)
		var b []byte
		for i := range n {
			b = AppendRequest(b[:0], Request{Type: CmdFlush, Handle: uint64(i)})
			if _, err := bw.Write(b); err != nil {
				werr <- err
				return
			}
		}
		werr <- bw.Flush()
	}()
	br := bufio.NewReaderSize(nc, 64<<10)
	seen := make([]bool, n)
	hdr := make([]byte, 16)
	for i := range n {
		if _, err := io.ReadFull(br, hdr); err != nil {
			t.Fatalf("reply %d of %d: %v", i, n, err)
		}
		if binary.BigEndian.Uint32(hdr[0:]) != simpleReplyMagic || binary.BigEndian.Uint32(hdr[4:]) != 0 {
			t.Fatalf("reply %d: bad magic or error %d", i, binary.BigEndian.Uint32(hdr[4:]))
		}
		h := binary.BigEndian.Uint64(hdr[8:])
		if h >= n || seen[h] {
			t.Fatalf("reply %d: handle %d unknown or answered twice", i, h)
		}
		seen[h] = true
	}
	close(stop)
	<-sampled
	if err := <-werr; err != nil {
		t.Fatal(err)
	}
	// The bounds: a handful of goroutines over the idle state (the
	// connection's loop, its flusher, this test's sampler and writer),
	// and no heap growth that scales with the requests.
	if extra := maxG - baseG; extra > 16 {
		t.Errorf("goroutines rose by %d (from %d to %d) for %d pipelined FLUSHes; want at most 16", extra, baseG, maxG, n)
	}
	if growth := int64(maxHeap) - int64(base.HeapInuse); growth > 32<<20 {
		t.Errorf("heap in use grew by %d MiB; want under 32 MiB", growth>>20)
	}
	t.Logf("%d FLUSHes answered with %d device flushes; goroutines +%d at most, heap +%d KiB at most",
		n, dev.calls.Load(), maxG-baseG, (int64(maxHeap)-int64(base.HeapInuse))>>10)
}
