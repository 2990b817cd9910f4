package qemu

import (
	"context"
	"testing"
	"time"
)

func TestDetectAccel(t *testing.T) {
	kernel, initrd := guestFiles(t)
	start := time.Now()
	got := DetectAccel(context.Background(), Boot{Kernel: kernel, Initrd: initrd})
	if got != "kvm" && got != "tcg" {
		t.Fatalf("DetectAccel = %q", got)
	}
	t.Logf("accelerator %s, detected in %v", got, time.Since(start).Round(time.Millisecond))
	if again := DetectAccel(context.Background(), Boot{Kernel: kernel, Initrd: initrd}); again != got {
		t.Fatalf("second call %q, want cached %q", again, got)
	}
}
