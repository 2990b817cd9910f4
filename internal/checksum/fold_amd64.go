package checksum

import "golang.org/x/sys/cpu"

var haveFold = cpu.X86.HasAVX512F && cpu.X86.HasAVX512VPCLMULQDQ

// fold reduces p (at least 256 bytes, a multiple of 64) to 64 bytes whose
// raw CRC-32C register from 0 equals p's from init: p's first four bytes
// XORed with init, folded modulo the polynomial. In fold_amd64.s.
//
//go:noescape
func fold(init uint32, p []byte, out *[64]byte)

// raw64 returns the raw CRC-32C register from 0 over p (SSE 4.2's CRC32
// instruction, which every CPU with the fold has). hash/crc32 would do,
// but p escapes through it: an allocation per checksum.
//
//go:noescape
func raw64(p *[64]byte) uint32
