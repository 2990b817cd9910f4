package nbd

import (
	"context"
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// FileDevice serves a plain file (no journal): read-only views and tests.
type FileDevice struct {
	f  *os.File
	ro bool
}

var _ Device = (*FileDevice)(nil)

// OpenFile opens path as a device, creating a sparse file of size bytes if
// it does not exist.
func OpenFile(path string, size int64, readOnly bool) (*FileDevice, error) {
	flag := os.O_RDWR | os.O_CREATE
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open device file: %w", err)
	}
	if fi, err := f.Stat(); err == nil && fi.Size() < size && !readOnly {
		if err := f.Truncate(size); err != nil {
			f.Close()
			return nil, fmt.Errorf("size device file: %w", err)
		}
	}
	return &FileDevice{f: f, ro: readOnly}, nil
}

// ReadAt implements Device.
func (d *FileDevice) ReadAt(_ context.Context, p []byte, off int64) error {
	n, err := d.f.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	return err
}

// WriteAt implements Device.
func (d *FileDevice) WriteAt(_ context.Context, p []byte, off int64) error {
	_, err := d.f.WriteAt(p, off)
	return err
}

// WriteZeroes implements Device by punching a hole.
func (d *FileDevice) WriteZeroes(_ context.Context, off, n int64) error {
	err := unix.Fallocate(int(d.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	if errors.Is(err, unix.EOPNOTSUPP) {
		_, err = d.f.WriteAt(make([]byte, n), off)
	}
	return err
}

// Trim implements Device; trimmed bytes read as zero.
func (d *FileDevice) Trim(ctx context.Context, off, n int64) error { return d.WriteZeroes(ctx, off, n) }

// Flush implements Device with fdatasync.
func (d *FileDevice) Flush(context.Context) error {
	if d.ro {
		return nil
	}
	return unix.Fdatasync(int(d.f.Fd()))
}

// Close closes the file.
func (d *FileDevice) Close() error { return d.f.Close() }
