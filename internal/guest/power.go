package guest

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// keyPower is KEY_POWER in linux/input-event-codes.h; evKey is EV_KEY.
const (
	keyPower = 116
	evKey    = 1
)

// RunPowerWatch waits for the ACPI power button (QEMU's system_powerdown)
// on every input device and then asks PID 1 (the guest's init script) to
// shut down cleanly with SIGTERM. The test guest runs no acpid or systemd,
// so without this the power button would do nothing.
func RunPowerWatch(ctx context.Context) error {
	devs, _ := filepath.Glob("/dev/input/event*")
	pressed := make(chan struct{}, 1)
	for _, d := range devs {
		f, err := os.Open(d)
		if err != nil {
			continue
		}
		go func() {
			defer f.Close()
			ev := make([]byte, 24) // struct input_event on 64-bit
			for {
				if _, err := f.Read(ev); err != nil {
					return
				}
				typ := binary.LittleEndian.Uint16(ev[16:])
				code := binary.LittleEndian.Uint16(ev[18:])
				val := int32(binary.LittleEndian.Uint32(ev[20:]))
				if typ == evKey && code == keyPower && val == 1 {
					select {
					case pressed <- struct{}{}:
					default:
					}
				}
			}
		}()
	}
	select {
	case <-ctx.Done():
		return nil
	case <-pressed:
		return unix.Kill(1, unix.SIGTERM)
	}
}

// Probe reports whether the guest can open a TCP connection to each
// address (used to check that an isolated network really is).
func Probe(addrs []string) error {
	for _, a := range addrs {
		c, err := net.DialTimeout("tcp", a, 3*time.Second)
		if err != nil {
			fmt.Printf("ferry-guest: probe blocked %s\n", a)
			continue
		}
		c.Close()
		fmt.Printf("ferry-guest: probe reached %s\n", a)
	}
	return nil
}
