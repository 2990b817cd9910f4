package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"syscall"
	"time"
)

// Device is the storage behind an export. The server calls it from one
// goroutine per connection for READ, WRITE, WRITE_ZEROES and TRIM, and from
// other goroutines for Flush, so implementations must be safe for
// concurrent use. Offsets and lengths are already checked against the
// export size. Errors are reported to the client as EIO (ENOSPC if the
// error wraps syscall.ENOSPC); the connection stays up.
type Device interface {
	// ReadAt fills p with the bytes at off.
	ReadAt(ctx context.Context, p []byte, off int64) error
	// WriteAt writes p at off. When it returns, a ReadAt on any connection
	// sees the data; it need not be durable until Flush.
	WriteAt(ctx context.Context, p []byte, off int64) error
	// WriteZeroes makes length bytes at off read as zero.
	WriteZeroes(ctx context.Context, off, length int64) error
	// Trim discards length bytes at off. Afterwards they may read as
	// anything the device chooses (ferry's devices: zero).
	Trim(ctx context.Context, off, length int64) error
	// Flush makes every write that returned before the call durable. It is
	// how FLUSH and FUA are honoured; it may block for an fsync.
	Flush(ctx context.Context) error
}

// BatchWriter is implemented by devices for which several writes cost
// less together than apart (one journal append for all). WriteAtBatch
// applies ps[i] at offs[i] for every i, in order, with the same visibility
// and durability as that many WriteAt calls, and fails or succeeds as a
// whole. The server hands it the writes of one burst of pipelined
// requests.
type BatchWriter interface {
	WriteAtBatch(ctx context.Context, ps [][]byte, offs []int64) error
}

// JournalingBatchWriter is a BatchWriter that can say when a batch may be
// acknowledged before it is applied. WriteAtBatchJournaled is WriteAtBatch
// that calls journaled (at most once, and not at all if the batch fails
// first) as soon as every write of the batch is in the device's log, in
// order. From then on the writes survive what an acknowledged write must:
// a FLUSH started after journaled makes them durable, and returns only
// once they are applied, so a read after it, on any connection, sees them.
// Reads on the calling connection come after the call returns anyway.
// journaled runs while the device holds its other writers up, so it must
// not block. An error after journaled means the device failed applying the
// batch: the writes stay in its log, and the device refuses I/O until it
// is resumed.
type JournalingBatchWriter interface {
	BatchWriter
	WriteAtBatchJournaled(ctx context.Context, ps [][]byte, offs []int64, journaled func()) error
}

// Batch limits: a burst is cut into batches of at most this many writes
// and bytes, which bounds the memory a connection holds.
const (
	maxBatchWrites = 64
	maxBatchBytes  = 8 << 20
)

// Export is a named disk the server offers.
type Export struct {
	Name        string
	Description string
	Size        int64
	ReadOnly    bool
	// MultiConn must be true only if a Flush through any connection makes
	// the writes acknowledged on every connection durable.
	MultiConn bool
	Device    Device
}

func (e *Export) flags() uint16 {
	f := uint16(FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagSendTrim | FlagSendWriteZeroes)
	if e.ReadOnly {
		f |= FlagReadOnly
	}
	if e.MultiConn {
		f |= FlagCanMultiConn
	}
	return f
}

// Config configures a Server.
type Config struct {
	Logger *slog.Logger
	// HandshakeTimeout bounds the negotiation phase. Default 30 s.
	HandshakeTimeout time.Duration
}

// Server serves exports over any number of listeners.
type Server struct {
	log     *slog.Logger
	hsLimit time.Duration

	mu        sync.Mutex
	exports   map[string]*Export
	order     []string
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{}
	closed    bool
	wg        sync.WaitGroup
}

// New returns a server with no exports.
func New(cfg Config) *Server {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = 30 * time.Second
	}
	return &Server{
		log:       cfg.Logger,
		hsLimit:   cfg.HandshakeTimeout,
		exports:   map[string]*Export{},
		listeners: map[net.Listener]struct{}{},
		conns:     map[*conn]struct{}{},
	}
}

// AddExport offers e. The first export added is also the default export
// (the empty name). It fails if the name is taken.
func (s *Server) AddExport(e Export) error {
	if e.Device == nil || e.Size < 0 || len(e.Name) > 4096 {
		return fmt.Errorf("nbd: invalid export %q", e.Name)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.exports[e.Name]; ok {
		return fmt.Errorf("nbd: export %q already exists", e.Name)
	}
	s.exports[e.Name] = &e
	s.order = append(s.order, e.Name)
	return nil
}

// RemoveExport stops offering the export and disconnects its clients. It
// returns after their connections have closed. Idempotent.
func (s *Server) RemoveExport(name string) {
	s.mu.Lock()
	e := s.exports[name]
	delete(s.exports, name)
	for i, n := range s.order {
		if n == name {
			s.order = append(s.order[:i], s.order[i+1:]...)
			break
		}
	}
	var victims []*conn
	for c := range s.conns {
		if e != nil && c.export == e {
			victims = append(victims, c)
		}
	}
	s.mu.Unlock()
	for _, c := range victims {
		c.nc.Close()
		<-c.done
	}
}

func (s *Server) lookup(name string) *Export {
	s.mu.Lock()
	defer s.mu.Unlock()
	if name == "" && len(s.order) > 0 {
		if e, ok := s.exports[""]; ok {
			return e
		}
		return s.exports[s.order[0]]
	}
	return s.exports[name]
}

// ListenUnix listens on a unix socket at path with mode 0600, so only the
// agent's user may connect. A stale socket file left by a dead process is
// replaced; one that a live server still answers on is an error.
//
// Connecting to a unix socket needs write permission on it, so under any
// umask that withholds write from group and others (the default 022 does)
// nobody else can connect in the instant between creation and chmod. The
// umask is not changed: it is process-wide and would race with other
// goroutines creating files.
func ListenUnix(path string) (net.Listener, error) {
	return ListenUnixShared(path, SocketAccess{})
}

// SocketAccess opens a socket to one more group (a hypervisor's user,
// such as libvirt-qemu), never to everyone.
type SocketAccess struct {
	GID  int         // group to own the socket; 0: the process's, mode 0600
	Mode os.FileMode // with GID: default 0660; bits for others are refused
}

// ErrWorldAccess: a socket mode that lets any user connect.
var ErrWorldAccess = errors.New("nbd: a socket mode that gives others access")

// ListenUnixShared is ListenUnix with the socket's group and mode from
// acc. The group is set before the mode widens, so no other group ever
// gets in.
func ListenUnixShared(path string, acc SocketAccess) (net.Listener, error) {
	mode := os.FileMode(0o600)
	if acc.GID != 0 {
		mode = acc.Mode
		if mode == 0 {
			mode = 0o660
		}
	}
	if mode&0o007 != 0 || mode&^os.ModePerm != 0 {
		return nil, fmt.Errorf("%w: %v for %s (give a group instead)", ErrWorldAccess, mode, path)
	}
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("listen on %s: another server is using it", path)
		}
		os.Remove(path)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("chmod %s: %w", path, err)
	}
	if acc.GID != 0 {
		if err := os.Lchown(path, -1, acc.GID); err != nil {
			ln.Close()
			return nil, fmt.Errorf("give socket %s to group %d: %w", path, acc.GID, err)
		}
	}
	if err := os.Chmod(path, mode); err != nil {
		ln.Close()
		return nil, fmt.Errorf("chmod %s: %w", path, err)
	}
	return ln, nil
}

// Serve accepts connections on ln until ctx is done, ln fails or Close is
// called. It returns nil on a clean stop.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return net.ErrClosed
	}
	s.listeners[ln] = struct{}{}
	s.mu.Unlock()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, ln)
		s.mu.Unlock()
	}()
	for {
		nc, err := ln.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed || ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			return fmt.Errorf("nbd accept: %w", err)
		}
		c := &conn{s: s, nc: nc, done: make(chan struct{})}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			nc.Close()
			return nil
		}
		s.conns[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.wg.Done()
			c.serve(ctx)
		}()
	}
}

// Close stops all listeners and connections and waits for them to end.
// In-flight requests complete first. Idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	for ln := range s.listeners {
		ln.Close()
	}
	for c := range s.conns {
		c.nc.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return nil
}

// conn is one client connection.
type conn struct {
	s      *Server
	nc     net.Conn
	export *Export
	done   chan struct{}
}

func (c *conn) serve(ctx context.Context) {
	defer func() {
		c.nc.Close()
		c.s.mu.Lock()
		delete(c.s.conns, c)
		c.s.mu.Unlock()
		close(c.done)
	}()
	defer func() {
		if r := recover(); r != nil {
			// A bug must cost one connection, not the agent.
			c.s.log.Error("nbd connection panic", "panic", r)
		}
	}()
	br := bufio.NewReaderSize(c.nc, 128<<10)
	bw := bufio.NewWriterSize(c.nc, 64<<10)
	c.nc.SetDeadline(time.Now().Add(c.s.hsLimit))
	e, err := c.handshake(br, bw)
	if err != nil {
		if !errors.Is(err, io.EOF) && !errors.Is(err, errAbort) {
			c.s.log.Debug("nbd handshake failed", "err", err)
		}
		return
	}
	c.nc.SetDeadline(time.Time{})
	c.s.mu.Lock()
	if _, ok := c.s.exports[e.Name]; !ok || c.s.closed {
		c.s.mu.Unlock()
		return
	}
	c.export = e
	c.s.mu.Unlock()
	if err := c.transmit(ctx, br, bw); err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
		c.s.log.Debug("nbd connection ended", "export", e.Name, "err", err)
	}
}

var errAbort = errors.New("client aborted negotiation")

// handshake runs the fixed newstyle negotiation and returns the chosen export.
func (c *conn) handshake(br *bufio.Reader, bw *bufio.Writer) (*Export, error) {
	var hello [18]byte
	binary.BigEndian.PutUint64(hello[0:], nbdMagic)
	binary.BigEndian.PutUint64(hello[8:], optMagic)
	binary.BigEndian.PutUint16(hello[16:], flagFixedNewstyle|flagNoZeroes)
	bw.Write(hello[:])
	if err := bw.Flush(); err != nil {
		return nil, err
	}
	var cf [4]byte
	if _, err := io.ReadFull(br, cf[:]); err != nil {
		return nil, err
	}
	clientFlags := binary.BigEndian.Uint32(cf[:])
	if clientFlags&^clientFlagsKnown != 0 || clientFlags&flagFixedNewstyle == 0 {
		return nil, fmt.Errorf("%w: client flags %#x", ErrProtocol, clientFlags)
	}
	noZeroes := clientFlags&flagNoZeroes != 0
	for {
		var oh [16]byte
		if _, err := io.ReadFull(br, oh[:]); err != nil {
			return nil, err
		}
		if m := binary.BigEndian.Uint64(oh[:]); m != optMagic {
			return nil, fmt.Errorf("%w: bad option magic %#x", ErrProtocol, m)
		}
		opt := binary.BigEndian.Uint32(oh[8:])
		n := binary.BigEndian.Uint32(oh[12:])
		if n > maxOptionDataLength {
			// We cannot tell a huge option from garbage; the spec allows
			// dropping such a client.
			return nil, fmt.Errorf("%w: option %d data length %d", ErrProtocol, opt, n)
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(br, data); err != nil {
			return nil, err
		}
		e, done, err := c.option(bw, opt, data, noZeroes)
		if err != nil {
			return nil, err
		}
		if err := bw.Flush(); err != nil {
			return nil, err
		}
		if done {
			return e, nil
		}
	}
}

func optReply(bw *bufio.Writer, opt, typ uint32, data []byte) {
	var h [20]byte
	binary.BigEndian.PutUint64(h[0:], optReplyMagic)
	binary.BigEndian.PutUint32(h[8:], opt)
	binary.BigEndian.PutUint32(h[12:], typ)
	binary.BigEndian.PutUint32(h[16:], uint32(len(data)))
	bw.Write(h[:])
	bw.Write(data)
}

// option handles one option. done reports that transmission begins with e.
func (c *conn) option(bw *bufio.Writer, opt uint32, data []byte, noZeroes bool) (e *Export, done bool, err error) {
	switch opt {
	case OptExportName:
		e := c.s.lookup(string(data))
		if e == nil {
			// No way to report an error for this option: hang up.
			return nil, false, fmt.Errorf("%w: %q", ErrUnknownExport, data)
		}
		var b [10]byte
		binary.BigEndian.PutUint64(b[0:], uint64(e.Size))
		binary.BigEndian.PutUint16(b[8:], e.flags())
		bw.Write(b[:])
		if !noZeroes {
			bw.Write(make([]byte, 124))
		}
		return e, true, nil
	case OptAbort:
		optReply(bw, opt, repAck, nil)
		bw.Flush()
		return nil, false, errAbort
	case OptList:
		if len(data) != 0 {
			optReply(bw, opt, repErrInvalid, []byte("NBD_OPT_LIST takes no data"))
			return nil, false, nil
		}
		c.s.mu.Lock()
		names := append([]string(nil), c.s.order...)
		c.s.mu.Unlock()
		for _, n := range names {
			b := binary.BigEndian.AppendUint32(nil, uint32(len(n)))
			optReply(bw, opt, repServer, append(b, n...))
		}
		optReply(bw, opt, repAck, nil)
		return nil, false, nil
	case OptInfo, OptGo:
		req, err := parseInfoRequest(data)
		if err != nil {
			optReply(bw, opt, repErrInvalid, []byte(err.Error()))
			return nil, false, nil
		}
		e := c.s.lookup(req.name)
		if e == nil {
			optReply(bw, opt, repErrUnknown, []byte(fmt.Sprintf("no export named %q", req.name)))
			return nil, false, nil
		}
		var b [12]byte
		binary.BigEndian.PutUint16(b[0:], infoExport)
		binary.BigEndian.PutUint64(b[2:], uint64(e.Size))
		binary.BigEndian.PutUint16(b[10:], e.flags())
		optReply(bw, opt, repInfo, b[:])
		for _, info := range req.infos {
			switch info {
			case infoName:
				optReply(bw, opt, repInfo, append([]byte{0, infoName}, e.Name...))
			case infoDescription:
				optReply(bw, opt, repInfo, append([]byte{0, infoDescription}, e.Description...))
			case infoBlockSize:
				var bs [14]byte
				binary.BigEndian.PutUint16(bs[0:], infoBlockSize)
				binary.BigEndian.PutUint32(bs[2:], 1)
				binary.BigEndian.PutUint32(bs[6:], 4096)
				binary.BigEndian.PutUint32(bs[10:], MaxRequest)
				optReply(bw, opt, repInfo, bs[:])
			}
		}
		optReply(bw, opt, repAck, nil)
		return e, opt == OptGo, nil
	case OptStartTLS:
		optReply(bw, opt, repErrUnsup, []byte("TLS is not offered: ferry serves NBD on local unix sockets only"))
		return nil, false, nil
	default:
		optReply(bw, opt, repErrUnsup, []byte(fmt.Sprintf("option %d not supported", opt)))
		return nil, false, nil
	}
}

// replier sends simple replies on a connection. The request loop buffers
// its replies and writes them out only when no further whole request is
// already waiting in its input buffer, so a burst of pipelined requests
// costs one write(2) for all their replies; FLUSH and FUA completions,
// which come from other goroutines, write out at once. Replies to a batch
// the device journaled before applying go out at once too, but only as
// far as the socket takes them without waiting (tryFlush): they are sent
// while the device holds its writers up.
type replier struct {
	mu  sync.Mutex
	nc  net.Conn
	rc  syscall.RawConn // nil: tryFlush leaves everything to flush
	buf []byte          // replies not written yet
	err error
	hdr [16]byte
	// tryWrite is tryFlush's raw write, made once: a closure made at
	// each call escapes to the heap (an allocation per batch). It sets
	// tried to the bytes written.
	tryWrite func(fd uintptr) bool
	tried    int
}

// replyBuffer is the size from which a reply's data is written past the
// buffer.
const replyBuffer = 64 << 10

func newReplier(nc net.Conn) *replier {
	w := &replier{nc: nc, buf: make([]byte, 0, replyBuffer)}
	if sc, ok := nc.(syscall.Conn); ok {
		if rc, err := sc.SyscallConn(); err == nil {
			w.rc = rc
		}
	}
	w.tryWrite = func(fd uintptr) bool {
		w.tried, _ = syscall.Write(int(fd), w.buf) // EAGAIN or an error: the next flush handles it
		return true
	}
	return w
}

func (w *replier) send(handle uint64, errno uint32, data []byte, flush bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.err != nil {
		return
	}
	binary.BigEndian.PutUint32(w.hdr[0:], simpleReplyMagic)
	binary.BigEndian.PutUint32(w.hdr[4:], errno)
	binary.BigEndian.PutUint64(w.hdr[8:], handle)
	w.buf = append(w.buf, w.hdr[:]...)
	if len(w.buf)+len(data) > cap(w.buf) {
		w.flushLocked()
		if w.err == nil && len(data) > 0 {
			if _, err := w.nc.Write(data); err != nil {
				w.fail(err)
			}
		}
		return
	}
	w.buf = append(w.buf, data...)
	if flush {
		w.flushLocked()
	}
}

func (w *replier) flush() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.err == nil {
		w.flushLocked()
	}
}

func (w *replier) flushLocked() {
	if len(w.buf) == 0 {
		return
	}
	_, err := w.nc.Write(w.buf)
	w.buf = w.buf[:0]
	if err != nil {
		w.fail(err)
	}
}

// tryFlush writes out what the socket takes without waiting, and keeps
// the rest for the next flush. It never blocks on the client.
func (w *replier) tryFlush() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.err != nil || w.rc == nil || len(w.buf) == 0 {
		return
	}
	w.tried = 0
	w.rc.Write(w.tryWrite)
	if n := w.tried; n > 0 {
		w.buf = w.buf[:copy(w.buf, w.buf[n:])]
	}
}

// pending returns the bytes of replies not written yet.
func (w *replier) pending() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.buf)
}

func (w *replier) fail(err error) {
	w.err = err
	w.nc.Close() // unblocks the request loop
}

// transmit runs the transmission phase. The calling goroutine executes
// requests in order of arrival, reading them itself while they are small
// and taking them from a read-ahead goroutine while large writes come (see
// reader.go); FLUSH and FUA waits go to the connection's flusher so that
// requests behind them go on.
func (c *conn) transmit(ctx context.Context, br *bufio.Reader, bw *bufio.Writer) error {
	e := c.export
	dev := e.Device
	if err := bw.Flush(); err != nil { // the handshake's last reply
		return err
	}
	w := newReplier(c.nc)
	fl := newFlusher(dev, w, MaxDurableInFlight)
	go fl.run(ctx)
	quit := make(chan struct{})
	rd := &reader{br: br, size: uint64(e.Size), readOnly: e.ReadOnly, pool: newPayloadPool(bigBytes),
		free: make(chan *chunk, chunks), out: make(chan *chunk, chunks), start: make(chan struct{}, 1), quit: quit}
	for range chunks {
		rd.free <- &chunk{}
	}
	go rd.run()
	in := inbox{rd: rd}
	defer func() {
		// The reader stops at its next hand-over; one blocked in a socket
		// read ends when serve closes the connection.
		close(quit)
		rd.pool.close()
		fl.close() // answers every FLUSH and FUA received, then stops
		w.flush()
	}()
	durable := fl.add
	// Writes that arrived together are applied together when the device
	// can batch; any other request first applies the batch, so the order
	// of execution is the order of arrival.
	bwr, canBatch := dev.(BatchWriter)
	jw, _ := dev.(JournalingBatchWriter)
	var (
		batch  []request
		bPs    [][]byte
		bOffs  []int64
		bBytes int
	)
	// ackEarly is the device's journaled callback: made once per
	// connection, not per batch, as a closure passed on would be an
	// allocation each time.
	acked := false
	ackEarly := func() {
		for _, r := range batch {
			w.send(r.Handle, 0, nil, false)
		}
		w.tryFlush()
		acked = true
	}
	runBatch := func(flush bool) {
		if len(batch) == 0 {
			return
		}
		bPs, bOffs = bPs[:0], bOffs[:0]
		for _, r := range batch {
			bPs = append(bPs, r.payload)
			bOffs = append(bOffs, int64(r.Offset))
		}
		var err error
		acked = false
		if jw != nil {
			// The replies go out while the images are written, so the
			// client sends its next requests meanwhile: 10-13 % more 4 KiB
			// writes a second (docs/benchmarks.md).
			err = jw.WriteAtBatchJournaled(ctx, bPs, bOffs, ackEarly)
		} else {
			err = bwr.WriteAtBatch(ctx, bPs, bOffs)
		}
		errno := errnoOf(err)
		for i, r := range batch {
			if !acked {
				w.send(r.Handle, errno, nil, flush && i == len(batch)-1)
			}
			in.done(r)
		}
		if acked && (flush || w.pending() > replyBuffer) {
			// What tryFlush left, now without the device's lock: a client
			// that sends requests without reading their replies is held
			// up here, as a blocking reply would hold it up.
			w.flush()
		}
		clear(bPs)
		batch, bBytes = batch[:0], 0
		in.release()
	}
	defer runBatch(true) // requests received before a disconnect still complete
	var buf []byte       // READ data; replies are written before reuse
	for {
		r, end, err := in.next()
		if end {
			runBatch(false)
			if r.Type == CmdWrite && r.Length > MaxRequest {
				w.send(r.Handle, EINVAL, nil, true)
			}
			return err
		}
		batchable := canBatch && r.Type == CmdWrite && r.errno == 0 && r.Flags&CmdFlagFUA == 0
		if batchable {
			batch = append(batch, r)
			bBytes += len(r.payload)
			// Take the writes already read, up to the batch limits.
			for len(batch) < maxBatchWrites && bBytes < maxBatchBytes {
				n, ok := in.peek()
				if !ok || n.Type != CmdWrite || n.errno != 0 || n.Flags&CmdFlagFUA != 0 {
					break
				}
				in.take()
				batch = append(batch, n)
				bBytes += len(n.payload)
			}
			runBatch(!in.more())
			continue
		}
		runBatch(false)
		more := in.more()
		if r.errno != 0 {
			in.done(r)
			in.release()
			w.send(r.Handle, r.errno, nil, !more)
			continue
		}
		off, n := int64(r.Offset), int64(r.Length)
		var opErr error
		switch r.Type {
		case CmdRead:
			if cap(buf) < int(r.Length) {
				buf = make([]byte, r.Length)
			}
			b := buf[:r.Length]
			in.release()
			if err := dev.ReadAt(ctx, b, off); err != nil {
				w.send(r.Handle, errnoOf(err), nil, !more)
				continue
			}
			w.send(r.Handle, 0, b, !more)
			continue
		case CmdWrite:
			opErr = dev.WriteAt(ctx, r.payload, off)
		case CmdWriteZeroes:
			opErr = dev.WriteZeroes(ctx, off, n)
		case CmdTrim:
			opErr = dev.Trim(ctx, off, n)
		case CmdCache:
			// Advisory; nothing to do.
		case CmdFlush:
			in.release()
			durable(r.Handle)
			continue
		}
		in.done(r)
		in.release()
		if opErr == nil && r.Flags&CmdFlagFUA != 0 {
			durable(r.Handle)
			continue
		}
		w.send(r.Handle, errnoOf(opErr), nil, !more)
	}
}

// inbox is the request loop's side of the reader: the requests in order,
// read by the loop itself or by the reader goroutine, and the chunks they
// came in given back once their requests ran.
type inbox struct {
	rd    *reader
	piped bool // the reader goroutine owns the socket
	cur   *chunk
	i     int      // next request in cur
	used  []*chunk // chunks read past whose requests may still be running
}

// fetch makes cur hold an unread request if one has been read, or can be
// without waiting; if block, it waits for one. It reports false if there
// is none (never when block).
func (in *inbox) fetch(block bool) bool {
	for in.cur == nil || in.i == len(in.cur.reqs) {
		if in.cur != nil {
			if in.cur.end {
				return true // its end is the next thing to report
			}
			if in.cur.handback {
				in.piped = false
			}
			in.used = append(in.used, in.cur)
			in.cur = nil
		}
		if in.piped {
			if block {
				in.cur = <-in.rd.out
			} else {
				select {
				case in.cur = <-in.rd.out:
				default:
					return false
				}
			}
			in.i = 0
			continue
		}
		// The loop reads the socket itself. A chunk is free: when block,
		// every earlier chunk has been released; otherwise try.
		var c *chunk
		select {
		case c = <-in.rd.free:
		default:
			if !block {
				return false
			}
			c = <-in.rd.free
		}
		c.reset()
		if !in.rd.fill(c, block) {
			in.rd.free <- c
			return false
		}
		if len(c.reqs) == 0 && !c.end {
			in.rd.free <- c
			return false
		}
		if c.large && !c.end {
			// Large writes: the reader goroutine reads what follows
			// while this chunk runs.
			in.piped = true
			in.rd.start <- struct{}{}
		}
		in.cur, in.i = c, 0
	}
	return true
}

// stops reports whether the connection ends at cur's request i: past the
// last chunk's requests, or at the request that stopped the reader.
func (in *inbox) stops(i int) bool {
	return in.cur.end && (i == len(in.cur.reqs) || in.cur.stopper && i == len(in.cur.reqs)-1)
}

// next returns the next request, waiting for it. end reports that the
// connection ends here, with err the reason (nil after a DISC); r is then
// the request that ended it, if any (a DISC or an oversized WRITE).
func (in *inbox) next() (r request, end bool, err error) {
	in.fetch(true)
	if in.stops(in.i) {
		if in.i < len(in.cur.reqs) {
			r = in.cur.reqs[in.i]
		}
		in.i = len(in.cur.reqs)
		return r, true, in.cur.err
	}
	r = in.cur.reqs[in.i]
	in.i++
	return r, false, nil
}

// peek returns the next request if it has been read already and does not
// end the connection; take then takes it.
func (in *inbox) peek() (request, bool) {
	if !in.fetch(false) || in.stops(in.i) {
		return request{}, false
	}
	return in.cur.reqs[in.i], true
}

// take takes the request that peek returned.
func (in *inbox) take() { in.i++ }

// more reports whether a request has been read, or can be without
// waiting.
func (in *inbox) more() bool {
	if in.cur != nil && in.i < len(in.cur.reqs) {
		return true
	}
	if in.piped {
		return len(in.rd.out) > 0
	}
	ready, _ := requestReady(in.rd.br)
	return ready
}

// done gives back r's own payload buffer, if it had one.
func (in *inbox) done(r request) {
	if r.big {
		in.rd.pool.put(r.payload)
	}
}

// release gives back the chunks read past: their requests have all run.
func (in *inbox) release() {
	for i, c := range in.used {
		in.rd.free <- c
		in.used[i] = nil
	}
	in.used = in.used[:0]
}

func errnoOf(err error) uint32 {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, syscall.ENOSPC):
		return ENOSPC
	case errors.Is(err, syscall.EPERM), errors.Is(err, syscall.EROFS):
		return EPERM
	case errors.Is(err, syscall.EINVAL):
		return EINVAL
	}
	return EIO
}

// MaxDurableInFlight bounds the FLUSH and FUA requests of one connection
// waiting for their flush: past it the connection's request loop stops
// reading the socket until the flusher catches up, so a client that
// pipelines without end holds a bounded amount of memory and no extra
// goroutines.
const MaxDurableInFlight = 256

// flusher answers one connection's FLUSH and FUA requests with one
// goroutine. Each round takes every handle waiting, runs one
// Device.Flush, which started after each of those requests had been
// received and so covers every write acknowledged before it, and then
// replies to them all: a burst of FLUSHes costs one fsync, not one each.
type flusher struct {
	dev  Device
	w    *replier
	max  int
	mu   sync.Mutex
	cond *sync.Cond
	// pending handles, in arrival order.
	pending []uint64
	closed  bool
	done    chan struct{}
}

func newFlusher(dev Device, w *replier, max int) *flusher {
	f := &flusher{dev: dev, w: w, max: max, done: make(chan struct{})}
	f.cond = sync.NewCond(&f.mu)
	return f
}

// add queues handle h for the next flush; it blocks while the queue is
// full (the bound on requests in flight).
func (f *flusher) add(h uint64) {
	f.mu.Lock()
	for len(f.pending) >= f.max && !f.closed {
		f.cond.Wait()
	}
	f.pending = append(f.pending, h)
	f.cond.Broadcast()
	f.mu.Unlock()
}

func (f *flusher) run(ctx context.Context) {
	defer close(f.done)
	var batch []uint64
	for {
		f.mu.Lock()
		for len(f.pending) == 0 && !f.closed {
			f.cond.Wait()
		}
		if len(f.pending) == 0 && f.closed {
			f.mu.Unlock()
			return
		}
		batch, f.pending = f.pending, batch[:0]
		f.cond.Broadcast() // room for the request loop again
		f.mu.Unlock()
		errno := errnoOf(f.dev.Flush(ctx))
		for i, h := range batch {
			f.w.send(h, errno, nil, i == len(batch)-1)
		}
	}
}

// close waits until every queued handle is answered, then stops run.
func (f *flusher) close() {
	f.mu.Lock()
	f.closed = true
	f.cond.Broadcast()
	f.mu.Unlock()
	<-f.done
}
