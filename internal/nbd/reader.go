package nbd

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"sync"
)

// A connection's requests are executed in arrival order by one goroutine,
// the request loop. While requests are small, the request loop reads them
// itself: a burst of them costs one read(2) and no hand-over between
// goroutines. Once a large WRITE arrives, it hands the socket to a second
// goroutine (reader.run), which reads the requests that follow while the
// request loop executes those before them, so that copying a payload off
// the socket overlaps journaling the previous one: on a machine where each
// takes most of a core this is up to twice as fast. The reader hands the
// socket back when it reads a run of small requests and finds nothing more
// waiting. Requests move in chunks: every request already whole in the
// input buffer goes into the same chunk.

const (
	// chunks is how many chunks a connection has: the reader waits for a
	// free one, which bounds how far it reads ahead.
	chunks = 8
	// chunkBytes is the payload space of a chunk, kept for reuse. A WRITE
	// larger than this gets its own buffer from the connection's pool.
	chunkBytes = 1 << 20
	// bigBytes bounds the bytes of such larger payloads in flight; one
	// request (up to MaxRequest) is always let through.
	bigBytes = MaxRequest
	// pipeMin is the WRITE payload from which reading and executing run
	// in two goroutines: below it, a hand-over costs more than the
	// overlap gains.
	pipeMin = 128 << 10
)

// request is one request as read off the socket.
type request struct {
	Request
	errno   uint32 // the server's check of the header, 0 if it passed
	payload []byte // a WRITE's payload
	big     bool   // payload came from the pool, not the chunk
}

// chunk is a run of requests handed over at once. The last chunk the
// reader sends has end set, and err: why reading stopped (io.EOF, a
// protocol error, or nil after a DISC). If stopper is set, its last
// request is the one that stopped it (the DISC, or a WRITE too large to
// read), not one to execute.
type chunk struct {
	reqs    []request
	data    []byte
	err     error
	end     bool
	stopper bool
	large   bool // holds a WRITE of pipeMin bytes or more
	// handback: the reader stopped after this chunk; the request loop
	// reads the socket again.
	handback bool
}

func (c *chunk) reset() {
	clear(c.reqs)
	c.reqs, c.data, c.err = c.reqs[:0], c.data[:0], nil
	c.end, c.stopper, c.large, c.handback = false, false, false, false
}

// payloadPool hands out buffers for payloads larger than a chunk, within
// a byte budget: get blocks while the budget is spent, until they are put
// back. Buffers put back are kept for reuse, up to the budget's worth.
type payloadPool struct {
	mu     sync.Mutex
	cond   *sync.Cond
	budget int
	used   int
	closed bool
	free   [][]byte
	kept   int // capacity in free
}

func newPayloadPool(budget int) *payloadPool {
	p := &payloadPool{budget: budget}
	p.cond = sync.NewCond(&p.mu)
	return p
}

// get returns a buffer of length n, or nil once the pool is closed.
func (p *payloadPool) get(n int) []byte {
	p.mu.Lock()
	defer p.mu.Unlock()
	for p.used > 0 && p.used+n > p.budget && !p.closed {
		p.cond.Wait()
	}
	if p.closed {
		return nil
	}
	p.used += n
	for i, b := range p.free {
		if cap(b) >= n {
			p.free[i] = p.free[len(p.free)-1]
			p.free[len(p.free)-1] = nil
			p.free = p.free[:len(p.free)-1]
			p.kept -= cap(b)
			return b[:n]
		}
	}
	return make([]byte, n)
}

// put gives back a buffer that get handed out.
func (p *payloadPool) put(b []byte) {
	p.mu.Lock()
	p.used -= len(b)
	if p.kept+cap(b) <= p.budget {
		p.free = append(p.free, b)
		p.kept += cap(b)
	}
	p.cond.Broadcast()
	p.mu.Unlock()
}

// close wakes and fails every get.
func (p *payloadPool) close() {
	p.mu.Lock()
	p.closed = true
	p.cond.Broadcast()
	p.mu.Unlock()
}

// requestReady reports whether a whole next request (header and any WRITE
// payload) is already buffered, so that reading it will not block, and
// the size of its payload.
func requestReady(br *bufio.Reader) (ready bool, payload int) {
	if br.Buffered() < requestHeaderSize {
		return false, 0
	}
	h, _ := br.Peek(requestHeaderSize)
	if binary.BigEndian.Uint16(h[6:]) != CmdWrite {
		return true, 0
	}
	n := int(binary.BigEndian.Uint32(h[24:]))
	return br.Buffered() >= requestHeaderSize+n, n
}

// reader reads one connection's requests.
type reader struct {
	br       *bufio.Reader
	size     uint64
	readOnly bool
	pool     *payloadPool
	free     chan *chunk   // chunks the request loop is done with
	out      chan *chunk   // chunks read by run
	start    chan struct{} // hands the socket to run
	quit     <-chan struct{}
	// hdr is one's scratch (a local array escapes through io.ReadFull:
	// an allocation per request). Whoever owns the socket uses it.
	hdr [requestHeaderSize]byte
}

// run owns the socket from each start until it hands it back: it reads
// requests and sends them in chunks on out, until a chunk marked handback,
// or the last one, marked end (after an error, a DISC or a protocol
// violation). It stops early, without sending, once quit is closed (the
// request loop has returned).
func (rd *reader) run() {
	for {
		select {
		case <-rd.start:
		case <-rd.quit:
			return
		}
		for {
			var c *chunk
			select {
			case c = <-rd.free:
			case <-rd.quit:
				return
			}
			c.reset()
			if !rd.fill(c, true) {
				return
			}
			if !c.end && !c.large {
				ready, _ := requestReady(rd.br)
				c.handback = !ready
			}
			select {
			case rd.out <- c:
			case <-rd.quit:
				return
			}
			if c.end {
				return
			}
			if c.handback {
				break
			}
		}
	}
}

// fill reads into c every request already whole in the input buffer, up
// to the chunk's limits; if block and there is none, it waits for one. It
// reports false if reading must stop (quit).
func (rd *reader) fill(c *chunk, block bool) bool {
	for {
		if len(c.reqs) > 0 || !block {
			ready, n := requestReady(rd.br)
			if !ready || len(c.reqs) == maxBatchWrites || n > 0 && len(c.reqs) > 0 && len(c.data)+n > chunkBytes {
				return true
			}
		}
		if !rd.one(c) {
			return false
		}
		if c.end {
			return true
		}
	}
}

// one reads a request into c; false if reading must stop (quit).
func (rd *reader) one(c *chunk) bool {
	hdr := rd.hdr[:]
	if _, err := io.ReadFull(rd.br, hdr); err != nil {
		if err == io.ErrUnexpectedEOF {
			err = fmt.Errorf("%w: truncated request header", ErrProtocol)
		}
		c.err, c.end = err, true
		return true
	}
	pr, err := ParseRequest(hdr)
	if err != nil {
		c.err, c.end = err, true
		return true
	}
	r := request{Request: pr}
	if r.Type == CmdDisc {
		c.reqs = append(c.reqs, r)
		c.end, c.stopper = true, true
		return true
	}
	r.errno = checkRequest(pr, rd.size, rd.readOnly)
	if r.Type == CmdWrite {
		n := int(r.Length)
		c.large = c.large || n >= pipeMin
		if r.Length > MaxRequest {
			// Too large to read or to trust: the loop replies and
			// hangs up.
			c.reqs = append(c.reqs, r)
			c.err, c.end, c.stopper = fmt.Errorf("%w: write of %d bytes", ErrProtocol, r.Length), true, true
			return true
		}
		switch {
		case len(c.data)+n <= cap(c.data):
			r.payload = c.data[len(c.data) : len(c.data)+n : len(c.data)+n]
			c.data = c.data[:len(c.data)+n]
		case n <= chunkBytes && cap(c.data) == 0:
			c.data = make([]byte, n, chunkBytes)
			r.payload = c.data[:n:n]
		default:
			if r.payload = rd.pool.get(n); r.payload == nil {
				return false
			}
			r.big = true
		}
		if _, err := io.ReadFull(rd.br, r.payload); err != nil {
			if r.big {
				rd.pool.put(r.payload)
			}
			c.err, c.end = fmt.Errorf("%w: truncated write payload: %v", ErrProtocol, err), true
			return true
		}
	}
	c.reqs = append(c.reqs, r)
	return true
}
