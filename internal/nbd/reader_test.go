package nbd

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"math/rand/v2"
	"net"
	"runtime"
	"testing"
	"time"
)

// transmitConn negotiates export name on a raw connection and returns it
// in the transmission phase.
func transmitConn(tb testing.TB, sock, name string) net.Conn {
	tb.Helper()
	nc := rawConn(tb, sock)
	nc.SetDeadline(time.Now().Add(2 * time.Minute))
	nc.Write([]byte{0, 0, 0, flagFixedNewstyle | flagNoZeroes})
	sendOpt(nc, OptGo, appendInfoRequest(nil, name))
	for {
		typ, _ := readOptReply(tb, nc)
		if typ == repAck {
			return nc
		}
	}
}

// TestReadAheadOrder sends random mixes of small and large requests back
// to back, without waiting for replies, so that the connection keeps
// handing its socket between the request loop and the reader goroutine,
// and checks every READ against a model that applies the requests in
// order: execution must be in arrival order across every hand-over.
func TestReadAheadOrder(t *testing.T) {
	const size = 4 << 20
	for _, batching := range []bool{false, true} {
		for seed := range uint64(3) {
			var dev Device = newMem(size)
			if batching {
				dev = &batchMem{memDevice: newMem(size)}
			}
			_, sock := startServer(t, Export{Name: "d", Size: size, Device: dev})
			testReadAheadOrder(t, sock, size, seed)
		}
	}
}

func testReadAheadOrder(t *testing.T, sock string, size int, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 11))
	lens := []int{512, 4096, 65536, pipeMin - 4096, pipeMin, 256 << 10, chunkBytes, chunkBytes + 4096, 3 << 20}
	type op struct {
		typ    uint16
		flags  uint16
		off, n int
		fill   byte
		want   []byte // READ: the model's bytes
	}
	model := make([]byte, size)
	var ops []op
	for i := range 250 {
		n := lens[rng.IntN(len(lens))]
		o := op{off: rng.IntN(size-n+1) &^ 511, n: n, fill: byte(i%250 + 1)}
		switch k := rng.IntN(10); {
		case k < 5:
			o.typ = CmdWrite
			if k == 0 {
				o.flags = CmdFlagFUA
			}
			copy(model[o.off:o.off+n], bytes.Repeat([]byte{o.fill}, n))
		case k < 8:
			o.typ = CmdRead
			o.want = bytes.Clone(model[o.off : o.off+n])
		case k == 8:
			o.typ = CmdWriteZeroes
			clear(model[o.off : o.off+n])
		default:
			o.typ, o.off, o.n = CmdFlush, 0, 0
		}
		ops = append(ops, o)
	}
	nc := transmitConn(t, sock, "d")
	defer nc.Close()
	werr := make(chan error, 1)
	go func() {
		bw := bufio.NewWriterSize(nc, 256<<10)
		var b []byte
		for h, o := range ops {
			b = AppendRequest(b[:0], Request{Type: o.typ, Flags: o.flags, Handle: uint64(h), Offset: uint64(o.off), Length: uint32(o.n)})
			if o.typ == CmdWrite {
				b = append(b, bytes.Repeat([]byte{o.fill}, o.n)...)
			}
			if _, err := bw.Write(b); err != nil {
				werr <- err
				return
			}
		}
		if err := bw.Flush(); err != nil {
			werr <- err
			return
		}
		werr <- nil
	}()
	br := bufio.NewReader(nc)
	hdr := make([]byte, 16)
	seen := make([]bool, len(ops))
	for range ops {
		if _, err := io.ReadFull(br, hdr); err != nil {
			t.Fatalf("seed %d: reply: %v", seed, err)
		}
		h := binary.BigEndian.Uint64(hdr[8:])
		if errno := binary.BigEndian.Uint32(hdr[4:]); errno != 0 || h >= uint64(len(ops)) || seen[h] {
			t.Fatalf("seed %d: reply for handle %d: errno %d (or unknown, or twice)", seed, h, errno)
		}
		seen[h] = true
		o := ops[h]
		if o.typ != CmdRead {
			continue
		}
		got := make([]byte, o.n)
		if _, err := io.ReadFull(br, got); err != nil {
			t.Fatalf("seed %d: read data: %v", seed, err)
		}
		if !bytes.Equal(got, o.want) {
			t.Fatalf("seed %d: op %d (READ %d at %d) does not see the requests before it", seed, h, o.n, o.off)
		}
	}
	if err := <-werr; err != nil {
		t.Fatal(err)
	}
}

// slowWrites delays every write, so that large writes pile up in the
// connection's read-ahead.
type slowWrites struct{ *memDevice }

func (s slowWrites) WriteAt(ctx context.Context, p []byte, off int64) error {
	time.Sleep(time.Millisecond)
	return s.memDevice.WriteAt(ctx, p, off)
}

// TestReadAheadBounded: a client that pipelines large writes without end
// makes the server hold a bounded number of payloads: its chunks and the
// budget for payloads larger than a chunk, not one buffer per request.
func TestReadAheadBounded(t *testing.T) {
	const n, size = 400, 2 << 20
	_, sock := startServer(t, Export{Name: "d", Size: 32 << 20, Device: slowWrites{newMem(32 << 20)}})
	nc := transmitConn(t, sock, "d")
	defer nc.Close()
	runtime.GC()
	var base runtime.MemStats
	runtime.ReadMemStats(&base)
	stop := make(chan struct{})
	peak := make(chan uint64)
	go func() {
		var m uint64
		var ms runtime.MemStats
		for {
			select {
			case <-stop:
				peak <- m
				return
			case <-time.After(2 * time.Millisecond):
			}
			runtime.ReadMemStats(&ms)
			m = max(m, ms.HeapInuse)
		}
	}()
	go func() {
		payload := bytes.Repeat([]byte{7}, size)
		var b []byte
		for h := range n {
			b = AppendRequest(b[:0], Request{Type: CmdWrite, Handle: uint64(h), Offset: uint64(h%16) * size, Length: size})
			if _, err := nc.Write(b); err != nil {
				return
			}
			if _, err := nc.Write(payload); err != nil {
				return
			}
		}
	}()
	br := bufio.NewReader(nc)
	hdr := make([]byte, 16)
	for i := range n {
		if _, err := io.ReadFull(br, hdr); err != nil {
			t.Fatalf("reply %d: %v", i, err)
		}
		if errno := binary.BigEndian.Uint32(hdr[4:]); errno != 0 {
			t.Fatalf("reply %d: errno %d", i, errno)
		}
	}
	close(stop)
	growth := int64(<-peak) - int64(base.HeapInuse)
	// Payloads of 2 MiB are larger than a chunk: at most bigBytes of them
	// are held, plus what one is being copied into (the client side of
	// this test also holds one payload and its request copy).
	if limit := int64(bigBytes + 16<<20); growth > limit {
		t.Errorf("heap in use grew by %d MiB for %d pipelined 2 MiB writes; want at most %d MiB", growth>>20, n, limit>>20)
	}
	t.Logf("heap +%d MiB at most", growth>>20)
}

func TestPayloadPool(t *testing.T) {
	p := newPayloadPool(10)
	a := p.get(6)
	b := p.get(4)
	if len(a) != 6 || len(b) != 4 {
		t.Fatalf("got lengths %d, %d; want 6, 4", len(a), len(b))
	}
	got := make(chan []byte)
	go func() { got <- p.get(3) }()
	select {
	case <-got:
		t.Fatal("get past the budget did not wait")
	case <-time.After(20 * time.Millisecond):
	}
	p.put(a)
	if c := <-got; len(c) != 3 {
		t.Fatalf("got length %d after a put; want 3", len(c))
	}
	// One request larger than the whole budget passes when nothing is
	// held, so a single MaxRequest write never waits forever.
	p.put(b)
	p.close()
	if c := p.get(1); c != nil {
		t.Fatalf("get after close returned %d bytes; want nil", len(c))
	}
	q := newPayloadPool(10)
	if c := q.get(50); len(c) != 50 {
		t.Fatalf("a lone get larger than the budget returned %d bytes; want 50", len(c))
	}
}
