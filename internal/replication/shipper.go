package replication

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/atomicfile"
	"github.com/ferry-dr/ferry/internal/disk"
	"github.com/ferry-dr/ferry/internal/journal"
	"github.com/ferry-dr/ferry/internal/link"
	"github.com/ferry-dr/ferry/internal/replica"
)

// States of a shipper.
const (
	StateConnecting   = api.ReplConnecting
	StateInitialSync  = api.ReplInitialSync
	StateStreaming    = api.ReplStreaming
	StateDisconnected = api.ReplDisconnected
	// StateResync: resending the blocks that changed while the journal
	// could not hold the writes (the dirty-block bitmap), then streaming.
	StateResync  = api.ReplResync
	StateStopped = api.ReplStopped
)

// holder is the name of the shipper's hold on the group's journal.
const holder = "shipper"

// ShipperConfig configures a Shipper.
type ShipperConfig struct {
	Group    *disk.Group
	Name     string // the group's name, as the recovery site knows it
	Source   string // this site's name
	StateDir string // where the acknowledged sequence is remembered (the group's dir)
	// Dial opens a connection to the recovery agent's replication endpoint.
	Dial   func(ctx context.Context) (io.ReadWriteCloser, error)
	Logger *slog.Logger
	Now    func() time.Time
	// MinBackoff and MaxBackoff bound the wait between reconnects
	// (defaults 100 ms and 5 s).
	MinBackoff, MaxBackoff time.Duration
	// MaxJournalBytes bounds the source journal while the recovery site
	// lags or is unreachable: past it the shipper lets the journal be
	// trimmed and tracks changed blocks in a bitmap instead, and resends
	// only those when the peer is back (default 1 GiB; negative: no bound).
	MaxJournalBytes int64
	// DeltaChunks, if set, is asked at the start of a delta copy (the
	// recovery site holds older images of the same disks, a reprotect)
	// which chunks may differ, given that entries after upTo are streamed
	// after the copy: changed-block tracking. Only those chunks are read
	// and sent. An error falls back to comparing every chunk's hash.
	DeltaChunks func(upTo uint64) (Chunks, error)
	// Copied, if set, is called after an initial copy was sent in full.
	Copied func()
	// NoCompress: do not offer zstd compression to the recovery site
	// (by default the stream compresses where it pays).
	NoCompress bool
}

// Status is what a shipper reports.
type Status = api.ReplicationStatus

// sentBatch remembers a batch sent but not yet acknowledged, for RPO.
type sentBatch struct {
	last      uint64
	firstTime int64
	bytes     int64
}

// Shipper replicates one group to one recovery agent, reconnecting with
// backoff and resuming from the last acknowledged entry.
type Shipper struct {
	cfg ShipperConfig
	log *slog.Logger

	mu    sync.Mutex
	state api.ReplicationState
	acked uint64
	// copyFrom: the journal entry from which the latest initial copy is
	// sent again as entries. Until the recovery site acknowledges the
	// copy, acked is 0, but the entries before copyFrom are in the copy,
	// not owed to the recovery site (owed).
	copyFrom            uint64
	queue               []sentBatch
	sent                int64
	copyDone, copyTotal int64
	lastErr             string
	reconnects          int
	rate                rateMeter
	conn                *link.Conn // the session's, for its byte counts
	payload, wire       int64      // bytes sent by ended sessions: as framed, and as compressed
	backlog             [4]backlogSample
	savedAck            uint64
	savedAt             time.Time

	bm           *bitmap // non-nil while writes are tracked as dirty blocks
	resyncSeq    uint64  // the resync-done marker, once appended
	resyncActive bool    // the resync appender runs
	resyncDone   int64
	resyncTotal  int64
	session      context.CancelFunc

	cancel context.CancelFunc
	done   chan struct{}
	// saveKick wakes the saver, which writes savedAck durably off the ack
	// path (an fsync there would hold up every acknowledgement behind it).
	saveKick chan struct{}
	saver    sync.WaitGroup
}

// NewShipper returns a stopped shipper and puts its hold on the journal at
// the remembered acknowledged sequence, so that nothing unshipped is
// trimmed even before Start.
func NewShipper(cfg ShipperConfig) *Shipper {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = 100 * time.Millisecond
	}
	if cfg.MaxBackoff <= 0 {
		cfg.MaxBackoff = 5 * time.Second
	}
	if cfg.MaxJournalBytes == 0 {
		cfg.MaxJournalBytes = 1 << 30
	}
	s := &Shipper{cfg: cfg, log: cfg.Logger, state: StateStopped}
	s.acked = s.loadAcked()
	s.savedAck = s.acked
	if s.acked > 0 {
		cfg.Group.Hold(holder, s.acked+1)
	} else {
		cfg.Group.Hold(holder, max(cfg.Group.Journal().FirstSeq(), 1))
	}
	if bm, err := loadBitmap(s.bitmapPath()); err == nil {
		if err := s.resumeBitmap(bm); err != nil {
			s.log.Error("dirty-block bitmap unusable; the next connection copies everything", "err", err)
			os.Remove(s.bitmapPath())
			s.acked = 0
		}
	}
	return s
}

func (s *Shipper) bitmapPath() string { return filepath.Join(s.cfg.StateDir, "bitmap.json") }

// resumeBitmap takes up a bitmap saved before a restart: re-mark what the
// journal holds past its Marked point and go on tracking.
func (s *Shipper) resumeBitmap(bm *bitmap) error {
	g := s.cfg.Group
	next := g.Journal().LastSeq() + 1
	if bm.ResyncFrom == 0 {
		next = g.Observe(bm.mark)
	}
	if from := bm.marked() + 1; from < next {
		if err := markFromJournal(bm, g.Journal(), from, next); err != nil {
			g.Observe(nil)
			return err
		}
	}
	s.bm = bm
	hold := bm.marked() + 1
	if bm.ResyncFrom != 0 {
		hold = bm.ResyncFrom
	}
	g.Hold(holder, hold)
	s.log.Warn("resuming dirty-block tracking", "group", s.cfg.Name, "since", bm.Since, "resync_from", bm.ResyncFrom)
	return nil
}

// markFromJournal marks the changes of entries [from, to) into bm.
func markFromJournal(bm *bitmap, j *journal.Journal, from, to uint64) error {
	r, err := j.NewReader(from)
	if err != nil {
		return err
	}
	defer r.Close()
	for {
		e, ok, err := r.TryNext()
		if err != nil {
			return err
		}
		if !ok || e.Seq >= to {
			return nil
		}
		bm.mark(&e)
	}
}

// watchJournal switches to dirty-block tracking when the journal passes
// its bound with entries unacknowledged, and keeps the bitmap saved and
// the journal hold just behind it.
func (s *Shipper) watchJournal(ctx context.Context) {
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	var saved uint64
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		j := s.cfg.Group.Journal()
		s.mu.Lock()
		bm, acked := s.bm, s.owed()
		s.mu.Unlock()
		if bm == nil {
			// Only the journal the shipper holds counts: the group may
			// keep more for itself (recent writes not folded yet), and
			// letting go would not free that.
			if s.cfg.MaxJournalBytes > 0 && acked < j.LastSeq() && j.SizeAfter(acked) > s.cfg.MaxJournalBytes {
				if err := s.enterBitmap(); err != nil {
					s.log.Error("switch to dirty-block tracking", "err", err)
				}
			}
			continue
		}
		bm.mu.Lock()
		marked, resync := bm.Marked, bm.ResyncFrom
		bm.mu.Unlock()
		if resync == 0 && marked != saved {
			if err := bm.save(s.bitmapPath()); err != nil {
				s.log.Error("save bitmap", "err", err)
				continue
			}
			saved = marked
			s.cfg.Group.Hold(holder, marked+1) // the journal past it may go
		}
	}
}

// owed returns the sequence after which the journal holds what the
// recovery site lacks: the acknowledged one, or, until an initial copy is
// acknowledged, the entry before the copy's start. Counting from 0 there
// made a journal with writes older than the copy look over its bound, and
// the bitmap entered then (since 1) outlived the copy: the shipper
// streamed with a stale bitmap that marked every block ever written.
// Caller holds mu.
func (s *Shipper) owed() uint64 {
	if s.acked == 0 && s.copyFrom > 0 {
		return s.copyFrom - 1
	}
	return s.acked
}

// enterBitmap starts tracking dirty blocks instead of holding the journal.
func (s *Shipper) enterBitmap() error {
	g := s.cfg.Group
	s.mu.Lock()
	since := s.owed() + 1
	s.mu.Unlock()
	bm := newBitmap(since)
	next := g.Observe(bm.mark)
	if err := markFromJournal(bm, g.Journal(), since, next); err != nil {
		g.Observe(nil)
		return err
	}
	bm.mu.Lock()
	bm.Marked = max(bm.Marked, next-1)
	bm.mu.Unlock()
	if err := bm.save(s.bitmapPath()); err != nil {
		g.Observe(nil)
		return err
	}
	s.mu.Lock()
	s.bm = bm
	if s.session != nil {
		s.session() // stop streaming entries the journal will no longer hold
	}
	s.mu.Unlock()
	g.Hold(holder, bm.marked()+1)
	s.log.Warn("source journal over its bound: tracking dirty blocks; the recovery site will be resynchronized",
		"group", s.cfg.Name, "bound", s.cfg.MaxJournalBytes, "since", since)
	return nil
}

func (s *Shipper) ackPath() string { return filepath.Join(s.cfg.StateDir, "shipper.json") }

func (s *Shipper) loadAcked() uint64 {
	b, err := os.ReadFile(s.ackPath())
	if err != nil {
		return 0
	}
	var v struct{ Acked uint64 }
	json.Unmarshal(b, &v)
	return v.Acked
}

// saveAcked remembers the acknowledged sequence. A stale value only makes
// the hold more conservative; a torn one must never read as 0 (which
// would ask for a full copy), so it goes through the durable helper.
func (s *Shipper) saveAcked(seq uint64) {
	if err := atomicfile.WriteJSON(s.ackPath(), struct{ Acked uint64 }{seq}, 0o600); err != nil {
		s.log.Warn("save acknowledged sequence", "err", err)
	}
}

// Start runs the shipper until Close or ctx is done.
func (s *Shipper) Start(ctx context.Context) {
	ctx, cancel := context.WithCancel(ctx)
	s.cancel = cancel
	s.done = make(chan struct{})
	s.saveKick = make(chan struct{}, 1)
	s.saver.Add(1)
	go s.saveLoop(ctx)
	go s.watchJournal(ctx)
	go func() {
		defer close(s.done)
		backoff := s.cfg.MinBackoff
		for ctx.Err() == nil {
			s.setState(StateConnecting)
			started := s.cfg.Now()
			err := s.RunOnce(ctx)
			if ctx.Err() != nil {
				break
			}
			s.mu.Lock()
			s.reconnects++
			if err != nil {
				s.lastErr = err.Error()
			}
			s.mu.Unlock()
			s.setState(StateDisconnected)
			s.log.Warn("replication link down", "group", s.cfg.Name, "err", err, "retry_in", backoff)
			if s.cfg.Now().Sub(started) > 10*time.Second {
				backoff = s.cfg.MinBackoff // it was up for a while: start over
			}
			select {
			case <-ctx.Done():
			case <-time.After(backoff):
			}
			backoff = min(backoff*2, s.cfg.MaxBackoff)
		}
		s.setState(StateStopped)
	}()
}

// Close stops the shipper and waits for it. Its hold stays, so the
// journal keeps what was not shipped.
func (s *Shipper) Close() {
	if s.cancel != nil {
		s.cancel()
		<-s.done
		s.saver.Wait()
	}
	s.mu.Lock()
	s.saveAcked(s.acked)
	s.mu.Unlock()
}

// saveLoop writes the acknowledged sequence each time the ack path asks
// (at most once a second), until ctx ends.
func (s *Shipper) saveLoop(ctx context.Context) {
	defer s.saver.Done()
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.saveKick:
		}
		s.mu.Lock()
		seq := s.savedAck
		s.mu.Unlock()
		s.saveAcked(seq)
	}
}

func (s *Shipper) setState(st api.ReplicationState) {
	s.mu.Lock()
	s.state = st
	s.mu.Unlock()
}

// RunOnce runs one session: connect, hello, initial copy if the recovery
// site needs one, then stream until an error.
func (s *Shipper) RunOnce(ctx context.Context) error {
	conn, err := s.cfg.Dial(ctx)
	if err != nil {
		return fmt.Errorf("dial: %w", err)
	}
	defer conn.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s.mu.Lock()
	s.session = cancel
	s.mu.Unlock()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	c := link.New(conn)
	defer func() {
		p, w := c.Counts()
		s.mu.Lock()
		s.payload, s.wire, s.conn = s.payload+p, s.wire+w, nil
		s.mu.Unlock()
		c.Close()
	}()
	g := s.cfg.Group
	j := g.Journal()
	hello := link.Hello{Group: s.cfg.Name, Source: s.cfg.Source, Disks: g.Disks()}
	if !s.cfg.NoCompress {
		hello.Compress = []string{link.CompressZstd}
	}
	if err := c.WriteJSON(link.TypeHello, hello); err != nil {
		return err
	}
	var w link.Welcome
	if err := c.ReadJSON(link.TypeWelcome, &w); err != nil {
		return fmt.Errorf("welcome: %w", err)
	}
	// The link's speed decides where compression pays; a connection that
	// cannot tell it (not TCP) is taken for a slow one.
	rater, _ := conn.(link.LinkRater)
	c.SetCompression(w.Compress == link.CompressZstd && !s.cfg.NoCompress, rater)
	s.mu.Lock()
	s.conn = c // for status, now that its compression is set
	s.mu.Unlock()
	next := w.NextSeq
	s.mu.Lock()
	bm := s.bm
	s.mu.Unlock()
	if bm != nil && next != 0 {
		var err error
		if next, err = s.resync(ctx, c, bm, next); err != nil {
			return fmt.Errorf("resync: %w", err)
		}
	}
	if next != 0 && (next < j.FirstSeq() || next > j.LastSeq()+1) {
		s.log.Warn("recovery site is out of step with the journal; copying again",
			"group", s.cfg.Name, "wants", next, "first", j.FirstSeq(), "last", j.LastSeq())
		next = 0
	}
	if next == 0 {
		s.setState(StateInitialSync)
		if next, err = s.initialCopy(ctx, c, w.Delta); err != nil {
			return fmt.Errorf("initial copy: %w", err)
		}
		s.dropBitmap() // a full copy covers every dirty block
	}
	s.mu.Lock()
	s.queue = s.queue[:0]
	if w.NextSeq != 0 && next == w.NextSeq {
		// What the recovery site holds durably, as it says; after an
		// initial copy, its ack of BaseDone sets this.
		s.acked = next - 1
	}
	s.mu.Unlock()
	s.mu.Lock()
	if s.bm != nil {
		s.state = StateResync
	} else {
		s.state = StateStreaming
	}
	s.mu.Unlock()
	s.log.Info("replicating", "group", s.cfg.Name, "from_seq", next)

	ackErr := make(chan error, 1)
	go func() {
		ackErr <- s.readAcks(c)
		cancel() // wake the sender: the link is down
	}()
	r, err := j.NewReader(next)
	if err != nil {
		return err
	}
	defer r.Close()
	// When the stream breaks, the recovery site's own reason (an error
	// frame: a full disk, a refusal) is what the operator needs, not the
	// broken pipe the sender saw: wait a moment for the reader's error.
	fail := func(err error) error {
		select {
		case aerr := <-ackErr:
			return fmt.Errorf("recovery site: %w", aerr)
		case <-time.After(time.Second):
			return err
		}
	}
	var buf []byte
	for {
		e, err := r.Next(ctx)
		if err != nil {
			return fail(err)
		}
		buf = journal.AppendEntry(buf[:0], &e)
		b := sentBatch{firstTime: e.Time, last: e.Seq}
		for len(buf) < 4<<20 {
			e, ok, err := r.TryNext()
			if err != nil {
				return err
			}
			if !ok {
				break
			}
			buf = journal.AppendEntry(buf, &e)
			b.last = e.Seq
		}
		b.bytes = int64(len(buf))
		s.mu.Lock()
		s.queue = append(s.queue, b)
		s.mu.Unlock()
		if err := c.Write(link.TypeEntries, buf); err != nil {
			return fail(err)
		}
		s.mu.Lock()
		s.sent += int64(len(buf))
		s.rate.add(s.cfg.Now(), int64(len(buf)))
		s.mu.Unlock()
	}
}

func (s *Shipper) readAcks(c *link.Conn) error {
	for {
		typ, body, err := c.Read()
		if err != nil {
			return err
		}
		if typ != link.TypeAck {
			return fmt.Errorf("%w: frame type %d from recovery site", link.ErrFrame, typ)
		}
		seq, err := link.DecodeAck(body)
		if err != nil {
			return err
		}
		s.mu.Lock()
		s.acked = max(s.acked, seq)
		for len(s.queue) > 0 && s.queue[0].last <= seq {
			s.queue = s.queue[1:]
		}
		// Remember the ack now and then: a stale value only makes the
		// hold after a restart more conservative.
		save := s.acked != s.savedAck && s.cfg.Now().Sub(s.savedAt) > time.Second
		if save {
			s.savedAck, s.savedAt = s.acked, s.cfg.Now()
		}
		acked := s.acked
		finished := s.bm != nil && s.resyncSeq != 0 && acked >= s.resyncSeq
		s.mu.Unlock()
		if finished {
			s.dropBitmap()
			s.setState(StateStreaming)
			s.log.Info("resynchronization complete", "group", s.cfg.Name, "seq", acked)
		}
		s.mu.Lock()
		bm := s.bm
		s.mu.Unlock()
		tracking := false
		if bm != nil {
			bm.mu.Lock()
			tracking = bm.ResyncFrom == 0
			bm.mu.Unlock()
		}
		if tracking {
			continue // the bitmap, not the journal, holds what is unsent
		}
		s.cfg.Group.Hold(holder, acked+1)
		if save {
			select { // the saver writes it; never wait for the disk here
			case s.saveKick <- struct{}{}:
			default:
			}
		}
	}
}

// initialCopy sends the group's disks while writes go on, and returns the
// sequence from which to stream. The journal is held from the copy's start,
// so every write that lands during the copy is sent again as an entry:
// the replica is consistent once it has the entries up to the copy's end.
//
// With delta (the recovery site holds older images of the same disks), it
// first asks for the hashes of the recovery site's chunks and sends only
// the chunks whose hashes differ: a reprotect after a failover sends what
// diverged, not the disks.
func (s *Shipper) initialCopy(ctx context.Context, c *link.Conn, delta bool) (uint64, error) {
	g := s.cfg.Group
	start := g.HoldNext(holder)
	s.mu.Lock()
	s.acked = 0 // the recovery site discards what it had
	s.copyFrom = start
	s.mu.Unlock()
	var total int64
	for _, d := range g.Disks() {
		total += d.Size
	}
	s.mu.Lock()
	s.copyDone, s.copyTotal = 0, total
	s.mu.Unlock()
	if err := c.WriteJSON(link.TypeBaseStart, link.BaseStart{StartSeq: start, Delta: delta}); err != nil {
		return 0, err
	}
	chunk := int64(1 << 20)
	if delta {
		chunk = ChunkSize // finer: fewer bytes for scattered differences
	}
	var tracked Chunks // changed-block tracking: no hashes to compare
	if delta && s.cfg.DeltaChunks != nil {
		var err error
		if tracked, err = s.cfg.DeltaChunks(start - 1); err != nil {
			s.log.Warn("no changed-block tracking for this delta copy; comparing chunk hashes", "group", s.cfg.Name, "err", err)
			tracked = nil
		} else {
			s.log.Info("delta copy from changed-block tracking", "group", s.cfg.Name, "blocks", tracked.Count())
		}
	}
	buf := make([]byte, chunk)
	for _, spec := range g.Disks() {
		d, err := g.Disk(spec.Name)
		if err != nil {
			return 0, err
		}
		if tracked != nil {
			// Only the tracked blocks, in runs of up to 1 MiB: nothing
			// else is read at either site.
			big := make([]byte, 1<<20)
			s.mu.Lock()
			base := s.copyDone
			s.mu.Unlock()
			err := tracked.Runs(spec.Name, spec.Size, int64(len(big)), func(off, n int64) error {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				if err := d.ReadAt(ctx, big[:n], off); err != nil {
					return err
				}
				if err := c.Write(link.TypeBaseData, link.EncodeBaseData(spec.ID, off), big[:n]); err != nil {
					return err
				}
				s.mu.Lock()
				s.sent += n
				s.rate.add(s.cfg.Now(), n)
				s.copyDone = base + off + n // runs come in order of offset
				s.mu.Unlock()
				return nil
			})
			if err != nil {
				return 0, err
			}
			s.mu.Lock()
			s.copyDone = base + spec.Size // the rest needs nothing
			s.mu.Unlock()
			continue
		}
		if !delta {
			if err := s.copyDisk(ctx, c, d, spec); err != nil {
				return 0, err
			}
			continue
		}
		var theirs []byte
		if delta {
			if err := c.Write(link.TypeHashReq, link.EncodeHashReq(spec.ID, uint32(chunk))); err != nil {
				return 0, err
			}
			typ, body, err := c.Read()
			if err != nil {
				return 0, fmt.Errorf("hashes of disk %s: %w", spec.Name, err)
			}
			if typ != link.TypeHashes {
				return 0, fmt.Errorf("%w: frame type %d instead of hashes", link.ErrFrame, typ)
			}
			theirs = append([]byte(nil), body...)
		}
		for off := int64(0); off < spec.Size; off += chunk {
			if ctx.Err() != nil {
				return 0, ctx.Err()
			}
			n := min(chunk, spec.Size-off)
			if err := d.ReadAt(ctx, buf[:n], off); err != nil {
				return 0, err
			}
			// Only the chunks whose hashes differ.
			i := int(off/chunk) * 16
			h := sha256.Sum256(buf[:n])
			send := i+16 > len(theirs) || !bytes.Equal(h[:16], theirs[i:i+16])
			if send {
				if err := c.Write(link.TypeBaseData, link.EncodeBaseData(spec.ID, off), buf[:n]); err != nil {
					return 0, err
				}
				s.mu.Lock()
				s.sent += n
				s.rate.add(s.cfg.Now(), n)
				s.mu.Unlock()
			}
			s.mu.Lock()
			s.copyDone += n
			s.mu.Unlock()
		}
	}
	end := g.Journal().LastSeq()
	if err := c.WriteJSON(link.TypeBaseDone, link.BaseDone{EndSeq: max(end, start-1)}); err != nil {
		return 0, err
	}
	s.log.Info("initial copy sent", "group", s.cfg.Name, "bytes", total, "start_seq", start, "end_seq", end)
	if s.cfg.Copied != nil {
		s.cfg.Copied()
	}
	return start, nil
}

// copyDisk sends every non-zero MiB of a disk's allocated parts. A
// reader goroutine stays a few chunks ahead of the sender, so reading the
// disk and encrypting and sending overlap.
func (s *Shipper) copyDisk(ctx context.Context, c *link.Conn, d *disk.Disk, spec disk.Spec) error {
	const chunk, depth = 1 << 20, 4
	type piece struct {
		off int64
		buf []byte
	}
	free := make(chan []byte, depth)
	for range depth {
		free <- make([]byte, chunk)
	}
	full := make(chan piece, depth)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	readErr := make(chan error, 1)
	go func() {
		defer close(full)
		readErr <- d.DataRanges(func(off, n int64) error {
			for end := off + n; off < end; {
				k := min(chunk, end-off)
				var buf []byte
				select {
				case buf = <-free:
				case <-ctx.Done():
					return ctx.Err()
				}
				if err := d.ReadAt(ctx, buf[:k], off); err != nil {
					return err
				}
				select {
				case full <- piece{off, buf[:k]}:
				case <-ctx.Done():
					return ctx.Err()
				}
				off += k
			}
			return nil
		})
	}()
	s.mu.Lock()
	base := s.copyDone
	s.mu.Unlock()
	for p := range full {
		if !allZero(p.buf) { // the replica image starts sparse
			if err := c.Write(link.TypeBaseData, link.EncodeBaseData(spec.ID, p.off), p.buf); err != nil {
				return err
			}
			s.mu.Lock()
			s.sent += int64(len(p.buf))
			s.rate.add(s.cfg.Now(), int64(len(p.buf)))
			s.mu.Unlock()
		}
		s.mu.Lock()
		s.copyDone = base + p.off + int64(len(p.buf)) // pieces come in order of offset
		s.mu.Unlock()
		free <- p.buf[:cap(p.buf)]
	}
	if err := <-readErr; err != nil {
		return fmt.Errorf("read disk %s: %w", spec.Name, err)
	}
	s.mu.Lock()
	s.copyDone = base + spec.Size
	s.mu.Unlock()
	return nil
}

func allZero(b []byte) bool {
	for len(b) >= 8 {
		if binary.LittleEndian.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// Status reports the shipper's state, RPO and progress.
func (s *Shipper) Status() Status {
	j := s.cfg.Group.Journal()
	last := j.LastSeq()
	now := s.cfg.Now()
	s.mu.Lock()
	st := Status{State: s.state, LastSeq: last, AckedSeq: s.acked, SentBytes: s.sent,
		CopyDone: s.copyDone, CopyTotal: s.copyTotal, LastError: s.lastErr, Reconnects: s.reconnects,
		ThroughputBps: s.rate.rate(now), BitmapMode: s.bm != nil, ResyncDone: s.resyncDone, ResyncTotal: s.resyncTotal}
	st.PayloadBytes, st.WireBytes = s.payload, s.wire
	if s.conn != nil {
		p, w := s.conn.Counts()
		st.PayloadBytes += p
		st.WireBytes += w
		var l float64
		st.Compressing, l, _ = s.conn.Compressing()
		st.LinkBitsPerSecond = int64(l * 8)
	}
	var oldest int64
	if s.acked < last && len(s.queue) > 0 {
		oldest = s.queue[0].firstTime
		for _, b := range s.queue {
			st.PendingBytes += b.bytes
		}
	}
	s.mu.Unlock()
	if st.AckedSeq < last && oldest == 0 {
		// Nothing in flight (the link is down, or the entries are not
		// sent yet): the oldest unacknowledged write is in the journal.
		// Reading it costs I/O, so it happens outside the lock.
		if t, err := j.EntryTime(st.AckedSeq + 1); err == nil {
			oldest = t
		}
	}
	if st.AckedSeq < last && oldest > 0 {
		st.RPO = max(0, now.Sub(time.Unix(0, oldest)).Seconds())
	}
	// The backlog: what the recovery site does not hold yet.
	if st.AckedSeq < last {
		st.BacklogBytes = j.SizeAfter(st.AckedSeq)
	}
	st.BacklogBytes += max(0, st.CopyTotal-st.CopyDone) + max(0, st.ResyncTotal-st.ResyncDone)
	st.ClearsInSeconds = s.clearsIn(now, st.BacklogBytes)
	return st
}

// State returns the stream's state.
func (s *Shipper) State() api.ReplicationState {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.state
}

// backlogSample is the backlog at one moment, for its trend.
type backlogSample struct {
	at    time.Time
	bytes int64
}

// clearsIn estimates the seconds until the backlog is gone from how fast
// it shrank over the last samples (taken at most one a second): 0 with
// no backlog, -1 while it does not shrink (churn above what the link
// carries: RPO grows until the churn drops).
func (s *Shipper) clearsIn(now time.Time, backlog int64) float64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	if newest := s.backlog[len(s.backlog)-1]; newest.at.IsZero() || now.Sub(newest.at) >= time.Second {
		copy(s.backlog[:], s.backlog[1:])
		s.backlog[len(s.backlog)-1] = backlogSample{at: now, bytes: backlog}
	}
	if backlog <= 1<<20 {
		return 0
	}
	oldest := s.backlog[0]
	for _, b := range s.backlog {
		if !b.at.IsZero() {
			oldest = b
			break
		}
	}
	dt := now.Sub(oldest.at).Seconds()
	if dt < 1 || oldest.bytes <= backlog {
		return -1
	}
	return float64(backlog) / (float64(oldest.bytes-backlog) / dt)
}

// rateMeter is a throughput estimate over the last few seconds.
type rateMeter struct {
	slots [8]struct {
		sec   int64
		bytes int64
	}
}

func (m *rateMeter) add(now time.Time, n int64) {
	sec := now.Unix()
	sl := &m.slots[sec%int64(len(m.slots))]
	if sl.sec != sec {
		sl.sec, sl.bytes = sec, 0
	}
	sl.bytes += n
}

// rate is bytes per second over the last complete seconds.
func (m *rateMeter) rate(now time.Time) float64 {
	sec := now.Unix()
	var sum int64
	for _, sl := range m.slots {
		if sl.sec < sec && sl.sec >= sec-5 {
			sum += sl.bytes
		}
	}
	return float64(sum) / 5
}

func decodeJSON(b []byte, v any) error {
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("%w: %v", link.ErrFrame, err)
	}
	return nil
}

// ResyncDoneMarker is the payload of the point that ends a resync.
var ResyncDoneMarker = replica.Marker{Type: replica.TypeResyncDone}.Encode()

// dropBitmap ends dirty-block tracking.
func (s *Shipper) dropBitmap() {
	s.cfg.Group.Observe(nil)
	s.mu.Lock()
	s.bm, s.resyncSeq = nil, 0
	s.mu.Unlock()
	os.Remove(s.bitmapPath())
}

// resync brings a recovery site that stopped at next (before the journal
// the source still holds) up to date from the bitmap: the replica records a
// skip from next to the journal's current end S, the source journals the
// current content of every dirty block (ordered with the guest's writes),
// then a resync-done point; the replica is consistent again from there.
// It returns the sequence from which to stream.
func (s *Shipper) resync(ctx context.Context, c *link.Conn, bm *bitmap, next uint64) (uint64, error) {
	g := s.cfg.Group
	bm.mu.Lock()
	from := bm.ResyncFrom
	bm.mu.Unlock()
	if from == 0 {
		// Freeze the bitmap and hold the journal from here on.
		from = g.Observe(nil)
		g.Hold(holder, from)
		bm.mu.Lock()
		bm.ResyncFrom = from
		bm.mu.Unlock()
		if err := bm.save(s.bitmapPath()); err != nil {
			return 0, err
		}
	}
	if next < bm.Since {
		return 0, nil // the replica is behind the bitmap: copy everything
	}
	if next < from {
		s.setState(StateResync)
		skip := journal.Entry{Seq: next, Kind: journal.KindSkip, Offset: from}
		if err := c.Write(link.TypeEntries, journal.AppendEntry(nil, &skip)); err != nil {
			return 0, err
		}
		next = from
	}
	s.mu.Lock()
	start := !s.resyncActive && s.resyncSeq == 0
	s.resyncActive = s.resyncActive || start
	s.mu.Unlock()
	if start {
		go s.appendResync(bm)
	}
	return next, nil
}

// appendResync journals the dirty blocks' content and then the
// resync-done point. It runs apart from the link, which may come and go.
func (s *Shipper) appendResync(bm *bitmap) {
	g := s.cfg.Group
	sizes := map[uint16]int64{}
	for _, d := range g.Disks() {
		sizes[d.ID] = d.Size
	}
	ext := bm.extents(sizes, 1<<20)
	var total int64
	for _, e := range ext {
		total += e.n
	}
	s.mu.Lock()
	s.resyncDone, s.resyncTotal = 0, total
	s.mu.Unlock()
	fail := func(err error) {
		s.log.Error("resync", "group", s.cfg.Name, "err", err)
		s.mu.Lock()
		s.resyncActive = false
		s.mu.Unlock()
	}
	for _, e := range ext {
		if _, err := g.AppendResync(e.disk, e.off, e.n); err != nil {
			fail(err)
			return
		}
		s.mu.Lock()
		s.resyncDone += e.n
		s.mu.Unlock()
	}
	seq, err := g.Mark(ResyncDoneMarker)
	if err != nil {
		fail(err)
		return
	}
	s.mu.Lock()
	s.resyncSeq, s.resyncActive = seq, false
	s.mu.Unlock()
	s.log.Info("resync data journaled", "group", s.cfg.Name, "bytes", total, "extents", len(ext), "done_seq", seq)
}
