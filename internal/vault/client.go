package vault

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"os"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/httpjson"
)

// Client calls the vault's API with a token.
type Client struct {
	base, token string
	hc          *http.Client
}

// NewClient returns a client for the vault at url (https://host:port),
// verifying its certificate against the CA in caFile (empty: system roots).
func NewClient(url, token, caFile string) (*Client, error) {
	tc := &tls.Config{MinVersion: tls.VersionTLS13}
	if caFile != "" {
		b, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("read the vault's CA certificate: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(b) {
			return nil, fmt.Errorf("%s holds no certificate", caFile)
		}
		tc.RootCAs = pool
	}
	return &Client{base: url, token: token, hc: &http.Client{Timeout: 2 * time.Minute, Transport: &http.Transport{TLSClientConfig: tc}}}, nil
}

// Do sends a JSON request and decodes the answer into out; an error answer
// is an *api.StatusError with the vault's message, matched with
// errors.Is against the api sentinels.
func (c *Client) Do(ctx context.Context, method, path string, in, out any) error {
	err := httpjson.Call(ctx, c.hc, method, c.base+path, c.token, in, out)
	var se *api.StatusError
	if errors.As(err, &se) {
		return se // errors.Is(err, api.ErrNotFound) and the like work
	}
	if err != nil {
		return fmt.Errorf("vault at %s: %w (is it running? set --vault or FERRY_VAULT)", c.base, err)
	}
	return nil
}
