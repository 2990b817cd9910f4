#include "textflag.h"

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
	VPCLMULQDQ $0x00, Z8, Z0, Z4
	VPCLMULQDQ $0x11, Z8, Z0, Z0
	VPTERNLOGD $0x96, 0(SI), Z4, Z0
	VPCLMULQDQ $0x00, Z8, Z1, Z5
	VPCLMULQDQ $0x11, Z8, Z1, Z1
	VPTERNLOGD $0x96, 64(SI), Z5, Z1
	VPCLMULQDQ $0x00, Z8, Z2, Z6
	VPCLMULQDQ $0x11, Z8, Z2, Z2
	VPTERNLOGD $0x96, 128(SI), Z6, Z2
	VPCLMULQDQ $0x00, Z8, Z3, Z7
	VPCLMULQDQ $0x11, Z8, Z3, Z3
	VPTERNLOGD $0x96, 192(SI), Z7, Z3
	ADDQ       $256, SI
	SUBQ       $256, CX
	JMP        loop256

fold4:
	// Z0 into Z1, Z1 into Z2, Z2 into Z3: 64 bytes apart.
	VBROADCASTI32X4 k64<>(SB), Z8
	VPCLMULQDQ $0x00, Z8, Z0, Z4
	VPCLMULQDQ $0x11, Z8, Z0, Z0
	VPTERNLOGD $0x96, Z4, Z0, Z1
	VPCLMULQDQ $0x00, Z8, Z1, Z4
	VPCLMULQDQ $0x11, Z8, Z1, Z1
	VPTERNLOGD $0x96, Z4, Z1, Z2
	VPCLMULQDQ $0x00, Z8, Z2, Z4
	VPCLMULQDQ $0x11, Z8, Z2, Z2
	VPTERNLOGD $0x96, Z4, Z2, Z3

loop64:
	CMPQ       CX, $64
	JB         done
	VPCLMULQDQ $0x00, Z8, Z3, Z4
	VPCLMULQDQ $0x11, Z8, Z3, Z3
	VPTERNLOGD $0x96, 0(SI), Z4, Z3
	ADDQ       $64, SI
	SUBQ       $64, CX
	JMP        loop64

done:
	VMOVDQU64 Z3, 0(DI)
	VZEROUPPER
	RET
