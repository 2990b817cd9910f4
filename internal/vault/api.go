package vault

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/httpjson"
	"github.com/ferry-dr/ferry/internal/httpserver"
	"github.com/ferry-dr/ferry/internal/pki"
)

// Handler serves the vault's REST API (docs/api.md). Every call but
// POST /v1/enroll carries "Authorization: Bearer TOKEN"; readers may only
// read.
func (v *Vault) Handler() http.Handler {
	mux := http.NewServeMux()
	read := func(pattern string, h func(r *http.Request) (any, error)) {
		mux.HandleFunc(pattern, v.auth(RoleReader, func(w http.ResponseWriter, r *http.Request) {
			out, err := h(r)
			reply(w, out, err)
		}))
	}
	read("GET /v1/sites", func(r *http.Request) (any, error) { return v.Sites(r.Context()) })
	read("GET /v1/vms", func(r *http.Request) (any, error) { return v.VMs(r.Context()) })
	read("GET /v1/protections", func(r *http.Request) (any, error) { return v.Protections(r.Context()) })
	read("GET /v1/protections/{vm}", func(r *http.Request) (any, error) { return v.Protection(r.Context(), r.PathValue("vm")) })
	read("GET /v1/protections/{vm}/points", func(r *http.Request) (any, error) { return v.Points(r.Context(), r.PathValue("vm")) })
	read("GET /v1/vms/{name}/console", func(r *http.Request) (any, error) {
		off, _ := strconv.ParseInt(r.URL.Query().Get("offset"), 10, 64)
		if r.URL.Query().Get("test") == "1" {
			return v.TestConsole(r.Context(), r.PathValue("name"), off)
		}
		return v.Console(r.Context(), r.PathValue("name"), off)
	})
	read("GET /v1/protections/{vm}/rpo-history", func(r *http.Request) (any, error) {
		if _, err := v.Protection(r.Context(), r.PathValue("vm")); err != nil {
			return nil, err
		}
		return v.RPOHistory(r.Context(), r.PathValue("vm"))
	})
	read("GET /v1/alerts", func(r *http.Request) (any, error) { return v.Alerts(r.Context()) })
	read("GET /v1/events", func(r *http.Request) (any, error) {
		limit := 0
		if l := r.URL.Query().Get("limit"); l != "" {
			n, err := strconv.Atoi(l)
			if err != nil || n < 0 {
				return nil, fmt.Errorf("%w: limit %q: want a count", ErrInvalid, l)
			}
			limit = n
		}
		return v.Events(r.Context(), limit)
	})
	read("GET /v1/whoami", func(r *http.Request) (any, error) {
		role, err := v.Authenticate(r.Context(), bearer(r))
		return api.Whoami{Role: role}, err
	})
	// Prometheus scrapes with a reader token (authorization: credentials).
	mux.Handle("GET /metrics", v.auth(RoleReader, v.metrics.handler().ServeHTTP))
	read("GET /v1/jobs", func(r *http.Request) (any, error) { return v.Jobs(r.Context(), r.URL.Query().Get("protection")) })
	read("GET /v1/jobs/{id}", func(r *http.Request) (any, error) { return v.Job(r.Context(), r.PathValue("id")) })

	// Site agents heartbeat with their client certificate (mutual TLS);
	// the certificate's name is the site.
	mux.HandleFunc("POST /v1/heartbeat", func(w http.ResponseWriter, r *http.Request) {
		peer, err := pki.Verified(r.TLS)
		if err != nil {
			reply(w, nil, fmt.Errorf("%w: heartbeats need a site certificate from the installation's CA: %v", ErrAuth, err))
			return
		}
		if peer.Role != pki.RoleSite {
			reply(w, nil, fmt.Errorf("%w: %s is not a site; only sites heartbeat", ErrRole, peer))
			return
		}
		reply(w, map[string]string{"site": peer.Name}, v.SiteHeartbeat(r.Context(), peer.Name))
	})
	mux.HandleFunc("POST /v1/enroll", func(w http.ResponseWriter, r *http.Request) {
		var req api.Enroll
		if err := decode(r, &req); err != nil {
			reply(w, nil, err)
			return
		}
		reply(w, map[string]string{"enrolled": req.Name}, v.Enroll(r.Context(), req.Token, req.Name, req.Addr))
	})
	act(v, mux, "POST /v1/sites", func(r *http.Request, b api.AddSite) (any, error) {
		return map[string]string{"site": b.Name, "addr": b.Addr}, v.AddSite(r.Context(), b.Name, b.Addr, b.Readdress)
	})
	mux.HandleFunc("DELETE /v1/sites/{name}", v.auth(RoleOperator, func(w http.ResponseWriter, r *http.Request) {
		reply(w, map[string]string{"deleted": r.PathValue("name")}, v.DeleteSite(r.Context(), r.PathValue("name")))
	}))
	act(v, mux, "POST /v1/tokens", func(r *http.Request, b TokenRequest) (any, error) {
		t, info, err := v.NewToken(r.Context(), b)
		return api.NewToken{Token: t, TokenInfo: info}, err
	})
	mux.HandleFunc("GET /v1/tokens", v.auth(RoleOperator, func(w http.ResponseWriter, r *http.Request) {
		ts, err := v.Tokens(r.Context())
		reply(w, ts, err)
	}))
	mux.HandleFunc("DELETE /v1/tokens/{id}", v.auth(RoleOperator, func(w http.ResponseWriter, r *http.Request) {
		reply(w, map[string]string{"revoked": r.PathValue("id")}, v.RevokeToken(r.Context(), r.PathValue("id")))
	}))
	act(v, mux, "PUT /v1/policies/{name}", func(r *http.Request, p Policy) (any, error) {
		p.Name = r.PathValue("name")
		return p, v.PutPolicy(r.Context(), p)
	})
	read("GET /v1/bandwidth", func(r *http.Request) (any, error) { return v.BandwidthCaps(r.Context()) })
	act(v, mux, "PUT /v1/bandwidth/pairs/{from}/{to}", func(r *http.Request, lim api.BandwidthLimit) (any, error) {
		return lim, v.SetPairCap(r.Context(), r.PathValue("from"), r.PathValue("to"), lim)
	})
	act(v, mux, "PUT /v1/bandwidth/vms/{vm}", func(r *http.Request, lim api.BandwidthLimit) (any, error) {
		return lim, v.SetVMCap(r.Context(), r.PathValue("vm"), lim)
	})
	read("GET /v1/policies", func(r *http.Request) (any, error) { return v.Policies(r.Context()) })
	read("GET /v1/policies/{name}", func(r *http.Request) (any, error) { return v.Policy(r.Context(), r.PathValue("name")) })
	act(v, mux, "POST /v1/vms", func(r *http.Request, vm VM) (any, error) { return vm, v.DefineVM(r.Context(), vm) })
	act(v, mux, "POST /v1/imports", func(r *http.Request, req api.VaultImport) (any, error) {
		return v.ImportVM(r.Context(), req)
	})
	// Operators only: the look that sees the copy done defines the VM.
	read("GET /v1/sites/{site}/domains", func(r *http.Request) (any, error) { return v.Domains(r.Context(), r.PathValue("site")) })
	mux.HandleFunc("GET /v1/imports/{site}/{domain}", v.auth(RoleOperator, func(w http.ResponseWriter, r *http.Request) {
		st, err := v.ImportStatus(r.Context(), r.PathValue("site"), r.PathValue("domain"))
		reply(w, st, err)
	}))
	act(v, mux, "POST /v1/vms/{name}/release", func(r *http.Request, _ struct{}) (any, error) {
		return map[string]string{"released": r.PathValue("name")}, v.ReleaseVM(r.Context(), r.PathValue("name"))
	})
	act(v, mux, "PUT /v1/vms/{name}/forwards", func(r *http.Request, fw map[string]string) (any, error) {
		return v.SetForwards(r.Context(), r.PathValue("name"), fw)
	})
	act(v, mux, "POST /v1/vms/{name}/start", func(r *http.Request, _ struct{}) (any, error) {
		return v.StartVM(r.Context(), r.PathValue("name"))
	})
	act(v, mux, "POST /v1/vms/{name}/stop", func(r *http.Request, _ struct{}) (any, error) {
		steps, err := v.StopVM(r.Context(), r.PathValue("name"))
		return api.Steps{Steps: steps}, err
	})
	mux.HandleFunc("DELETE /v1/vms/{name}", v.auth(RoleOperator, func(w http.ResponseWriter, r *http.Request) {
		reply(w, map[string]string{"deleted": r.PathValue("name")}, v.DeleteVM(r.Context(), r.PathValue("name")))
	}))
	act(v, mux, "POST /v1/protections/{vm}/disable", func(r *http.Request, b api.DisableRequest) (any, error) {
		return v.Disable(r.Context(), r.PathValue("vm"), b.KeepReplica)
	})
	act(v, mux, "POST /v1/protections", func(r *http.Request, b EnableRequest) (any, error) {
		return v.Enable(r.Context(), b)
	})
	act(v, mux, "PUT /v1/sites/{site}/networks/{name}", func(r *http.Request, n Network) (any, error) {
		n.Name = r.PathValue("name")
		return v.PutNetwork(r.Context(), r.PathValue("site"), n)
	})
	mux.HandleFunc("DELETE /v1/sites/{site}/networks/{name}", v.auth(RoleOperator, func(w http.ResponseWriter, r *http.Request) {
		reply(w, map[string]string{"deleted": r.PathValue("name")}, v.DeleteNetwork(r.Context(), r.PathValue("site"), r.PathValue("name")))
	}))
	act(v, mux, "POST /v1/protections/{vm}/test-failover", func(r *http.Request, b api.PointRequest) (any, error) {
		return v.TestFailover(r.Context(), r.PathValue("vm"), b.Point)
	})
	act(v, mux, "POST /v1/protections/{vm}/test-failover/cleanup", func(r *http.Request, b api.CleanupRequest) (any, error) {
		return v.CleanupTestFailover(r.Context(), r.PathValue("vm"), b.Notes)
	})
	act(v, mux, "POST /v1/protections/{vm}/failover", func(r *http.Request, b api.FailoverRequest) (any, error) {
		return v.Failover(r.Context(), r.PathValue("vm"), b)
	})
	act(v, mux, "POST /v1/protections/{vm}/change-point", func(r *http.Request, b api.PointRequest) (any, error) {
		return v.ChangePoint(r.Context(), r.PathValue("vm"), b.Point)
	})
	// Files are the VM's data: operators only (a reader sees the state
	// of things, not what the VMs hold).
	mux.HandleFunc("GET /v1/protections/{vm}/files", v.auth(RoleOperator, func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		l, err := v.Files(r.Context(), r.PathValue("vm"), q.Get("point"), q.Get("path"))
		reply(w, l, err)
	}))
	mux.HandleFunc("GET /v1/protections/{vm}/files/content", v.auth(RoleOperator, func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		format := q.Get("format")
		if format != "" && format != "tar" && format != "raw" {
			reply(w, nil, fmt.Errorf("%w: format %q: want tar or raw", ErrInvalid, format))
			return
		}
		resp, pt, err := v.FileContent(r.Context(), r.PathValue("vm"), q.Get("point"), q.Get("path"), format == "raw")
		if err != nil {
			reply(w, nil, err)
			return
		}
		defer resp.Body.Close()
		for _, h := range []string{"Content-Type", "Content-Length", api.FileSizeHeader} {
			if x := resp.Header.Get(h); x != "" {
				w.Header().Set(h, x)
			}
		}
		w.Header().Set(api.FilePointHeader, strconv.FormatUint(pt.Seq, 10))
		w.WriteHeader(http.StatusOK)
		if _, err := io.Copy(httpserver.Stream(w, 2*time.Minute), resp.Body); err != nil {
			// The site's stream ended short: cut ours short too, so the
			// client sees it.
			v.log.Warn("file download cut short", "vm", r.PathValue("vm"), "err", err)
			panic(http.ErrAbortHandler)
		}
	}))
	act(v, mux, "POST /v1/protections/{vm}/ransomware/dismiss", func(r *http.Request, _ struct{}) (any, error) {
		return map[string]string{"dismissed": r.PathValue("vm")}, v.DismissIncident(r.Context(), r.PathValue("vm"))
	})
	act(v, mux, "POST /v1/protections/{vm}/commit", func(r *http.Request, _ struct{}) (any, error) {
		return v.Commit(r.Context(), r.PathValue("vm"))
	})
	read("GET /v1/protections/{vm}/reprotect-plan", func(r *http.Request) (any, error) { return v.PlanReprotect(r.Context(), r.PathValue("vm")) })
	act(v, mux, "POST /v1/protections/{vm}/reprotect", func(r *http.Request, _ struct{}) (any, error) {
		return v.Reprotect(r.Context(), r.PathValue("vm"))
	})
	read("GET /v1/plans", func(r *http.Request) (any, error) { return v.Plans(r.Context()) })
	read("GET /v1/plans/{name}", func(r *http.Request) (any, error) { return v.Plan(r.Context(), r.PathValue("name")) })
	act(v, mux, "PUT /v1/plans/{name}", func(r *http.Request, p Plan) (any, error) {
		if p.Name == "" {
			p.Name = r.PathValue("name")
		}
		if p.Name != r.PathValue("name") {
			return nil, fmt.Errorf("%w: plan %q in the body, %q in the path", ErrInvalid, p.Name, r.PathValue("name"))
		}
		return v.PutPlan(r.Context(), p)
	})
	mux.HandleFunc("DELETE /v1/plans/{name}", v.auth(RoleOperator, func(w http.ResponseWriter, r *http.Request) {
		reply(w, struct{}{}, v.DeletePlan(r.Context(), r.PathValue("name")))
	}))
	act(v, mux, "POST /v1/plans/{name}/run", func(r *http.Request, b api.PlanRun) (any, error) {
		return v.RunPlan(r.Context(), r.PathValue("name"), b)
	})
	act(v, mux, "POST /v1/jobs/{id}/resume", func(r *http.Request, _ struct{}) (any, error) {
		return v.ResumeJob(r.Context(), r.PathValue("id"))
	})
	act(v, mux, "POST /v1/jobs/{id}/retry", func(r *http.Request, _ struct{}) (any, error) {
		return v.RetryJob(r.Context(), r.PathValue("id"))
	})
	return v.leaderOnly(mux)
}

// leaderOnly refuses changes at a vault that does not lead, naming the
// one that does; reads are served by every vault from the shared store.
func (v *Vault) leaderOnly(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if v.cfg.Leadership == nil || r.Method == http.MethodGet || r.Method == http.MethodHead || v.Leading() || !strings.HasPrefix(r.URL.Path, "/v1/") {
			h.ServeHTTP(w, r)
			return
		}
		leader, _ := v.cfg.Leadership.Leader(r.Context())
		if leader == "" {
			leader = "none yet (an election is under way: retry in a few seconds)"
		}
		reply(w, nil, fmt.Errorf("%w: this vault does not lead; the leader is %s", api.ErrNotLeader, leader))
	})
}

// act registers an operator action whose JSON body decodes into a T.
func act[T any](v *Vault, mux *http.ServeMux, pattern string, h func(r *http.Request, body T) (any, error)) {
	mux.HandleFunc(pattern, v.auth(RoleOperator, func(w http.ResponseWriter, r *http.Request) {
		var body T
		if err := decode(r, &body); err != nil {
			reply(w, nil, err)
			return
		}
		out, err := h(r, body)
		reply(w, out, err)
	}))
}

// auth wraps h: a valid token of at least role is required.
func (v *Vault) auth(role string, h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		got, err := v.Authenticate(r.Context(), bearer(r))
		if err != nil {
			reply(w, nil, err)
			return
		}
		if role == RoleOperator && got != RoleOperator {
			reply(w, nil, fmt.Errorf("%w: %s tokens may only read; this needs an operator token", ErrRole, got))
			return
		}
		if got == RoleEnroll {
			reply(w, nil, fmt.Errorf("%w: an enroll token only enrolls a site", ErrRole))
			return
		}
		h(w, r)
	}
}

// bearer is the token of an "Authorization: Bearer TOKEN" header; any
// other form gives "" (no token), never the raw header.
func bearer(r *http.Request) string {
	scheme, tok, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return ""
	}
	return strings.TrimSpace(tok)
}

func decode(r *http.Request, v any) error {
	if err := httpjson.Decode(r, v); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	return nil
}

// reply answers with v or err. An error a site agent answered a call of
// the vault's with is the site's failure, not the caller's: it goes out
// as 502 (api.ErrSite) with the site's message, so that an agent's 404 or
// 401 is never taken for the vault's own.
func reply(w http.ResponseWriter, v any, err error) {
	var se *api.StatusError
	if errors.As(err, &se) {
		err = fmt.Errorf("%w: %s", api.ErrSite, err.Error())
	}
	httpjson.Reply(w, v, err)
}
