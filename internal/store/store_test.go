package store_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/store"
	"github.com/ferry-dr/ferry/internal/store/etcdtest"
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

// TestEtcdConformance runs the store contract against a real etcd; each
// store has its own key prefix, and a reopen is a new client.
func TestEtcdConformance(t *testing.T) {
	url := etcdtest.Start(t)
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
