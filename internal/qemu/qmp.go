package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"
)

// QMP is a client of QEMU's machine protocol. Execute may be called
// concurrently; events are delivered on Events until the connection ends.
type QMP struct {
	nc      net.Conn
	mu      sync.Mutex // one command at a time
	replies chan qmpMsg
	Events  chan Event
	done    chan struct{}
	err     error
}

// Event is an asynchronous QMP event (SHUTDOWN, STOP, ...).
type Event struct {
	Name string          `json:"event"`
	Data json.RawMessage `json:"data"`
}

type qmpMsg struct {
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
	Event string          `json:"event"`
	Data  json.RawMessage `json:"data"`
	QMP   json.RawMessage `json:"QMP"`
}

// DialQMP connects to the QMP socket and negotiates capabilities.
func DialQMP(ctx context.Context, path string) (*QMP, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, err
	}
	q := &QMP{nc: nc, replies: make(chan qmpMsg, 1), Events: make(chan Event, 64), done: make(chan struct{})}
	br := bufio.NewReader(nc)
	nc.SetDeadline(time.Now().Add(10 * time.Second))
	line, err := br.ReadBytes('\n')
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("qmp greeting: %w", err)
	}
	var greet qmpMsg
	if json.Unmarshal(line, &greet) != nil || greet.QMP == nil {
		nc.Close()
		return nil, fmt.Errorf("qmp: unexpected greeting %q", line)
	}
	nc.SetDeadline(time.Time{})
	go q.readLoop(br)
	if err := q.Execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		nc.Close()
		return nil, err
	}
	return q, nil
}

func (q *QMP) readLoop(br *bufio.Reader) {
	defer close(q.done)
	defer close(q.Events)
	for {
		line, err := br.ReadBytes('\n')
		if err != nil {
			q.err = err
			return
		}
		var m qmpMsg
		if json.Unmarshal(line, &m) != nil {
			continue
		}
		if m.Event != "" {
			select {
			case q.Events <- Event{Name: m.Event, Data: m.Data}:
			default: // nobody listens; events are advisory
			}
			continue
		}
		select {
		case q.replies <- m:
		default:
		}
	}
}

// ErrQMP: QEMU answered a command with an error.
var ErrQMP = errors.New("qmp: command failed")

// Execute runs cmd with args and decodes the return value into out.
func (q *QMP) Execute(ctx context.Context, cmd string, args any, out any) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	b, _ := json.Marshal(req)
	if _, err := q.nc.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("qmp %s: %w", cmd, err)
	}
	select {
	case m := <-q.replies:
		if m.Error != nil {
			return fmt.Errorf("%w: %s: %s", ErrQMP, cmd, m.Error.Desc)
		}
		if out != nil {
			return json.Unmarshal(m.Return, out)
		}
		return nil
	case <-q.done:
		return fmt.Errorf("qmp %s: connection closed: %v", cmd, q.err)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Close closes the connection.
func (q *QMP) Close() error { return q.nc.Close() }
