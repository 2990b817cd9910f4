#include "textflag.h"

// FOLD moves accumulator acc on by the distance of the constants in k:
// acc = lo(acc)*lo(k) ^ hi(acc)*hi(k) ^ next, per 128-bit lane; tmp is
// clobbered. next may be a register or a 64-byte memory operand.
#define FOLD(k, acc, tmp, next) \
	VPCLMULQDQ $0x00, k, acc, tmp \
	VPCLMULQDQ $0x11, k, acc, acc \
	VPTERNLOGD $0x96, next, tmp, acc

// Fold constants for CRC-32C, reflected, one 128-bit lane each: x^(8D+31)
// and x^(8D-33) mod P for a fold across D bytes; the low quadword of a
// lane is multiplied by the first, the high by the second
// (TestFoldConstants derives them again).
DATA k256<>+0(SB)/8, $0xdcb17aa4
DATA k256<>+8(SB)/8, $0xb9e02b86
GLOBL k256<>(SB), RODATA|NOPTR, $16
DATA k64<>+0(SB)/8, $0x740eef02
DATA k64<>+8(SB)/8, $0x9e4addf8
GLOBL k64<>(SB), RODATA|NOPTR, $16

// func fold(init uint32, p []byte, out *[64]byte)
TEXT ·fold(SB), NOSPLIT, $0-40
	MOVL init+0(FP), AX
	MOVQ p_base+8(FP), SI
	MOVQ p_len+16(FP), CX
	MOVQ out+32(FP), DI

	// Four accumulators over the first 256 bytes, init in the first.
	VMOVDQU64 0(SI), Z0
	VMOVDQU64 64(SI), Z1
	VMOVDQU64 128(SI), Z2
	VMOVDQU64 192(SI), Z3
	VMOVD     AX, X4
	VPXORQ    Z4, Z0, Z0
	ADDQ      $256, SI
	SUBQ      $256, CX
	VBROADCASTI32X4 k256<>(SB), Z8

loop256:
	// Each accumulator moves 256 bytes on: lo*k1 ^ hi*k2 ^ next.
	CMPQ       CX, $256
	JB         fold4
	FOLD(Z8, Z0, Z4, 0(SI))
	FOLD(Z8, Z1, Z5, 64(SI))
	FOLD(Z8, Z2, Z6, 128(SI))
	FOLD(Z8, Z3, Z7, 192(SI))
	ADDQ       $256, SI
	SUBQ       $256, CX
	JMP        loop256

fold4:
	// Z0 on into Z1, that on into Z2, that on into Z3 (64 bytes apart):
	// Z0 then holds all four, and takes the rest 64 bytes at a time.
	VBROADCASTI32X4 k64<>(SB), Z8
	FOLD(Z8, Z0, Z4, Z1)
	FOLD(Z8, Z0, Z4, Z2)
	FOLD(Z8, Z0, Z4, Z3)

loop64:
	CMPQ       CX, $64
	JB         done
	FOLD(Z8, Z0, Z4, 0(SI))
	ADDQ       $64, SI
	SUBQ       $64, CX
	JMP        loop64

done:
	VMOVDQU64 Z0, 0(DI)
	VZEROUPPER
	RET

// func raw64(p *[64]byte) uint32
TEXT ·raw64(SB), NOSPLIT, $0-12
	MOVQ   p+0(FP), SI
	XORL   AX, AX
	CRC32Q 0(SI), AX
	CRC32Q 8(SI), AX
	CRC32Q 16(SI), AX
	CRC32Q 24(SI), AX
	CRC32Q 32(SI), AX
	CRC32Q 40(SI), AX
	CRC32Q 48(SI), AX
	CRC32Q 56(SI), AX
	MOVL   AX, ret+8(FP)
	RET
