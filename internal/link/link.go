// Package link is the replication wire protocol between a source agent and
// a recovery agent: length-prefixed frames over a mutually authenticated
// TLS 1.3 connection. docs/replication.md specifies it.
//
// The source speaks first (Hello); the recovery side answers with the
// sequence number it wants next (0: it needs an initial copy). Then the
// source sends either an initial copy (BaseStart, BaseData..., BaseDone)
// followed by entries, or entries straight away. The recovery side acks
// each batch once it is durable; the source may then trim it.
package link

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/ferry-dr/ferry/internal/disk"
	"github.com/ferry-dr/ferry/internal/journal"
)

// Frame types.
const (
	TypeHello     = 1  // source -> recovery: JSON Hello
	TypeWelcome   = 2  // recovery -> source: JSON Welcome
	TypeBaseStart = 3  // source -> recovery: JSON BaseStart
	TypeBaseData  = 4  // source -> recovery: disk u16, offset u64, data
	TypeBaseDone  = 5  // source -> recovery: JSON BaseDone
	TypeEntries   = 6  // source -> recovery: journal entries, encoded as in segments
	TypeAck       = 7  // recovery -> source: u64 seq durable
	TypeError     = 8  // either way: UTF-8 message, then the sender closes
	TypeHashReq   = 9  // source -> recovery: disk id u16, chunk size u32 (delta copy)
	TypeHashes    = 10 // recovery -> source: 16 bytes per chunk of that disk
)

// Compressed, or'ed into a frame's type, says that its body is the zstd
// frame of the body of the type without this bit. Only Entries and
// BaseData frames are sent compressed, and only on a stream whose Hello
// and Welcome agreed on CompressZstd.
const Compressed = 0x80

// CompressZstd names zstd stream compression in Hello and Welcome.
const CompressZstd = "zstd"

// MaxFrame bounds a frame's body.
const MaxFrame = journal.MaxPayload + 1<<20

// ErrFrame: a malformed frame.
var ErrFrame = errors.New("link: malformed frame")

// Hello opens a replication stream.
type Hello struct {
	Group  string      `json:"group"`
	Source string      `json:"source"` // the source site's name
	Disks  []disk.Spec `json:"disks"`
	// Compress lists the compressions the source can send; the recovery
	// site picks one it can read (Welcome.Compress).
	Compress []string `json:"compress,omitempty"`
}

// Welcome answers Hello.
type Welcome struct {
	NextSeq uint64 `json:"next_seq"` // 0: send an initial copy first
	// Delta: the recovery site holds older images of these disks (an old
	// source after a failover); the copy may send only chunks that differ.
	Delta bool `json:"delta,omitempty"`
	// Compress is the compression the source may use on this stream
	// (empty: none).
	Compress string `json:"compress,omitempty"`
}

// BaseStart begins an initial copy; the journal continues at StartSeq.
type BaseStart struct {
	StartSeq uint64 `json:"start_seq"`
	Delta    bool   `json:"delta,omitempty"` // keep the images; only differing chunks follow
}

// EncodeHashReq builds a TypeHashReq body.
func EncodeHashReq(diskID uint16, chunk uint32) []byte {
	return binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint16(nil, diskID), chunk)
}

// DecodeHashReq parses a TypeHashReq body.
func DecodeHashReq(b []byte) (uint16, uint32, error) {
	if len(b) != 6 {
		return 0, 0, fmt.Errorf("%w: hash request of %d bytes", ErrFrame, len(b))
	}
	chunk := binary.BigEndian.Uint32(b[2:])
	if chunk < 4096 || chunk > 16<<20 {
		return 0, 0, fmt.Errorf("%w: chunk size %d", ErrFrame, chunk)
	}
	return binary.BigEndian.Uint16(b), chunk, nil
}

// BaseDone ends an initial copy; the replica is consistent from EndSeq.
type BaseDone struct {
	EndSeq uint64 `json:"end_seq"`
}

// Conn frames a stream. Reads and writes may run concurrently (one reader,
// one writer).
type Conn struct {
	r    *bufio.Reader
	w    *bufio.Writer
	rbuf []byte

	// Compression of written frames (SetCompression) and decompression of
	// read ones (always accepted).
	comp    *compressor
	dec     *zstd.Decoder
	dbuf    []byte
	payload atomic.Int64 // bytes of frames written, uncompressed
	wire    atomic.Int64 // bytes of frames written, as sent
}

// New wraps rw.
func New(rw io.ReadWriter) *Conn {
	return &Conn{r: bufio.NewReaderSize(rw, 256<<10), w: bufio.NewWriterSize(rw, 256<<10)}
}

// LinkRater estimates how fast the connection under a Conn carries
// bytes (bandwidth.Conn: the caps in force and TCP's delivery rate).
type LinkRater interface {
	// LinkRate returns the payload bytes per second the link is estimated
	// to carry now, or false while it has no estimate. It is called from
	// the writing goroutine, once per frame.
	LinkRate() (bytesPerSecond float64, ok bool)
}

// SetCompression makes Write compress Entries and BaseData frames with
// zstd wherever that pays (see compressor). link, if not nil, tells how
// fast the link is: compression then pays only where the link, not the
// compressor, is the slower of the two. Without it a frame is compressed
// wherever that saves enough bytes. Call it before the first Write of
// such a frame, once the peer agreed (Welcome.Compress).
func (c *Conn) SetCompression(on bool, link LinkRater) {
	if on {
		c.comp = &compressor{link: link}
	} else {
		c.comp = nil
	}
}

// Compressing reports whether the last frame that could have been
// compressed was, and the link and compressor rates (bytes per second,
// 0 if unknown) that decided it.
func (c *Conn) Compressing() (on bool, linkRate, compressRate float64) {
	if c.comp == nil {
		return false, 0, 0
	}
	st := c.comp.state.Load()
	if st == nil {
		return false, 0, 0
	}
	return st.on, st.link, st.speed
}

// Counts returns the bytes of frames written so far: as they were
// (payload) and as sent after compression (wire), headers included.
func (c *Conn) Counts() (payload, wire int64) { return c.payload.Load(), c.wire.Load() }

// Write sends one frame made of the given parts and flushes.
func (c *Conn) Write(typ byte, parts ...[]byte) error {
	n := 1
	for _, p := range parts {
		n += len(p)
	}
	if n-1 > MaxFrame {
		return fmt.Errorf("%w: body of %d bytes", ErrFrame, n-1)
	}
	c.payload.Add(int64(4 + n))
	if c.comp != nil && (typ == TypeEntries || typ == TypeBaseData) {
		if z, ok := c.comp.compress(parts, n-1); ok {
			parts = [][]byte{z}
			typ |= Compressed
			n = 1 + len(z)
		}
	}
	c.wire.Add(int64(4 + n))
	var h [5]byte
	binary.BigEndian.PutUint32(h[:], uint32(n))
	h[4] = typ
	c.w.Write(h[:])
	for _, p := range parts {
		c.w.Write(p)
	}
	return c.w.Flush()
}

// Buffered reports whether a whole or partial next frame has already been
// received.
func (c *Conn) Buffered() bool { return c.r.Buffered() > 0 }

// WriteJSON sends v as a frame of type typ.
func (c *Conn) WriteJSON(typ byte, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return c.Write(typ, b)
}

// Read returns the next frame. body is valid until the next Read.
func (c *Conn) Read() (typ byte, body []byte, err error) {
	var h [5]byte
	if _, err := io.ReadFull(c.r, h[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(h[:])
	if n == 0 || n-1 > MaxFrame {
		return 0, nil, fmt.Errorf("%w: length %d", ErrFrame, n)
	}
	if cap(c.rbuf) < int(n-1) {
		c.rbuf = make([]byte, n-1)
	}
	body = c.rbuf[:n-1]
	if _, err := io.ReadFull(c.r, body); err != nil {
		return 0, nil, err
	}
	typ = h[4]
	if typ&Compressed != 0 {
		typ &^= Compressed
		if typ != TypeEntries && typ != TypeBaseData {
			return 0, nil, fmt.Errorf("%w: compressed frame of type %d", ErrFrame, typ)
		}
		if body, err = c.decompress(body); err != nil {
			return 0, nil, err
		}
	}
	if typ == TypeError {
		return 0, nil, fmt.Errorf("link: peer: %s", body)
	}
	return typ, body, nil
}

// ReadJSON reads a frame that must be of type want and decodes it into v.
func (c *Conn) ReadJSON(want byte, v any) error {
	typ, body, err := c.Read()
	if err != nil {
		return err
	}
	if typ != want {
		return fmt.Errorf("%w: got frame type %d, want %d", ErrFrame, typ, want)
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("%w: %v", ErrFrame, err)
	}
	return nil
}

// EncodeBaseData builds the head of a TypeBaseData frame (the data follows).
func EncodeBaseData(diskID uint16, off int64) []byte {
	b := binary.BigEndian.AppendUint16(nil, diskID)
	return binary.BigEndian.AppendUint64(b, uint64(off))
}

// DecodeBaseData splits a TypeBaseData body.
func DecodeBaseData(b []byte) (diskID uint16, off int64, data []byte, err error) {
	if len(b) < 10 {
		return 0, 0, nil, fmt.Errorf("%w: base data of %d bytes", ErrFrame, len(b))
	}
	off = int64(binary.BigEndian.Uint64(b[2:]))
	if off < 0 {
		return 0, 0, nil, fmt.Errorf("%w: negative offset", ErrFrame)
	}
	return binary.BigEndian.Uint16(b), off, b[10:], nil
}

// DecodeEntries parses a TypeEntries body into entries whose Data alias b.
// Every entry's checksum is verified.
func DecodeEntries(b []byte, out []journal.Entry) ([]journal.Entry, error) {
	out = out[:0]
	for len(b) > 0 {
		e, n, err := journal.DecodeEntry(b)
		if err != nil {
			return nil, fmt.Errorf("%w: entry: %v", ErrFrame, err)
		}
		out = append(out, e)
		b = b[n:]
	}
	return out, nil
}

// EncodeAck builds a TypeAck body.
func EncodeAck(seq uint64) []byte { return binary.BigEndian.AppendUint64(nil, seq) }

// DecodeAck parses a TypeAck body.
func DecodeAck(b []byte) (uint64, error) {
	if len(b) != 8 {
		return 0, fmt.Errorf("%w: ack of %d bytes", ErrFrame, len(b))
	}
	return binary.BigEndian.Uint64(b), nil
}

// decompress returns the body a compressed frame holds, refusing one
// that would grow past MaxFrame.
func (c *Conn) decompress(z []byte) ([]byte, error) {
	if c.dec == nil {
		d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(MaxFrame+1<<20),
			zstd.WithDecoderMaxWindow(MaxFrame+1<<20))
		if err != nil {
			return nil, fmt.Errorf("link: zstd decoder: %w", err)
		}
		c.dec = d
	}
	out, err := c.dec.DecodeAll(z, c.dbuf[:0])
	if err != nil {
		return nil, fmt.Errorf("%w: compressed body: %v", ErrFrame, err)
	}
	if len(out) > MaxFrame {
		return nil, fmt.Errorf("%w: compressed body of %d bytes", ErrFrame, len(out))
	}
	c.dbuf = out
	return out, nil
}

// Close releases the decoder; the Conn must not be read after.
func (c *Conn) Close() {
	if c.dec != nil {
		c.dec.Close()
		c.dec = nil
	}
}

// compressor compresses frame bodies with zstd at its fastest level, on
// the writer's goroutine (one core per stream at most).
//
// Compression pays where it gets a frame across sooner. n bytes take n/L
// to send plain over a link carrying L bytes per second, and n/S +
// n/(r·L) compressed, by an encoder that turns S bytes per second into
// 1/r of their size; so it pays while L < S·(1 − 1/r). On a WAN link
// (12 MB/s against an encoder's few hundred) it nearly always does; on a
// LAN or loopback (GB/s) it costs throughput and latency, so frames go
// plain there, and one in trialEvery is still compressed to keep S and r
// current in case the link slows down.
//
// Where the data itself does not compress (encrypted, already
// compressed) it backs off too: after missLimit frames in a row that
// shrank by less than an eighth, it tries only one frame in probeEvery
// until one pays again; except on a link more than probeEvery times
// slower than the compressor, where trying every frame costs little
// against sending it, and compressible data after incompressible data is
// compressed from its first frame.
type compressor struct {
	link   LinkRater
	now    func() time.Time
	plain  []byte
	out    []byte
	misses int
	skip   int
	trial  int     // frames sent plain by the rate test since the last trial
	speed  float64 // bytes per second the encoder compresses (measureSpeed)
	warm   bool    // an encoder compressed once
	// inBytes and inSecs: the decaying sums speed is their ratio of.
	inBytes, inSecs float64
	ratio           float64 // bytes in per byte out (moving average)
	state           atomic.Pointer[compressState]
}

// compressState is the last decision, for status.
type compressState struct {
	on          bool
	link, speed float64
}

const (
	missLimit  = 4
	probeEvery = 16
	trialEvery = 32
	minMeasure = 16 << 10
)

// encoders are shared: an encoder holds a few MiB, and most agents run
// many streams that compress one frame at a time.
var encoders = sync.Pool{New: func() any {
	e, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1),
		zstd.WithLowerEncoderMem(true))
	if err != nil {
		panic(err) // only for invalid options
	}
	return e
}}

// pays reports whether the link is slow enough for compression to pay,
// given what the compressor has measured; with no measure yet it does
// (the first frames are the measure).
func (z *compressor) pays() (bool, float64) {
	if z.link == nil {
		return true, 0
	}
	l, ok := z.link.LinkRate()
	if !ok || z.speed == 0 || z.ratio == 0 {
		return true, l
	}
	return l < z.speed*(1-1/z.ratio), l
}

// compress returns the compressed body of parts (n bytes in all), or
// false to send it as it is.
func (z *compressor) compress(parts [][]byte, n int) ([]byte, bool) {
	if n < 512 {
		return nil, false
	}
	pays, l := z.pays()
	if !pays {
		if z.trial++; z.trial < trialEvery {
			z.report(false, l)
			return nil, false
		}
	}
	z.trial = 0
	// On a link far slower than the compressor, trying costs next to
	// nothing against sending: every frame is tried, so compressible data
	// that follows incompressible data is compressed at once.
	cheap := z.link != nil && l > 0 && z.speed > 0 && l*probeEvery < z.speed
	if z.skip > 0 && !cheap {
		z.skip--
		return nil, false
	}
	z.plain = z.plain[:0]
	for _, p := range parts {
		z.plain = append(z.plain, p...)
	}
	if z.now == nil {
		z.now = time.Now
	}
	enc := encoders.Get().(*zstd.Encoder)
	start := z.now()
	z.out = enc.EncodeAll(z.plain, z.out[:0])
	took := z.now().Sub(start)
	encoders.Put(enc)
	z.measureSpeed(n, took)
	if len(z.out) > n-n/8 {
		if z.misses++; z.misses >= missLimit && !cheap {
			z.skip = probeEvery - 1
		}
		z.report(false, l)
		return nil, false
	}
	z.misses = 0
	z.measureRatio(n, len(z.out))
	z.report(true, l)
	return z.out, true
}

// report publishes the decision for status, allocating only when it
// changes: the decision flips, or the link or encoder rate moves by more
// than an eighth (this runs once per frame on the shipper's path).
func (z *compressor) report(on bool, link float64) {
	near := func(a, b float64) bool { return a == b || a > 0 && b > 0 && a < b*9/8 && b < a*9/8 }
	if cur := z.state.Load(); cur != nil && cur.on == on && near(cur.link, link) && near(cur.speed, z.speed) {
		return
	}
	z.state.Store(&compressState{on: on, link: link, speed: z.speed})
}

// measureSpeed folds one compression into the encoder's rate: bytes
// over time, both decaying by 7/8 a frame, so that a large frame counts
// for more than a small one. The first compression is left out (the
// encoder may be new and allocate its tables then), and so are frames
// under minMeasure, whose fixed costs would make the encoder look slow.
func (z *compressor) measureSpeed(in int, took time.Duration) {
	if !z.warm {
		z.warm = true
		return
	}
	if in < minMeasure {
		return
	}
	z.inBytes = z.inBytes*7/8 + float64(in)
	z.inSecs = z.inSecs*7/8 + max(took.Seconds(), 1e-6)
	z.speed = z.inBytes / z.inSecs
}

// measureRatio folds the ratio of a frame that paid into the moving
// average. Frames that did not shrink are left out: the back-off deals
// with them, and the link test is about the data that does compress.
func (z *compressor) measureRatio(in, out int) {
	r := float64(in) / float64(max(out, 1))
	if z.ratio == 0 {
		z.ratio = r
		return
	}
	z.ratio += (r - z.ratio) / 8
}
