//go:build !linux

package bandwidth

import "syscall"

// deliveryRate: only Linux reports TCP's delivery rate.
func deliveryRate(syscall.Conn) (float64, bool) { return 0, false }
