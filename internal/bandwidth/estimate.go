package bandwidth

import (
	"sync"
	"syscall"
	"time"
)

// LinkRate estimates the payload bytes per second the connection can
// carry now: the lower of the caps in force (less their header overhead)
// and the bottleneck rate the kernel measures TCP delivering at. False
// while neither is known (no cap, and no data acknowledged yet, or a
// connection that is not TCP on Linux). Safe for concurrent use; cheap
// enough to call per frame (the kernel is asked at most every
// sampleEvery).
func (c *Conn) LinkRate() (float64, bool) {
	rate, ok := c.est.rate(c.Conn)
	for _, l := range c.limiters {
		if bps := l.Rate(); bps > 0 {
			r := float64(bps) / 8 * SegmentPayload / (SegmentPayload + Overhead)
			if !ok || r < rate {
				rate, ok = r, true
			}
		}
	}
	return rate, ok
}

// estimator keeps the highest delivery rate TCP measured over the last
// window. The kernel's delivery rate is one sample per acknowledgement,
// of what the last flight achieved: when the sender had less to send
// than the path takes (app-limited) it is the sender's rate, a lower
// bound; when it had a full window, it is the bottleneck's rate. A
// windowed maximum (as BBR keeps) therefore settles on the bottleneck
// rate, whether the stream keeps the link busy or sends in bursts, and
// forgets a faster past (a link rerouted onto a slower path) within a
// window.
type estimator struct {
	mu      sync.Mutex
	now     func() time.Time
	samples [window]float64
	next    int
	last    time.Time
}

const (
	sampleEvery = 100 * time.Millisecond
	window      = 20 // samples: 2 s
)

func (e *estimator) rate(c any) (float64, bool) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return 0, false
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	now := time.Now
	if e.now != nil {
		now = e.now
	}
	if t := now(); t.Sub(e.last) >= sampleEvery {
		e.last = t
		if r, ok := deliveryRate(sc); ok {
			e.samples[e.next%window] = r
			e.next++
		}
	}
	best := 0.0
	for _, s := range e.samples {
		best = max(best, s)
	}
	return best, best > 0
}
