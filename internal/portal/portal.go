// Package portal is the vault's web portal: one page, embedded in the
// binary (no CDN, works offline), that drives the vault's REST API with the
// user's API token. It shows the replicated items, their recovery points
// and RPO, runs the DR actions from dialogs with the API's guards, and
// follows jobs live.
package portal

import (
	"embed"
	"io/fs"
	"net/http"
)

//go:embed static
var static embed.FS

// Handler serves the portal. Paths the API owns (/v1/, /metrics) are not
// its business; mount it at "/" beside them.
func Handler() http.Handler {
	sub, _ := fs.Sub(static, "static")
	files := http.FileServerFS(sub)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		// Everything the page needs is served from here; the token lives
		// in the tab's session storage, so scripts from elsewhere must not
		// run, and the page must not be framed.
		h.Set("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cache-Control", "no-cache")
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			http.Error(w, "the portal is read-only; the API is under /v1/", http.StatusMethodNotAllowed)
			return
		}
		files.ServeHTTP(w, r)
	})
}
