// Package replication runs the two ends of a replication stream: the
// Shipper at the source site, which sends a group's journal (after an
// initial copy when needed) and moves its hold forward as entries are
// acknowledged, and Receive at the recovery site, which feeds a
// replica.Replica and acknowledges only what is durable.
package replication

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"

	"github.com/ferry-dr/ferry/internal/disk"
	"github.com/ferry-dr/ferry/internal/journal"
	"github.com/ferry-dr/ferry/internal/link"
	"github.com/ferry-dr/ferry/internal/replica"
)

// ReplicaFor returns the replica that should receive the group named in
// hello (creating it if new). It is how the recovery agent maps streams to
// its replicas.
type ReplicaFor func(hello link.Hello) (*replica.Replica, error)

// Receiver serves replication streams, at most one per group at a time: a
// new stream for a group (the source reconnected) ends the old one first,
// which may be a half-open connection the network never closed.
type Receiver struct {
	ReplicaFor ReplicaFor

	mu     sync.Mutex
	active map[string]*session
}

type session struct {
	close func()
	done  chan struct{}
}

// Serve runs one stream on conn (closed when Serve returns). admit, if
// not nil, decides whether the authenticated peer may send the stream its
// Hello announces; it runs before the stream touches anything, so a
// refused stream never ends the live one of the same group.
func (rc *Receiver) Serve(ctx context.Context, conn io.ReadWriteCloser, admit func(link.Hello) error) error {
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	c := link.New(conn)
	defer c.Close()
	var hello link.Hello
	if err := c.ReadJSON(link.TypeHello, &hello); err != nil {
		return fmt.Errorf("read hello: %w", err)
	}
	if admit != nil {
		if err := admit(hello); err != nil {
			c.Write(link.TypeError, []byte(err.Error()))
			return fmt.Errorf("stream of %q refused: %w", hello.Group, err)
		}
	}
	me := &session{close: func() { conn.Close() }, done: make(chan struct{})}
	defer close(me.done)
	rc.mu.Lock()
	if rc.active == nil {
		rc.active = map[string]*session{}
	}
	old := rc.active[hello.Group]
	rc.active[hello.Group] = me
	rc.mu.Unlock()
	defer func() {
		rc.mu.Lock()
		if rc.active[hello.Group] == me {
			delete(rc.active, hello.Group)
		}
		rc.mu.Unlock()
	}()
	if old != nil {
		old.close()
		<-old.done
	}
	return receive(ctx, c, hello, rc.ReplicaFor, func() { conn.Close() })
}

// receive runs a stream after Hello. It acknowledges entries only after
// Replica.Commit made them durable. Commits run on their own goroutine,
// one at a time, each covering every entry appended before it started, so
// frames keep being read and appended while an fsync runs: under load one
// fsync covers many batches, and a slow one does not stall the link.
// Every other frame waits for the commits in flight first.
func receive(ctx context.Context, c *link.Conn, hello link.Hello, replicaFor ReplicaFor, closeConn func()) error {
	var sendMu sync.Mutex
	send := func(typ byte, parts ...[]byte) error {
		sendMu.Lock()
		defer sendMu.Unlock()
		return c.Write(typ, parts...)
	}
	rep, err := replicaFor(hello)
	if err != nil {
		send(link.TypeError, []byte(err.Error()))
		return err
	}
	next := rep.NextSeq()
	if next != 0 && !sameDisks(rep.Disks(), hello.Disks) {
		next = 0 // the source's disks changed: copy again
	}
	w := link.Welcome{NextSeq: next}
	if slices.Contains(hello.Compress, link.CompressZstd) {
		w.Compress = link.CompressZstd
	}
	if next == 0 {
		w.Delta = rep.HasImages(hello.Disks)
	}
	if err := c.WriteJSON(link.TypeWelcome, w); err != nil { // the committer is not running yet
		return err
	}
	cm := &committer{rep: rep, send: send, closeConn: closeConn}
	cm.cond = sync.NewCond(&cm.mu)
	go cm.run(ctx)
	defer cm.stop()
	var es []journal.Entry
	var ptrs []*journal.Entry
	for {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		typ, body, err := c.Read()
		if err != nil {
			if cerr := cm.failed(); cerr != nil {
				return cerr
			}
			if errors.Is(err, io.EOF) {
				return cm.drain()
			}
			return err
		}
		if typ != link.TypeEntries {
			if err := cm.drain(); err != nil {
				return err
			}
		}
		switch typ {
		case link.TypeBaseStart:
			var bs link.BaseStart
			if err := decodeJSON(body, &bs); err != nil {
				return err
			}
			begin := rep.Begin
			if bs.Delta {
				begin = rep.BeginDelta
			}
			if err := begin(hello.Group, hello.Disks, bs.StartSeq); err != nil {
				return fmt.Errorf("begin initial copy: %w", err)
			}
		case link.TypeHashReq:
			id, chunk, err := link.DecodeHashReq(body)
			if err != nil {
				return err
			}
			h, err := rep.ChunkHashes(id, int64(chunk))
			if err != nil {
				return err
			}
			if err := send(link.TypeHashes, h); err != nil {
				return err
			}
		case link.TypeBaseData:
			id, off, data, err := link.DecodeBaseData(body)
			if err != nil {
				return err
			}
			if err := rep.WriteBase(id, off, data); err != nil {
				return err
			}
		case link.TypeBaseDone:
			var bd link.BaseDone
			if err := decodeJSON(body, &bd); err != nil {
				return err
			}
			if err := rep.EndBase(bd.EndSeq); err != nil {
				return err
			}
			// The base is durable: acknowledge everything before the
			// journal's start.
			if err := send(link.TypeAck, link.EncodeAck(rep.NextSeq()-1)); err != nil {
				return err
			}
		case link.TypeEntries:
			es, err = link.DecodeEntries(body, es)
			if err != nil {
				return err
			}
			ptrs = ptrs[:0]
			for i := range es {
				ptrs = append(ptrs, &es[i])
			}
			if err := rep.Append(ptrs); err != nil {
				send(link.TypeError, []byte(err.Error()))
				return fmt.Errorf("append: %w", err)
			}
			if err := cm.kick(); err != nil {
				return err
			}
		default:
			return fmt.Errorf("%w: unexpected frame type %d", link.ErrFrame, typ)
		}
	}
}

// committer makes appended entries durable and acknowledges them, one
// Replica.Commit at a time, beside the loop that reads and appends.
type committer struct {
	rep       *replica.Replica
	send      func(typ byte, parts ...[]byte) error
	closeConn func()

	mu      sync.Mutex
	cond    *sync.Cond
	want    uint64 // appends asked to be committed
	done    uint64 // appends covered by a finished commit
	err     error
	stopped bool
	exited  bool
}

func (cm *committer) run(ctx context.Context) {
	defer func() {
		cm.mu.Lock()
		cm.exited = true
		cm.cond.Broadcast()
		cm.mu.Unlock()
	}()
	for {
		cm.mu.Lock()
		for cm.done == cm.want && !cm.stopped {
			cm.cond.Wait()
		}
		if cm.stopped && cm.done == cm.want {
			cm.mu.Unlock()
			return
		}
		target := cm.want
		cm.mu.Unlock()
		last, err := cm.rep.Commit(ctx)
		if err != nil {
			err = fmt.Errorf("commit: %w", err)
		} else if err = cm.send(link.TypeAck, link.EncodeAck(last)); err != nil {
			err = fmt.Errorf("ack: %w", err)
		}
		cm.mu.Lock()
		cm.done = target
		if err != nil && cm.err == nil {
			cm.err = err
		}
		cm.cond.Broadcast()
		cm.mu.Unlock()
		if err != nil {
			cm.closeConn() // the reading loop is woken and returns the error
			return
		}
	}
}

// kick asks for a commit of everything appended so far.
func (cm *committer) kick() error {
	cm.mu.Lock()
	defer cm.mu.Unlock()
	cm.want++
	cm.cond.Broadcast()
	return cm.err
}

// drain waits until every append asked for is committed.
func (cm *committer) drain() error {
	cm.mu.Lock()
	defer cm.mu.Unlock()
	for cm.done != cm.want && cm.err == nil && !cm.exited {
		cm.cond.Wait()
	}
	return cm.err
}

func (cm *committer) failed() error {
	cm.mu.Lock()
	defer cm.mu.Unlock()
	return cm.err
}

// stop ends the goroutine once what was asked is committed (or failed).
func (cm *committer) stop() {
	cm.mu.Lock()
	cm.stopped = true
	cm.cond.Broadcast()
	for !cm.exited {
		cm.cond.Wait()
	}
	cm.mu.Unlock()
}

func sameDisks(a, b []disk.Spec) bool {
	return slices.Equal(a, b)
}
