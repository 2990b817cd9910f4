package faultnet

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Link is a point-to-point IP link between two TUN devices that delays
// and drops packets in user space, the way a WAN does: this kernel has no
// netem, and a TCP proxy cannot lose packets. Move each device into its
// own network namespace (ip link set NAME netns NS) and give both
// addresses of one subnet; shape the rate with tc tbf on each device.
// Everything a side's kernel sends into its device comes out of the other
// side's device after Delay, unless dropped (with probability Loss).
type Link struct {
	Delay time.Duration // one way
	Loss  float64       // 0..1, per packet, each way

	a, b *os.File
	// Packets and bytes forwarded and dropped, both ways.
	Forwarded, Dropped, Bytes atomic.Int64
}

// NewLink creates the TUN devices nameA and nameB (down, no address).
func NewLink(nameA, nameB string, delay time.Duration, loss float64) (*Link, error) {
	if loss < 0 || loss >= 1 {
		return nil, fmt.Errorf("faultnet: loss %v: want 0 <= loss < 1", loss)
	}
	a, err := openTUN(nameA)
	if err != nil {
		return nil, err
	}
	b, err := openTUN(nameB)
	if err != nil {
		a.Close()
		return nil, err
	}
	return &Link{Delay: delay, Loss: loss, a: a, b: b}, nil
}

func openTUN(name string) (*os.File, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("faultnet: open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("faultnet: device name %q: %w", name, err)
	}
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("faultnet: create TUN device %q: %w", name, err)
	}
	return os.NewFile(uintptr(fd), "/dev/net/tun:"+name), nil
}

// Run forwards packets both ways until ctx ends, then closes the devices.
func (l *Link) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	wg.Go(func() { errs <- l.pump(ctx, l.a, l.b) })
	wg.Go(func() { errs <- l.pump(ctx, l.b, l.a) })
	<-ctx.Done()
	l.a.Close()
	l.b.Close()
	wg.Wait()
	return nil
}

type packet struct {
	due  time.Time
	data []byte
}

// pump reads packets from src and writes each to dst once its delay has
// passed. The delay is constant, so the queue is in order.
func (l *Link) pump(ctx context.Context, src, dst *os.File) error {
	q := make(chan packet, 65536)
	go func() {
		for p := range q {
			if d := time.Until(p.due); d > 0 {
				time.Sleep(d)
			}
			dst.Write(p.data)
		}
	}()
	defer close(q)
	buf := make([]byte, 65536)
	for {
		n, err := src.Read(buf)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("faultnet: read TUN: %w", err)
		}
		if l.Loss > 0 && rand.Float64() < l.Loss {
			l.Dropped.Add(1)
			continue
		}
		p := packet{due: time.Now().Add(l.Delay), data: append([]byte(nil), buf[:n]...)}
		select {
		case q <- p:
			l.Forwarded.Add(1)
			l.Bytes.Add(int64(n))
		default:
			l.Dropped.Add(1) // the path's buffer is full
		}
	}
}
