package nbd

import (
	"bufio"
	"io"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// rawPayload reads a large payload: what the buffer holds, then straight
// off the socket, waiting for more in ppoll while holding the P (up to
// rawWait each time) rather than parking on the netpoller.
func rawPayload(br *bufio.Reader, rc syscall.RawConn, p []byte) error {
	k := 0
	if b := br.Buffered(); b > 0 {
		n, _ := br.Read(p[:min(b, len(p))])
		k = n
	}
	var rerr error
	for k < len(p) && rerr == nil {
		err := rc.Read(func(fd uintptr) bool {
			for k < len(p) {
				n, _, e := syscall.RawSyscall6(unix.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&p[k])), uintptr(len(p)-k), unix.MSG_DONTWAIT, 0, 0)
				switch e {
				case 0:
					if n == 0 {
						rerr = io.ErrUnexpectedEOF
						return true
					}
					k += int(n)
					continue
				case unix.EINTR:
					continue
				case unix.EAGAIN:
				default:
					rerr = e
					return true
				}
				pfd := unix.PollFd{Fd: int32(fd), Events: unix.POLLIN}
				ts := unix.Timespec{Nsec: rawWait}
				r, _, _ := syscall.RawSyscall6(unix.SYS_PPOLL, uintptr(unsafe.Pointer(&pfd)), 1, uintptr(unsafe.Pointer(&ts)), 0, 0, 0)
				if r == 0 {
					return false // nothing came: park on the netpoller
				}
			}
			return true
		})
		if err != nil {
			return err
		}
	}
	return rerr
}

const rawWait = 1_000_000 // ns
