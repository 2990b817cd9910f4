package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// Client is a minimal NBD client: fixed newstyle, NBD_OPT_GO, simple
// replies. Its methods may be called concurrently; requests are pipelined
// on one connection. ferry uses it in tests and in tools that drive an
// export (the write-order checker); production clients are QEMU and the
// libnbd tools.
type Client struct {
	nc    net.Conn
	Size  int64
	Flags uint16

	wmu  sync.Mutex
	bw   *bufio.Writer
	next uint64

	mu      sync.Mutex
	pending map[uint64]*call
	err     error
	done    chan struct{}
}

type call struct {
	buf []byte // READ destination
	ch  chan error
}

// RemoteError is an error reply from the server.
type RemoteError struct{ Errno uint32 }

func (e *RemoteError) Error() string { return fmt.Sprintf("nbd: server replied errno %d", e.Errno) }

// Dial connects to addr ("unix" or "tcp") and opens export.
func Dial(ctx context.Context, network, addr, export string) (*Client, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, fmt.Errorf("nbd dial %s: %w", addr, err)
	}
	if dl, ok := ctx.Deadline(); ok {
		nc.SetDeadline(dl)
	}
	c := &Client{nc: nc, bw: bufio.NewWriterSize(nc, 256<<10), pending: map[uint64]*call{}, done: make(chan struct{})}
	br := bufio.NewReaderSize(nc, 256<<10)
	if err := c.negotiate(br, export); err != nil {
		nc.Close()
		return nil, err
	}
	nc.SetDeadline(time.Time{})
	go c.readLoop(br)
	return c, nil
}

func (c *Client) negotiate(br *bufio.Reader, export string) error {
	var hello [18]byte
	if _, err := io.ReadFull(br, hello[:]); err != nil {
		return fmt.Errorf("nbd greeting: %w", err)
	}
	if binary.BigEndian.Uint64(hello[0:]) != nbdMagic || binary.BigEndian.Uint64(hello[8:]) != optMagic {
		return fmt.Errorf("%w: not a newstyle NBD server", ErrProtocol)
	}
	b := binary.BigEndian.AppendUint32(nil, flagFixedNewstyle|flagNoZeroes)
	b = binary.BigEndian.AppendUint64(b, optMagic)
	b = binary.BigEndian.AppendUint32(b, OptGo)
	data := appendInfoRequest(nil, export)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	b = append(b, data...)
	if _, err := c.nc.Write(b); err != nil {
		return fmt.Errorf("nbd negotiate: %w", err)
	}
	for {
		var h [20]byte
		if _, err := io.ReadFull(br, h[:]); err != nil {
			return fmt.Errorf("nbd option reply: %w", err)
		}
		typ := binary.BigEndian.Uint32(h[12:])
		n := binary.BigEndian.Uint32(h[16:])
		if n > maxOptionDataLength {
			return fmt.Errorf("%w: option reply of %d bytes", ErrProtocol, n)
		}
		d := make([]byte, n)
		if _, err := io.ReadFull(br, d); err != nil {
			return err
		}
		switch {
		case typ == repAck:
			return nil
		case typ == repInfo && len(d) >= 12 && binary.BigEndian.Uint16(d) == infoExport:
			c.Size = int64(binary.BigEndian.Uint64(d[2:]))
			c.Flags = binary.BigEndian.Uint16(d[10:])
		case typ&repFlagError != 0:
			if typ == repErrUnknown {
				return fmt.Errorf("%w: %q: %s", ErrUnknownExport, export, d)
			}
			return fmt.Errorf("nbd: NBD_OPT_GO refused (%#x): %s", typ, d)
		}
	}
}

func (c *Client) readLoop(br *bufio.Reader) {
	var err error
	for {
		var h [16]byte
		if _, err = io.ReadFull(br, h[:]); err != nil {
			break
		}
		if binary.BigEndian.Uint32(h[:]) != simpleReplyMagic {
			err = fmt.Errorf("%w: bad reply magic", ErrProtocol)
			break
		}
		errno := binary.BigEndian.Uint32(h[4:])
		handle := binary.BigEndian.Uint64(h[8:])
		c.mu.Lock()
		cl := c.pending[handle]
		delete(c.pending, handle)
		c.mu.Unlock()
		if cl == nil {
			err = fmt.Errorf("%w: reply for unknown handle %d", ErrProtocol, handle)
			break
		}
		if errno != 0 {
			cl.ch <- &RemoteError{Errno: errno}
			continue
		}
		if cl.buf != nil {
			if _, err = io.ReadFull(br, cl.buf); err != nil {
				cl.ch <- err
				break
			}
		}
		cl.ch <- nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	c.mu.Lock()
	c.err = fmt.Errorf("nbd connection: %w", err)
	for h, cl := range c.pending {
		cl.ch <- c.err
		delete(c.pending, h)
	}
	c.mu.Unlock()
	close(c.done)
}

// Do sends one request and waits for its reply. For CmdRead, dst receives
// the data; for CmdWrite, payload is sent.
func (c *Client) Do(ctx context.Context, typ, flags uint16, off uint64, length uint32, payload, dst []byte) error {
	cl := &call{buf: dst, ch: make(chan error, 1)}
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return c.err
	}
	c.mu.Unlock()
	c.wmu.Lock()
	c.next++
	h := c.next
	c.mu.Lock()
	c.pending[h] = cl
	c.mu.Unlock()
	var hdr [requestHeaderSize]byte
	AppendRequest(hdr[:0], Request{Flags: flags, Type: typ, Handle: h, Offset: off, Length: length})
	c.bw.Write(hdr[:])
	c.bw.Write(payload)
	err := c.bw.Flush()
	c.wmu.Unlock()
	if err != nil {
		c.nc.Close()
	}
	select {
	case err := <-cl.ch:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// ReadAt reads len(p) bytes at off.
func (c *Client) ReadAt(ctx context.Context, p []byte, off int64) error {
	return c.Do(ctx, CmdRead, 0, uint64(off), uint32(len(p)), nil, p)
}

// WriteAt writes p at off, with FUA if fua is set.
func (c *Client) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	var f uint16
	if fua {
		f = CmdFlagFUA
	}
	return c.Do(ctx, CmdWrite, f, uint64(off), uint32(len(p)), p, nil)
}

// Flush sends NBD_CMD_FLUSH.
func (c *Client) Flush(ctx context.Context) error { return c.Do(ctx, CmdFlush, 0, 0, 0, nil, nil) }

// Close sends NBD_CMD_DISC and closes the connection.
func (c *Client) Close() error {
	c.wmu.Lock()
	var hdr [requestHeaderSize]byte
	AppendRequest(hdr[:0], Request{Type: CmdDisc})
	c.bw.Write(hdr[:])
	c.bw.Flush()
	c.wmu.Unlock()
	err := c.nc.Close()
	<-c.done
	return err
}
