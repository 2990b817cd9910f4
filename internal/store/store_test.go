package store_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/store"
	"github.com/ferry-dr/ferry/internal/store/storetest"
)

func TestMemConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Store { return store.NewMem() }, nil)
}

func TestSQLiteConformance(t *testing.T) {
	paths := map[store.Store]string{}
	storetest.Run(t, func(t *testing.T) store.Store {
		p := filepath.Join(t.TempDir(), "vault.db")
		s, err := store.OpenSQLite(p)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		paths[s] = p
		return s
	}, func(t *testing.T, s store.Store) store.Store {
		s.Close()
		s2, err := store.OpenSQLite(paths[s])
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s2.Close() })
		return s2
	})
}

// startEtcd runs a one-member etcd (Debian's etcd-server: make deps) on
// loopback in a temporary directory and returns its client URL.
func startEtcd(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("etcd")
	if err != nil {
		t.Fatalf("etcd not found: run 'make deps' (installs etcd-server)")
	}
	port := func() int {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		return l.Addr().(*net.TCPAddr).Port
	}
	client, peer := fmt.Sprintf("http://127.0.0.1:%d", port()), fmt.Sprintf("http://127.0.0.1:%d", port())
	cmd := exec.Command(bin, "--name", "t", "--data-dir", t.TempDir(), "--listen-client-urls", client, "--advertise-client-urls", client,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", "t="+peer, "--log-level", "error")
	var log bytes.Buffer
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("etcd log:\n%s", log.String())
		}
	})
	return client
}

// TestEtcdConformance runs the store contract against a real etcd; each
// store has its own key prefix, and a reopen is a new client.
func TestEtcdConformance(t *testing.T) {
	url := startEtcd(t)
	ctx := context.Background()
	var n atomic.Int64
	open := func(t *testing.T, prefix string) store.Store {
		var s *store.Etcd
		var err error
		deadline := time.Now().Add(20 * time.Second)
		for s, err = store.OpenEtcd(ctx, store.EtcdConfig{Endpoints: []string{url}, Prefix: prefix, DialTimeout: time.Second}); err != nil; s, err = store.OpenEtcd(ctx, store.EtcdConfig{Endpoints: []string{url}, Prefix: prefix, DialTimeout: time.Second}) {
			if time.Now().After(deadline) {
				t.Fatalf("etcd at %s: %v", url, err)
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}
	prefixes := map[store.Store]string{}
	storetest.Run(t, func(t *testing.T) store.Store {
		p := fmt.Sprintf("/ferry-test-%d", n.Add(1))
		s := open(t, p)
		prefixes[s] = p
		return s
	}, func(t *testing.T, s store.Store) store.Store {
		s.Close()
		return open(t, prefixes[s])
	})
	if _, err := store.OpenEtcd(ctx, store.EtcdConfig{Endpoints: []string{"127.0.0.1:1"}, DialTimeout: 500 * time.Millisecond}); !errors.Is(err, store.ErrUnavailable) {
		t.Errorf("open an etcd that does not answer: %v, want ErrUnavailable", err)
	}
}
