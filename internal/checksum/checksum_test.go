package checksum

import (
	"hash/crc32"
	"math/rand"
	"testing"
)

func want(crc uint32, p []byte) uint32 { return crc32.Update(crc, table, p) }

// TestUpdateMatchesHashCRC32 covers every length up to a few folds, at
// every alignment of the start, with random initial values.
func TestUpdateMatchesHashCRC32(t *testing.T) {
	if !haveFold {
		t.Log("no vector fold on this CPU: Update is hash/crc32 itself")
	}
	rng := rand.New(rand.NewSource(1))
	buf := make([]byte, 4096+64)
	rng.Read(buf)
	for n := 0; n <= 2200; n++ {
		for _, start := range []int{0, 1, 7, 63} {
			p := buf[start : start+n]
			crc := rng.Uint32()
			if got, w := Update(crc, p), want(crc, p); got != w {
				t.Fatalf("Update(%#x, len %d at %d) = %#x, want %#x", crc, n, start, got, w)
			}
		}
	}
	for _, n := range []int{1 << 20, 1<<20 + 13, 32 << 20} {
		p := make([]byte, n)
		rng.Read(p)
		if got, w := Checksum(p), crc32.Checksum(p, table); got != w {
			t.Fatalf("Checksum(len %d) = %#x, want %#x", n, got, w)
		}
	}
}

// TestUpdateChains: a checksum computed in pieces equals the whole one.
func TestUpdateChains(t *testing.T) {
	rng := rand.New(rand.NewSource(2))
	p := make([]byte, 100_000)
	rng.Read(p)
	whole := Checksum(p)
	for range 200 {
		cut := rng.Intn(len(p))
		if got := Update(Checksum(p[:cut]), p[cut:]); got != whole {
			t.Fatalf("cut at %d: %#x, want %#x", cut, got, whole)
		}
	}
}

// TestFoldConstants derives the constants in fold_amd64.s: moving a
// 16-byte lane D bytes on multiplies its low quadword by x^(8D+31) and its
// high quadword by x^(8D-33) modulo the polynomial (bit-reflected), and
// the software fold with them keeps the CRC.
func TestFoldConstants(t *testing.T) {
	for _, c := range []struct {
		d      int
		k1, k2 uint64
	}{{256, 0xdcb17aa4, 0xb9e02b86}, {64, 0x740eef02, 0x9e4addf8}} {
		k1, k2 := uint64(xpow(8*c.d+31)), uint64(xpow(8*c.d-33))
		if k1 != c.k1 || k2 != c.k2 {
			t.Errorf("D=%d: derived %#x %#x, the assembly has %#x %#x", c.d, k1, k2, c.k1, c.k2)
		}
		rng := rand.New(rand.NewSource(int64(c.d)))
		for range 20 {
			m := make([]byte, c.d+16)
			rng.Read(m)
			lo, hi := le64(m), le64(m[8:])
			l1, h1 := clmul(lo, k1)
			l2, h2 := clmul(hi, k2)
			moved := append([]byte(nil), m[16:]...)
			xor64(moved[c.d-16:], l1^l2)
			xor64(moved[c.d-8:], h1^h2)
			if got, w := rawCRC(moved), rawCRC(m); got != w {
				t.Fatalf("D=%d: the folded message has raw CRC %#x, the message %#x", c.d, got, w)
			}
		}
	}
}

// xpow is x^e modulo the Castagnoli polynomial, bit-reflected.
func xpow(e int) uint32 {
	v := uint32(1 << 31) // x^0
	for range e {
		if v&1 == 1 {
			v = v>>1 ^ 0x82F63B78
		} else {
			v >>= 1
		}
	}
	return v
}

func clmul(a, b uint64) (lo, hi uint64) {
	for i := range 64 {
		if b>>i&1 == 1 {
			lo ^= a << i
			if i > 0 {
				hi ^= a >> (64 - i)
			}
		}
	}
	return lo, hi
}

func le64(b []byte) uint64 {
	var v uint64
	for i := 7; i >= 0; i-- {
		v = v<<8 | uint64(b[i])
	}
	return v
}

func xor64(b []byte, v uint64) {
	for i := range 8 {
		b[i] ^= byte(v >> (8 * i))
	}
}

func rawCRC(p []byte) uint32 { return ^crc32.Update(0xFFFFFFFF, table, p) }

func FuzzUpdate(f *testing.F) {
	f.Add(uint32(0), make([]byte, 300))
	f.Add(uint32(0xdeadbeef), make([]byte, 1000))
	f.Fuzz(func(t *testing.T, crc uint32, p []byte) {
		if got, w := Update(crc, p), want(crc, p); got != w {
			t.Fatalf("Update(%#x, len %d) = %#x, want %#x", crc, len(p), got, w)
		}
	})
}

func BenchmarkChecksum(b *testing.B) {
	for _, n := range []int{2048, 4096, 1 << 20} {
		p := make([]byte, n)
		b.Run(byteSize(n), func(b *testing.B) {
			b.SetBytes(int64(n))
			for b.Loop() {
				Checksum(p)
			}
		})
		b.Run(byteSize(n)+"/hash-crc32", func(b *testing.B) {
			b.SetBytes(int64(n))
			for b.Loop() {
				crc32.Checksum(p, table)
			}
		})
	}
}

func byteSize(n int) string {
	switch {
	case n >= 1<<20:
		return string(rune('0'+n>>20)) + "MiB"
	}
	return string(rune('0'+n>>10)) + "KiB"
}

// TestUpdateAllocatesNothing: the journal checksums every entry, and an
// allocation per checksum (the fold state escaping through hash/crc32)
// was a measurable share of 4 KiB writes' garbage.
func TestUpdateAllocatesNothing(t *testing.T) {
	p := make([]byte, 4096)
	for _, n := range []int{100, minFold, 4096} {
		if got := testing.AllocsPerRun(100, func() { Update(1, p[:n]) }); got != 0 {
			t.Errorf("Update of %d bytes: %v allocations, want 0", n, got)
		}
	}
}
