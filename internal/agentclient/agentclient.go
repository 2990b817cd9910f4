// Package agentclient is the typed client of a site agent's API
// (docs/agent-api.md): one method per route, and the only code that spells
// an agent's URLs. Errors the agent answers wrap an *api.StatusError, so
// callers decide with errors.Is(err, api.ErrNotFound) and the like. It
// imports no data-plane package: the vault reaches sites through it
// without linking the journal, the NBD server or QEMU.
package agentclient

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/httpjson"
	"github.com/ferry-dr/ferry/internal/pki"
)

// Client calls one agent. It is safe for concurrent use.
type Client struct {
	base string
	hc   *http.Client
}

// New returns a client for the agent of site at addr (host:port),
// authenticating with id; the server must hold site's certificate.
func New(id *pki.Identity, addr, site string) *Client {
	return NewFor(id, addr, pki.Peer{Role: pki.RoleSite, Name: site})
}

// NewFor returns a client for the server at addr that must hold the
// identity server (an empty name accepts any name of that role).
func NewFor(id *pki.Identity, addr string, server pki.Peer) *Client {
	tr := &http.Transport{TLSClientConfig: id.ClientConfig(server), ForceAttemptHTTP2: false,
		MaxIdleConnsPerHost: 4, IdleConnTimeout: 30 * time.Second}
	// Long enough for a graceful VM shutdown (60 s grace, then quit).
	return &Client{base: "https://" + addr, hc: &http.Client{Transport: tr, Timeout: 3 * time.Minute}}
}

// SetLeaderEpoch makes every call carry epoch() as the caller's
// leadership epoch (api.LeaderEpochHeader), when it is above 0: a site
// then refuses the calls of a leader older than one it obeyed, with
// api.ErrStaleLeader, and deposed (if not nil) is called at once, so
// that the caller stops acting before its own lease tells it. Call it
// before the first call.
func (c *Client) SetLeaderEpoch(epoch func() int64, deposed func()) {
	c.hc.Transport = epochTransport{next: c.hc.Transport, epoch: epoch, deposed: deposed}
}

// epochTransport adds the leadership epoch to each request.
type epochTransport struct {
	next    http.RoundTripper
	epoch   func() int64
	deposed func()
}

func (t epochTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	e := t.epoch()
	if e > 0 {
		r = r.Clone(r.Context())
		r.Header.Set(api.LeaderEpochHeader, strconv.FormatInt(e, 10))
	}
	resp, err := t.next.RoundTrip(r)
	if err == nil && e > 0 && t.deposed != nil && errors.Is(api.Sentinel(resp.StatusCode), api.ErrStaleLeader) {
		t.deposed()
	}
	return resp, err
}

// SetTimeout bounds every call (default 3 min).
func (c *Client) SetTimeout(d time.Duration) { c.hc.Timeout = d }

func (c *Client) call(ctx context.Context, method, path string, in, out any) error {
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

func esc(s string) string { return url.PathEscape(s) }

// Status reports the agent's groups, replicas, views and VMs, and its
// capacity. Read-only.
func (c *Client) Status(ctx context.Context) (api.AgentStatus, error) {
	var st api.AgentStatus
	return st, c.call(ctx, "GET", "/v1/status", nil, &st)
}

// CreateGroup creates a consistency group with its disks. ErrConflict if
// one of that name exists; ErrInvalid for bad names or sizes.
func (c *Client) CreateGroup(ctx context.Context, name string, disks []api.DiskSpec) error {
	return c.call(ctx, "POST", "/v1/groups", api.CreateGroup{Name: name, Disks: disks}, nil)
}

// DeleteGroup deletes a group's disks and journal. ErrConflict while it
// replicates or a VM runs on it; ErrNotFound if there is none.
func (c *Client) DeleteGroup(ctx context.Context, name string) error {
	return c.call(ctx, "DELETE", "/v1/groups/"+esc(name), nil, nil)
}

// Replicate starts replicating group to the peer in r; asked again with
// the same peer it does nothing (idempotent). ErrConflict if the group
// replicates elsewhere.
func (c *Client) Replicate(ctx context.Context, group string, r api.Replicate) error {
	return c.call(ctx, "POST", "/v1/groups/"+esc(group)+"/replication", r, nil)
}

// SetBandwidth replaces the site's replication caps. ErrInvalid for a
// malformed cap (nothing changes then).
func (c *Client) SetBandwidth(ctx context.Context, bw api.Bandwidth) error {
	return c.call(ctx, "PUT", "/v1/bandwidth", bw, nil)
}

// Bandwidth returns the site's replication caps as set.
func (c *Client) Bandwidth(ctx context.Context) (api.Bandwidth, error) {
	var bw api.Bandwidth
	return bw, c.call(ctx, "GET", "/v1/bandwidth", nil, &bw)
}

// Unreplicate stops a group's replication and releases its journal hold.
func (c *Client) Unreplicate(ctx context.Context, group string) error {
	return c.call(ctx, "DELETE", "/v1/groups/"+esc(group)+"/replication", nil, nil)
}

// Domains lists the site's libvirt domains that ferry does not run yet,
// with what an import would take or why it cannot (none at a site that
// runs QEMU directly).
func (c *Client) Domains(ctx context.Context) ([]api.DomainInfo, error) {
	var out []api.DomainInfo
	return out, c.call(ctx, "GET", "/v1/domains", nil, &out)
}

// Fence tells the site that generation gen of group runs elsewhere: the
// group stops replicating as a source and refuses to start its VM.
// Idempotent; never lowers a generation. ErrNotFound if there is no such
// group.
func (c *Client) Fence(ctx context.Context, group string, gen int64) error {
	return c.call(ctx, "POST", "/v1/groups/"+esc(group)+"/fence", api.Fence{Generation: gen}, nil)
}

// ToReplica turns a group no VM runs on into a replica of the same name
// streamed by req.Source, reporting what it changed after req.Since.
// Idempotent: asked again it answers what it answered then.
func (c *Client) ToReplica(ctx context.Context, group string, req api.ToReplica) (api.ToReplicaResult, error) {
	var out api.ToReplicaResult
	return out, c.call(ctx, "POST", "/v1/groups/"+esc(group)+"/to-replica", req, &out)
}

// Changes reports the blocks a (fenced) group changed after since.
// ErrNotFound if the group or its tracking is gone.
func (c *Client) Changes(ctx context.Context, group string, since uint64) (api.PeerChanges, error) {
	var out api.PeerChanges
	return out, c.call(ctx, "GET", "/v1/groups/"+esc(group)+"/changes?since="+strconv.FormatUint(since, 10), nil, &out)
}

// Divergence reports a committed group's divergence record. ErrNotFound if
// it has none.
func (c *Client) Divergence(ctx context.Context, group string) (api.Divergence, error) {
	var out api.Divergence
	return out, c.call(ctx, "GET", "/v1/groups/"+esc(group)+"/divergence", nil, &out)
}

// Mark records a named or crash-consistent point in a group's journal and
// returns its sequence number; it is durable when answered.
func (c *Client) Mark(ctx context.Context, group string, m api.Marker) (uint64, error) {
	var out api.MarkResult
	return out.Seq, c.call(ctx, "POST", "/v1/groups/"+esc(group)+"/points", m, &out)
}

// AppPoint takes an application-consistent point through the group's VM's
// guest agent. ErrConflict, with the reason, if the guest cannot be
// quiesced.
func (c *Client) AppPoint(ctx context.Context, group, label string) (api.AppPointStatus, error) {
	var out api.AppPointStatus
	return out, c.call(ctx, "POST", "/v1/groups/"+esc(group)+"/points", api.Marker{Type: api.PointApp, Label: label}, &out)
}

// ExpectReplica records site source as the only one whose streams
// replica takes. Idempotent.
func (c *Client) ExpectReplica(ctx context.Context, replica, source string) error {
	return c.call(ctx, "PUT", "/v1/replicas/"+esc(replica)+"/source", api.ReplicaSource{Source: source}, nil)
}

// ResyncReplica sets a damaged replica's journal aside and has the
// source's next stream copy again by checksum compare. ErrNotFound without
// the replica, ErrConflict while a VM or view uses it.
func (c *Client) ResyncReplica(ctx context.Context, name string) (api.Repair, error) {
	var out api.Repair
	err := c.call(ctx, "POST", "/v1/replicas/"+esc(name)+"/resync", nil, &out)
	return out, err
}

// ReseedGroup takes a damaged group's images as they are, sets its journal
// aside and starts a new one; its replica is copied again. ErrNotFound
// unless the group is one that did not open, ErrConflict if it is open.
func (c *Client) ReseedGroup(ctx context.Context, name string) (api.Repair, error) {
	var out api.Repair
	err := c.call(ctx, "POST", "/v1/groups/"+esc(name)+"/reseed", nil, &out)
	return out, err
}

// DeleteReplica deletes a replica with its journal and recovery points.
// ErrConflict while a VM or a view uses it; ErrNotFound without it.
func (c *Client) DeleteReplica(ctx context.Context, name string) error {
	return c.call(ctx, "DELETE", "/v1/replicas/"+esc(name), nil, nil)
}

// Files lists a directory of a replica's disks at recovery point seq
// ("/" lists the file systems). The first call on a point starts a
// libguestfs appliance at the site (10-30 s). ErrNotFound for a missing
// replica, point or path, ErrUnsupported for a file system the site
// cannot read, ErrTooMany while the site's browsing sessions are all in
// use.
func (c *Client) Files(ctx context.Context, replica string, seq uint64, path string) (api.FileListing, error) {
	var out api.FileListing
	q := url.Values{"seq": {strconv.FormatUint(seq, 10)}, "path": {path}}
	return out, c.call(ctx, "GET", "/v1/replicas/"+esc(replica)+"/files?"+q.Encode(), nil, &out)
}

// FileContent opens a download of path at seq: the file's bytes (raw)
// or a tar of it under its base name. The caller closes the body; a
// stream that ends short is an error the reader sees (io.ErrUnexpectedEOF
// or a tar without its end). Errors as Files.
func (c *Client) FileContent(ctx context.Context, replica string, seq uint64, path string, raw bool) (*http.Response, error) {
	q := url.Values{"seq": {strconv.FormatUint(seq, 10)}, "path": {path}, "format": {"tar"}}
	if raw {
		q.Set("format", "raw")
	}
	p := "/v1/replicas/" + esc(replica) + "/files/content?" + q.Encode()
	// No overall timeout: a large tree takes as long as it takes; ctx
	// bounds it.
	resp, err := httpjson.Open(ctx, &http.Client{Transport: c.hc.Transport}, c.base+p, "")
	var se *api.StatusError
	if errors.As(err, &se) {
		return nil, fmt.Errorf("GET %s: %d %s: %w", p, se.Code, http.StatusText(se.Code), se)
	}
	if err != nil {
		return nil, fmt.Errorf("agent at %s: %w", c.base, err)
	}
	return resp, nil
}

// SetRansomwarePolicy sets a replica's detector thresholds. Idempotent;
// ErrNotFound without the replica, ErrInvalid for negative thresholds.
func (c *Client) SetRansomwarePolicy(ctx context.Context, replica string, p api.RansomwarePolicy) error {
	return c.call(ctx, "PUT", "/v1/replicas/"+esc(replica)+"/ransomware-policy", p, nil)
}

// DismissIncident closes a replica's open ransomware incident (its last
// clean point is then no longer held from retention). ErrNotFound without
// the replica or without an open incident.
func (c *Client) DismissIncident(ctx context.Context, replica string) error {
	return c.call(ctx, "POST", "/v1/replicas/"+esc(replica)+"/ransomware-dismiss", nil, nil)
}

// Points lists a replica's recovery points, oldest first. ErrNotFound if
// there is no such replica.
func (c *Client) Points(ctx context.Context, replica string) ([]api.Point, error) {
	var out []api.Point
	return out, c.call(ctx, "GET", "/v1/replicas/"+esc(replica)+"/points", nil, &out)
}

// OpenView exports a view of a replica's disk at a point over NBD.
func (c *Client) OpenView(ctx context.Context, replica string, req api.OpenView) (api.ViewInfo, error) {
	var out api.ViewInfo
	return out, c.call(ctx, "POST", "/v1/replicas/"+esc(replica)+"/views", req, &out)
}

// CloseView closes a view and disconnects its clients.
func (c *Client) CloseView(ctx context.Context, id string) error {
	return c.call(ctx, "DELETE", "/v1/views/"+esc(id), nil, nil)
}

// StartVM starts a VM on a group's disks, or on views of a replica at a
// point. ErrConflict if it exists or the group is fenced.
func (c *Client) StartVM(ctx context.Context, req api.VMRequest) (api.VMStatus, error) {
	var out api.VMStatus
	return out, c.call(ctx, "POST", "/v1/vms", req, &out)
}

// Import starts importing a shut-off libvirt domain (a libvirt site only):
// ErrInvalid for a domain it cannot import, ErrConflict if it runs or its
// group exists. Idempotent while the copy runs.
func (c *Client) Import(ctx context.Context, domain string) (api.ImportStatus, error) {
	var out api.ImportStatus
	return out, c.call(ctx, "POST", "/v1/imports", api.ImportRequest{Domain: domain}, &out)
}

// ImportStatus reports an import's progress; ErrNotFound if none started
// since the agent did.
func (c *Client) ImportStatus(ctx context.Context, domain string) (api.ImportStatus, error) {
	var out api.ImportStatus
	return out, c.call(ctx, "GET", "/v1/imports/"+url.PathEscape(domain), nil, &out)
}

// Release gives an imported domain its own disks back (shut off first).
func (c *Client) Release(ctx context.Context, domain string) error {
	return c.call(ctx, "POST", "/v1/imports/"+url.PathEscape(domain)+"/release", struct{}{}, nil)
}

// PingGuest asks a VM's guest agent whether it answers: nil if it does,
// ErrNotFound if no such VM runs, another error while it does not answer.
func (c *Client) PingGuest(ctx context.Context, name string) error {
	return c.call(ctx, "POST", "/v1/vms/"+esc(name)+"/ping", nil, nil)
}

// StopVM shuts a VM down (gracefully within opts.Timeout, or at once with
// opts.Force) and returns the steps taken. ErrNotFound if no such VM runs.
func (c *Client) StopVM(ctx context.Context, name string, opts api.StopOptions) ([]string, error) {
	q := url.Values{}
	if opts.Force {
		q.Set("force", "1")
	}
	if opts.Timeout > 0 {
		q.Set("timeout", opts.Timeout.String())
	}
	path := "/v1/vms/" + esc(name)
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	var out api.Steps
	return out.Steps, c.call(ctx, "DELETE", path, nil, &out)
}

// CommitVM makes a VM that runs on views standalone and returns the steps
// taken.
func (c *Client) CommitVM(ctx context.Context, name string) ([]string, error) {
	var out api.Steps
	return out.Steps, c.call(ctx, "POST", "/v1/vms/"+esc(name)+"/commit", nil, &out)
}

// Console returns a VM's serial console from byte off.
func (c *Client) Console(ctx context.Context, name string, off int64) (api.Console, error) {
	var out api.Console
	return out, c.call(ctx, "GET", "/v1/vms/"+esc(name)+"/console?offset="+strconv.FormatInt(off, 10), nil, &out)
}
