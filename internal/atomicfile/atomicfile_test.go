package atomicfile

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestWriteFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "state.json")
	for _, want := range []string{"first", "second, longer", ""} {
		if err := WriteFile(path, []byte(want), 0o600); err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != want {
			t.Errorf("got %q, want %q", got, want)
		}
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", fi.Mode().Perm())
	}
	assertNoTemp(t, dir)
}

// A crash before the rename leaves the old content whole.
func TestWriteFileCrashBeforeRename(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "fenced")
	if err := WriteFile(path, []byte("7"), 0o600); err != nil {
		t.Fatal(err)
	}
	type crashed struct{}
	CrashPoint = func(name, p string) {
		if name == "before-rename" {
			panic(crashed{})
		}
	}
	t.Cleanup(func() { CrashPoint = nil })
	func() {
		defer func() {
			if r := recover(); r == nil {
				t.Fatal("the crash point was not reached")
			}
		}()
		WriteFile(path, []byte("8"), 0o600)
	}()
	got, err := os.ReadFile(path)
	if err != nil || string(got) != "7" {
		t.Errorf("after a crash before the rename: %q, %v; want the old content %q", got, err, "7")
	}
}

func TestWriteFileMissingDir(t *testing.T) {
	err := WriteFile(filepath.Join(t.TempDir(), "nope", "x"), []byte("x"), 0o600)
	if err == nil {
		t.Fatal("want an error for a missing directory")
	}
}

func assertNoTemp(t *testing.T, dir string) {
	t.Helper()
	es, _ := os.ReadDir(dir)
	for _, e := range es {
		if e.Name() != "state.json" {
			t.Errorf("left behind %s", e.Name())
		}
	}
}

// TestRemoveDir: a crash after the rename leaves no directory under its
// own name, only the hidden sibling, which the next RemoveDir clears.
func TestRemoveDir(t *testing.T) {
	parent := t.TempDir()
	dir := filepath.Join(parent, "web")
	mk := func() {
		t.Helper()
		if err := os.MkdirAll(filepath.Join(dir, "images"), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "images", "vda.img"), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	mk()
	type crashed struct{}
	CrashPoint = func(name, _ string) {
		if name == "remove-renamed" {
			panic(crashed{})
		}
	}
	func() {
		defer func() { recover() }()
		RemoveDir(dir)
	}()
	CrashPoint = nil
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("after a crash mid-removal the directory is still there under its name: %v", err)
	}
	if _, err := os.Stat(filepath.Join(parent, RemovedPrefix+"web")); err != nil {
		t.Fatalf("no hidden sibling after the crash: %v", err)
	}
	mk() // a new one of the same name, then removed for good
	if err := RemoveDir(dir); err != nil {
		t.Fatal(err)
	}
	if entries, _ := os.ReadDir(parent); len(entries) != 0 {
		t.Fatalf("left behind: %v", entries)
	}
	if err := RemoveDir(dir); err != nil {
		t.Fatalf("removing a missing directory: %v", err)
	}
}
