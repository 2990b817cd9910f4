package store

import (
	"context"
	"fmt"
	"sort"
	"sync"
)

// Mem is an in-memory Store for tests.
type Mem struct {
	mu   sync.Mutex
	docs map[[2]string]Doc
}

var _ Store = (*Mem)(nil)

// NewMem returns an empty in-memory store.
func NewMem() *Mem { return &Mem{docs: map[[2]string]Doc{}} }

// Get implements Store.
func (m *Mem) Get(_ context.Context, kind, id string) (Doc, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	d, ok := m.docs[[2]string{kind, id}]
	if !ok {
		return Doc{}, fmt.Errorf("%w: %s %q", ErrNotFound, kind, id)
	}
	d.Data = append([]byte(nil), d.Data...)
	return d, nil
}

// List implements Store.
func (m *Mem) List(_ context.Context, kind string) ([]Doc, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []Doc
	for k, d := range m.docs {
		if k[0] == kind {
			d.Data = append([]byte(nil), d.Data...)
			out = append(out, d)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

// Put implements Store.
func (m *Mem) Put(_ context.Context, kind, id string, data []byte, version int64) (int64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	k := [2]string{kind, id}
	if m.docs[k].Version != version {
		return 0, fmt.Errorf("%w: %s %q is not at version %d", ErrConflict, kind, id, version)
	}
	m.docs[k] = Doc{Kind: kind, ID: id, Data: append([]byte(nil), data...), Version: version + 1}
	return version + 1, nil
}

// Delete implements Store.
func (m *Mem) Delete(_ context.Context, kind, id string, version int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	k := [2]string{kind, id}
	d, ok := m.docs[k]
	if !ok {
		return fmt.Errorf("%w: %s %q", ErrNotFound, kind, id)
	}
	if d.Version != version {
		return fmt.Errorf("%w: %s %q is not at version %d", ErrConflict, kind, id, version)
	}
	delete(m.docs, k)
	return nil
}

// Close implements Store.
func (m *Mem) Close() error { return nil }
