// Package store keeps the vault's state: versioned JSON documents by kind
// and id, with compare-and-set writes. Every vault object (site, VM,
// policy, protection, job, token) is such a document, so a distributed
// store (etcd) can replace SQLite behind the same small interface.
package store

import (
	"context"
	"errors"
)

// Sentinel errors.
var (
	ErrNotFound = errors.New("store: not found")
	// ErrConflict: the document changed since it was read (or exists when
	// it should not): re-read and retry, or give up.
	ErrConflict = errors.New("store: version conflict")
)

// Doc is a stored document.
type Doc struct {
	Kind    string
	ID      string
	Data    []byte // JSON
	Version int64  // 1 after the first Put, +1 per Put
}

// Store is the vault's persistence. All methods are safe for concurrent
// use; every write is durable when it returns.
type Store interface {
	// Get returns the document, or ErrNotFound.
	Get(ctx context.Context, kind, id string) (Doc, error)
	// List returns every document of kind, ordered by id.
	List(ctx context.Context, kind string) ([]Doc, error)
	// Put writes data if the stored version equals version (0: the
	// document must not exist) and returns the new version; else
	// ErrConflict and nothing changes.
	Put(ctx context.Context, kind, id string, data []byte, version int64) (int64, error)
	// Delete removes the document if its version equals version; else
	// ErrConflict (ErrNotFound if it is gone).
	Delete(ctx context.Context, kind, id string, version int64) error
	// Close releases the store.
	Close() error
}
