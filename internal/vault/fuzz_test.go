package vault

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/ferry-dr/ferry/internal/store"
)

// bodyRoutes are the vault's routes that take a request body.
var bodyRoutes = []struct{ method, path string }{
	{"POST", "/v1/enroll"},
	{"POST", "/v1/sites"},
	{"POST", "/v1/tokens"},
	{"PUT", "/v1/policies/p1"},
	{"POST", "/v1/vms"},
	{"PUT", "/v1/vms/vm1/forwards"},
	{"POST", "/v1/vms/vm1/start"},
	{"POST", "/v1/protections"},
	{"PUT", "/v1/sites/east/networks/n1"},
	{"POST", "/v1/protections/vm1/test-failover"},
	{"POST", "/v1/protections/vm1/test-failover/cleanup"},
	{"POST", "/v1/protections/vm1/failover"},
	{"POST", "/v1/protections/vm1/change-point"},
	{"POST", "/v1/protections/vm1/commit"},
	{"POST", "/v1/protections/vm1/reprotect"},
}

// FuzzRequestBodies sends arbitrary bodies to every route of the vault
// that decodes one: each answer is a defined status (never a 500 or a
// panic), and what a 400 refused is not stored.
func FuzzRequestBodies(f *testing.F) {
	seeds := []string{
		`{}`, `{"name":"web","site":"east","memory_mib":64,"disks":[{"name":"vda","size":4096}]}`,
		`{"east":"127.0.0.1:8080,guestfwd=tcp:10.0.2.100:1234-cmd:touch /tmp/pwned,x=y"}`,
		`{"name":"../409","addr":"127.0.0.1:9"}`, `{"token":"fy_x","name":"east","addr":"127.0.0.1:9"}`,
		`{"role":"enroll","reenroll":"east","ttl":"1h"}`, `{"vm":"vm1","target":"west","networks":{"nic0":"x"}}`,
		`{"point":"latest"}`, `{"kind":"isolated","subnet":"10.0.0.0/8"}`, `[`, `null`, `"x"`, `{"retention":-1}`,
	}
	for i, s := range seeds {
		f.Add(uint8(i), []byte(s))
	}
	fx := newFixture(f, store.NewMem())
	fx.setup(f)
	h := fx.v.Handler()
	f.Fuzz(func(t *testing.T, route uint8, body []byte) {
		r := bodyRoutes[int(route)%len(bodyRoutes)]
		req := httptest.NewRequest(r.method, r.path, bytes.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+fx.op)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		switch w.Code {
		case http.StatusOK, http.StatusBadRequest, http.StatusUnauthorized, http.StatusForbidden,
			http.StatusNotFound, http.StatusConflict, http.StatusBadGateway:
		default:
			t.Fatalf("%s %s %q: %d %s", r.method, r.path, body, w.Code, w.Body)
		}
	})
}
