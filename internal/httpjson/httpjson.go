// Package httpjson is the JSON-over-HTTP plumbing the agent and the vault
// APIs share: decoding a request body strictly, writing a JSON answer or a
// JSON error with the right status, and calling such an API.
package httpjson

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"

	"github.com/ferry-dr/ferry/internal/api"
)

// ErrBody: the request body is not the JSON expected (an api.ErrInvalid).
var ErrBody = api.Kind("invalid request body", api.ErrInvalid)

// Decode reads a JSON body (at most 1 MiB; unknown fields refused) into v.
// An empty body leaves v as it is.
func Decode(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("%w: %v", ErrBody, err)
	}
	return nil
}

// Reply writes v as JSON, or, if err is not nil, {"error": err} with the
// status code of the api sentinel err wraps (api.Status).
func Reply(w http.ResponseWriter, v any, err error) {
	w.Header().Set("Content-Type", "application/json")
	if err != nil {
		w.WriteHeader(api.Status(err))
		json.NewEncoder(w).Encode(map[string]string{"error": err.Error()})
		return
	}
	json.NewEncoder(w).Encode(v)
}

// Call sends in as JSON (if not nil) with an optional bearer token and
// decodes the JSON answer into out (if not nil). An error answer becomes an
// *api.StatusError carrying the API's message, which errors.Is matches
// against the sentinel of its status.
func Call(ctx context.Context, hc *http.Client, method, url, token string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, url, body)
	if err != nil {
		return err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if resp.StatusCode >= 300 {
		var e struct{ Error string }
		json.Unmarshal(b, &e)
		if e.Error == "" {
			e.Error = string(b)
		}
		return &api.StatusError{Code: resp.StatusCode, Message: e.Error}
	}
	if out != nil {
		return json.Unmarshal(b, out)
	}
	return nil
}

// Open sends a GET (with an optional bearer token) and returns the
// response of a 2xx answer for the caller to stream and close; an error
// answer becomes an *api.StatusError, as with Call.
func Open(ctx context.Context, hc *http.Client, url, token string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode >= 300 {
		defer resp.Body.Close()
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		var e struct{ Error string }
		json.Unmarshal(b, &e)
		if e.Error == "" {
			e.Error = string(b)
		}
		return nil, &api.StatusError{Code: resp.StatusCode, Message: e.Error}
	}
	return resp, nil
}
