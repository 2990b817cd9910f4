// Package guest holds the programs of ferry's test guest: a guest agent
// that speaks the subset of the QEMU guest agent (QGA) protocol ferry uses
// for application-consistent points, and a workload that writes
// sequence-stamped, checksummed records to a data disk. Production guests
// run the standard qemu-guest-agent; this one speaks the same protocol so
// the host side is tested against the real wire format.
package guest

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/ferry-dr/ferry/internal/qga"
	"golang.org/x/sys/unix"
)

// qgaRequest is one QGA command.
type qgaRequest struct {
	Execute   string          `json:"execute"`
	Arguments json.RawMessage `json:"arguments,omitempty"`
}

// Agent answers QGA commands read from rw.
type Agent struct {
	// Mounts are the file systems guest-fsfreeze-* act on.
	Mounts []string
	// MaxFreeze thaws automatically if the host never does (default 10 s).
	MaxFreeze time.Duration
	// Shutdown powers the guest off (guest-shutdown).
	Shutdown func() error
	// freeze and thaw are the ioctls; replaced in tests.
	freeze, thaw func(mount string) error

	mu     sync.Mutex
	frozen bool
	timer  *time.Timer
}

// Serve answers requests until rw fails.
func (a *Agent) Serve(ctx context.Context, rw io.ReadWriter) error {
	if a.MaxFreeze <= 0 {
		a.MaxFreeze = 10 * time.Second
	}
	if a.freeze == nil {
		a.freeze, a.thaw = ioctlFreeze, ioctlThaw
	}
	br := bufio.NewReader(rw)
	for ctx.Err() == nil {
		obj, err := qga.ReadObject(br)
		if err != nil {
			return err
		}
		var req qgaRequest
		if err := json.Unmarshal(obj, &req); err != nil {
			b, _ := json.Marshal(errResp("GenericError", "invalid JSON: "+err.Error()))
			rw.Write(append(b, '\n'))
			continue
		}
		resp, delimited := a.handle(req)
		if resp == nil {
			continue // a command with no reply (guest-shutdown): not even "null"
		}
		b, _ := json.Marshal(resp)
		if delimited {
			b = append([]byte{0xff}, b...)
		}
		if _, err := rw.Write(append(b, '\n')); err != nil {
			return err
		}
	}
	return ctx.Err()
}

func errResp(class, desc string) map[string]any {
	return map[string]any{"error": map[string]string{"class": class, "desc": desc}}
}

func (a *Agent) handle(req qgaRequest) (resp any, delimited bool) {
	switch req.Execute {
	case "guest-sync-delimited", "guest-sync":
		var args struct {
			ID int64 `json:"id"`
		}
		json.Unmarshal(req.Arguments, &args)
		return map[string]any{"return": args.ID}, req.Execute == "guest-sync-delimited"
	case "guest-ping":
		return map[string]any{"return": map[string]any{}}, false
	case "guest-fsfreeze-status":
		a.mu.Lock()
		defer a.mu.Unlock()
		if a.frozen {
			return map[string]any{"return": "frozen"}, false
		}
		return map[string]any{"return": "thawed"}, false
	case "guest-fsfreeze-freeze":
		a.mu.Lock()
		defer a.mu.Unlock()
		if a.frozen {
			return errResp("GenericError", "file systems are already frozen"), false
		}
		n := 0
		for _, m := range a.Mounts {
			if err := a.freeze(m); err != nil {
				for _, done := range a.Mounts[:n] {
					a.thaw(done)
				}
				return errResp("GenericError", fmt.Sprintf("freeze %s: %v", m, err)), false
			}
			n++
		}
		a.frozen = true
		// Never stay frozen if the host disappears.
		a.timer = time.AfterFunc(a.MaxFreeze, func() { a.thawAll() })
		return map[string]any{"return": n}, false
	case "guest-fsfreeze-thaw":
		return map[string]any{"return": a.thawAll()}, false
	case "guest-shutdown":
		if a.Shutdown != nil {
			go func() {
				time.Sleep(100 * time.Millisecond)
				a.Shutdown()
			}()
		}
		return nil, false // QGA sends no reply on success
	}
	return errResp("CommandNotFound", fmt.Sprintf("The command %s has not been found", req.Execute)), false
}

func (a *Agent) thawAll() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.frozen {
		return 0
	}
	if a.timer != nil {
		a.timer.Stop()
	}
	n := 0
	for _, m := range a.Mounts {
		if a.thaw(m) == nil {
			n++
		}
	}
	a.frozen = false
	return n
}

func ioctlOnMount(mount string, req uint) error {
	f, err := os.Open(mount)
	if err != nil {
		return err
	}
	defer f.Close()
	return unix.IoctlSetInt(int(f.Fd()), req, 0)
}

// The fsfreeze ioctls (linux/fs.h): _IOWR('X', 119, int) and _IOWR('X', 120, int).
const (
	fifreeze = 0xC0045877
	fithaw   = 0xC0045878
)

func ioctlFreeze(mount string) error { return ioctlOnMount(mount, fifreeze) }
func ioctlThaw(mount string) error   { return ioctlOnMount(mount, fithaw) }

// findPort returns the device of the virtio-serial port with the given name.
func findPort(name string) (string, error) {
	ports, _ := filepath.Glob("/sys/class/virtio-ports/*/name")
	for _, p := range ports {
		b, err := os.ReadFile(p)
		if err == nil && strings.TrimSpace(string(b)) == name {
			return "/dev/" + filepath.Base(filepath.Dir(p)), nil
		}
	}
	return "", fmt.Errorf("no virtio-serial port named %s", name)
}

// RunAgent is "ferry-guest agent".
func RunAgent(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("agent", flag.ContinueOnError)
	mounts := fs.String("mounts", "/data", "comma-separated mount points to freeze")
	port := fs.String("port", "org.qemu.guest_agent.0", "virtio-serial port name")
	if err := fs.Parse(args); err != nil {
		return err
	}
	dev, err := findPort(*port)
	if err != nil {
		return err
	}
	// guest-shutdown is a clean shutdown, as qemu-guest-agent's is
	// (shutdown -h): PID 1, the guest's init script, stops the workload,
	// unmounts the data disk and powers off, as for the power button.
	a := &Agent{Mounts: strings.Split(*mounts, ","), Shutdown: func() error {
		return unix.Kill(1, unix.SIGTERM)
	}}
	for ctx.Err() == nil {
		f, err := os.OpenFile(dev, os.O_RDWR, 0)
		if err != nil {
			return err
		}
		err = a.Serve(ctx, f)
		f.Close()
		if ctx.Err() != nil {
			return nil
		}
		// The host closed its end; the port reads EOF until it reconnects.
		time.Sleep(200 * time.Millisecond)
	}
	return nil
}
