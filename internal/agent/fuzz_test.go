package agent

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/pki/pkitest"
)

// bodyRoutes are the agent's routes that take a request body.
var bodyRoutes = []struct{ method, path string }{
	{"POST", "/v1/vms"},
	{"POST", "/v1/groups"},
	{"POST", "/v1/groups/vm1/replication"},
	{"POST", "/v1/groups/vm1/fence"},
	{"POST", "/v1/groups/vm1/to-replica"},
	{"POST", "/v1/groups/vm1/points"},
	{"POST", "/v1/replicas/vm1/views"},
	{"PUT", "/v1/replicas/vm1/source"},
}

// FuzzRequestBodies sends arbitrary bodies, as the vault, to every route
// of the agent that decodes one: each answer is a defined status, never a
// 500 or a panic. Groups a body managed to create are deleted after each
// input, so no VM can ever start.
func FuzzRequestBodies(f *testing.F) {
	for i, s := range []string{
		`{}`, `{"name":"x","disks":[{"name":"vda","size":4096}]}`, `{"generation":3}`, `{"since":1,"source":"siteB"}`,
		`{"name":"web","group":"vm1","memory_mib":64,"forwards":[{"host":"127.0.0.1:8080,guestfwd=x","guest_port":80}]}`,
		`{"type":"named","label":"x"}`, `{"disk":"vda","seq":1,"writable":true}`, `{"source":"../x"}`,
		`{"peer_addr":"127.0.0.1:1","peer_name":"siteB"}`, `[`, `null`,
	} {
		f.Add(uint8(i), []byte(s))
	}
	pk := pkitest.Dir(f, "siteA", "vault/vault")
	a := startAgentWith(f, Config{Name: "siteA", PKIDir: pk, PointInterval: -1, AppInterval: -1})
	vault := pkitest.Load(f, pk, "vault")
	leaf, err := x509.ParseCertificate(vault.Cert.Certificate[0])
	if err != nil {
		f.Fatal(err)
	}
	state := &tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{leaf}}}
	h := a.routes()
	f.Fuzz(func(t *testing.T, route uint8, body []byte) {
		r := bodyRoutes[int(route)%len(bodyRoutes)]
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		req := httptest.NewRequestWithContext(ctx, r.method, r.path, bytes.NewReader(body))
		req.TLS = state
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		for _, g := range a.Status().Groups {
			a.DisableReplication(g.Name)
			if err := a.DeleteGroup(ctx, g.Name); err != nil {
				t.Fatalf("clean up group %s: %v", g.Name, err)
			}
		}
		switch w.Code {
		case http.StatusOK, http.StatusBadRequest, http.StatusNotFound, http.StatusConflict:
		default:
			t.Fatalf("%s %s %q: %d %s", r.method, r.path, body, w.Code, w.Body)
		}
	})
}
