package clock

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestSteadyIgnoresSteps steps the wall clock an hour forward and back:
// System follows it, Steady does not move with it.
func TestSteadyIgnoresSteps(t *testing.T) {
	f := filepath.Join(t.TempDir(), "offset")
	t.Setenv(FaultEnv, f)
	wall := System()
	now := Steady(wall)
	before := now()
	for _, off := range []string{"3600", "-3600", "0"} {
		if err := os.WriteFile(f, []byte(off), 0o600); err != nil {
			t.Fatal(err)
		}
		w, s := wall(), now()
		if d := w.Sub(time.Now()); off == "3600" && d < 59*time.Minute || off == "-3600" && d > -59*time.Minute {
			t.Fatalf("offset %s: the faulted wall clock is %v from the real one", off, d)
		}
		if s.Before(before) {
			t.Fatalf("offset %s: the steady clock went back from %v to %v", off, before, s)
		}
		if d := s.Sub(time.Now()); d > time.Second || d < -time.Second {
			t.Fatalf("offset %s: the steady clock is %v from the real one", off, d)
		}
		before = s
	}
}

func TestSystemWithoutFault(t *testing.T) {
	t.Setenv(FaultEnv, "")
	if d := time.Since(System()()); d < 0 || d > time.Second {
		t.Fatalf("System is %v from time.Now", d)
	}
}
