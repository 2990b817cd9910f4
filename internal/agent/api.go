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
	"strconv"
	"strings"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/disk"
	"github.com/ferry-dr/ferry/internal/httpjson"
	"github.com/ferry-dr/ferry/internal/pki"
	"github.com/ferry-dr/ferry/internal/replica"
)

const linkProto = "ferry-link/1"

func (a *Agent) routes() http.Handler {
	mux := http.NewServeMux()
	// Prometheus scrapes over the same mutual TLS as everything else
	// (give it a certificate: ferry ca issue prometheus).
	mux.Handle("GET /metrics", a.metrics.handler())
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) { reply(w, a.FullStatus(r.Context()), nil) })
	mux.HandleFunc("POST /v1/vms", func(w http.ResponseWriter, r *http.Request) {
		var req VMRequest
		if !decode(w, r, &req) {
			return
		}
		st, err := a.StartVM(r.Context(), req)
		reply(w, st, err)
	})
	mux.HandleFunc("GET /v1/vms/{name}/console", func(w http.ResponseWriter, r *http.Request) {
		off, _ := strconv.ParseInt(r.URL.Query().Get("offset"), 10, 64)
		b, next, err := a.Console(r.PathValue("name"), off)
		reply(w, map[string]any{"data": string(b), "next": next}, err)
	})
	mux.HandleFunc("POST /v1/vms/{name}/commit", func(w http.ResponseWriter, r *http.Request) {
		steps, err := a.CommitVM(r.Context(), r.PathValue("name"))
		reply(w, map[string]any{"committed": r.PathValue("name"), "steps": steps}, err)
	})
	mux.HandleFunc("DELETE /v1/vms/{name}", func(w http.ResponseWriter, r *http.Request) {
		steps, err := a.StopVM(r.Context(), r.PathValue("name"), r.URL.Query().Get("force") == "1")
		reply(w, map[string]any{"stopped": r.PathValue("name"), "steps": steps}, err)
	})
	mux.HandleFunc("POST /v1/groups", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Name  string      `json:"name"`
			Disks []disk.Spec `json:"disks"`
		}
		if !decode(w, r, &req) {
			return
		}
		reply(w, map[string]string{"created": req.Name}, a.CreateGroup(req.Name, req.Disks))
	})
	mux.HandleFunc("DELETE /v1/groups/{name}", func(w http.ResponseWriter, r *http.Request) {
		reply(w, map[string]string{"deleted": r.PathValue("name")}, a.DeleteGroup(r.Context(), r.PathValue("name")))
	})
	mux.HandleFunc("POST /v1/groups/{name}/replication", func(w http.ResponseWriter, r *http.Request) {
		var rc replConfig
		if !decode(w, r, &rc) {
			return
		}
		reply(w, map[string]string{"replicating": r.PathValue("name"), "to": rc.PeerName}, a.EnableReplication(r.PathValue("name"), rc))
	})
	mux.HandleFunc("POST /v1/groups/{name}/fence", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Generation int64 `json:"generation"`
		}
		if !decode(w, r, &req) {
			return
		}
		reply(w, map[string]any{"fenced": r.PathValue("name"), "generation": req.Generation}, a.Fence(r.PathValue("name"), req.Generation))
	})
	mux.HandleFunc("POST /v1/groups/{name}/to-replica", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Since uint64 `json:"since"` // the failover point: report the changes after it
		}
		if r.ContentLength != 0 && !decode(w, r, &req) {
			return
		}
		specs, pc, err := a.GroupToReplica(r.Context(), r.PathValue("name"), req.Since)
		reply(w, map[string]any{"replica": r.PathValue("name"), "reused": specs, "changes": pc}, err)
	})
	mux.HandleFunc("GET /v1/groups/{name}/changes", func(w http.ResponseWriter, r *http.Request) {
		since, err := strconv.ParseUint(r.URL.Query().Get("since"), 10, 64)
		if err != nil {
			reply(w, nil, fmt.Errorf("%w: since must be a sequence number: %v", ErrInvalid, err))
			return
		}
		c, err := a.GroupChanges(r.PathValue("name"), since)
		reply(w, c, err)
	})
	mux.HandleFunc("GET /v1/groups/{name}/divergence", func(w http.ResponseWriter, r *http.Request) {
		d, err := a.GroupDivergence(r.PathValue("name"))
		reply(w, d, err)
	})
	mux.HandleFunc("DELETE /v1/groups/{name}/replication", func(w http.ResponseWriter, r *http.Request) {
		reply(w, map[string]string{"stopped": r.PathValue("name")}, a.DisableReplication(r.PathValue("name")))
	})
	mux.HandleFunc("POST /v1/groups/{name}/points", func(w http.ResponseWriter, r *http.Request) {
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
		reply(w, map[string]uint64{"seq": seq}, err)
	})
	mux.HandleFunc("GET /v1/replicas/{name}/points", func(w http.ResponseWriter, r *http.Request) {
		pts, err := a.Points(r.PathValue("name"))
		reply(w, pts, err)
	})
	mux.HandleFunc("POST /v1/replicas/{name}/views", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Disk     string `json:"disk"`
			Seq      uint64 `json:"seq"`
			Writable bool   `json:"writable"`
		}
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
	mux.HandleFunc("DELETE /v1/views/{id}", func(w http.ResponseWriter, r *http.Request) {
		reply(w, map[string]string{"closed": r.PathValue("id")}, a.CloseView(r.PathValue("id")))
	})
	mux.HandleFunc("POST /v1/link", a.serveLink)
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
	if err := a.recv.Serve(a.ctx, bufferedConn{Conn: conn, r: brw.Reader}); err != nil && a.ctx.Err() == nil {
		a.log.Warn("replication stream ended", "peer", peerName(conn), "err", err)
	}
}

func peerName(c net.Conn) string {
	if tc, ok := c.(*tls.Conn); ok {
		if cs := tc.ConnectionState(); len(cs.PeerCertificates) > 0 {
			return cs.PeerCertificates[0].Subject.CommonName
		}
	}
	return c.RemoteAddr().String()
}

// bufferedConn reads through the buffer the HTTP layer may have filled.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// dialLink opens a replication stream to the agent at addr, whose
// certificate must name peerName.
func dialLink(ctx context.Context, id *pki.Identity, addr, peerName string) (io.ReadWriteCloser, error) {
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 10 * time.Second, KeepAlive: 15 * time.Second}, Config: id.ClientConfig(peerName)}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
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

// Client calls an agent's API.
type Client struct {
	base string
	hc   *http.Client
}

// NewClient returns a client for the agent at addr (host:port) whose
// certificate names serverName, authenticating with id.
func NewClient(id *pki.Identity, addr, serverName string) *Client {
	tr := &http.Transport{TLSClientConfig: id.ClientConfig(serverName), ForceAttemptHTTP2: false}
	// Long enough for a graceful VM shutdown (60 s grace, then quit).
	return &Client{base: "https://" + addr, hc: &http.Client{Transport: tr, Timeout: 3 * time.Minute}}
}

// Do sends a JSON request and decodes the JSON answer into out (if not
// nil). An error answer wraps an *api.StatusError: errors.Is matches it
// against the api sentinel of its status (api.ErrNotFound, ...).
func (c *Client) Do(ctx context.Context, method, path string, in, out any) error {
	err := httpjson.Call(ctx, c.hc, method, c.base+path, "", in, out)
	var se *api.StatusError
	if errors.As(err, &se) {
		return fmt.Errorf("%s %s: %d %s: %w", method, path, se.Code, http.StatusText(se.Code), se)
	}
	if err != nil {
		return fmt.Errorf("agent at %s: %w", c.base, err)
	}
	return nil
}
