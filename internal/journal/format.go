package journal

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/ferry-dr/ferry/internal/checksum"
)

// The on-disk format is specified normatively in docs/journal-format.md.
// Keep the two in step.

const (
	segmentMagic   = "FERRYJNL"
	segmentVersion = 1
	// SegmentHeaderSize is the size of the fixed header at the start of every segment file.
	SegmentHeaderSize = 40
	// EntryHeaderSize is the size of the fixed header in front of every entry.
	EntryHeaderSize = 40
	// MaxPayload bounds the payload of one entry. It is the NBD server's
	// maximum request size plus room; anything larger is corruption.
	MaxPayload = 64 << 20
)

// Kind says what an entry records.
type Kind uint8

const (
	// KindWrite: Length bytes of Data written at Offset of Disk.
	KindWrite Kind = 1
	// KindZero: Length bytes at Offset of Disk now read as zero. No payload.
	KindZero Kind = 2
	// KindTrim: Length bytes at Offset of Disk discarded; ferry makes them
	// read as zero so that a replica stays byte-identical. No payload.
	KindTrim Kind = 3
	// KindMarker: a recovery point or other named mark; Data is its payload
	// (see Marker). Disk, Offset and Length are zero.
	KindMarker Kind = 4
	// KindSkip: the sequence jumps: the next entry's sequence number is
	// Offset (> Seq). A replica records one where the source could not
	// send the entries in between (they are resent as block data).
	KindSkip Kind = 5
)

// FlagResync marks a write entry that re-sends a block's current content
// during a resynchronization rather than recording a guest write.
const FlagResync = 1

// NextSeq is the sequence number of the entry that follows e.
func (e *Entry) NextSeq() uint64 {
	if e.Kind == KindSkip {
		return e.Offset
	}
	return e.Seq + 1
}

func (k Kind) String() string {
	switch k {
	case KindWrite:
		return "write"
	case KindZero:
		return "zero"
	case KindTrim:
		return "trim"
	case KindMarker:
		return "marker"
	case KindSkip:
		return "skip"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

func (k Kind) valid() bool { return k >= KindWrite && k <= KindSkip }

// Entry is one record of the journal.
type Entry struct {
	Seq    uint64 // assigned by Append; dense, starting at 1
	Time   int64  // Unix nanoseconds when appended; assigned by Append
	Kind   Kind
	Flags  uint8
	Disk   uint16
	Offset uint64
	Length uint32 // bytes of the disk affected; for markers, len(Data)
	Data   []byte // the written bytes for KindWrite, the payload for KindMarker, else nil
}

// Sentinel errors. Errors returned by this package wrap one of these where
// a caller may want to tell them apart.
var (
	// ErrCorrupt: bytes that are not a valid entry or segment header.
	ErrCorrupt = errors.New("journal: corrupt")
	// ErrTrimmed: the requested sequence number is no longer in the journal.
	ErrTrimmed = errors.New("journal: sequence trimmed")
	// ErrClosed: the journal was closed.
	ErrClosed = errors.New("journal: closed")
	// ErrFailed: an earlier write or fsync failed; the journal refuses all
	// further work because what is on disk is no longer known (see
	// fsyncgate). Reopen it to recover.
	ErrFailed = errors.New("journal: failed")
	// ErrLocked: another process (or another Journal) has the journal open.
	ErrLocked = errors.New("journal: in use by another process")
	// ErrInvalid: the caller passed an entry that cannot be recorded.
	ErrInvalid = errors.New("journal: invalid entry")
	// ErrDamaged: the journal holds corruption that is not a torn tail;
	// Open deleted nothing and Recovery.Damage says where it is.
	ErrDamaged = errors.New("journal: damaged")
	// ErrReadOnly: the journal was opened read-only.
	ErrReadOnly = errors.New("journal: opened read-only")
)

// encodeHeader fills h (EntryHeaderSize bytes) for e and returns the CRC
// over the header (after the CRC field) and the payload.
func encodeHeader(h []byte, e *Entry) {
	h[4] = byte(e.Kind)
	h[5] = e.Flags
	binary.LittleEndian.PutUint16(h[6:], e.Disk)
	binary.LittleEndian.PutUint64(h[8:], e.Seq)
	binary.LittleEndian.PutUint64(h[16:], uint64(e.Time))
	binary.LittleEndian.PutUint64(h[24:], e.Offset)
	binary.LittleEndian.PutUint32(h[32:], e.Length)
	binary.LittleEndian.PutUint32(h[36:], uint32(len(e.Data)))
	c := checksum.Update(0, h[4:EntryHeaderSize])
	c = checksum.Update(c, e.Data)
	binary.LittleEndian.PutUint32(h[0:], c)
}

// header is a decoded entry header.
type header struct {
	crc        uint32
	payloadLen uint32
	e          Entry // Data not filled
}

// decodeHeader parses an entry header and checks what can be checked
// without the payload. The payload's CRC is checked by verify.
func decodeHeader(h []byte) (header, error) {
	if len(h) < EntryHeaderSize {
		return header{}, fmt.Errorf("%w: short entry header (%d bytes)", ErrCorrupt, len(h))
	}
	var d header
	d.crc = binary.LittleEndian.Uint32(h[0:])
	d.e.Kind = Kind(h[4])
	d.e.Flags = h[5]
	d.e.Disk = binary.LittleEndian.Uint16(h[6:])
	d.e.Seq = binary.LittleEndian.Uint64(h[8:])
	d.e.Time = int64(binary.LittleEndian.Uint64(h[16:]))
	d.e.Offset = binary.LittleEndian.Uint64(h[24:])
	d.e.Length = binary.LittleEndian.Uint32(h[32:])
	d.payloadLen = binary.LittleEndian.Uint32(h[36:])
	if !d.e.Kind.valid() {
		return d, fmt.Errorf("%w: unknown entry kind %d", ErrCorrupt, h[4])
	}
	if d.payloadLen > MaxPayload {
		return d, fmt.Errorf("%w: payload length %d over limit", ErrCorrupt, d.payloadLen)
	}
	switch d.e.Kind {
	case KindWrite:
		if d.payloadLen != d.e.Length {
			return d, fmt.Errorf("%w: write payload %d != length %d", ErrCorrupt, d.payloadLen, d.e.Length)
		}
	case KindZero, KindTrim:
		if d.payloadLen != 0 {
			return d, fmt.Errorf("%w: %s entry with payload", ErrCorrupt, d.e.Kind)
		}
	case KindMarker:
		if d.payloadLen != d.e.Length {
			return d, fmt.Errorf("%w: marker payload %d != length %d", ErrCorrupt, d.payloadLen, d.e.Length)
		}
	case KindSkip:
		if d.payloadLen != 0 || d.e.Length != 0 || d.e.Offset <= d.e.Seq {
			return d, fmt.Errorf("%w: malformed skip entry", ErrCorrupt)
		}
	}
	return d, nil
}

// verify checks the CRC of a decoded header against its raw bytes and payload.
func (d *header) verify(h, payload []byte) error {
	c := checksum.Update(0, h[4:EntryHeaderSize])
	c = checksum.Update(c, payload)
	if c != d.crc {
		return fmt.Errorf("%w: entry seq %d checksum mismatch", ErrCorrupt, d.e.Seq)
	}
	return nil
}

// DecodeEntry parses one whole entry from b and returns it and the number
// of bytes it took. Data aliases b. It is the parser fuzzed by
// FuzzDecodeEntry and used by tools that inspect raw segment bytes.
func DecodeEntry(b []byte) (Entry, int, error) {
	d, err := decodeHeader(b)
	if err != nil {
		return Entry{}, 0, err
	}
	n := EntryHeaderSize + int(d.payloadLen)
	if len(b) < n {
		return Entry{}, 0, fmt.Errorf("%w: entry seq %d truncated", ErrCorrupt, d.e.Seq)
	}
	payload := b[EntryHeaderSize:n]
	if err := d.verify(b, payload); err != nil {
		return Entry{}, 0, err
	}
	e := d.e
	if len(payload) > 0 {
		e.Data = payload
	}
	return e, n, nil
}

// AppendEntry encodes e (with its Seq and Time as given) onto b.
func AppendEntry(b []byte, e *Entry) []byte {
	var h [EntryHeaderSize]byte
	encodeHeader(h[:], e)
	b = append(b, h[:]...)
	return append(b, e.Data...)
}

func encodeSegmentHeader(firstSeq uint64, created int64) []byte {
	h := make([]byte, SegmentHeaderSize)
	copy(h, segmentMagic)
	binary.LittleEndian.PutUint32(h[8:], segmentVersion)
	binary.LittleEndian.PutUint32(h[12:], SegmentHeaderSize)
	binary.LittleEndian.PutUint64(h[16:], firstSeq)
	binary.LittleEndian.PutUint64(h[24:], uint64(created))
	binary.LittleEndian.PutUint32(h[36:], checksum.Checksum(h[:36]))
	return h
}

func decodeSegmentHeader(h []byte) (firstSeq uint64, err error) {
	if len(h) < SegmentHeaderSize {
		return 0, fmt.Errorf("%w: short segment header", ErrCorrupt)
	}
	if string(h[:8]) != segmentMagic {
		return 0, fmt.Errorf("%w: bad segment magic", ErrCorrupt)
	}
	if v := binary.LittleEndian.Uint32(h[8:]); v != segmentVersion {
		return 0, fmt.Errorf("%w: unsupported segment version %d", ErrCorrupt, v)
	}
	if checksum.Checksum(h[:36]) != binary.LittleEndian.Uint32(h[36:]) {
		return 0, fmt.Errorf("%w: segment header checksum mismatch", ErrCorrupt)
	}
	return binary.LittleEndian.Uint64(h[16:]), nil
}
