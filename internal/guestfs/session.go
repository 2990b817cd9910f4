// Package guestfs reads files out of a VM's disks without booting the VM,
// through libguestfs (https://libguestfs.org): an appliance, a tiny Linux
// VM of libguestfs's own, attaches the disks read-only over NBD and mounts
// their file systems. ferry uses it to restore files from any recovery
// point: the agent exports views of the point and opens a Session on them.
//
// Why libguestfs and not a file-system parser of ferry's own: it reads
// every file system Linux reads (ext2/3/4, XFS, btrfs, VFAT, NTFS), on
// whole disks, MBR and GPT partitions and LVM, and a crash-consistent
// point's journal is replayed into a throw-away overlay so that such a
// point mounts like a clean one; the VM's own guest agent is not needed.
// The price is the appliance's start (10-20 s under TCG, 2-3 s with KVM),
// paid once per Session.
//
// The appliance is driven by a small helper (helper.py) written against
// libguestfs's Python bindings (Debian python3-guestfs), which report
// every call's error and keep the handle, where guestfish's remote mode
// exits at the first failed command. It speaks JSON lines on its stdin
// and stdout: the first line out says the appliance is up and lists the
// devices and file systems; then one request in, one answer out. Bulk
// data (a file, a tar of a tree) goes through a FIFO the session makes.
package guestfs

import (
	"bufio"
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
)

//go:embed helper.py
var helperScript []byte

// Errors. Every error a Session returns wraps one of these or api's.
var (
	// ErrUnavailable: libguestfs is not installed, or the appliance did
	// not start (the message says why).
	ErrUnavailable = fmt.Errorf("%w: libguestfs", api.ErrUnavailable)
	// ErrClosed: the session was closed (or its helper died).
	ErrClosed = errors.New("guestfs: session closed")
)

// Drive is one disk: an NBD export on a unix socket.
type Drive struct {
	Name   string // the disk's name in the VM ("vda")
	Socket string
	Export string
}

// Config configures a Session.
type Config struct {
	Drives []Drive
	// Python is the interpreter with the guestfs module (default
	// /usr/bin/python3, Debian's, where python3-guestfs installs).
	Python string
	// ForceTCG starts the appliance without KVM (where KVM is present but
	// does not work).
	ForceTCG bool
	// TempDir holds the session's FIFOs (default os.TempDir()).
	TempDir string
	Logger  *slog.Logger
}

// FS is a file system found on the drives.
type FS struct {
	Device string // the appliance's device: /dev/sda1, /dev/vg/lv
	Type   string // "ext4", "xfs", "swap", "unknown", ...
}

// Session is one running appliance. Its methods are safe for concurrent
// use; they run one at a time (libguestfs handles are single-threaded).
type Session struct {
	cfg    Config
	log    *slog.Logger
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	out    *bufio.Reader
	dir    string
	done   chan struct{}
	stderr *tailBuffer

	devices []string
	fss     map[string]string

	mu     sync.Mutex
	closed bool
	nfifo  int
}

type answer struct {
	OK     bool            `json:"ok"`
	Kind   string          `json:"kind"`
	Error  string          `json:"error"`
	Result json.RawMessage `json:"result"`
}

// Open starts the appliance on cfg.Drives and waits until it is up (or
// ctx ends: the appliance is then killed). ErrUnavailable if libguestfs
// is missing or the appliance fails to start.
func Open(ctx context.Context, cfg Config) (*Session, error) {
	if cfg.Python == "" {
		cfg.Python = "/usr/bin/python3"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if len(cfg.Drives) == 0 {
		return nil, fmt.Errorf("%w: no drives", api.ErrInvalid)
	}
	dir, err := os.MkdirTemp(cfg.TempDir, "ferry-guestfs-")
	if err != nil {
		return nil, err
	}
	script := filepath.Join(dir, "helper.py")
	if err := os.WriteFile(script, helperScript, 0o600); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	type drive struct {
		Name   string `json:"name"`
		Socket string `json:"socket"`
		Export string `json:"export"`
	}
	arg := struct {
		Drives   []drive `json:"drives"`
		ForceTCG bool    `json:"force_tcg"`
	}{ForceTCG: cfg.ForceTCG}
	for _, d := range cfg.Drives {
		arg.Drives = append(arg.Drives, drive(d))
	}
	b, _ := json.Marshal(arg)
	cmd := exec.Command(cfg.Python, script, string(b))
	// The direct backend: no libvirtd needed; the appliance's files go to
	// the session's own directory.
	cmd.Env = append(os.Environ(), "LIBGUESTFS_BACKEND=direct", "TMPDIR="+dir)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	s := &Session{cfg: cfg, log: cfg.Logger, cmd: cmd, dir: dir, done: make(chan struct{}), stderr: &tailBuffer{max: 4096}}
	cmd.Stderr = s.stderr
	if s.stdin, err = cmd.StdinPipe(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	s.out = bufio.NewReaderSize(stdout, 1<<20)
	if err := cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("%w: start %s: %v (install python3-guestfs and libguestfs-tools)", ErrUnavailable, cfg.Python, err)
	}
	go func() { cmd.Wait(); close(s.done) }()
	type first struct {
		a   answer
		err error
	}
	ch := make(chan first, 1)
	go func() { a, err := s.read(); ch <- first{a, err} }()
	var f first
	select {
	case f = <-ch:
	case <-ctx.Done():
		s.kill()
		return nil, fmt.Errorf("start the libguestfs appliance: %w", ctx.Err())
	}
	if f.err == nil && !f.a.OK {
		f.err = fmt.Errorf("%s", f.a.Error)
	}
	if f.err != nil {
		s.kill()
		msg := strings.TrimSpace(s.stderr.String())
		if strings.Contains(msg, "No module named 'guestfs'") {
			msg = "the Python bindings are missing: apt-get install python3-guestfs libguestfs-tools"
		}
		return nil, fmt.Errorf("%w: the appliance did not start: %v %s", ErrUnavailable, f.err, msg)
	}
	var up struct {
		Devices     []string          `json:"devices"`
		Filesystems map[string]string `json:"filesystems"`
	}
	if err := json.Unmarshal(f.a.Result, &up); err != nil {
		s.kill()
		return nil, fmt.Errorf("%w: helper: %v", ErrUnavailable, err)
	}
	s.devices, s.fss = up.Devices, up.Filesystems
	return s, nil
}

// Devices are the appliance's whole-disk devices, in the drives' order.
func (s *Session) Devices() []string { return append([]string(nil), s.devices...) }

// Filesystems are the file systems libguestfs found, by device.
func (s *Session) Filesystems() []FS {
	var out []FS
	for dev, t := range s.fss {
		out = append(out, FS{Device: dev, Type: t})
	}
	return out
}

func (s *Session) read() (answer, error) {
	line, err := s.out.ReadBytes('\n')
	if err != nil {
		return answer{}, fmt.Errorf("%w: %v", ErrClosed, err)
	}
	var a answer
	if err := json.Unmarshal(line, &a); err != nil {
		return answer{}, fmt.Errorf("guestfs helper said %q: %w", line, err)
	}
	return a, nil
}

// call sends one request and waits for its answer. The caller holds mu.
// A context that ends kills the session: a libguestfs call cannot be
// interrupted otherwise.
func (s *Session) call(ctx context.Context, req map[string]string, result any) error {
	if s.closed {
		return ErrClosed
	}
	b, _ := json.Marshal(req)
	if _, err := s.stdin.Write(append(b, '\n')); err != nil {
		s.closed = true
		return fmt.Errorf("%w: %v", ErrClosed, err)
	}
	ch := make(chan struct {
		a   answer
		err error
	}, 1)
	go func() {
		a, err := s.read()
		ch <- struct {
			a   answer
			err error
		}{a, err}
	}()
	var r struct {
		a   answer
		err error
	}
	select {
	case r = <-ch:
	case <-ctx.Done():
		s.closed = true
		s.kill()
		return ctx.Err()
	}
	if r.err != nil {
		s.closed = true
		return r.err
	}
	if !r.a.OK {
		return kindError(r.a.Kind, r.a.Error)
	}
	if result != nil {
		return json.Unmarshal(r.a.Result, result)
	}
	return nil
}

func kindError(kind, msg string) error {
	switch kind {
	case "notfound":
		return fmt.Errorf("%w: no such file or directory", api.ErrNotFound)
	case "notdir":
		return fmt.Errorf("%w: not a directory", api.ErrInvalid)
	case "isdir", "notfile":
		return fmt.Errorf("%w: %s, not a regular file", api.ErrInvalid, msg)
	case "unsupported":
		return fmt.Errorf("%w: %s (ferry reads ext2/3/4, XFS, btrfs, VFAT and NTFS)", api.ErrUnsupported, msg)
	case "invalid":
		return fmt.Errorf("%w: %s", api.ErrInvalid, msg)
	}
	return fmt.Errorf("guestfs: %s", msg)
}

// Entry is a file as the helper reports it.
type Entry struct {
	Name  string `json:"name"`
	Type  string `json:"type"`
	Size  int64  `json:"size"`
	Mode  uint32 `json:"mode"`
	MTime int64  `json:"mtime"`
	Link  string `json:"link"`
}

// List lists directory path of the file system on device (mounting it
// read-only the first time). api.ErrNotFound, api.ErrInvalid (not a
// directory), api.ErrUnsupported (a file system it cannot read).
func (s *Session) List(ctx context.Context, device, path string) ([]Entry, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Entry
	return out, s.call(ctx, map[string]string{"op": "ls", "device": device, "path": path}, &out)
}

// Stat describes path (a symlink itself, not its target).
func (s *Session) Stat(ctx context.Context, device, path string) (Entry, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out Entry
	return out, s.call(ctx, map[string]string{"op": "stat", "device": device, "path": path}, &out)
}

// Usage is the space the files under path use, in bytes.
func (s *Session) Usage(ctx context.Context, device, path string) (int64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var n int64
	return n, s.call(ctx, map[string]string{"op": "du", "device": device, "path": path}, &n)
}

// Download copies a regular file's bytes to w.
func (s *Session) Download(ctx context.Context, device, path string, w io.Writer) error {
	return s.stream(ctx, "download", device, path, w)
}

// Tar writes a tar stream of directory path's contents (names relative
// to it, owners numeric) to w.
func (s *Session) Tar(ctx context.Context, device, path string, w io.Writer) error {
	return s.stream(ctx, "tar", device, path, w)
}

// stream runs op with a FIFO as its output, copying what comes through
// to w while it runs.
func (s *Session) stream(ctx context.Context, op, device, path string, w io.Writer) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	s.nfifo++
	fifo := filepath.Join(s.dir, fmt.Sprintf("out%d", s.nfifo))
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		return fmt.Errorf("make fifo: %w", err)
	}
	defer os.Remove(fifo)
	// The read end first (non-blocking open, then Go's poller), then a
	// write end of our own, so that reads wait for the helper instead of
	// seeing EOF before it opens the FIFO, or forever if it never does.
	r, err := os.OpenFile(fifo, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return err
	}
	defer r.Close()
	hold, err := os.OpenFile(fifo, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	copied := make(chan error, 1)
	go func() {
		_, err := io.Copy(w, r)
		if err != nil {
			// The receiver went away: close the read end, so that the
			// helper's writes fail (EPIPE) and it answers.
			r.Close()
		}
		copied <- err
	}()
	callErr := s.call(ctx, map[string]string{"op": op, "device": device, "path": path, "out": fifo}, nil)
	hold.Close()
	copyErr := <-copied
	if callErr != nil {
		return callErr
	}
	if copyErr != nil {
		return fmt.Errorf("send %s: %w", path, copyErr)
	}
	return nil
}

// Close shuts the appliance down (and kills it if it does not go within
// its own time). Idempotent.
func (s *Session) Close() error {
	// A call in progress holds the lock; one that does not end soon is
	// ended by killing the helper (its read fails, it lets go).
	locked := make(chan struct{})
	go func() { s.mu.Lock(); close(locked) }()
	select {
	case <-locked:
	case <-time.After(5 * time.Second):
		s.kill()
		<-locked
	}
	defer s.mu.Unlock()
	if !s.closed {
		s.closed = true
		b, _ := json.Marshal(map[string]string{"op": "quit"})
		s.stdin.Write(append(b, '\n'))
	}
	s.stdin.Close()
	select {
	case <-s.done:
	case <-time.After(10 * time.Second):
		s.kill()
	}
	os.RemoveAll(s.dir)
	return nil
}

// Done is closed when the helper has exited.
func (s *Session) Done() <-chan struct{} { return s.done }

func (s *Session) kill() {
	if s.cmd.Process != nil {
		// The helper's process group: it and the appliance's QEMU.
		syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
	}
	<-s.done
	os.RemoveAll(s.dir)
}

// tailBuffer keeps the last max bytes written (the helper's stderr, for
// error messages).
type tailBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > t.max {
		t.b = t.b[len(t.b)-t.max:]
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}
