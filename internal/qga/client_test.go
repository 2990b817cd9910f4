package qga_test

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/guest"
	"github.com/ferry-dr/ferry/internal/qga"
)

func TestClientAgainstGuestAgent(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "qga.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			// A stale reply from an earlier session comes first.
			c.Write([]byte(`{"return": 12345}` + "\n"))
			a := &guest.Agent{Mounts: nil}
			go a.Serve(context.Background(), c)
		}
	}()
	c := &qga.Client{Path: sock, Timeout: 2 * time.Second}
	defer c.Close()
	ctx := context.Background()
	if err := c.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	if n, err := c.Freeze(ctx); err != nil || n != 0 {
		t.Fatalf("freeze: %d %v", n, err)
	}
	if s, err := c.FreezeStatus(ctx); err != nil || s != "frozen" {
		t.Fatalf("status: %q %v", s, err)
	}
	if _, err := c.Freeze(ctx); !errors.Is(err, qga.ErrCommand) {
		t.Fatalf("double freeze: %v", err)
	}
	if _, err := c.Thaw(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestClientNoAgent(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "qga.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close() // QEMU's chardev accepts; nobody answers
		}
	}()
	c := &qga.Client{Path: sock, Timeout: 300 * time.Millisecond}
	start := time.Now()
	if err := c.Ping(context.Background()); !errors.Is(err, qga.ErrNoAgent) {
		t.Fatalf("ping: %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("took %v", d)
	}
}
