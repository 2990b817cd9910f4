package bandwidth

import (
	"syscall"

	"golang.org/x/sys/unix"
)

// deliveryRate returns the kernel's latest delivery-rate sample of a TCP
// socket, in bytes per second (tcp_info.tcpi_delivery_rate, Linux 4.9+).
func deliveryRate(sc syscall.Conn) (float64, bool) {
	rc, err := sc.SyscallConn()
	if err != nil {
		return 0, false
	}
	var info *unix.TCPInfo
	var ierr error
	if err := rc.Control(func(fd uintptr) {
		info, ierr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
	}); err != nil || ierr != nil || info.Delivery_rate == 0 {
		return 0, false
	}
	return float64(info.Delivery_rate), true
}
