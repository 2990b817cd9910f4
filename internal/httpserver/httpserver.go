// Package httpserver builds the HTTP servers of the vault and the agents
// with the limits an exposed daemon needs: header, body, write and idle
// timeouts, so that a client that sends a byte a minute cannot hold a
// connection, and a cap on the connections one client identity may hold
// at once (its certificate's identity, or its address without one).
// Routes that must outlive the timeouts (the replication link) hijack the
// connection and clear its deadlines.
package httpserver

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/httpjson"
	"github.com/ferry-dr/ferry/internal/pki"
)

// Config sets the limits; zero values take the defaults.
type Config struct {
	Handler http.Handler
	Logger  *slog.Logger
	// ReadHeaderTimeout bounds the TLS handshake and the request header
	// (default 10 s); ReadTimeout the whole request with its body
	// (default 30 s).
	ReadHeaderTimeout, ReadTimeout time.Duration
	// WriteTimeout bounds a handler and its answer (default 5 min: a
	// graceful VM shutdown takes up to a minute and a half).
	WriteTimeout time.Duration
	// IdleTimeout closes keep-alive connections left idle (default 2 min).
	IdleTimeout time.Duration
	// MaxConnsPerClient caps the connections one identity holds open at
	// once (default 64); past it new ones are closed at their first
	// request.
	MaxConnsPerClient int
}

// New returns a server with cfg's limits. Serve it with Serve or
// ServeTLS as usual.
func New(cfg Config) *http.Server {
	if cfg.ReadHeaderTimeout <= 0 {
		cfg.ReadHeaderTimeout = 10 * time.Second
	}
	if cfg.ReadTimeout <= 0 {
		cfg.ReadTimeout = 30 * time.Second
	}
	if cfg.WriteTimeout <= 0 {
		cfg.WriteTimeout = 5 * time.Minute
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = 2 * time.Minute
	}
	if cfg.MaxConnsPerClient <= 0 {
		cfg.MaxConnsPerClient = 64
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	l := &limiter{max: cfg.MaxConnsPerClient, log: cfg.Logger, count: map[string]int{}, owner: map[net.Conn]*slot{}}
	return &http.Server{
		Handler:           l.wrap(cfg.Handler),
		ConnContext:       l.connContext,
		ReadHeaderTimeout: cfg.ReadHeaderTimeout,
		ReadTimeout:       cfg.ReadTimeout,
		WriteTimeout:      cfg.WriteTimeout,
		IdleTimeout:       cfg.IdleTimeout,
		MaxHeaderBytes:    64 << 10,
		ConnState:         l.state,
		ErrorLog:          slog.NewLogLogger(cfg.Logger.Handler(), slog.LevelDebug),
	}
}

// limiter counts open connections per client identity. A connection is
// counted from its first request (the TLS handshake is done by then, so
// the identity is known) until it closes or is hijacked. A connection over
// the cap has its requests answered 429 without reaching the handler, and
// is closed.
type limiter struct {
	max   int
	log   *slog.Logger
	mu    sync.Mutex
	count map[string]int
	owner map[net.Conn]*slot
}

// slot is a connection's standing, shared with its requests' contexts.
type slot struct {
	key     string // the identity counted ("" until the first request)
	counted bool
	refused atomic.Bool
	decided bool
}

type slotKey struct{}

func (l *limiter) connContext(ctx context.Context, c net.Conn) context.Context {
	sl := &slot{}
	l.mu.Lock()
	l.owner[c] = sl
	l.mu.Unlock()
	return context.WithValue(ctx, slotKey{}, sl)
}

func (l *limiter) state(c net.Conn, s http.ConnState) {
	switch s {
	case http.StateActive:
		l.mu.Lock()
		sl := l.owner[c]
		if sl == nil || sl.decided {
			l.mu.Unlock()
			return
		}
		sl.decided = true
		sl.key = clientKey(c)
		if l.count[sl.key] >= l.max {
			l.mu.Unlock()
			sl.refused.Store(true)
			l.log.Warn("connection refused: too many from one client", "client", sl.key, "limit", l.max)
			return
		}
		l.count[sl.key]++
		sl.counted = true
		l.mu.Unlock()
	case http.StateHijacked, http.StateClosed:
		l.mu.Lock()
		if sl, ok := l.owner[c]; ok {
			delete(l.owner, c)
			if sl.counted {
				if l.count[sl.key]--; l.count[sl.key] <= 0 {
					delete(l.count, sl.key)
				}
			}
		}
		l.mu.Unlock()
	}
}

// wrap refuses the requests of a connection over the cap before h sees
// them: nothing they ask for happens.
func (l *limiter) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if sl, _ := r.Context().Value(slotKey{}).(*slot); sl != nil && sl.refused.Load() {
			w.Header().Set("Connection", "close")
			httpjson.Reply(w, nil, fmt.Errorf("%w: more than %d connections from %s; reuse connections", api.ErrTooMany, l.max, sl.key))
			return
		}
		h.ServeHTTP(w, r)
	})
}

// clientKey is the identity in the client's certificate, else its IP.
func clientKey(c net.Conn) string {
	if tc, ok := c.(*tls.Conn); ok {
		cs := tc.ConnectionState()
		if p, err := pki.Verified(&cs); err == nil {
			return p.String()
		}
	}
	host, _, err := net.SplitHostPort(c.RemoteAddr().String())
	if err != nil {
		return c.RemoteAddr().String()
	}
	return "addr/" + host
}

// Stream returns a writer for a long answer (a download) that moves the
// connection's write deadline idle past each write: the server's
// WriteTimeout bounds an answer as a whole, which a large download
// outlasts, while a client that stops reading for idle still ends it.
func Stream(w http.ResponseWriter, idle time.Duration) io.Writer {
	return &streamWriter{w: w, rc: http.NewResponseController(w), idle: idle}
}

type streamWriter struct {
	w    http.ResponseWriter
	rc   *http.ResponseController
	idle time.Duration
}

func (s *streamWriter) Write(p []byte) (int, error) {
	// Not every ResponseWriter can (a test recorder): then the server's
	// own timeout stands.
	s.rc.SetWriteDeadline(time.Now().Add(s.idle))
	return s.w.Write(p)
}
