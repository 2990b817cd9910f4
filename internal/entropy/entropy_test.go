package entropy

import (
	"bytes"
	"compress/gzip"
	"crypto/aes"
	"crypto/cipher"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/journal"
)

// text is low-entropy filler like the guests' documents.
func text(n int, seed uint64) []byte {
	words := []string{"the", "replica", "journal", "invoice", "customer", "order", "2026-12-02", "INFO", "request", "served", "in", "ms", "total", "amount", "EUR", "line"}
	r := rand.New(rand.NewPCG(seed, 1))
	var b bytes.Buffer
	for b.Len() < n {
		b.WriteString(words[r.IntN(len(words))])
		if r.IntN(9) == 0 {
			b.WriteString(fmt.Sprintf(" %d\n", r.IntN(100000)))
		} else {
			b.WriteByte(' ')
		}
	}
	return b.Bytes()[:n]
}

func random(n int, seed uint64) []byte {
	r := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)})
	b := make([]byte, n)
	r.Read(b)
	return b
}

func encrypt(p []byte) []byte {
	blk, _ := aes.NewCipher(make([]byte, 32))
	out := make([]byte, len(p))
	cipher.NewCTR(blk, make([]byte, 16)).XORKeyStream(out, p)
	return out
}

func gzipped(p []byte) []byte {
	var b bytes.Buffer
	w := gzip.NewWriter(&b)
	w.Write(p)
	w.Close()
	return b.Bytes()
}

func TestClassify(t *testing.T) {
	tests := []struct {
		name string
		data []byte
		want Class
	}{
		{"zeros", make([]byte, BlockSize), Zero},
		{"text", text(BlockSize, 1), Low},
		{"log lines", bytes.Repeat([]byte("2026-12-02T10:42:00Z INFO GET /index.html 200 12ms\n"), 100)[:BlockSize], Low},
		{"records", bytes.Repeat([]byte{1, 0, 0, 0, 0, 0, 0, 0, 42, 0, 0, 0, 9, 9, 9, 9}, BlockSize/16), Low},
		{"random", random(BlockSize, 2), High},
		{"aes-ctr of text", encrypt(text(BlockSize, 3)), High},
		{"gzip of text", gzipped(text(64*BlockSize, 4))[:BlockSize], High},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Classify(tt.data); got != tt.want {
				t.Errorf("Classify = %v (%.2f bits), want %v", got, Bits(tt.data), tt.want)
			}
		})
	}
}

// feed writes blocks as entries at times, one entry per block.
type feed struct {
	m   *Monitor
	seq uint64
}

func (f *feed) write(t time.Time, disk uint16, block int64, data []byte) uint64 {
	f.seq++
	f.m.ObserveEntries([]*journal.Entry{{Seq: f.seq, Time: t.UnixNano(), Kind: journal.KindWrite, Disk: disk, Offset: uint64(block * BlockSize), Length: uint32(len(data)), Data: data}})
	return f.seq
}

func newMonitor(t *testing.T, dir string) *Monitor {
	t.Helper()
	m, err := New(Config{Dir: dir, Now: func() time.Time { return time.Unix(1_800_000_000, 0) }})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestDetectsEncryptionInPlace: an hour of ordinary writes (some of them
// high-entropy overwrites, the protection's normal), then text files
// encrypted in place: an incident whose first write is the first
// encrypted block.
func TestDetectsEncryptionInPlace(t *testing.T) {
	m := newMonitor(t, t.TempDir())
	f := &feed{m: m}
	t0 := time.Unix(1_800_000_000, 0)
	// The documents: 4096 blocks (16 MiB) of text, from the initial copy.
	for b := int64(0); b < 4096; b++ {
		m.ObserveBase(0, b*BlockSize, text(BlockSize, uint64(b)))
	}
	// An hour of normal life: text appended, and one block a minute of a
	// document overwritten by something compressed (a normal save).
	for s := 0; s < 3600; s++ {
		now := t0.Add(time.Duration(s) * time.Second)
		f.write(now, 0, 8192+int64(s), text(BlockSize, uint64(s)))
		if s%60 == 0 {
			f.write(now, 0, int64(s/60), random(BlockSize, uint64(s)))
		}
	}
	if st := m.Status(); st.Incident != nil || st.BaselineBytes != BlockSize {
		t.Fatalf("after normal life: incident %+v baseline %d, want none and %d", st.Incident, st.BaselineBytes, BlockSize)
	}
	// Encryption: 200 blocks a second.
	start := t0.Add(3600 * time.Second)
	var firstSeq uint64
	var raised []Incident
	m.OnIncident(func(i Incident) { raised = append(raised, i) })
	for b := int64(100); b < 4096; b++ {
		now := start.Add(time.Duration((b-100)/200) * time.Second)
		seq := f.write(now, 0, b, encrypt(text(BlockSize, uint64(b))))
		if firstSeq == 0 {
			firstSeq = seq
		}
	}
	if len(raised) != 1 {
		t.Fatalf("incidents raised: %d, want 1", len(raised))
	}
	inc := raised[0]
	if inc.FirstSeq != firstSeq || !inc.Start.Equal(start) {
		t.Errorf("incident starts at seq %d (%v), want %d (%v)", inc.FirstSeq, inc.Start, firstSeq, start)
	}
	// Persisted and reopened: the incident and the map survive.
	if err := m.Save(); err != nil {
		t.Fatal(err)
	}
	m2 := newMonitor(t, m.cfg.Dir)
	got, ok := m2.Incident()
	if !ok || got.FirstSeq != firstSeq {
		t.Fatalf("reopened incident %+v %v, want first seq %d", got, ok, firstSeq)
	}
	if c := m2.maps[0].get(200); c != High {
		t.Errorf("reopened block 200 class %v, want high", c)
	}
	if err := m2.Dismiss(); err != nil {
		t.Fatal(err)
	}
	if err := m2.Dismiss(); err != ErrNoIncident {
		t.Errorf("second Dismiss: %v, want ErrNoIncident", err)
	}
}

// TestNoAlertForCompressedData: a guest that writes random bytes and
// gzip streams into new files (blocks that were zero) as fast as the
// attack above raises nothing.
func TestNoAlertForCompressedData(t *testing.T) {
	m := newMonitor(t, "")
	f := &feed{m: m}
	t0 := time.Unix(1_800_000_000, 0)
	for b := int64(0); b < 4096; b++ {
		m.ObserveBase(0, b*BlockSize, text(BlockSize, uint64(b)))
	}
	gz := gzipped(text(1024*BlockSize, 5))
	for b := int64(0); b < 8192; b++ {
		now := t0.Add(time.Duration(b/200) * time.Second)
		data := random(BlockSize, uint64(b))
		if i := b / 2 * BlockSize; b%2 == 0 && i+BlockSize <= int64(len(gz)) {
			data = gz[i : i+BlockSize]
		}
		f.write(now, 0, 100000+b, data) // fresh blocks, zero before
		// and rewrites of the same high blocks (a file rewritten)
		f.write(now, 0, 100000+b/2, random(BlockSize, uint64(b)+7))
	}
	if st := m.Status(); st.Incident != nil || st.LowToHighBytes != 0 {
		t.Errorf("compressed writes: incident %+v, low-to-high %d; want none", st.Incident, st.LowToHighBytes)
	}
}

func TestDisabledPolicy(t *testing.T) {
	m := newMonitor(t, "")
	m.SetPolicy(Policy{Disabled: true})
	f := &feed{m: m}
	t0 := time.Unix(1_800_000_000, 0)
	for b := int64(0); b < 2048; b++ {
		m.ObserveBase(0, b*BlockSize, text(BlockSize, uint64(b)))
	}
	for b := int64(0); b < 2048; b++ {
		f.write(t0, 0, b, random(BlockSize, uint64(b)))
	}
	if _, ok := m.Incident(); ok {
		t.Error("a disabled detector raised an incident")
	}
}

// TestPartialBlocks: a write that covers part of a block makes it Unknown,
// so a later high write over it counts nothing.
func TestPartialBlocks(t *testing.T) {
	m := newMonitor(t, "")
	m.ObserveBase(0, 0, text(2*BlockSize, 1))
	m.ObserveBase(0, 100, text(200, 2))
	if got := m.maps[0].get(0); got != Unknown {
		t.Errorf("partly written block: %v, want unknown", got)
	}
	if got := m.maps[0].get(1); got != Low {
		t.Errorf("untouched block: %v, want low", got)
	}
}

func TestDecodeMapRejectsGarbage(t *testing.T) {
	for _, b := range [][]byte{nil, []byte("nope"), append(append([]byte{}, mapMagic...), 1, 0, 255, 255, 0, 0, 0, 0, 0, 0)} {
		if _, err := decodeMap(b); err == nil {
			t.Errorf("decodeMap(%q): no error", b)
		}
	}
}

func BenchmarkClassify(b *testing.B) {
	blocks := [][]byte{text(BlockSize, 1), random(BlockSize, 2)}
	b.SetBytes(BlockSize)
	for i := 0; b.Loop(); i++ {
		Classify(blocks[i&1])
	}
}

// TestStrayOverwritesDoNotMoveTheStart: a low-to-high overwrite every
// two seconds before the attack (a document saved compressed now and
// then) is not the attack's start.
func TestStrayOverwritesDoNotMoveTheStart(t *testing.T) {
	m := newMonitor(t, "")
	f := &feed{m: m}
	t0 := time.Unix(1_800_000_000, 0)
	for b := int64(0); b < 4096; b++ {
		m.ObserveBase(0, b*BlockSize, text(BlockSize, uint64(b)))
	}
	for s := int64(0); s < 30; s += 2 {
		f.write(t0.Add(time.Duration(s)*time.Second), 0, 3000+s, random(BlockSize, uint64(s)))
	}
	start := t0.Add(31 * time.Second)
	var first uint64
	for b := int64(0); b < 2000; b++ {
		seq := f.write(start.Add(time.Duration(b/400)*time.Second), 0, b, random(BlockSize, uint64(b)+99))
		if first == 0 {
			first = seq
		}
	}
	inc, ok := m.Incident()
	if !ok || inc.FirstSeq != first || !inc.Start.Equal(start) {
		t.Fatalf("incident %+v (%v), want it to start at seq %d, %v", inc, ok, first, start)
	}
}
