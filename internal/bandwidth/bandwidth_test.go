package bandwidth

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
)

func TestParseRate(t *testing.T) {
	tests := []struct {
		in   string
		want int64
		err  bool
	}{
		{"50Mbit", 50e6, false},
		{"1.5Gbit", 1.5e9, false},
		{"800kbit", 800e3, false},
		{"100M", 100e6, false},
		{"12MB", 96e6, false},
		{"20mbps", 20e6, false},
		{"off", 0, false},
		{"0", 0, false},
		{"", 0, true},
		{"-5Mbit", 0, true},
		{"fast", 0, true},
		{"1e30Gbit", 0, true},
	}
	for _, tt := range tests {
		got, err := ParseRate(tt.in)
		if (err != nil) != tt.err || got != tt.want {
			t.Errorf("ParseRate(%q) = %d, %v; want %d, error %v", tt.in, got, err, tt.want, tt.err)
		}
		if err != nil && !errors.Is(err, ErrInvalid) {
			t.Errorf("ParseRate(%q): %v is not ErrInvalid", tt.in, err)
		}
		if err == nil {
			if back, _ := ParseRate(FormatRate(got)); back != got {
				t.Errorf("FormatRate(%d) = %q reads back as %d", got, FormatRate(got), back)
			}
		}
	}
}

func TestSchedule(t *testing.T) {
	lim := api.BandwidthLimit{BitsPerSecond: 100e6, Schedule: []api.BandwidthWindow{
		{Days: "mon-fri", From: "08:00", To: "18:00", BitsPerSecond: 20e6},
		{Days: "sat,sun", From: "22:00", To: "06:00", BitsPerSecond: 0},
	}}
	if err := Check(lim); err != nil {
		t.Fatal(err)
	}
	at := func(s string) time.Time {
		tm, err := time.Parse("Mon 2006-01-02 15:04", s)
		if err != nil {
			t.Fatal(err)
		}
		return tm
	}
	tests := []struct {
		when string
		want int64
	}{
		{"Wed 2026-12-02 09:30", 20e6},
		{"Wed 2026-12-02 18:00", 100e6},
		{"Wed 2026-12-02 07:59", 100e6},
		{"Sat 2026-12-05 09:30", 100e6},
		{"Sat 2026-12-05 23:00", 0},
		{"Sun 2026-12-06 05:59", 0},
		{"Mon 2026-12-07 05:59", 100e6},
	}
	for _, tt := range tests {
		if got := RateAt(lim, at(tt.when)); got != tt.want {
			t.Errorf("RateAt(%s) = %d, want %d", tt.when, got, tt.want)
		}
	}
	bad := []api.BandwidthLimit{
		{BitsPerSecond: -1},
		{TimeZone: "Mars/Olympus"},
		{Schedule: []api.BandwidthWindow{{Days: "someday", From: "08:00", To: "09:00"}}},
		{Schedule: []api.BandwidthWindow{{From: "8", To: "09:00"}}},
		{Schedule: []api.BandwidthWindow{{From: "09:00", To: "09:00"}}},
		{Schedule: []api.BandwidthWindow{{From: "09:00", To: "25:00"}}},
	}
	for _, b := range bad {
		if err := Check(b); !errors.Is(err, ErrInvalid) {
			t.Errorf("Check(%+v) = %v, want ErrInvalid", b, err)
		}
	}
}

// sink is a connection that swallows what is written to it.
func sink(t *testing.T) net.Conn {
	t.Helper()
	a, b := net.Pipe()
	go io.Copy(io.Discard, b)
	t.Cleanup(func() { a.Close(); b.Close() })
	return a
}

// TestCapHonoured: writers sharing a limiter get the cap together,
// within 5 %, whatever their write sizes.
func TestCapHonoured(t *testing.T) {
	l := NewLimiter(nil)
	const rate = 40e6 // bits/s: 5 MB/s
	if err := l.Set(api.BandwidthLimit{BitsPerSecond: rate}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	start := time.Now()
	var wg sync.WaitGroup
	for _, size := range []int{4 << 10, 1 << 20, 64 << 10} {
		c := NewConn(ctx, sink(t), nil, l)
		buf := make([]byte, size)
		wg.Go(func() {
			for ctx.Err() == nil {
				c.Write(buf)
			}
		})
	}
	wg.Wait()
	got := float64(l.Total()) * 8 / time.Since(start).Seconds()
	if got > rate*1.05 || got < rate*0.9 {
		t.Errorf("%.1f Mbit/s through a %.0f Mbit/s cap", got/1e6, rate/1e6)
	}
}

// TestStreamsFirst: a bulk writer (an initial copy) gets only what
// stream writers leave.
func TestStreamsFirst(t *testing.T) {
	l := NewLimiter(nil)
	if err := l.Set(api.BandwidthLimit{BitsPerSecond: 16e6}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	var streamed, bulk int64
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, cl := range []Class{Stream, Bulk} {
		c := NewConn(ctx, sink(t), func() Class { return cl }, l)
		buf := make([]byte, 256<<10)
		wg.Go(func() {
			for ctx.Err() == nil {
				n, _ := c.Write(buf)
				mu.Lock()
				if cl == Stream {
					streamed += int64(n)
				} else {
					bulk += int64(n)
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if bulk*10 > streamed {
		t.Errorf("bulk sent %d bytes beside a saturating stream's %d: want under a tenth", bulk, streamed)
	}
}

// TestNoCap: without a limit nothing waits, and a cap set later applies
// to the next writes.
func TestNoCap(t *testing.T) {
	l := NewLimiter(nil)
	c := NewConn(context.Background(), sink(t), nil, l)
	buf := make([]byte, 8<<20)
	start := time.Now()
	if _, err := c.Write(buf); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("8 MiB without a cap took %v", d)
	}
	if got := l.Rate(); got != 0 {
		t.Errorf("rate %d, want 0", got)
	}
	l.Set(api.BandwidthLimit{BitsPerSecond: 8e6})
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	c = NewConn(ctx, sink(t), nil, l)
	if _, err := c.Write(buf); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("8 MiB through a 1 MB/s cap in 300 ms: %v, want the deadline", err)
	}
}

// TestLinkRate: over loopback TCP the estimate is the kernel's delivery
// rate (far above any WAN's); a cap bounds it; a connection that is not
// TCP has none until a cap gives one.
func TestLinkRate(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(io.Discard, c)
	}()
	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	c := NewConn(context.Background(), raw, nil)
	buf := make([]byte, 1<<20)
	deadline := time.Now().Add(10 * time.Second)
	var rate float64
	for ok := false; !ok; rate, ok = c.LinkRate() {
		if time.Now().After(deadline) {
			t.Fatal("no delivery rate after 10 s of writes")
		}
		if _, err := c.Write(buf); err != nil {
			t.Fatal(err)
		}
	}
	if rate < 50e6 {
		t.Errorf("loopback estimated at %.0f B/s, want well over a WAN's", rate)
	}

	l := NewLimiter(nil)
	if err := l.Set(api.BandwidthLimit{BitsPerSecond: 8_000_000}); err != nil {
		t.Fatal(err)
	}
	capped := NewConn(context.Background(), raw, nil, l)
	capped.Write(buf[:4096])
	if got, ok := capped.LinkRate(); !ok || got > 1e6 || got < 0.9e6 {
		t.Errorf("capped at 8 Mbit/s: estimate %.0f B/s %v, want the cap's payload share of 1 MB/s", got, ok)
	}

	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if _, ok := NewConn(context.Background(), a, nil).LinkRate(); ok {
		t.Error("a pipe has a link rate")
	}
	if got, ok := NewConn(context.Background(), a, nil, l).LinkRate(); !ok || got > 1e6 {
		t.Errorf("a capped pipe: %.0f %v, want the cap", got, ok)
	}
}
