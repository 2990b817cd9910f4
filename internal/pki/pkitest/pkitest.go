// Package pkitest makes throwaway PKI directories for tests.
package pkitest

import (
	"strings"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/pki"
)

// Peer parses "role/name"; a bare name is a site.
func Peer(s string) pki.Peer {
	if role, name, ok := strings.Cut(s, "/"); ok {
		return pki.Peer{Role: role, Name: name}
	}
	return pki.Peer{Role: pki.RoleSite, Name: s}
}

// Dir makes a CA in a new temporary directory and issues a certificate
// (valid for 127.0.0.1 and localhost) for each identity, written
// "role/name" or, for a site, "name".
func Dir(tb testing.TB, ids ...string) string {
	tb.Helper()
	dir := tb.TempDir()
	Issue(tb, dir, ids...)
	return dir
}

// Issue is Dir into dir (which gets a CA first if it has none).
func Issue(tb testing.TB, dir string, ids ...string) {
	tb.Helper()
	now := time.Now()
	if _, err := pki.Load(dir, "-none-"); err != nil {
		pki.InitCA(dir, "test CA", now) // refuses (harmlessly) if there is one
	}
	for _, s := range ids {
		if err := pki.Issue(dir, dir, Peer(s), []string{"127.0.0.1", "localhost"}, now); err != nil {
			tb.Fatal(err)
		}
	}
}

// Load loads the identity called name from dir.
func Load(tb testing.TB, dir, name string) *pki.Identity {
	tb.Helper()
	id, err := pki.Load(dir, name)
	if err != nil {
		tb.Fatal(err)
	}
	return id
}
