// Package bandwidth caps what replication sends over the link between
// sites: token-bucket limiters, one per site pair and one per
// protection, that every stream's connection writes through, with a
// schedule (a lower cap in business hours) and two priorities, so that
// streaming new writes is not starved by another VM's initial copy.
//
// The cap counts bytes on the wire: what a connection writes into TCP
// (TLS records included) plus Overhead per segment of TCP/IP and
// Ethernet headers, so a cap of 50 Mbit/s is what a link's interface
// counters show.
package bandwidth

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
)

// ErrInvalid: a malformed rate or schedule.
var ErrInvalid = errors.New("bandwidth: invalid")

// Header overhead the cap counts per TCP segment: Ethernet (14), IPv4
// (20), TCP with timestamps (32), for segments of SegmentPayload bytes.
const (
	Overhead       = 66
	SegmentPayload = 1448
)

// WireCost is what n bytes written into a TCP connection cost on the wire.
func WireCost(n int) int64 {
	return int64(n) + int64((n+SegmentPayload-1)/SegmentPayload)*Overhead
}

// Class is a writer's priority.
type Class int

const (
	// Stream: new writes (a protection's journal). Served first.
	Stream Class = iota
	// Bulk: initial copies and delta copies. They wait while a Stream
	// writer waits.
	Bulk
)

// Limiter is a token bucket in bytes per second, shared by every
// connection that writes through it. The zero rate is no limit. Safe for
// concurrent use.
type Limiter struct {
	mu       sync.Mutex
	sched    api.BandwidthLimit
	rate     float64 // bytes per second now; 0: none
	burst    float64
	tokens   float64
	last     time.Time
	checked  time.Time // when the schedule was last looked at
	streams  int       // Stream writers waiting
	now      func() time.Time
	location *time.Location
	// Total counts the wire bytes that went through.
	total int64
}

// NewLimiter returns a limiter with no limit. now may be nil (time.Now).
func NewLimiter(now func() time.Time) *Limiter {
	if now == nil {
		now = time.Now
	}
	return &Limiter{now: now, location: time.UTC}
}

// Set replaces the limit and its schedule; it applies to writes that wait
// now. Set validates the limit first (ErrInvalid).
func (l *Limiter) Set(lim api.BandwidthLimit) error {
	if err := Check(lim); err != nil {
		return err
	}
	loc := time.UTC
	if lim.TimeZone != "" {
		loc, _ = time.LoadLocation(lim.TimeZone) // Check loaded it
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.sched, l.location = lim, loc
	l.checked = time.Time{}
	l.applyLocked(l.now())
	return nil
}

// Limit returns the limit as set.
func (l *Limiter) Limit() api.BandwidthLimit {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.sched
}

// Rate returns the cap in force now, in bits per second (0: none).
func (l *Limiter) Rate() int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.applyLocked(l.now())
	return int64(l.rate * 8)
}

// Total returns the wire bytes that went through the limiter.
func (l *Limiter) Total() int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.total
}

// applyLocked sets the rate the schedule gives at now.
func (l *Limiter) applyLocked(now time.Time) {
	if !l.checked.IsZero() && now.Sub(l.checked) < time.Second && now.Minute() == l.checked.Minute() {
		return
	}
	l.checked = now
	rate := float64(RateAt(l.sched, now.In(l.location))) / 8
	if rate == l.rate {
		return
	}
	l.rate = rate
	// The burst bounds how far a 10 s window can exceed the cap: 20 ms
	// of the rate, at least 16 KiB so small rates still move whole
	// records.
	l.burst = max(rate/50, 16<<10)
	l.tokens = min(l.tokens, l.burst)
	l.last = now
}

// RateAt returns the cap, in bits per second, that lim gives at t (in
// lim's time zone): the first schedule rule that covers t, else the
// default. 0 means no cap.
func RateAt(lim api.BandwidthLimit, t time.Time) int64 {
	wd := int(t.Weekday())
	mins := t.Hour()*60 + t.Minute()
	for _, r := range lim.Schedule {
		days, from, to, err := parseWindow(r.Days, r.From, r.To)
		if err != nil || days&(1<<wd) == 0 {
			continue
		}
		if from <= to && mins >= from && mins < to || from > to && (mins >= from || mins < to) {
			return r.BitsPerSecond
		}
	}
	return lim.BitsPerSecond
}

// Wait blocks until n bytes (their wire cost) may be written, or ctx
// ends. A Bulk writer also waits while a Stream writer waits.
func (l *Limiter) Wait(ctx context.Context, n int, class Class) error {
	cost := float64(WireCost(n))
	l.mu.Lock()
	if class == Stream {
		l.streams++
		defer func() { l.mu.Lock(); l.streams--; l.mu.Unlock() }()
	}
	for {
		now := l.now()
		l.applyLocked(now)
		if l.rate == 0 {
			l.total += int64(cost)
			l.mu.Unlock()
			return nil
		}
		l.tokens = min(l.burst, l.tokens+now.Sub(l.last).Seconds()*l.rate)
		l.last = now
		var wait time.Duration
		switch {
		case class == Bulk && l.streams > 0:
			wait = 5 * time.Millisecond
		case l.tokens >= min(cost, l.burst):
			// A write larger than the burst may take the bucket into
			// debt; the writes after it wait that debt off.
			l.tokens -= cost
			l.total += int64(cost)
			l.mu.Unlock()
			return nil
		default:
			wait = time.Duration((min(cost, l.burst) - l.tokens) / l.rate * float64(time.Second))
		}
		l.mu.Unlock()
		t := time.NewTimer(max(wait, 100*time.Microsecond))
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
		l.mu.Lock()
	}
}

// Conn is a connection whose writes go through limiters (a protection's
// and its site pair's), in pieces of at most chunk bytes so that streams
// interleave. Reads are not limited.
type Conn struct {
	net.Conn
	ctx      context.Context
	limiters []*Limiter
	class    func() Class
	est      estimator
}

// chunk is the most one Write sends per wait: small enough that a
// stream's writes and a copy's interleave finely.
const chunk = 16 << 10

// NewConn wraps c. class, called at each write, says the writer's
// priority (nil: Stream). ctx ends the waits (the connection's life).
func NewConn(ctx context.Context, c net.Conn, class func() Class, limiters ...*Limiter) *Conn {
	var ls []*Limiter
	for _, l := range limiters {
		if l != nil {
			ls = append(ls, l)
		}
	}
	if class == nil {
		class = func() Class { return Stream }
	}
	return &Conn{Conn: c, ctx: ctx, limiters: ls, class: class}
}

// Write writes p through the limiters.
func (c *Conn) Write(p []byte) (int, error) {
	written := 0
	for len(p) > 0 {
		n := min(len(p), chunk)
		cl := c.class()
		for _, l := range c.limiters {
			if err := l.Wait(c.ctx, n, cl); err != nil {
				return written, err
			}
		}
		m, err := c.Conn.Write(p[:n])
		written += m
		if err != nil {
			return written, err
		}
		p = p[n:]
	}
	return written, nil
}

// Check validates a limit: rates not negative, windows well formed, the
// time zone known.
func Check(lim api.BandwidthLimit) error {
	if lim.BitsPerSecond < 0 {
		return fmt.Errorf("%w: negative rate %d", ErrInvalid, lim.BitsPerSecond)
	}
	if lim.TimeZone != "" {
		if _, err := time.LoadLocation(lim.TimeZone); err != nil {
			return fmt.Errorf("%w: time zone %q: %v", ErrInvalid, lim.TimeZone, err)
		}
	}
	for i, r := range lim.Schedule {
		if r.BitsPerSecond < 0 {
			return fmt.Errorf("%w: schedule rule %d: negative rate", ErrInvalid, i+1)
		}
		if _, _, _, err := parseWindow(r.Days, r.From, r.To); err != nil {
			return fmt.Errorf("%w: schedule rule %d: %v", ErrInvalid, i+1, err)
		}
	}
	return nil
}

var dayNames = []string{"sun", "mon", "tue", "wed", "thu", "fri", "sat"}

// parseWindow parses days ("mon-fri", "sat,sun", "" for every day) and
// times "HH:MM" into a weekday bitmask (bit = time.Weekday) and minutes
// of the day. to may be before from (a window across midnight).
func parseWindow(days, from, to string) (mask int, f, t int, err error) {
	if days == "" || days == "*" {
		mask = 0x7f
	}
	for part := range strings.SplitSeq(days, ",") {
		if part == "" || part == "*" {
			continue
		}
		a, b, isRange := strings.Cut(part, "-")
		i, j := dayIndex(a), dayIndex(b)
		if !isRange {
			j = i
		}
		if i < 0 || j < 0 {
			return 0, 0, 0, fmt.Errorf("days %q: want e.g. mon-fri or sat,sun", days)
		}
		for d := i; ; d = (d + 1) % 7 {
			mask |= 1 << d
			if d == j {
				break
			}
		}
	}
	if f, err = parseClock(from); err != nil {
		return 0, 0, 0, err
	}
	if t, err = parseClock(to); err != nil {
		return 0, 0, 0, err
	}
	if f == t {
		return 0, 0, 0, fmt.Errorf("window %s-%s is empty", from, to)
	}
	return mask, f, t, nil
}

func dayIndex(s string) int {
	for i, d := range dayNames {
		if strings.EqualFold(s, d) {
			return i
		}
	}
	return -1
}

func parseClock(s string) (int, error) {
	h, m, ok := strings.Cut(s, ":")
	hh, err1 := strconv.Atoi(h)
	mm, err2 := strconv.Atoi(m)
	if !ok || err1 != nil || err2 != nil || hh < 0 || hh > 24 || mm < 0 || mm > 59 || hh == 24 && mm != 0 {
		return 0, fmt.Errorf("time %q: want HH:MM", s)
	}
	return hh*60 + mm, nil
}

// ParseRate parses a rate in bits per second: "50Mbit", "50Mbps",
// "1.5Gbit", "800kbit", "100M" (bits), "12MB" (bytes: x8), "0", "off" or
// "unlimited" (no cap).
func ParseRate(s string) (int64, error) {
	t := strings.TrimSpace(strings.ToLower(s))
	t = strings.TrimSuffix(t, "/s")
	switch t {
	case "0", "off", "none", "unlimited":
		return 0, nil
	}
	mult := 1.0
	switch {
	case strings.HasSuffix(t, "bps"): // bits, as networks count
		t = strings.TrimSuffix(t, "bps")
	case strings.HasSuffix(t, "bits"):
		t = strings.TrimSuffix(t, "bits")
	case strings.HasSuffix(t, "bit"):
		t = strings.TrimSuffix(t, "bit")
	case strings.HasSuffix(t, "b"):
		mult = 8 // bytes
		t = strings.TrimSuffix(t, "b")
	}
	for _, u := range []struct {
		suffix string
		f      float64
	}{{"k", 1e3}, {"m", 1e6}, {"g", 1e9}} {
		if strings.HasSuffix(t, u.suffix) {
			mult *= u.f
			t = strings.TrimSuffix(t, u.suffix)
			break
		}
	}
	v, err := strconv.ParseFloat(t, 64)
	if err != nil || v < 0 || math.IsInf(v, 0) || math.IsNaN(v) || v*mult > 1e15 {
		return 0, fmt.Errorf("%w: rate %q: want e.g. 50Mbit, 1Gbit, 20MB or off", ErrInvalid, s)
	}
	return int64(v * mult), nil
}

// FormatRate prints bits per second as ParseRate reads it.
func FormatRate(bps int64) string {
	switch {
	case bps == 0:
		return "unlimited"
	case bps%1e9 == 0:
		return fmt.Sprintf("%dGbit", bps/1e9)
	case bps >= 1e6:
		return strconv.FormatFloat(float64(bps)/1e6, 'f', -1, 64) + "Mbit"
	case bps >= 1e3:
		return strconv.FormatFloat(float64(bps)/1e3, 'f', -1, 64) + "kbit"
	}
	return fmt.Sprintf("%dbit", bps)
}
