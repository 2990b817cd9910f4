package qemu

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestDetectAccel(t *testing.T) {
	kernel, initrd := guestFiles(t)
	old := accelCacheDir
	accelCacheDir = t.TempDir() // a probe, not a verdict from an earlier run
	t.Cleanup(func() { accelCacheDir = old })
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

// TestAccelCacheFile: a verdict kept in the cache file is used without a
// probe, and a damaged one is not. The kernel is not a kernel: a probe of
// it could never answer "kvm", so "kvm" can only come from the file.
func TestAccelCacheFile(t *testing.T) {
	t.Setenv("FERRY_ACCEL", "")
	old := accelCacheDir
	accelCacheDir = t.TempDir()
	t.Cleanup(func() { accelCacheDir = old })
	kernel := filepath.Join(t.TempDir(), "vmlinuz")
	if err := os.WriteFile(kernel, []byte("not a kernel"), 0o600); err != nil {
		t.Fatal(err)
	}
	boot := Boot{Kernel: kernel}
	key, ok := accelKey(boot)
	if !ok {
		t.Fatal("accelKey: no key for an existing kernel")
	}
	if _, ok := readAccelCache(key); ok {
		t.Fatal("a verdict before any was written")
	}
	writeAccelCache(key, "kvm")
	fi, err := os.Stat(accelCacheDir)
	if err != nil || fi.Mode().Perm()&0o077 != 0 {
		t.Fatalf("cache directory %v, err %v: want private to its user", fi.Mode(), err)
	}
	if got := DetectAccel(context.Background(), boot); got != "kvm" {
		t.Fatalf("DetectAccel = %q, want the cached kvm", got)
	}

	// Another kernel file is another key.
	if err := os.WriteFile(kernel, []byte("another kernel, longer"), 0o600); err != nil {
		t.Fatal(err)
	}
	if key2, _ := accelKey(boot); key2 == key {
		t.Fatal("the key did not change with the kernel")
	}

	if err := os.WriteFile(filepath.Join(accelCacheDir, key), []byte("maybe\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if got, ok := readAccelCache(key); ok {
		t.Fatalf("a damaged verdict was read as %q", got)
	}

	// A verdict others may write is not trusted.
	writeAccelCache(key, "kvm")
	if err := os.Chmod(filepath.Join(accelCacheDir, key), 0o622); err != nil {
		t.Fatal(err)
	}
	if got, ok := readAccelCache(key); ok {
		t.Fatalf("a group-writable verdict was read as %q", got)
	}
}
