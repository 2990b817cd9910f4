// Package httpserver builds the HTTP servers of the vault and the agents
// with the limits an exposed daemon needs: header, body, write and idle
// timeouts, so that a client that sends a byte a minute cannot hold a
// connection, and a cap on the connections one client identity may hold
// at once (its certificate's identity, or its address without one).
// Routes that must outlive the timeouts (the replication link) hijack the
// connection and clear its deadlines.
package httpserver

import (
	"crypto/tls"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

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
	l := &limiter{max: cfg.MaxConnsPerClient, log: cfg.Logger, count: map[string]int{}, owner: map[net.Conn]string{}}
	return &http.Server{
		Handler:           cfg.Handler,
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
// the identity is known) until it closes or is hijacked.
type limiter struct {
	max   int
	log   *slog.Logger
	mu    sync.Mutex
	count map[string]int
	owner map[net.Conn]string // "" for a connection refused
}

func (l *limiter) state(c net.Conn, s http.ConnState) {
	switch s {
	case http.StateActive:
		l.mu.Lock()
		if _, seen := l.owner[c]; seen {
			l.mu.Unlock()
			return
		}
		key := clientKey(c)
		if l.count[key] >= l.max {
			l.owner[c] = ""
			l.mu.Unlock()
			l.log.Warn("connection refused: too many from one client", "client", key, "limit", l.max)
			c.Close()
			return
		}
		l.count[key]++
		l.owner[c] = key
		l.mu.Unlock()
	case http.StateHijacked, http.StateClosed:
		l.mu.Lock()
		if key, ok := l.owner[c]; ok {
			delete(l.owner, c)
			if key != "" {
				if l.count[key]--; l.count[key] <= 0 {
					delete(l.count, key)
				}
			}
		}
		l.mu.Unlock()
	}
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
