package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// memDevice is an in-memory Device for unit tests.
type memDevice struct {
	mu      sync.Mutex
	b       []byte
	flushes int
	failAt  int64 // ReadAt/WriteAt at this offset fail (-1: never)
}

var _ Device = (*memDevice)(nil)

func newMem(n int) *memDevice { return &memDevice{b: make([]byte, n), failAt: -1} }

func (m *memDevice) ReadAt(_ context.Context, p []byte, off int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off == m.failAt {
		return errors.New("injected")
	}
	copy(p, m.b[off:])
	return nil
}
func (m *memDevice) WriteAt(_ context.Context, p []byte, off int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off == m.failAt {
		return errors.New("injected")
	}
	copy(m.b[off:], p)
	return nil
}
func (m *memDevice) WriteZeroes(_ context.Context, off, n int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.b[off : off+n])
	return nil
}
func (m *memDevice) Trim(ctx context.Context, off, n int64) error { return m.WriteZeroes(ctx, off, n) }
func (m *memDevice) Flush(context.Context) error {
	m.mu.Lock()
	m.flushes++
	m.mu.Unlock()
	return nil
}

// batchMem is a memDevice that also takes batches, to exercise the
// server's batching path.
type batchMem struct {
	*memDevice
	batches, writes int
}

func (b *batchMem) WriteAtBatch(ctx context.Context, ps [][]byte, offs []int64) error {
	b.mu.Lock()
	b.batches++
	b.writes += len(ps)
	b.mu.Unlock()
	for i, p := range ps {
		if err := b.WriteAt(ctx, p, offs[i]); err != nil {
			return err
		}
	}
	return nil
}

func startServer(tb testing.TB, exports ...Export) (*Server, string) {
	tb.Helper()
	s := New(Config{HandshakeTimeout: 2 * time.Second})
	for _, e := range exports {
		if err := s.AddExport(e); err != nil {
			tb.Fatal(err)
		}
	}
	sock := filepath.Join(tb.TempDir(), "nbd.sock")
	ln, err := ListenUnix(sock)
	if err != nil {
		tb.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(context.Background(), ln) }()
	tb.Cleanup(func() {
		s.Close()
		if err := <-done; err != nil {
			tb.Errorf("Serve: %v", err)
		}
	})
	return s, sock
}

func dialT(tb testing.TB, sock, name string) *Client {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, "unix", sock, name)
	if err != nil {
		tb.Fatalf("Dial: %v", err)
	}
	tb.Cleanup(func() { c.Close() })
	return c
}

func TestReadWriteFlush(t *testing.T) {
	dev := newMem(1 << 20)
	_, sock := startServer(t, Export{Name: "d", Size: 1 << 20, Device: dev, MultiConn: true})
	c := dialT(t, sock, "d")
	if c.Size != 1<<20 {
		t.Fatalf("size %d", c.Size)
	}
	want := uint16(FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagSendTrim | FlagSendWriteZeroes | FlagCanMultiConn)
	if c.Flags != want {
		t.Fatalf("flags %#x, want %#x", c.Flags, want)
	}
	ctx := context.Background()
	data := bytes.Repeat([]byte("ferry"), 1000)
	if err := c.WriteAt(ctx, data, 4096, false); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	if err := c.ReadAt(ctx, got, 4096); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("read back differs")
	}
	if err := c.WriteAt(ctx, data, 0, true); err != nil { // FUA
		t.Fatal(err)
	}
	if err := c.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if dev.flushes != 2 {
		t.Fatalf("device flushes = %d, want 2 (one FUA, one FLUSH)", dev.flushes)
	}
	if err := c.Do(ctx, CmdWriteZeroes, 0, 4096, 100, nil, nil); err != nil {
		t.Fatal(err)
	}
	if err := c.ReadAt(ctx, got[:100], 4096); err != nil || !bytes.Equal(got[:100], make([]byte, 100)) {
		t.Fatalf("zeroes not read back: %v", err)
	}
}

// TestPipelined sends many requests at once from many goroutines on one
// connection; every reply must reach its own caller with its own data.
func TestPipelined(t *testing.T) {
	t.Run("plain", func(t *testing.T) { testPipelined(t, newMem(4<<20)) })
	t.Run("batching", func(t *testing.T) {
		b := &batchMem{memDevice: newMem(4 << 20)}
		testPipelined(t, b)
		// 64 writers x 20 writes, one in five with FUA (not batched).
		if want := 64 * 16; b.writes != want {
			t.Fatalf("batched writes = %d, want %d", b.writes, want)
		}
		t.Logf("%d writes in %d batches", b.writes, b.batches)
	})
}

func testPipelined(t *testing.T, dev Device) {
	_, sock := startServer(t, Export{Name: "d", Size: 4 << 20, Device: dev})
	c := dialT(t, sock, "d")
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for g := 0; g < 64; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			off := int64(g) * 65536
			p := bytes.Repeat([]byte{byte(g + 1)}, 65536)
			for i := 0; i < 20; i++ {
				if err := c.WriteAt(ctx, p, off, i%5 == 0); err != nil {
					errs <- err
					return
				}
				q := make([]byte, len(p))
				if err := c.ReadAt(ctx, q, off); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(p, q) {
					errs <- errors.New("mixed-up reply data")
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

func TestBadRequests(t *testing.T) {
	dev := newMem(1 << 20)
	dev.failAt = 8192
	_, sock := startServer(t,
		Export{Name: "d", Size: 1 << 20, Device: dev},
		Export{Name: "ro", Size: 1 << 20, Device: newMem(1 << 20), ReadOnly: true})
	c := dialT(t, sock, "d")
	ro := dialT(t, sock, "ro")
	ctx := context.Background()
	tests := []struct {
		name  string
		c     *Client
		typ   uint16
		flags uint16
		off   uint64
		len   uint32
		data  []byte
		errno uint32
	}{
		{"read past end", c, CmdRead, 0, 1<<20 - 10, 20, nil, EINVAL},
		{"read offset overflow", c, CmdRead, 0, 1<<64 - 5, 10, nil, EINVAL},
		{"write past end", c, CmdWrite, 0, 1<<20 - 10, 20, make([]byte, 20), ENOSPC},
		{"zero past end", c, CmdWriteZeroes, 0, 1 << 20, 1, nil, ENOSPC},
		{"trim past end", c, CmdTrim, 0, 1<<20 + 1, 1, nil, EINVAL},
		{"unknown command", c, 99, 0, 0, 0, nil, EINVAL},
		{"block status unsupported", c, CmdBlockStatus, 0, 0, 512, nil, EINVAL},
		{"unknown flag", c, CmdWrite, 1 << 9, 0, 4, make([]byte, 4), EINVAL},
		{"FUA on read", c, CmdRead, CmdFlagFUA, 0, 4, nil, EINVAL},
		{"oversize read", c, CmdRead, 0, 0, MaxRequest + 1, nil, EINVAL},
		{"write to read-only", ro, CmdWrite, 0, 0, 4, make([]byte, 4), EPERM},
		{"trim read-only", ro, CmdTrim, 0, 0, 4, nil, EPERM},
		{"device error", c, CmdRead, 0, 8192, 4, nil, EIO},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var dst []byte
			if tc.typ == CmdRead {
				dst = make([]byte, tc.len)
			}
			err := tc.c.Do(ctx, tc.typ, tc.flags, tc.off, tc.len, tc.data, dst)
			var re *RemoteError
			if !errors.As(err, &re) || re.Errno != tc.errno {
				t.Fatalf("got %v, want errno %d", err, tc.errno)
			}
		})
	}
	// The connection survives all of them.
	if err := c.WriteAt(ctx, []byte("still here"), 0, false); err != nil {
		t.Fatal(err)
	}
}

// rawConn negotiates by hand up to transmission (export "d") and returns
// the connection, for tests that send broken bytes.
func rawConn(tb testing.TB, sock string) net.Conn {
	tb.Helper()
	nc, err := net.Dial("unix", sock)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(5 * time.Second))
	hello := make([]byte, 18)
	if _, err := io.ReadFull(nc, hello); err != nil {
		tb.Fatal(err)
	}
	return nc
}

func sendOpt(w io.Writer, opt uint32, data []byte) {
	b := binary.BigEndian.AppendUint64(nil, optMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	w.Write(append(b, data...))
}

func readOptReply(tb testing.TB, r io.Reader) (typ uint32, data []byte) {
	tb.Helper()
	h := make([]byte, 20)
	if _, err := io.ReadFull(r, h); err != nil {
		tb.Fatalf("option reply: %v", err)
	}
	data = make([]byte, binary.BigEndian.Uint32(h[16:]))
	io.ReadFull(r, data)
	return binary.BigEndian.Uint32(h[12:]), data
}

func TestNegotiation(t *testing.T) {
	_, sock := startServer(t,
		Export{Name: "a", Size: 4096, Device: newMem(4096), Description: "disk a"},
		Export{Name: "b", Size: 8192, Device: newMem(8192)})
	t.Run("list", func(t *testing.T) {
		nc := rawConn(t, sock)
		nc.Write([]byte{0, 0, 0, flagFixedNewstyle | flagNoZeroes})
		sendOpt(nc, OptList, nil)
		var names []string
		for {
			typ, d := readOptReply(t, nc)
			if typ == repAck {
				break
			}
			if typ != repServer {
				t.Fatalf("reply type %#x", typ)
			}
			names = append(names, string(d[4:]))
		}
		if len(names) != 2 || names[0] != "a" || names[1] != "b" {
			t.Fatalf("names %q", names)
		}
		sendOpt(nc, OptAbort, nil)
		if typ, _ := readOptReply(t, nc); typ != repAck {
			t.Fatalf("abort reply %#x", typ)
		}
		if _, err := nc.Read(make([]byte, 1)); err != io.EOF {
			t.Fatalf("after abort: %v, want EOF", err)
		}
	})
	t.Run("info unknown and unsupported", func(t *testing.T) {
		nc := rawConn(t, sock)
		nc.Write([]byte{0, 0, 0, flagFixedNewstyle | flagNoZeroes})
		sendOpt(nc, OptInfo, appendInfoRequest(nil, "nope"))
		if typ, _ := readOptReply(t, nc); typ != repErrUnknown {
			t.Fatalf("unknown export: %#x", typ)
		}
		sendOpt(nc, OptStructuredReply, nil)
		if typ, _ := readOptReply(t, nc); typ != repErrUnsup {
			t.Fatalf("structured reply: %#x", typ)
		}
		sendOpt(nc, 1000, []byte("x"))
		if typ, _ := readOptReply(t, nc); typ != repErrUnsup {
			t.Fatalf("unknown option: %#x", typ)
		}
		sendOpt(nc, OptInfo, []byte{0, 0, 0, 9, 'a'}) // truncated
		if typ, _ := readOptReply(t, nc); typ != repErrInvalid {
			t.Fatalf("malformed info: %#x", typ)
		}
		sendOpt(nc, OptInfo, appendInfoRequest(nil, "a", infoName, infoDescription, infoBlockSize))
		seen := map[uint16][]byte{}
		for {
			typ, d := readOptReply(t, nc)
			if typ == repAck {
				break
			}
			seen[binary.BigEndian.Uint16(d)] = d[2:]
		}
		if string(seen[infoDescription]) != "disk a" || string(seen[infoName]) != "a" || len(seen[infoBlockSize]) != 12 {
			t.Fatalf("infos %v", seen)
		}
		if got := binary.BigEndian.Uint64(seen[infoExport]); got != 4096 {
			t.Fatalf("size %d", got)
		}
	})
	t.Run("export name and default", func(t *testing.T) {
		nc := rawConn(t, sock)
		nc.Write([]byte{0, 0, 0, flagFixedNewstyle}) // zeroes wanted
		sendOpt(nc, OptExportName, nil)              // default export: a
		b := make([]byte, 10+124)
		if _, err := io.ReadFull(nc, b); err != nil {
			t.Fatal(err)
		}
		if got := binary.BigEndian.Uint64(b); got != 4096 {
			t.Fatalf("default export size %d", got)
		}
	})
	t.Run("bad client flags", func(t *testing.T) {
		nc := rawConn(t, sock)
		nc.Write([]byte{0, 0, 1, flagFixedNewstyle})
		if _, err := nc.Read(make([]byte, 1)); err != io.EOF {
			t.Fatalf("got %v, want disconnect", err)
		}
	})
	t.Run("export name unknown", func(t *testing.T) {
		nc := rawConn(t, sock)
		nc.Write([]byte{0, 0, 0, flagFixedNewstyle | flagNoZeroes})
		sendOpt(nc, OptExportName, []byte("zzz"))
		if _, err := nc.Read(make([]byte, 1)); err != io.EOF {
			t.Fatalf("got %v, want disconnect", err)
		}
	})
	t.Run("huge option", func(t *testing.T) {
		nc := rawConn(t, sock)
		nc.Write([]byte{0, 0, 0, flagFixedNewstyle | flagNoZeroes})
		b := binary.BigEndian.AppendUint64(nil, optMagic)
		b = binary.BigEndian.AppendUint32(b, OptGo)
		b = binary.BigEndian.AppendUint32(b, 1<<30)
		nc.Write(b)
		if _, err := nc.Read(make([]byte, 1)); err != io.EOF {
			t.Fatalf("got %v, want disconnect", err)
		}
	})
}

func TestHandshakeTimeout(t *testing.T) {
	_, sock := startServer(t, Export{Name: "a", Size: 4096, Device: newMem(4096)})
	nc := rawConn(t, sock)
	nc.SetDeadline(time.Now().Add(10 * time.Second))
	// Say nothing: the server must hang up after its 2 s handshake limit.
	start := time.Now()
	if _, err := nc.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("got %v, want EOF", err)
	}
	if d := time.Since(start); d > 8*time.Second {
		t.Fatalf("took %v", d)
	}
}

func TestTransmissionGarbage(t *testing.T) {
	tests := []struct {
		name string
		send []byte
	}{
		{"bad magic", append([]byte{1, 2, 3, 4}, make([]byte, 24)...)},
		{"truncated header", AppendRequest(nil, Request{Type: CmdRead, Length: 4})[:13]},
		{"oversize write", AppendRequest(nil, Request{Type: CmdWrite, Length: MaxRequest + 1})},
		{"truncated write payload", append(AppendRequest(nil, Request{Type: CmdWrite, Length: 4096}), 1, 2, 3)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, sock := startServer(t, Export{Name: "d", Size: 1 << 20, Device: newMem(1 << 20)})
			nc := rawConn(t, sock)
			nc.Write([]byte{0, 0, 0, flagFixedNewstyle | flagNoZeroes})
			sendOpt(nc, OptGo, appendInfoRequest(nil, "d"))
			for {
				typ, _ := readOptReply(t, nc)
				if typ == repAck {
					break
				}
			}
			nc.Write(tc.send)
			if uc, ok := nc.(*net.UnixConn); ok {
				uc.CloseWrite()
			}
			// Whatever replies come, the server must end the connection.
			if _, err := io.ReadAll(nc); err != nil {
				t.Fatalf("read: %v", err)
			}
		})
	}
}

func TestRemoveExportDisconnects(t *testing.T) {
	s, sock := startServer(t, Export{Name: "d", Size: 4096, Device: newMem(4096)})
	c := dialT(t, sock, "d")
	s.RemoveExport("d")
	if err := c.ReadAt(context.Background(), make([]byte, 4), 0); err == nil {
		t.Fatal("read after RemoveExport succeeded")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if _, err := Dial(ctx, "unix", sock, "d"); !errors.Is(err, ErrUnknownExport) {
		t.Fatalf("dial removed export: %v", err)
	}
}

func FuzzParseRequest(f *testing.F) {
	f.Add(AppendRequest(nil, Request{Type: CmdWrite, Length: 4096, Offset: 512, Handle: 7}))
	f.Add(AppendRequest(nil, Request{Type: CmdRead, Flags: CmdFlagDF, Length: MaxRequest + 1}))
	f.Add([]byte{0x25, 0x60, 0x95, 0x13})
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := ParseRequest(b)
		if err != nil {
			return
		}
		if !bytes.Equal(AppendRequest(nil, r), b[:requestHeaderSize]) {
			t.Fatal("round trip differs")
		}
		// Validation never panics and rejects every out-of-range request.
		errno := checkRequest(r, 1<<20, false)
		end := r.Offset + uint64(r.Length)
		if errno == 0 && (r.Type == CmdRead || r.Type == CmdWrite) && (end < r.Offset || end > 1<<20 || r.Length > MaxRequest) {
			t.Fatalf("accepted %+v", r)
		}
	})
}

func FuzzParseInfoRequest(f *testing.F) {
	f.Add(appendInfoRequest(nil, "disk", infoName, infoBlockSize))
	f.Add(appendInfoRequest(nil, ""))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		req, err := parseInfoRequest(b)
		if err != nil {
			return
		}
		if !bytes.Equal(appendInfoRequest(nil, req.name, req.infos...), b) {
			t.Fatal("round trip differs")
		}
	})
}

// FuzzServerOptions feeds arbitrary bytes to a live server's negotiation:
// it must answer or hang up, never panic or hang.
func FuzzServerOptions(f *testing.F) {
	hello := []byte{0, 0, 0, flagFixedNewstyle | flagNoZeroes}
	var b bytes.Buffer
	b.Write(hello)
	sendOpt(&b, OptList, nil)
	sendOpt(&b, OptGo, appendInfoRequest(nil, "d", infoBlockSize))
	b.Write(AppendRequest(nil, Request{Type: CmdWrite, Length: 3}))
	b.Write([]byte{1, 2, 3})
	b.Write(AppendRequest(nil, Request{Type: CmdRead, Length: 3}))
	f.Add(b.Bytes())
	// A large WRITE hands the socket to the read-ahead goroutine; small
	// requests after it hand it back; the last payload is cut short.
	b.Write(AppendRequest(nil, Request{Type: CmdWrite, Length: pipeMin}))
	b.Write(make([]byte, pipeMin))
	b.Write(AppendRequest(nil, Request{Type: CmdFlush}))
	b.Write(AppendRequest(nil, Request{Type: CmdRead, Length: 3}))
	b.Write(AppendRequest(nil, Request{Type: CmdWrite, Length: pipeMin}))
	b.Write(make([]byte, 100))
	f.Add(b.Bytes())
	f.Add(hello)
	s := New(Config{HandshakeTimeout: time.Second})
	s.AddExport(Export{Name: "d", Size: 1 << 16, Device: newMem(1 << 16)})
	f.Fuzz(func(t *testing.T, in []byte) {
		a, z := net.Pipe()
		c := &conn{s: s, nc: z, done: make(chan struct{})}
		s.mu.Lock()
		s.conns[c] = struct{}{}
		s.mu.Unlock()
		go c.serve(context.Background())
		a.SetDeadline(time.Now().Add(5 * time.Second))
		go func() { io.Copy(io.Discard, a) }()
		a.Write(in)
		a.Close()
		select {
		case <-c.done:
		case <-time.After(5 * time.Second):
			t.Fatal("connection did not end")
		}
	})
}

func TestTCPListener(t *testing.T) {
	s := New(Config{})
	if err := s.AddExport(Export{Name: "d", Size: 1 << 16, Device: newMem(1 << 16)}); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, ln) }()
	c, err := Dial(context.Background(), "tcp", ln.Addr().String(), "d")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.WriteAt(context.Background(), []byte("tcp"), 100, true); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 3)
	if err := c.ReadAt(context.Background(), got, 100); err != nil || string(got) != "tcp" {
		t.Fatalf("read %q, %v", got, err)
	}
	c.Close()
	cancel() // stopping the context stops Serve cleanly
	if err := <-done; err != nil {
		t.Fatalf("Serve: %v", err)
	}
	s.Close()
}

func TestListenUnixLiveAndStale(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s.sock")
	ln, err := ListenUnix(sock)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	if _, err := ListenUnix(sock); err == nil {
		t.Fatal("second ListenUnix on a live socket succeeded")
	}
	// A socket file whose server is gone is replaced.
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	ln2, err := ListenUnix(sock)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	ln2.Close()
}

// dialAs connects to a unix socket with the file-system identity of
// uid:gid (no supplementary groups but root's, none of which the tests
// use), on a thread of its own that dies afterwards: what a hypervisor
// running as that user would get.
func dialAs(tb testing.TB, path string, uid, gid int) error {
	tb.Helper()
	res := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread goes with the goroutine
		unix.Setfsgid(gid)
		unix.Setfsuid(uid) // from 0 to non-zero drops CAP_DAC_OVERRIDE on this thread
		c, err := net.Dial("unix", path)
		if err == nil {
			c.Close()
		}
		res <- err
	}()
	return <-res
}

func TestListenUnixShared(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test gives a socket to another group and connects as another user: run it as root (make test does)")
	}
	const nobody, nogroup, other = 65534, 65534, 65533
	dir := t.TempDir()
	// The hypervisor's user must be able to reach the socket's directory.
	for d := dir; d != "/" && d != os.TempDir(); d = filepath.Dir(d) {
		if err := os.Chmod(d, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct {
		name     string
		acc      SocketAccess
		wantMode os.FileMode
		wantErr  error
		// who may connect: the group's user, and a user of another group
		groupIn, otherIn bool
	}{
		{"default: the agent's user only", SocketAccess{}, 0o600, nil, false, false},
		{"a group, default mode", SocketAccess{GID: nogroup}, 0o660, nil, true, false},
		{"a group, read-only bits kept", SocketAccess{GID: nogroup, Mode: 0o640}, 0o640, nil, false, false},
		{"world access refused", SocketAccess{GID: nogroup, Mode: 0o666}, 0, ErrWorldAccess, false, false},
		{"odd bits refused", SocketAccess{GID: nogroup, Mode: os.ModeSetuid | 0o660}, 0, ErrWorldAccess, false, false},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sock := filepath.Join(dir, fmt.Sprintf("s%d.sock", i))
			ln, err := ListenUnixShared(sock, tc.acc)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("err = %v, want %v", err, tc.wantErr)
				}
				if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
					t.Fatalf("a refused socket was created: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			go func() {
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					c.Close()
				}
			}()
			fi, err := os.Lstat(sock)
			if err != nil {
				t.Fatal(err)
			}
			if got := fi.Mode().Perm(); got != tc.wantMode {
				t.Errorf("mode = %v, want %v", got, tc.wantMode)
			}
			if gid := int(fi.Sys().(*syscall.Stat_t).Gid); tc.acc.GID != 0 && gid != tc.acc.GID {
				t.Errorf("group = %d, want %d", gid, tc.acc.GID)
			}
			if err := dialAs(t, sock, nobody, nogroup); (err == nil) != tc.groupIn {
				t.Errorf("user %d of group %d: dial err = %v, want access %v", nobody, nogroup, err, tc.groupIn)
			}
			if err := dialAs(t, sock, nobody, other); (err == nil) != tc.otherIn {
				t.Errorf("user %d of group %d: dial err = %v, want access %v", nobody, other, err, tc.otherIn)
			}
		})
	}
}

// journalMem is a batchMem that acknowledges a batch once "journaled" and
// then holds its apply until release is closed, as a device whose image
// write is slow.
type journalMem struct {
	*batchMem
	release chan struct{}
	applied chan struct{} // closed after the first batch's apply
}

// WriteAtBatch is the slow apply: it waits for release. A server that
// replies only after it would not answer before the test releases it.
func (j *journalMem) WriteAtBatch(ctx context.Context, ps [][]byte, offs []int64) error {
	<-j.release
	return j.batchMem.WriteAtBatch(ctx, ps, offs)
}

func (j *journalMem) WriteAtBatchJournaled(ctx context.Context, ps [][]byte, offs []int64, journaled func()) error {
	journaled()
	err := j.WriteAtBatch(ctx, ps, offs)
	select {
	case <-j.applied:
	default:
		close(j.applied)
	}
	return err
}

// TestJournaledBatchRepliesEarly: a write to a JournalingBatchWriter is
// answered while the device still applies it, and a READ behind it on the
// same connection runs only once the apply is done.
func TestJournaledBatchRepliesEarly(t *testing.T) {
	dev := &journalMem{batchMem: &batchMem{memDevice: newMem(1 << 20)}, release: make(chan struct{}), applied: make(chan struct{})}
	_, sock := startServer(t, Export{Name: "d", Size: 1 << 20, Device: dev})
	c := dialT(t, sock, "d")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	p := bytes.Repeat([]byte{7}, 4096)
	wctx, wcancel := context.WithTimeout(ctx, 5*time.Second)
	defer wcancel()
	if err := c.WriteAt(wctx, p, 8192, false); err != nil {
		close(dev.release)
		t.Fatalf("write (the reply should come before the device applies it): %v", err)
	}
	select {
	case <-dev.applied:
		t.Fatal("the reply waited for the apply")
	default:
	}
	read := make(chan error, 1)
	got := make([]byte, 4096)
	go func() { read <- c.ReadAt(ctx, got, 8192) }()
	close(dev.release)
	if err := <-read; err != nil {
		t.Fatalf("read: %v", err)
	}
	if !bytes.Equal(got, p) {
		t.Fatal("the read behind an early-acknowledged write did not see it")
	}
}
