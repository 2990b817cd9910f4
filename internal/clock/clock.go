// Package clock gives ferry's daemons a wall clock that does not jump.
//
// Recovery points, RPO and retention are all wall-clock times, and the
// system clock can step: an NTP correction, a VM resumed after a pause, an
// operator's date -s. Stepped back an hour, a journal would stamp new
// writes before old ones (points out of order); stepped forward, RPO would
// read an hour and retention would drop an hour of points at once. Steady
// reads the wall clock once and then advances with the monotonic clock,
// which steps never move; the journal also never stamps an entry before
// the one it follows (journal.Options.Now), which covers a restart while
// the clock is behind. A deliberate correction takes effect at the next
// restart of the daemon.
package clock

import (
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Steady returns a clock that reads wall once, now, and from then on adds
// the monotonic time elapsed. Safe for concurrent use.
func Steady(wall func() time.Time) func() time.Time {
	start := time.Now()       // its monotonic reading
	anchor := wall().Round(0) // wall only: Add below keeps it so
	return func() time.Time {
		return anchor.Add(time.Since(start))
	}
}

// FaultEnv names a file whose content, a signed number of seconds, System
// adds to the wall clock it reads: a fault injection for tests that step
// one daemon's clock (the torture suite's clock-jump scenario). Unset in
// production.
const FaultEnv = "FERRY_FAULT_CLOCK"

// System returns the system's wall clock (with FaultEnv's offset when that
// is set). Steady(System()) is a daemon's default clock.
func System() func() time.Time {
	path := os.Getenv(FaultEnv)
	if path == "" {
		return time.Now
	}
	var mu sync.Mutex
	return func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		var off time.Duration
		if b, err := os.ReadFile(path); err == nil {
			if s, err := strconv.ParseFloat(strings.TrimSpace(string(b)), 64); err == nil {
				off = time.Duration(s * float64(time.Second))
			}
		}
		return time.Now().Round(0).Add(off)
	}
}
