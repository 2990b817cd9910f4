// Package api holds what crosses a process boundary between ferry's
// processes: the error model shared by the vault's and the agents' HTTP
// APIs (a status code for each sentinel error and back), and the rules
// every name a user gives must follow. It imports nothing of ferry, so
// that any package may use it.
package api

import (
	"errors"
	"fmt"
	"net/http"
)

// The sentinel errors. Every error an API returns wraps exactly one of
// them; it decides the HTTP status, and a client maps the status back to
// the same sentinel, so callers decide with errors.Is, never on text.
var (
	ErrInvalid      = errors.New("invalid request")   // 400
	ErrUnauthorized = errors.New("unauthorized")      // 401: no or bad credential
	ErrForbidden    = errors.New("forbidden")         // 403: this identity or role may not
	ErrNotFound     = errors.New("not found")         // 404
	ErrConflict     = errors.New("conflict")          // 409: not in this state
	ErrTooMany      = errors.New("too many requests") // 429
	ErrUnavailable  = errors.New("unavailable")       // 503
	// ErrNotLeader: a vault that does not lead refused a change (421);
	// the message names the leader, and a client tries the next vault.
	ErrNotLeader = errors.New("not the leading vault")
	// ErrSite: a site agent failed a call the vault made on the caller's
	// behalf (502); the message says which site and what it answered.
	ErrSite = errors.New("site error")
	// ErrStaleLeader: an agent refused a call from a vault whose
	// leadership epoch (LeaderEpochHeader) is older than one it already
	// obeyed (412): a newer vault leads, and the caller must stop acting.
	ErrStaleLeader = errors.New("a newer vault leads")
	// ErrUnsupported: the request is well-formed but ferry cannot do it
	// on this object (422), e.g. a file system it cannot read.
	ErrUnsupported = errors.New("unsupported")
)

// LeaderEpochHeader carries, on a vault's calls to agents, the fencing
// token of the vault's leadership: etcd's revision of its election key,
// greater for every later leader. An agent refuses a call with an epoch
// below the highest it has obeyed (ErrStaleLeader), so a vault that lost
// the leadership but does not know it yet (cut off from etcd, paused)
// cannot act on a site after its successor did. Calls without it (a lone
// vault, an operator) are not fenced.
const LeaderEpochHeader = "Ferry-Leader-Epoch"

var codes = []struct {
	err  error
	code int
}{
	{ErrInvalid, http.StatusBadRequest},
	{ErrUnauthorized, http.StatusUnauthorized},
	{ErrForbidden, http.StatusForbidden},
	{ErrNotFound, http.StatusNotFound},
	{ErrConflict, http.StatusConflict},
	{ErrTooMany, http.StatusTooManyRequests},
	{ErrUnavailable, http.StatusServiceUnavailable},
	{ErrNotLeader, http.StatusMisdirectedRequest},
	{ErrSite, http.StatusBadGateway},
	{ErrStaleLeader, http.StatusPreconditionFailed},
	{ErrUnsupported, http.StatusUnprocessableEntity},
}

// Status is the HTTP status for err: the code of the sentinel it wraps,
// 500 for any other error, 200 for nil.
func Status(err error) int {
	if err == nil {
		return http.StatusOK
	}
	for _, c := range codes {
		if errors.Is(err, c.err) {
			return c.code
		}
	}
	return http.StatusInternalServerError
}

// Sentinel is the sentinel error for an HTTP status (nil for a status
// that has none, such as 500).
func Sentinel(code int) error {
	for _, c := range codes {
		if c.code == code {
			return c.err
		}
	}
	return nil
}

// StatusError is an error answer received from an API: errors.Is matches
// it against the sentinel of its status code.
type StatusError struct {
	Code    int
	Message string
}

func (e *StatusError) Error() string {
	if e.Message == "" {
		return fmt.Sprintf("%d %s", e.Code, http.StatusText(e.Code))
	}
	return e.Message
}

// Unwrap returns the sentinel of the status code (nil if none).
func (e *StatusError) Unwrap() error { return Sentinel(e.Code) }

// Kind returns a package-level sentinel with its own message that is also
// base: a vault's "forbidden move" is a conflict (409) but can be told
// apart from other conflicts with errors.Is on the server side.
func Kind(msg string, base error) error { return &kind{msg: msg, base: base} }

type kind struct {
	msg  string
	base error
}

func (k *kind) Error() string { return k.msg }
func (k *kind) Unwrap() error { return k.base }
