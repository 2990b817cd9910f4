package qga

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"time"
)

// Sentinel errors.
var (
	// ErrNoAgent: nothing answered on the guest agent channel in time
	// (no guest agent installed, or it is not running).
	ErrNoAgent = errors.New("qga: the guest agent does not answer")
	// ErrCommand: the guest agent answered with an error.
	ErrCommand = errors.New("qga: command failed")
)

// Client talks to one guest agent over QEMU's chardev unix socket. Calls
// are serialized; each takes a deadline from ctx or Timeout.
type Client struct {
	Path    string
	Timeout time.Duration // per call, default 5 s

	mu sync.Mutex
	nc net.Conn
	br *bufio.Reader
}

func (c *Client) timeout() time.Duration {
	if c.Timeout <= 0 {
		return 5 * time.Second
	}
	return c.Timeout
}

// Close drops the connection.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.nc != nil {
		err := c.nc.Close()
		c.nc = nil
		return err
	}
	return nil
}

// connect opens the socket and synchronises with guest-sync-delimited, so
// that a stale reply from an earlier session is never taken for ours.
func (c *Client) connect(ctx context.Context) error {
	if c.nc != nil {
		return nil
	}
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", c.Path)
	if err != nil {
		return fmt.Errorf("qga socket %s: %w", c.Path, err)
	}
	c.nc, c.br = nc, bufio.NewReader(nc)
	id := rand.Int64N(1 << 40)
	nc.SetDeadline(deadline(ctx, c.timeout()))
	// 0xFF makes the agent's parser drop any half-read input.
	if _, err := nc.Write(append([]byte{0xff}, fmt.Sprintf(`{"execute":"guest-sync-delimited","arguments":{"id":%d}}`+"\n", id)...)); err != nil {
		c.drop()
		return err
	}
	for {
		obj, err := ReadObject(c.br)
		if err != nil {
			c.drop()
			if isTimeout(err) {
				return fmt.Errorf("%w: no reply to guest-sync-delimited within %v", ErrNoAgent, c.timeout())
			}
			return err
		}
		var r struct {
			Return *int64 `json:"return"`
		}
		if json.Unmarshal(obj, &r) == nil && r.Return != nil && *r.Return == id {
			return nil
		}
	}
}

func (c *Client) drop() {
	if c.nc != nil {
		c.nc.Close()
		c.nc = nil
	}
}

func deadline(ctx context.Context, d time.Duration) time.Time {
	t := time.Now().Add(d)
	if dl, ok := ctx.Deadline(); ok && dl.Before(t) {
		return dl
	}
	return t
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// Execute runs a command and decodes its "return" into out (may be nil).
// noReply is for commands the agent does not answer on success
// (guest-shutdown).
func (c *Client) execute(ctx context.Context, cmd string, out any, noReply bool) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.connect(ctx); err != nil {
		return err
	}
	c.nc.SetDeadline(deadline(ctx, c.timeout()))
	if _, err := fmt.Fprintf(c.nc, `{"execute":%q}`+"\n", cmd); err != nil {
		c.drop()
		return err
	}
	if noReply {
		return nil
	}
	obj, err := ReadObject(c.br)
	if err != nil {
		c.drop()
		if isTimeout(err) {
			return fmt.Errorf("%w: no reply to %s", ErrNoAgent, cmd)
		}
		return err
	}
	var r struct {
		Return json.RawMessage `json:"return"`
		Error  *struct {
			Class string `json:"class"`
			Desc  string `json:"desc"`
		} `json:"error"`
	}
	if err := json.Unmarshal(obj, &r); err != nil {
		return fmt.Errorf("qga: bad reply to %s: %w", cmd, err)
	}
	if r.Error != nil {
		return fmt.Errorf("%w: %s: %s: %s", ErrCommand, cmd, r.Error.Class, r.Error.Desc)
	}
	if out != nil {
		return json.Unmarshal(r.Return, out)
	}
	return nil
}

// Ping checks that the agent answers.
func (c *Client) Ping(ctx context.Context) error { return c.execute(ctx, "guest-ping", nil, false) }

// Freeze freezes the guest's file systems and returns how many.
func (c *Client) Freeze(ctx context.Context) (int, error) {
	var n int
	err := c.execute(ctx, "guest-fsfreeze-freeze", &n, false)
	return n, err
}

// Thaw thaws them and returns how many.
func (c *Client) Thaw(ctx context.Context) (int, error) {
	var n int
	err := c.execute(ctx, "guest-fsfreeze-thaw", &n, false)
	return n, err
}

// FreezeStatus returns "frozen" or "thawed".
func (c *Client) FreezeStatus(ctx context.Context) (string, error) {
	var s string
	err := c.execute(ctx, "guest-fsfreeze-status", &s, false)
	return s, err
}

// Shutdown asks the guest to power off.
func (c *Client) Shutdown(ctx context.Context) error {
	return c.execute(ctx, "guest-shutdown", nil, true)
}
