package portal

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestHandler(t *testing.T) {
	srv := httptest.NewServer(Handler())
	defer srv.Close()
	tests := []struct {
		method, path string
		want         int
		body         string // a fragment the response must hold
	}{
		{"GET", "/", 200, `<script src="app.js">`},
		{"GET", "/app.js", 200, "async function api("},
		{"GET", "/style.css", 200, ":root"},
		{"GET", "/nope.js", 404, ""},
		{"POST", "/", 405, "read-only"},
	}
	for _, tt := range tests {
		req, _ := http.NewRequest(tt.method, srv.URL+tt.path, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var b strings.Builder
		buf := make([]byte, 1<<16)
		for {
			n, err := resp.Body.Read(buf)
			b.Write(buf[:n])
			if err != nil {
				break
			}
		}
		resp.Body.Close()
		if resp.StatusCode != tt.want || !strings.Contains(b.String(), tt.body) {
			t.Errorf("%s %s: %d, want %d with %q", tt.method, tt.path, resp.StatusCode, tt.want, tt.body)
		}
		if csp := resp.Header.Get("Content-Security-Policy"); !strings.Contains(csp, "script-src 'self'") || !strings.Contains(csp, "frame-ancestors 'none'") {
			t.Errorf("%s %s: Content-Security-Policy %q", tt.method, tt.path, csp)
		}
	}
}

// TestNoRemoteAssets: the portal must work without an internet
// connection, so nothing in it may point elsewhere.
func TestNoRemoteAssets(t *testing.T) {
	for _, f := range []string{"static/index.html", "static/app.js", "static/style.css"} {
		b, err := static.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, bad := range []string{"http://", "https://", "//cdn", "@import"} {
			if i := strings.Index(string(b), bad); i >= 0 && !strings.Contains(string(b[max(0, i-30):i]), "createElementNS(") {
				t.Errorf("%s refers to %q: %q", f, bad, string(b[max(0, i-40):min(len(b), i+60)]))
			}
		}
	}
}
