// Package atomicfile writes ferry's state files so that a crash at any
// instant leaves either the old content or the new one, never a torn or
// empty file: write a temporary file in the same directory, fsync it,
// rename it over the target, fsync the directory. Every manifest, bitmap,
// marker and record an agent keeps goes through WriteFile.
package atomicfile

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// CrashPoint, if set (tests only), is called at each named step of
// WriteFile; a test can kill the process there ("before-rename",
// "after-rename") to prove that readers never see a partial file.
var CrashPoint func(name, path string)

func crash(name, path string) {
	if CrashPoint != nil {
		CrashPoint(name, path)
	}
}

// WriteFile replaces path with data, durably: when it returns nil the new
// content survives a crash or power loss. On error the old content (if
// any) is intact; a leftover temporary file is removed.
func WriteFile(path string, data []byte, perm os.FileMode) (err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			os.Remove(tmp)
		}
	}()
	if _, err = f.Write(data); err == nil {
		err = f.Chmod(perm)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	crash("before-rename", path)
	if err = os.Rename(tmp, path); err != nil {
		return fmt.Errorf("install %s: %w", path, err)
	}
	crash("after-rename", path)
	if err = syncDir(dir); err != nil {
		return fmt.Errorf("sync directory of %s: %w", path, err)
	}
	return nil
}

// WriteJSON is WriteFile of v encoded as JSON.
func WriteJSON(path string, v any, perm os.FileMode) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode %s: %w", path, err)
	}
	return WriteFile(path, b, perm)
}

// SyncDir makes the entries of dir durable (after a rename into it).
func SyncDir(dir string) error { return syncDir(dir) }

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// RemovedPrefix starts the name of a directory RemoveDir is deleting:
// whoever lists the parent skips (and may finish deleting) such entries.
const RemovedPrefix = ".removing-"

// RemoveDir deletes a directory tree so that a crash never leaves it half
// there under its own name: it is renamed to a hidden sibling first
// (RemovedPrefix), the rename made durable, then deleted. A crash after
// the rename leaves only the hidden sibling, which the next RemoveDir of
// the same name, or the owner's start-up, deletes. A missing dir is fine.
func RemoveDir(dir string) error {
	parent := filepath.Dir(dir)
	gone := filepath.Join(parent, RemovedPrefix+filepath.Base(dir))
	if err := os.RemoveAll(gone); err != nil {
		return err
	}
	if err := os.Rename(dir, gone); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	if err := syncDir(parent); err != nil {
		return err
	}
	crash("remove-renamed", dir)
	return os.RemoveAll(gone)
}
