package nbd_test

import (
	"testing"

	"github.com/ferry-dr/ferry/internal/nbd"
	"github.com/ferry-dr/ferry/internal/nbd/nbdtest"
)

func TestFileDeviceConformance(t *testing.T) {
	nbdtest.TestDevice(t, 1<<20, func(t *testing.T) nbd.Device {
		d, err := nbd.OpenFile(t.TempDir()+"/img", 1<<20, false)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Close() })
		return d
	})
}
