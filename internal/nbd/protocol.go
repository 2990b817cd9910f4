// Package nbd implements the server side of the Network Block Device
// protocol (fixed newstyle negotiation, simple replies) and a small client.
//
// ferry serves every VM disk through this server so that the site agent
// sees, journals and replicates every write. The server pipelines requests
// per connection, replies out of order where a request must wait (FLUSH and
// FUA writes wait for durability without holding up the requests behind
// them), and treats all input as hostile: a malformed or out-of-range
// request gets an NBD error or a clean disconnect, never a panic or a hang.
//
// Protocol reference: the NBD protocol document (doc/proto.md in the
// NetworkBlockDevice/nbd repository). docs/nbd.md lists what ferry supports.
package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Wire constants from the NBD protocol document.
const (
	nbdMagic          = 0x4e42444d41474943 // "NBDMAGIC"
	optMagic          = 0x49484156454f5054 // "IHAVEOPT"
	optReplyMagic     = 0x0003e889045565a9
	requestMagic      = 0x25609513
	simpleReplyMagic  = 0x67446698
	requestHeaderSize = 28
)

// Handshake flags.
const (
	flagFixedNewstyle = 1 << 0
	flagNoZeroes      = 1 << 1
	clientFlagsKnown  = flagFixedNewstyle | flagNoZeroes
)

// Transmission flags.
const (
	FlagHasFlags        = 1 << 0
	FlagReadOnly        = 1 << 1
	FlagSendFlush       = 1 << 2
	FlagSendFUA         = 1 << 3
	FlagRotational      = 1 << 4
	FlagSendTrim        = 1 << 5
	FlagSendWriteZeroes = 1 << 6
	FlagSendDF          = 1 << 7
	FlagCanMultiConn    = 1 << 8
)

// Options.
const (
	OptExportName       = 1
	OptAbort            = 2
	OptList             = 3
	OptPeekExport       = 4
	OptStartTLS         = 5
	OptInfo             = 6
	OptGo               = 7
	OptStructuredReply  = 8
	OptListMetaContext  = 9
	OptSetMetaContext   = 10
	OptExtendedHeaders  = 11
	maxOptionDataLength = 64 << 10
)

// Option replies.
const (
	repAck             = 1
	repServer          = 2
	repInfo            = 3
	repFlagError       = 1 << 31
	repErrUnsup        = repFlagError | 1
	repErrPolicy       = repFlagError | 2
	repErrInvalid      = repFlagError | 3
	repErrPlatform     = repFlagError | 4
	repErrTLSReqd      = repFlagError | 5
	repErrUnknown      = repFlagError | 6
	repErrShutdown     = repFlagError | 7
	repErrBlockSizeReq = repFlagError | 8
	repErrTooBig       = repFlagError | 9
)

// Info types for NBD_OPT_INFO and NBD_OPT_GO.
const (
	infoExport      = 0
	infoName        = 1
	infoDescription = 2
	infoBlockSize   = 3
)

// Commands.
const (
	CmdRead        = 0
	CmdWrite       = 1
	CmdDisc        = 2
	CmdFlush       = 3
	CmdTrim        = 4
	CmdCache       = 5
	CmdWriteZeroes = 6
	CmdBlockStatus = 7
)

// Command flags.
const (
	CmdFlagFUA    = 1 << 0
	CmdFlagNoHole = 1 << 1
	CmdFlagDF     = 1 << 2
	CmdFlagReqOne = 1 << 3
	CmdFlagFast   = 1 << 4
)

// Errors sent in replies (Linux errno values, as the protocol requires).
const (
	EPERM     = 1
	EIO       = 5
	ENOMEM    = 12
	EINVAL    = 22
	ENOSPC    = 28
	EOVERFLOW = 75
	ENOTSUP   = 95
	ESHUTDOWN = 108
)

// MaxRequest is the largest READ or WRITE payload the server accepts (the
// maximum block size it advertises).
const MaxRequest = 32 << 20

// Sentinel errors.
var (
	// ErrProtocol: the peer broke the protocol; the connection is closed.
	ErrProtocol = errors.New("nbd: protocol violation")
	// ErrUnknownExport: no export of that name.
	ErrUnknownExport = errors.New("nbd: unknown export")
)

// Request is a parsed transmission-phase request header.
type Request struct {
	Flags  uint16
	Type   uint16
	Handle uint64
	Offset uint64
	Length uint32
}

// ParseRequest decodes a 28-byte request header. It fails only on a bad
// magic, after which the stream cannot be trusted; every other check
// (command, flags, range) is the server's and yields an error reply.
func ParseRequest(b []byte) (Request, error) {
	if len(b) < requestHeaderSize {
		return Request{}, fmt.Errorf("%w: short request header (%d bytes)", ErrProtocol, len(b))
	}
	if m := binary.BigEndian.Uint32(b); m != requestMagic {
		return Request{}, fmt.Errorf("%w: bad request magic %#x", ErrProtocol, m)
	}
	return Request{
		Flags:  binary.BigEndian.Uint16(b[4:]),
		Type:   binary.BigEndian.Uint16(b[6:]),
		Handle: binary.BigEndian.Uint64(b[8:]),
		Offset: binary.BigEndian.Uint64(b[16:]),
		Length: binary.BigEndian.Uint32(b[24:]),
	}, nil
}

// AppendRequest encodes r (used by the client and tests).
func AppendRequest(b []byte, r Request) []byte {
	b = binary.BigEndian.AppendUint32(b, requestMagic)
	b = binary.BigEndian.AppendUint16(b, r.Flags)
	b = binary.BigEndian.AppendUint16(b, r.Type)
	b = binary.BigEndian.AppendUint64(b, r.Handle)
	b = binary.BigEndian.AppendUint64(b, r.Offset)
	return binary.BigEndian.AppendUint32(b, r.Length)
}

// checkRequest validates a request against an export and returns the NBD
// errno to reply with (0 if the request may proceed).
func checkRequest(r Request, size uint64, readOnly bool) uint32 {
	var allowed uint16
	switch r.Type {
	case CmdRead:
		allowed = CmdFlagDF
	case CmdWrite:
		allowed = CmdFlagFUA
	case CmdWriteZeroes:
		allowed = CmdFlagFUA | CmdFlagNoHole
	case CmdTrim:
		allowed = CmdFlagFUA
	case CmdFlush, CmdDisc, CmdCache:
		allowed = 0
	default:
		return EINVAL
	}
	if r.Flags&^allowed != 0 {
		return EINVAL
	}
	switch r.Type {
	case CmdRead, CmdWrite:
		if r.Length > MaxRequest {
			return EINVAL
		}
	}
	switch r.Type {
	case CmdWrite, CmdWriteZeroes, CmdTrim:
		if readOnly {
			return EPERM
		}
	}
	switch r.Type {
	case CmdRead, CmdWrite, CmdWriteZeroes, CmdTrim, CmdCache:
		end := r.Offset + uint64(r.Length)
		if end < r.Offset || end > size {
			if r.Type == CmdWrite || r.Type == CmdWriteZeroes {
				return ENOSPC
			}
			return EINVAL
		}
	}
	return 0
}

// optionRequest is a parsed NBD_OPT_INFO / NBD_OPT_GO payload.
type optionRequest struct {
	name  string
	infos []uint16
}

// parseInfoRequest decodes the payload of NBD_OPT_INFO and NBD_OPT_GO:
// a 32-bit name length, the name, a 16-bit count and that many info types.
func parseInfoRequest(b []byte) (optionRequest, error) {
	if len(b) < 6 {
		return optionRequest{}, fmt.Errorf("%w: info request too short", ErrProtocol)
	}
	n := binary.BigEndian.Uint32(b)
	if n > 4096 || uint64(len(b)) < 4+uint64(n)+2 {
		return optionRequest{}, fmt.Errorf("%w: bad export name length %d", ErrProtocol, n)
	}
	name := string(b[4 : 4+n])
	rest := b[4+n:]
	count := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*count {
		return optionRequest{}, fmt.Errorf("%w: info request has %d bytes for %d items", ErrProtocol, len(rest), count)
	}
	infos := make([]uint16, count)
	for i := range infos {
		infos[i] = binary.BigEndian.Uint16(rest[2*i:])
	}
	return optionRequest{name: name, infos: infos}, nil
}

func appendInfoRequest(b []byte, name string, infos ...uint16) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}
