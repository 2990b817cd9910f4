package store_test

import (
	"path/filepath"
	"testing"

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
