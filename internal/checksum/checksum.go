// Package checksum computes CRC-32C (Castagnoli), the checksum of every
// journal entry, as hash/crc32 does, faster where the CPU can fold 64
// bytes per instruction (AVX-512 with VPCLMULQDQ).
//
// Why not hash/crc32 alone: its CRC-32C on amd64 is the SSE 4.2 CRC32
// instruction on three interleaved streams, 25 GB/s here, and the journal
// checksums every byte a guest writes: 11 % of ferry's CPU samples in
// bench/nbd.sh write1m (docs/benchmarks.md). Carry-less multiplication
// folds 256 bytes per loop over four independent 512-bit accumulators;
// the folded 64 bytes and the tail then go through hash/crc32, so the
// result is hash/crc32's by construction of the fold (a polynomial
// congruent modulo the CRC polynomial has the same CRC).
//
// Measured: 54 GB/s on 1 MiB, and the checksum's share of write1m's
// samples fell from 11 % to 6 %. write1m's throughput did not move, because
// the NBD layer bounds it (docs/benchmarks.md). What it saves is CPU
// wherever entries are checksummed.
package checksum

import "hash/crc32"

var table = crc32.MakeTable(crc32.Castagnoli)

// minFold is the shortest input worth the vector fold: below it the setup
// and the final 64 bytes cost more than they save.
const minFold = 2048

// Update returns the CRC-32C of p appended to data whose CRC-32C is crc:
// crc32.Update(crc, crc32.MakeTable(crc32.Castagnoli), p).
func Update(crc uint32, p []byte) uint32 {
	if !haveFold || len(p) < minFold {
		return crc32.Update(crc, table, p)
	}
	n := len(p) &^ 63
	var st [64]byte
	// hash/crc32 inverts the register before and after; the fold works
	// on the raw register, which starts as the inverted crc XORed into
	// the first four bytes.
	fold(^crc, p[:n], &st)
	c := ^raw64(&st) // crc32.Update(0xFFFFFFFF, table, st[:]), the raw register from 0 inverted
	return crc32.Update(c, table, p[n:])
}

// Checksum returns the CRC-32C of p.
func Checksum(p []byte) uint32 { return Update(0, p) }
