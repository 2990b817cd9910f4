// Package storetest is the conformance suite every store.Store runs.
package storetest

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/ferry-dr/ferry/internal/store"
)

// Run checks the Store contract on stores made by open. reopen, if not
// nil, closes and reopens the same store (durability).
func Run(t *testing.T, open func(t *testing.T) store.Store, reopen func(t *testing.T, s store.Store) store.Store) {
	ctx := context.Background()
	t.Run("put get list delete", func(t *testing.T) {
		s := open(t)
		if _, err := s.Get(ctx, "site", "east"); !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("get missing: %v", err)
		}
		v, err := s.Put(ctx, "site", "east", []byte(`{"a":1}`), 0)
		if err != nil || v != 1 {
			t.Fatalf("create: %d %v", v, err)
		}
		if _, err := s.Put(ctx, "site", "east", []byte(`{}`), 0); !errors.Is(err, store.ErrConflict) {
			t.Fatalf("create twice: %v", err)
		}
		if _, err := s.Put(ctx, "site", "east", []byte(`{}`), 7); !errors.Is(err, store.ErrConflict) {
			t.Fatalf("stale version: %v", err)
		}
		v, err = s.Put(ctx, "site", "east", []byte(`{"a":2}`), 1)
		if err != nil || v != 2 {
			t.Fatalf("update: %d %v", v, err)
		}
		s.Put(ctx, "site", "west", []byte(`{}`), 0)
		s.Put(ctx, "vm", "x", []byte(`{}`), 0)
		docs, err := s.List(ctx, "site")
		if err != nil || len(docs) != 2 || docs[0].ID != "east" || string(docs[0].Data) != `{"a":2}` || docs[0].Version != 2 {
			t.Fatalf("list: %+v %v", docs, err)
		}
		if err := s.Delete(ctx, "site", "east", 1); !errors.Is(err, store.ErrConflict) {
			t.Fatalf("delete stale: %v", err)
		}
		if err := s.Delete(ctx, "site", "east", 2); err != nil {
			t.Fatal(err)
		}
		if err := s.Delete(ctx, "site", "east", 2); !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("delete gone: %v", err)
		}
		if reopen != nil {
			s = reopen(t, s)
			d, err := s.Get(ctx, "site", "west")
			if err != nil || d.Version != 1 {
				t.Fatalf("after reopen: %+v %v", d, err)
			}
		}
	})
	t.Run("compare and set under contention", func(t *testing.T) {
		s := open(t)
		s.Put(ctx, "counter", "c", []byte("0"), 0)
		var wg sync.WaitGroup
		for w := 0; w < 8; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < 20; i++ {
					for {
						d, err := s.Get(ctx, "counter", "c")
						if err != nil {
							t.Error(err)
							return
						}
						var n int
						fmt.Sscan(string(d.Data), &n)
						if _, err := s.Put(ctx, "counter", "c", []byte(fmt.Sprint(n+1)), d.Version); err == nil {
							break
						} else if !errors.Is(err, store.ErrConflict) {
							t.Error(err)
							return
						}
					}
				}
			}()
		}
		wg.Wait()
		d, _ := s.Get(ctx, "counter", "c")
		if string(d.Data) != "160" {
			t.Fatalf("counter %s, want 160: lost updates", d.Data)
		}
	})
}
