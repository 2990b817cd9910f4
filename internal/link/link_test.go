package link

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/journal"
	"github.com/klauspost/compress/zstd"
)

func TestFrames(t *testing.T) {
	a, b := net.Pipe()
	ca, cb := New(a), New(b)
	go func() {
		ca.WriteJSON(TypeHello, Hello{Group: "vm1", Source: "siteA"})
		e := journal.Entry{Seq: 5, Kind: journal.KindWrite, Length: 3, Data: []byte("abc")}
		ca.Write(TypeEntries, journal.AppendEntry(nil, &e))
		ca.Write(TypeBaseData, EncodeBaseData(2, 4096), []byte("xyz"))
		ca.Write(TypeError, []byte("boom"))
	}()
	var h Hello
	if err := cb.ReadJSON(TypeHello, &h); err != nil || h.Group != "vm1" {
		t.Fatalf("hello %+v %v", h, err)
	}
	typ, body, err := cb.Read()
	if err != nil || typ != TypeEntries {
		t.Fatal(typ, err)
	}
	es, err := DecodeEntries(body, nil)
	if err != nil || len(es) != 1 || es[0].Seq != 5 || string(es[0].Data) != "abc" {
		t.Fatalf("entries %+v %v", es, err)
	}
	typ, body, _ = cb.Read()
	id, off, data, err := DecodeBaseData(body)
	if typ != TypeBaseData || err != nil || id != 2 || off != 4096 || string(data) != "xyz" {
		t.Fatalf("base data %d %d %q %v", id, off, data, err)
	}
	if _, _, err := cb.Read(); err == nil || !bytes.Contains([]byte(err.Error()), []byte("boom")) {
		t.Fatalf("error frame: %v", err)
	}
}

func FuzzDecode(f *testing.F) {
	e := journal.Entry{Seq: 1, Kind: journal.KindWrite, Length: 2, Data: []byte("hi")}
	f.Add(byte(TypeEntries), journal.AppendEntry(nil, &e))
	f.Add(byte(TypeBaseData), append(EncodeBaseData(1, 512), 1, 2, 3))
	f.Add(byte(TypeAck), EncodeAck(9))
	f.Fuzz(func(t *testing.T, typ byte, b []byte) {
		switch typ % 3 {
		case 0:
			es, err := DecodeEntries(b, nil)
			if err != nil && !errors.Is(err, ErrFrame) {
				t.Fatal(err)
			}
			for _, e := range es {
				if e.Kind == journal.KindWrite && int(e.Length) != len(e.Data) {
					t.Fatal("write entry with a wrong payload accepted")
				}
			}
		case 1:
			if _, off, _, err := DecodeBaseData(b); err == nil && off < 0 {
				t.Fatal("negative offset accepted")
			}
		case 2:
			DecodeAck(b)
		}
	})
}

// TestCompression: compressible frames travel compressed and arrive
// intact; random ones go as they are; the counts say which.
func TestCompression(t *testing.T) {
	text := bytes.Repeat([]byte("the quick brown fox jumps over the lazy dog\n"), 2000)
	noise := make([]byte, 64<<10)
	rand.Read(noise)
	tests := []struct {
		name      string
		data      []byte
		compress  bool
		wantSmall bool // wire well under payload
		wantPlain bool // wire == payload
	}{
		{"text compressed", text, true, true, false},
		{"random sent as is", noise, true, false, true},
		{"text, compression off", text, false, false, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var buf bytes.Buffer
			w := New(&buf)
			w.SetCompression(tt.compress, nil)
			e := journal.Entry{Seq: 7, Kind: journal.KindWrite, Length: uint32(len(tt.data)), Data: tt.data}
			if err := w.Write(TypeEntries, journal.AppendEntry(nil, &e)); err != nil {
				t.Fatal(err)
			}
			if err := w.Write(TypeBaseData, EncodeBaseData(1, 8192), tt.data); err != nil {
				t.Fatal(err)
			}
			payload, wire := w.Counts()
			if got := int64(buf.Len()); got != wire {
				t.Fatalf("wire count %d, %d bytes written", wire, got)
			}
			if tt.wantSmall && wire*4 > payload {
				t.Errorf("wire %d of payload %d: want under a quarter", wire, payload)
			}
			if tt.wantPlain && wire != payload {
				t.Errorf("wire %d != payload %d", wire, payload)
			}
			r := New(&buf)
			typ, body, err := r.Read()
			if err != nil || typ != TypeEntries {
				t.Fatal(typ, err)
			}
			es, err := DecodeEntries(body, nil)
			if err != nil || len(es) != 1 || !bytes.Equal(es[0].Data, tt.data) {
				t.Fatalf("entries after the trip: %v", err)
			}
			typ, body, err = r.Read()
			if err != nil || typ != TypeBaseData {
				t.Fatal(typ, err)
			}
			if _, off, data, err := DecodeBaseData(body); err != nil || off != 8192 || !bytes.Equal(data, tt.data) {
				t.Fatalf("base data after the trip: off %d, %v", off, err)
			}
		})
	}
}

// TestCompressionBacksOff: after a run of frames that do not shrink, only
// one frame in probeEvery is tried, and a compressible one is compressed
// again once a probe finds it.
func TestCompressionBacksOff(t *testing.T) {
	noise := make([]byte, 4096)
	z := &compressor{}
	tries := 0
	for range 100 {
		rand.Read(noise)
		before := z.skip
		if _, ok := z.compress([][]byte{noise}, len(noise)); ok {
			t.Fatal("random bytes compressed")
		}
		if before == 0 {
			tries++
		}
	}
	if want := missLimit + (100-missLimit)/probeEvery + 1; tries > want {
		t.Errorf("%d of 100 incompressible frames tried, want at most %d", tries, want)
	}
	text := bytes.Repeat([]byte("abcd"), 1024)
	for i := range probeEvery {
		if _, ok := z.compress([][]byte{text}, len(text)); ok {
			return
		} else if i == probeEvery-1 {
			t.Fatal("a compressible frame was never compressed again")
		}
	}
}

// fixedRate is a link of a known speed.
type fixedRate float64

func (r fixedRate) LinkRate() (float64, bool) { return float64(r), r > 0 }

// TestCompressionPaysByLinkRate: compression is used where the link is
// slower than what compressing saves, and only tried now and then on a
// faster link. Each compression takes 1 ms on the test's clock, so the
// encoder runs at 64 MiB/s on 64 KiB frames, and text shrinks far more
// than 2×: the break-even link rate is a little under 64 MiB/s.
func TestCompressionPaysByLinkRate(t *testing.T) {
	text := bytes.Repeat([]byte("the quick brown fox jumps over the lazy dog\n"), 1500)[:64<<10]
	tests := []struct {
		name string
		link LinkRater
		want int // frames of 100 compressed
	}{
		{"no link rate: wherever it shrinks", nil, 100},
		{"link rate unknown yet", fixedRate(0), 100},
		{"WAN, 12 MB/s", fixedRate(12e6), 100},
		{"just under break-even", fixedRate(60 << 20), 100},
		// The first frame warms the encoder up and the second measures
		// it; then one in trialEvery.
		{"just over break-even", fixedRate(70 << 20), 2 + 98/trialEvery},
		{"loopback, 8 GB/s", fixedRate(8e9), 2 + 98/trialEvery},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var clock time.Time
			z := &compressor{link: tt.link, now: func() time.Time {
				clock = clock.Add(time.Millisecond)
				return clock
			}}
			got := 0
			for range 100 {
				if _, ok := z.compress([][]byte{text}, len(text)); ok {
					got++
				}
			}
			if got != tt.want {
				t.Errorf("%d of 100 frames compressed, want %d", got, tt.want)
			}
		})
	}
}

// TestCompressionResumesAtOnceOnSlowLink: on a link far slower than the
// compressor, frames after a run of incompressible ones are still each
// tried, so text that follows random data is compressed from its first
// frame; without a link rate the back-off applies (TestCompressionBacksOff).
func TestCompressionResumesAtOnceOnSlowLink(t *testing.T) {
	noise := make([]byte, 64<<10)
	text := bytes.Repeat([]byte("abcd"), 16<<10)
	z := &compressor{link: fixedRate(1e6)}
	for range 20 {
		rand.Read(noise)
		z.compress([][]byte{noise}, len(noise))
	}
	if _, ok := z.compress([][]byte{text}, len(text)); !ok {
		t.Fatal("text after random data on a 1 MB/s link was not compressed at once")
	}
}

// TestCompressedFrameChecks: a compressed frame of a type that is never
// compressed, a corrupt one and one that inflates past MaxFrame are
// refused with ErrFrame.
func TestCompressedFrameChecks(t *testing.T) {
	enc, _ := zstd.NewWriter(nil)
	big := enc.EncodeAll(make([]byte, MaxFrame+1), nil)
	tests := []struct {
		name string
		typ  byte
		body []byte
	}{
		{"ack compressed", TypeAck | Compressed, enc.EncodeAll(EncodeAck(1), nil)},
		{"corrupt", TypeEntries | Compressed, []byte("not zstd at all")},
		{"bomb", TypeBaseData | Compressed, big},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var buf bytes.Buffer
			h := binary.BigEndian.AppendUint32(nil, uint32(1+len(tt.body)))
			buf.Write(append(append(h, tt.typ), tt.body...))
			if _, _, err := New(&buf).Read(); !errors.Is(err, ErrFrame) {
				t.Fatalf("got %v, want ErrFrame", err)
			}
		})
	}
}

// FuzzRead: any bytes on the wire, compressed frames included, give
// frames or an error, never a panic or a body past MaxFrame.
func FuzzRead(f *testing.F) {
	var buf bytes.Buffer
	w := New(&buf)
	w.SetCompression(true, nil)
	w.Write(TypeBaseData, EncodeBaseData(1, 0), bytes.Repeat([]byte("abc"), 400))
	w.Write(TypeAck, EncodeAck(3))
	f.Add(buf.Bytes())
	f.Add([]byte{0, 0, 0, 5, TypeEntries | Compressed, 0x28, 0xb5, 0x2f, 0xfd})
	f.Fuzz(func(t *testing.T, b []byte) {
		r := New(struct {
			io.Reader
			io.Writer
		}{bytes.NewReader(b), io.Discard})
		for range 8 {
			typ, body, err := r.Read()
			if err != nil {
				return
			}
			if typ&Compressed != 0 || len(body) > MaxFrame {
				t.Fatalf("frame type %d of %d bytes", typ, len(body))
			}
		}
	})
}
