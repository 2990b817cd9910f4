package agent

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/httpjson"
	"github.com/ferry-dr/ferry/internal/httpserver"
	"github.com/ferry-dr/ferry/internal/link"
	"github.com/ferry-dr/ferry/internal/pki"
	"github.com/ferry-dr/ferry/internal/replica"
)

const linkProto = "ferry-link/1"

// Who may call what: every route names the roles whose certificates it
// accepts. The vault and operators manage; monitors read; sites only
// stream their replicas (and the link checks which site, per replica).
var (
	readers  = roles{pki.RoleVault, pki.RoleOperator, pki.RoleMonitor}
	managers = roles{pki.RoleVault, pki.RoleOperator}
	sites    = roles{pki.RoleSite}
)

type roles []string

type peerKey struct{}

// callerOf is the identity of the caller of a route (set by handle).
func callerOf(r *http.Request) pki.Peer {
	p, _ := r.Context().Value(peerKey{}).(pki.Peer)
	return p
}

func (a *Agent) routes() http.Handler {
	mux := http.NewServeMux()
	handle := func(pattern string, allowed roles, h http.HandlerFunc) {
		mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
			peer, err := pki.Verified(r.TLS)
			if err != nil {
				reply(w, nil, fmt.Errorf("%w: %v", api.ErrUnauthorized, err))
				return
			}
			if !slices.Contains(allowed, peer.Role) {
				a.log.Warn("refused a call", "route", pattern, "caller", peer.String())
				reply(w, nil, fmt.Errorf("%w: %s may not call %s (allowed: %s)", api.ErrForbidden, peer, pattern, strings.Join(allowed, ", ")))
				return
			}
			if r.Method != http.MethodGet {
				// A change from an older leader is refused (epoch.go).
				if err := a.admitEpoch(r.Header.Get(api.LeaderEpochHeader)); err != nil {
					a.log.Warn("refused a call", "route", pattern, "caller", peer.String(), "err", err)
					reply(w, nil, err)
					return
				}
			}
			h(w, r.WithContext(context.WithValue(r.Context(), peerKey{}, peer)))
		})
	}
	// Prometheus scrapes over the same mutual TLS as everything else
	// (give it a certificate: ferry ca issue --role monitor prometheus).
	handle("GET /metrics", readers, a.metrics.handler().ServeHTTP)
	handle("GET /v1/status", readers, func(w http.ResponseWriter, r *http.Request) { reply(w, a.FullStatus(r.Context()), nil) })
	handle("POST /v1/vms", managers, func(w http.ResponseWriter, r *http.Request) {
		var req VMRequest
		if !decode(w, r, &req) {
			return
		}
		st, err := a.StartVM(r.Context(), req)
		reply(w, st, err)
	})
	handle("POST /v1/imports", managers, func(w http.ResponseWriter, r *http.Request) {
		var req api.ImportRequest
		if !decode(w, r, &req) {
			return
		}
		st, err := a.Import(r.Context(), req)
		reply(w, st, err)
	})
	handle("GET /v1/domains", readers, func(w http.ResponseWriter, r *http.Request) {
		ds, err := a.Domains(r.Context())
		reply(w, ds, err)
	})
	handle("GET /v1/imports/{domain}", managers, func(w http.ResponseWriter, r *http.Request) {
		st, err := a.ImportStatus(r.PathValue("domain"))
		reply(w, st, err)
	})
	handle("POST /v1/imports/{domain}/release", managers, func(w http.ResponseWriter, r *http.Request) {
		reply(w, struct{}{}, a.Release(r.Context(), r.PathValue("domain")))
	})
	handle("GET /v1/vms/{name}/console", managers, func(w http.ResponseWriter, r *http.Request) {
		off, _ := strconv.ParseInt(r.URL.Query().Get("offset"), 10, 64)
		b, next, err := a.Console(r.PathValue("name"), off)
		reply(w, api.Console{Data: string(b), Next: next}, err)
	})
	handle("POST /v1/vms/{name}/ping", managers, func(w http.ResponseWriter, r *http.Request) {
		reply(w, struct{}{}, a.PingGuest(r.Context(), r.PathValue("name")))
	})
	handle("POST /v1/vms/{name}/commit", managers, func(w http.ResponseWriter, r *http.Request) {
		steps, err := a.CommitVM(r.Context(), r.PathValue("name"))
		reply(w, api.Steps{Steps: steps}, err)
	})
	handle("DELETE /v1/vms/{name}", managers, func(w http.ResponseWriter, r *http.Request) {
		opts := api.StopOptions{Force: r.URL.Query().Get("force") == "1"}
		if t := r.URL.Query().Get("timeout"); t != "" {
			d, err := time.ParseDuration(t)
			if err != nil || d <= 0 || d > time.Hour {
				reply(w, nil, fmt.Errorf("%w: timeout %q: want a duration up to 1h, like 30s", ErrInvalid, t))
				return
			}
			opts.Timeout = d
		}
		steps, err := a.StopVM(r.Context(), r.PathValue("name"), opts)
		reply(w, api.Steps{Steps: steps}, err)
	})
	handle("GET /v1/bandwidth", readers, func(w http.ResponseWriter, r *http.Request) { reply(w, a.Bandwidth(), nil) })
	handle("PUT /v1/bandwidth", managers, func(w http.ResponseWriter, r *http.Request) {
		var req api.Bandwidth
		if !decode(w, r, &req) {
			return
		}
		reply(w, a.Bandwidth(), a.SetBandwidth(req))
	})
	handle("POST /v1/groups", managers, func(w http.ResponseWriter, r *http.Request) {
		var req api.CreateGroup
		if !decode(w, r, &req) {
			return
		}
		reply(w, map[string]string{"created": req.Name}, a.CreateGroup(req.Name, req.Disks))
	})
	handle("DELETE /v1/groups/{name}", managers, func(w http.ResponseWriter, r *http.Request) {
		reply(w, map[string]string{"deleted": r.PathValue("name")}, a.DeleteGroup(r.Context(), r.PathValue("name")))
	})
	handle("POST /v1/groups/{name}/replication", managers, func(w http.ResponseWriter, r *http.Request) {
		var rc replConfig
		if !decode(w, r, &rc) {
			return
		}
		reply(w, map[string]string{"replicating": r.PathValue("name"), "to": rc.PeerName}, a.EnableReplication(r.PathValue("name"), rc))
	})
	handle("POST /v1/groups/{name}/fence", managers, func(w http.ResponseWriter, r *http.Request) {
		var req api.Fence
		if !decode(w, r, &req) {
			return
		}
		reply(w, map[string]any{"fenced": r.PathValue("name"), "generation": req.Generation}, a.Fence(r.PathValue("name"), req.Generation))
	})
	handle("POST /v1/groups/{name}/to-replica", managers, func(w http.ResponseWriter, r *http.Request) {
		var req api.ToReplica
		if r.ContentLength != 0 && !decode(w, r, &req) {
			return
		}
		specs, pc, err := a.GroupToReplica(r.Context(), r.PathValue("name"), req.Since, req.Source)
		reply(w, api.ToReplicaResult{Replica: r.PathValue("name"), Reused: specs, Changes: pc}, err)
	})
	handle("GET /v1/groups/{name}/changes", managers, func(w http.ResponseWriter, r *http.Request) {
		since, err := strconv.ParseUint(r.URL.Query().Get("since"), 10, 64)
		if err != nil {
			reply(w, nil, fmt.Errorf("%w: since must be a sequence number: %v", ErrInvalid, err))
			return
		}
		c, err := a.GroupChanges(r.PathValue("name"), since)
		reply(w, c, err)
	})
	handle("GET /v1/groups/{name}/divergence", managers, func(w http.ResponseWriter, r *http.Request) {
		d, err := a.GroupDivergence(r.PathValue("name"))
		reply(w, d, err)
	})
	handle("DELETE /v1/groups/{name}/replication", managers, func(w http.ResponseWriter, r *http.Request) {
		reply(w, map[string]string{"stopped": r.PathValue("name")}, a.DisableReplication(r.PathValue("name")))
	})
	handle("POST /v1/groups/{name}/points", managers, func(w http.ResponseWriter, r *http.Request) {
		var m replica.Marker
		if !decode(w, r, &m) {
			return
		}
		if m.Type == "app" {
			st, err := a.AppPoint(r.Context(), r.PathValue("name"), m.Label)
			if errors.Is(err, ErrNoQuiesce) {
				err = fmt.Errorf("%w: %v", ErrConflict, err)
			}
			reply(w, st, err)
			return
		}
		seq, err := a.Mark(r.Context(), r.PathValue("name"), m)
		reply(w, api.MarkResult{Seq: seq}, err)
	})
	handle("GET /v1/replicas/{name}/points", managers, func(w http.ResponseWriter, r *http.Request) {
		pts, err := a.Points(r.PathValue("name"))
		reply(w, pts, err)
	})
	handle("POST /v1/replicas/{name}/views", managers, func(w http.ResponseWriter, r *http.Request) {
		var req api.OpenView
		if !decode(w, r, &req) {
			return
		}
		ov, err := a.OpenView(r.PathValue("name"), req.Disk, req.Seq, req.Writable)
		if err != nil {
			reply(w, nil, err)
			return
		}
		reply(w, a.viewInfo(ov), nil)
	})
	handle("DELETE /v1/views/{id}", managers, func(w http.ResponseWriter, r *http.Request) {
		reply(w, map[string]string{"closed": r.PathValue("id")}, a.CloseView(r.PathValue("id")))
	})
	handle("PUT /v1/replicas/{name}/source", managers, func(w http.ResponseWriter, r *http.Request) {
		var req api.ReplicaSource
		if !decode(w, r, &req) {
			return
		}
		reply(w, req, a.ExpectReplica(r.PathValue("name"), req.Source))
	})
	handle("GET /v1/replicas/{name}/files", managers, func(w http.ResponseWriter, r *http.Request) {
		seq, err := strconv.ParseUint(r.URL.Query().Get("seq"), 10, 64)
		if err != nil || seq == 0 {
			reply(w, nil, fmt.Errorf("%w: seq %q: want a recovery point's sequence number", ErrInvalid, r.URL.Query().Get("seq")))
			return
		}
		l, err := a.ListFiles(r.Context(), r.PathValue("name"), seq, r.URL.Query().Get("path"))
		reply(w, l, err)
	})
	handle("GET /v1/replicas/{name}/files/content", managers, func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		seq, err := strconv.ParseUint(q.Get("seq"), 10, 64)
		if err != nil || seq == 0 {
			reply(w, nil, fmt.Errorf("%w: seq %q: want a recovery point's sequence number", ErrInvalid, q.Get("seq")))
			return
		}
		var format = q.Get("format")
		if format != "" && format != "tar" && format != "raw" {
			reply(w, nil, fmt.Errorf("%w: format %q: want tar or raw", ErrInvalid, format))
			return
		}
		started := false
		err = a.GetFiles(r.Context(), r.PathValue("name"), seq, q.Get("path"), format == "raw", func(c FileContent) {
			started = true
			w.Header().Set(api.FileSizeHeader, strconv.FormatInt(c.Size, 10))
			if c.Raw {
				w.Header().Set("Content-Type", "application/octet-stream")
				w.Header().Set("Content-Length", strconv.FormatInt(c.Size, 10))
			} else {
				w.Header().Set("Content-Type", "application/x-tar")
			}
			w.WriteHeader(http.StatusOK)
		}, httpserver.Stream(w, 2*time.Minute))
		if err != nil && !started {
			reply(w, nil, err)
		} else if err != nil {
			// Too late for a status: the stream is cut short, which the
			// client sees (a short file, a tar without its end).
			a.log.Warn("file download cut short", "replica", r.PathValue("name"), "path", q.Get("path"), "err", err)
			panic(http.ErrAbortHandler)
		}
	})
	handle("PUT /v1/replicas/{name}/ransomware-policy", managers, func(w http.ResponseWriter, r *http.Request) {
		var req api.RansomwarePolicy
		if !decode(w, r, &req) {
			return
		}
		if req.MinBytes < 0 || req.Factor < 0 || req.Window < 0 || req.Window > 24*time.Hour {
			reply(w, nil, fmt.Errorf("%w: ransomware policy %+v: thresholds must be positive (or 0 for the default), the window at most 24h", ErrInvalid, req))
			return
		}
		reply(w, struct{}{}, a.SetRansomwarePolicy(r.PathValue("name"), req))
	})
	handle("POST /v1/replicas/{name}/ransomware-dismiss", managers, func(w http.ResponseWriter, r *http.Request) {
		reply(w, struct{}{}, a.DismissIncident(r.PathValue("name")))
	})
	handle("POST /v1/replicas/{name}/resync", managers, func(w http.ResponseWriter, r *http.Request) {
		rp, err := a.ResyncReplica(r.Context(), r.PathValue("name"))
		reply(w, rp, err)
	})
	handle("POST /v1/groups/{name}/reseed", managers, func(w http.ResponseWriter, r *http.Request) {
		rp, err := a.ReseedGroup(r.Context(), r.PathValue("name"))
		reply(w, rp, err)
	})
	handle("DELETE /v1/replicas/{name}", managers, func(w http.ResponseWriter, r *http.Request) {
		reply(w, map[string]string{"deleted": r.PathValue("name")}, a.DeleteReplica(r.PathValue("name")))
	})
	handle("POST /v1/link", sites, a.serveLink)
	return mux
}

func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	if err := httpjson.Decode(r, v); err != nil {
		reply(w, nil, fmt.Errorf("%w: %v", ErrInvalid, err))
		return false
	}
	return true
}

func reply(w http.ResponseWriter, v any, err error) { httpjson.Reply(w, v, err) }

// serveLink upgrades the request to a replication stream.
func (a *Agent) serveLink(w http.ResponseWriter, r *http.Request) {
	if !strings.EqualFold(r.Header.Get("Upgrade"), linkProto) {
		reply(w, nil, fmt.Errorf("%w: expected Upgrade: %s", ErrInvalid, linkProto))
		return
	}
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		reply(w, nil, err)
		return
	}
	fmt.Fprintf(brw, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: %s\r\n\r\n", linkProto)
	if err := brw.Flush(); err != nil {
		conn.Close()
		return
	}
	conn.SetDeadline(time.Time{})
	a.wg.Add(1)
	defer a.wg.Done()
	peer := callerOf(r)
	admit := func(h link.Hello) error { return a.admitLink(peer, h) }
	if err := a.recv.Serve(a.ctx, bufferedConn{Conn: conn, r: brw.Reader}, admit); err != nil && a.ctx.Err() == nil {
		a.log.Warn("replication stream ended", "peer", peer.String(), "err", err)
	}
}

// bufferedConn reads through the buffer the HTTP layer may have filled.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// dialLink opens a replication stream to the agent at addr, whose
// certificate must name peerName.
//
// pace, if set, wraps the TCP connection under TLS (the bandwidth caps),
// so that what it counts is what goes on the wire.
func dialLink(ctx context.Context, id *pki.Identity, addr, peerName string, pace func(net.Conn) net.Conn) (io.ReadWriteCloser, error) {
	nd := &net.Dialer{Timeout: 10 * time.Second, KeepAlive: 15 * time.Second}
	raw, err := nd.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	if pace != nil {
		raw = pace(raw)
	}
	c := tls.Client(raw, id.ClientConfig(pki.Peer{Role: pki.RoleSite, Name: peerName}))
	hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	err = c.HandshakeContext(hctx)
	cancel()
	if err != nil {
		raw.Close()
		return nil, err
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "POST /v1/link HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: %s\r\nContent-Length: 0\r\n\r\n", peerName, linkProto)
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("link upgrade: %w", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		c.Close()
		return nil, fmt.Errorf("link upgrade refused: %s: %s", resp.Status, bytes.TrimSpace(b))
	}
	c.SetDeadline(time.Time{})
	return bufferedConn{Conn: c, r: br}, nil
}
