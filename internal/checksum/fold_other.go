//go:build !amd64

package checksum

const haveFold = false

func fold(init uint32, p []byte, out *[64]byte) { panic("checksum: no vector fold on this CPU") }

func raw64(p *[64]byte) uint32 { panic("checksum: no vector fold on this CPU") }
