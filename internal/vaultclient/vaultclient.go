// Package vaultclient is the typed client of the vault's API
// (docs/api.md): one method per route, and the only code that spells the
// vault's URLs. Errors the vault answers are *api.StatusError values that
// errors.Is matches against the api sentinels (api.ErrNotFound,
// api.ErrConflict, ...). It imports no vault or data-plane package.
package vaultclient

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/httpjson"
	"github.com/ferry-dr/ferry/internal/pki"
)

// Client calls the vault with a token. It is safe for concurrent use.
// Given several vaults (one per site, one of them leading), it sends
// each call to the one that answered last, and moves to the next when a
// vault is down (the connection is refused) or does not lead.
type Client struct {
	bases []string
	cur   atomic.Int32
	token string
	hc    *http.Client
	base  string // the first, for messages
}

// New returns a client for the vault at rawURL (https://host:port; or
// several, comma-separated, for vaults sharing an etcd store),
// verifying its certificate against the CA in caFile (empty: the system's
// roots), sending token on every call.
func New(rawURL, token, caFile string) (*Client, error) {
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
	return newClient(rawURL, token, tc)
}

// NewSite returns a client with which a site agent reaches the vault at
// addr (host:port, or several comma-separated) with its certificate; the server must hold a vault
// certificate. It needs no token (Heartbeat).
func NewSite(id *pki.Identity, addr string) (*Client, error) {
	var urls []string
	for _, a := range strings.Split(addr, ",") {
		urls = append(urls, "https://"+strings.TrimSpace(a))
	}
	return newClient(strings.Join(urls, ","), "", id.ClientConfig(pki.Peer{Role: pki.RoleVault}))
}

func newClient(rawURL, token string, tc *tls.Config) (*Client, error) {
	c := &Client{token: token, hc: &http.Client{Timeout: 2 * time.Minute, Transport: &http.Transport{TLSClientConfig: tc}}}
	for _, one := range strings.Split(rawURL, ",") {
		u, err := url.Parse(strings.TrimSpace(one))
		if err != nil || u.Scheme != "https" || u.Host == "" {
			return nil, fmt.Errorf("vault URL %q: want https://HOST:PORT (several: comma-separated)", one)
		}
		c.bases = append(c.bases, strings.TrimSuffix(strings.TrimSpace(one), "/"))
	}
	c.base = c.bases[0]
	return c, nil
}

// SetTimeout bounds every call (default 2 min).
func (c *Client) SetTimeout(d time.Duration) { c.hc.Timeout = d }

// URL is the base URL of the vault the client calls now.
func (c *Client) URL() string { return c.bases[int(c.cur.Load())%len(c.bases)] }

func (c *Client) call(ctx context.Context, method, path string, in, out any) error {
	var err error
	start := int(c.cur.Load())
	for i := range c.bases {
		k := (start + i) % len(c.bases)
		base := c.bases[k]
		err = httpjson.Call(ctx, c.hc, method, base+path, c.token, in, out)
		// Another vault is tried only where the call surely did nothing:
		// this one refused it (not the leader) or could not be reached.
		var oe *net.OpError
		if errors.Is(err, api.ErrNotLeader) || (errors.As(err, &oe) && oe.Op == "dial") {
			continue
		}
		c.cur.Store(int32(k))
		var se *api.StatusError
		if errors.As(err, &se) {
			return se
		}
		if err != nil {
			return fmt.Errorf("vault at %s: %w (is it running? set --vault or FERRY_VAULT)", base, err)
		}
		return nil
	}
	var se *api.StatusError
	if errors.As(err, &se) {
		return se
	}
	return fmt.Errorf("vaults at %s: %w (is one running and leading? set --vault or FERRY_VAULT)", strings.Join(c.bases, ", "), err)
}

func esc(s string) string { return url.PathEscape(s) }

// --- identity, tokens, sites ---

// Whoami returns the role of the client's token.
func (c *Client) Whoami(ctx context.Context) (string, error) {
	var out api.Whoami
	return out.Role, c.call(ctx, "GET", "/v1/whoami", nil, &out)
}

// CreateToken makes a token; the answer holds its secret, shown only now.
func (c *Client) CreateToken(ctx context.Context, req api.TokenRequest) (api.NewToken, error) {
	var out api.NewToken
	return out, c.call(ctx, "POST", "/v1/tokens", req, &out)
}

// Tokens lists the tokens, without their secrets (operators only).
func (c *Client) Tokens(ctx context.Context) ([]api.TokenInfo, error) {
	var out []api.TokenInfo
	return out, c.call(ctx, "GET", "/v1/tokens", nil, &out)
}

// RevokeToken ends the token with this ID at once. ErrNotFound if none.
func (c *Client) RevokeToken(ctx context.Context, id string) error {
	return c.call(ctx, "DELETE", "/v1/tokens/"+esc(id), nil, nil)
}

// Enroll registers a site with a one-time enroll token (the client's own
// token is not sent).
func (c *Client) Enroll(ctx context.Context, req api.Enroll) error {
	anon := &Client{bases: c.bases, hc: c.hc, base: c.base}
	anon.cur.Store(c.cur.Load())
	return anon.call(ctx, "POST", "/v1/enroll", req, nil)
}

// Heartbeat tells the vault the calling site is up (a site client).
func (c *Client) Heartbeat(ctx context.Context) error {
	return c.call(ctx, "POST", "/v1/heartbeat", nil, nil)
}

// Sites lists the sites.
func (c *Client) Sites(ctx context.Context) ([]api.Site, error) {
	var out []api.Site
	return out, c.call(ctx, "GET", "/v1/sites", nil, &out)
}

// AddSite registers a site (re-addresses one with Readdress).
func (c *Client) AddSite(ctx context.Context, req api.AddSite) error {
	return c.call(ctx, "POST", "/v1/sites", req, nil)
}

// DeleteSite forgets a site. ErrConflict while something uses it.
func (c *Client) DeleteSite(ctx context.Context, name string) error {
	return c.call(ctx, "DELETE", "/v1/sites/"+esc(name), nil, nil)
}

// PutNetwork declares or changes a network of a site.
func (c *Client) PutNetwork(ctx context.Context, site string, n api.Network) (api.Site, error) {
	var out api.Site
	return out, c.call(ctx, "PUT", "/v1/sites/"+esc(site)+"/networks/"+esc(n.Name), n, &out)
}

// DeleteNetwork removes a network of a site. ErrConflict while used.
func (c *Client) DeleteNetwork(ctx context.Context, site, name string) error {
	return c.call(ctx, "DELETE", "/v1/sites/"+esc(site)+"/networks/"+esc(name), nil, nil)
}

// --- VMs and policies ---

// VMs lists the VMs.
func (c *Client) VMs(ctx context.Context) ([]api.VM, error) {
	var out []api.VM
	return out, c.call(ctx, "GET", "/v1/vms", nil, &out)
}

// DefineVM records a VM and creates its disks at its site.
func (c *Client) DefineVM(ctx context.Context, vm api.VM) (api.VM, error) {
	var out api.VM
	return out, c.call(ctx, "POST", "/v1/vms", vm, &out)
}

// StartVM starts a defined VM where it is.
func (c *Client) StartVM(ctx context.Context, name string) (api.VMStatus, error) {
	var out api.VMStatus
	return out, c.call(ctx, "POST", "/v1/vms/"+esc(name)+"/start", nil, &out)
}

// StopVM shuts a VM down where it runs (not one a failover runs on views)
// and returns the steps taken.
func (c *Client) StopVM(ctx context.Context, name string) (api.Steps, error) {
	var out api.Steps
	return out, c.call(ctx, "POST", "/v1/vms/"+esc(name)+"/stop", nil, &out)
}

// DeleteVM deletes a stopped, unprotected VM and its disks.
func (c *Client) DeleteVM(ctx context.Context, name string) error {
	return c.call(ctx, "DELETE", "/v1/vms/"+esc(name), nil, nil)
}

// ImportVM starts importing a shut-off libvirt domain at a site.
func (c *Client) ImportVM(ctx context.Context, req api.VaultImport) (api.ImportStatus, error) {
	var out api.ImportStatus
	return out, c.call(ctx, "POST", "/v1/imports", req, &out)
}

// ImportStatus reports an import's progress; the VM is defined once done.
func (c *Client) ImportStatus(ctx context.Context, site, domain string) (api.ImportStatus, error) {
	var out api.ImportStatus
	return out, c.call(ctx, "GET", "/v1/imports/"+esc(site)+"/"+esc(domain), nil, &out)
}

// ReleaseVM gives an imported VM back to libvirt with its own disks and
// forgets it (its group stays at the site).
func (c *Client) ReleaseVM(ctx context.Context, name string) error {
	return c.call(ctx, "POST", "/v1/vms/"+esc(name)+"/release", struct{}{}, nil)
}

// SetForwards changes a VM's published addresses ("" removes one).
func (c *Client) SetForwards(ctx context.Context, name string, fw map[string]string) (api.VM, error) {
	var out api.VM
	return out, c.call(ctx, "PUT", "/v1/vms/"+esc(name)+"/forwards", fw, &out)
}

// Console returns a VM's serial console from byte off, wherever it runs.
func (c *Client) Console(ctx context.Context, name string, off int64) (api.Console, error) {
	var out api.Console
	return out, c.call(ctx, "GET", "/v1/vms/"+esc(name)+"/console?offset="+strconv.FormatInt(off, 10), nil, &out)
}

// TestConsole returns the serial console of the VM a test failover of
// name runs, from byte off on (ErrConflict when none runs).
func (c *Client) TestConsole(ctx context.Context, name string, off int64) (api.Console, error) {
	var out api.Console
	return out, c.call(ctx, "GET", "/v1/vms/"+esc(name)+"/console?test=1&offset="+strconv.FormatInt(off, 10), nil, &out)
}

// Policies lists the policies (the default one included).
func (c *Client) Policies(ctx context.Context) ([]api.Policy, error) {
	var out []api.Policy
	return out, c.call(ctx, "GET", "/v1/policies", nil, &out)
}

// Policy returns one policy.
func (c *Client) Policy(ctx context.Context, name string) (api.Policy, error) {
	var out api.Policy
	return out, c.call(ctx, "GET", "/v1/policies/"+esc(name), nil, &out)
}

// PutPolicy creates or replaces a policy.
func (c *Client) PutPolicy(ctx context.Context, p api.Policy) (api.Policy, error) {
	var out api.Policy
	return out, c.call(ctx, "PUT", "/v1/policies/"+esc(p.Name), p, &out)
}

// BandwidthCaps returns the replication caps.
func (c *Client) BandwidthCaps(ctx context.Context) (api.BandwidthCaps, error) {
	var out api.BandwidthCaps
	return out, c.call(ctx, "GET", "/v1/bandwidth", nil, &out)
}

// SetPairCap sets the cap of what site from streams to site to; a zero
// limit without a schedule removes it. ErrNotFound for an unknown site,
// ErrInvalid for a malformed limit.
func (c *Client) SetPairCap(ctx context.Context, from, to string, lim api.BandwidthLimit) error {
	return c.call(ctx, "PUT", "/v1/bandwidth/pairs/"+esc(from)+"/"+esc(to), lim, nil)
}

// SetVMCap sets the cap of one VM's replication stream; a zero limit
// without a schedule removes it. ErrNotFound for an unknown VM.
func (c *Client) SetVMCap(ctx context.Context, vm string, lim api.BandwidthLimit) error {
	return c.call(ctx, "PUT", "/v1/bandwidth/vms/"+esc(vm), lim, nil)
}

// --- protections and the DR lifecycle (each action is a job) ---

// Protections lists the protections.
func (c *Client) Protections(ctx context.Context) ([]api.Protection, error) {
	var out []api.Protection
	return out, c.call(ctx, "GET", "/v1/protections", nil, &out)
}

// Protection returns one protection.
func (c *Client) Protection(ctx context.Context, vm string) (api.Protection, error) {
	var out api.Protection
	return out, c.call(ctx, "GET", "/v1/protections/"+esc(vm), nil, &out)
}

// Points lists a protection's recovery points at its recovery site.
func (c *Client) Points(ctx context.Context, vm string) ([]api.Point, error) {
	var out []api.Point
	return out, c.call(ctx, "GET", "/v1/protections/"+esc(vm)+"/points", nil, &out)
}

// Files lists path ("/": the file systems of the VM's disks) at a
// recovery point (as a failover names it; "" is latest-processed). The
// first call on a point waits for the recovery site to start a libguestfs
// appliance (10-30 s).
func (c *Client) Files(ctx context.Context, vm, point, path string) (api.FileListing, error) {
	var out api.FileListing
	q := url.Values{"point": {point}, "path": {path}}
	return out, c.call(ctx, "GET", "/v1/protections/"+esc(vm)+"/files?"+q.Encode(), nil, &out)
}

// FileContent opens a download of path at a point: a regular file's
// bytes (raw) or a tar of it under its base name. The caller closes the
// body; Ferry-Size says how much to expect, Ferry-Point the point's id.
// A stream that ends short is an error its reader sees.
func (c *Client) FileContent(ctx context.Context, vm, point, path string, raw bool) (*http.Response, error) {
	q := url.Values{"point": {point}, "path": {path}, "format": {"tar"}}
	if raw {
		q.Set("format", "raw")
	}
	var err error
	start := int(c.cur.Load())
	for i := range c.bases {
		base := c.bases[(start+i)%len(c.bases)]
		var resp *http.Response
		resp, err = httpjson.Open(ctx, &http.Client{Transport: c.hc.Transport}, base+"/v1/protections/"+esc(vm)+"/files/content?"+q.Encode(), c.token)
		var oe *net.OpError
		if errors.Is(err, api.ErrNotLeader) || (errors.As(err, &oe) && oe.Op == "dial") {
			continue
		}
		var se *api.StatusError
		if errors.As(err, &se) {
			return nil, se
		}
		if err != nil {
			return nil, fmt.Errorf("vault at %s: %w", base, err)
		}
		return resp, nil
	}
	return nil, err
}

// DismissIncident closes a protection's open ransomware incident (the
// alert clears; retention no longer holds the last clean point).
// ErrNotFound if none is open.
func (c *Client) DismissIncident(ctx context.Context, vm string) error {
	return c.call(ctx, "POST", "/v1/protections/"+esc(vm)+"/ransomware/dismiss", struct{}{}, nil)
}

// RPOHistory returns the worst RPO per 10 s over the last 6 h.
func (c *Client) RPOHistory(ctx context.Context, vm string) ([]api.RPOSample, error) {
	var out []api.RPOSample
	return out, c.call(ctx, "GET", "/v1/protections/"+esc(vm)+"/rpo-history", nil, &out)
}

func (c *Client) job(ctx context.Context, path string, body any) (api.Job, error) {
	var out api.Job
	return out, c.call(ctx, "POST", path, body, &out)
}

// Enable starts protecting a VM.
func (c *Client) Enable(ctx context.Context, req api.EnableRequest) (api.Job, error) {
	return c.job(ctx, "/v1/protections", req)
}

// Disable stops protecting a VM: replication stops; the replica and its
// points are deleted, or kept if keepReplica.
func (c *Client) Disable(ctx context.Context, vm string, keepReplica bool) (api.Job, error) {
	return c.job(ctx, "/v1/protections/"+esc(vm)+"/disable", api.DisableRequest{KeepReplica: keepReplica})
}

// TestFailover starts a DR drill on a point.
func (c *Client) TestFailover(ctx context.Context, vm, point string) (api.Job, error) {
	return c.job(ctx, "/v1/protections/"+esc(vm)+"/test-failover", api.PointRequest{Point: point})
}

// CleanupTestFailover ends a drill and records notes.
func (c *Client) CleanupTestFailover(ctx context.Context, vm, notes string) (api.Job, error) {
	return c.job(ctx, "/v1/protections/"+esc(vm)+"/test-failover/cleanup", api.CleanupRequest{Notes: notes})
}

// Failover fails a VM over to its recovery site.
func (c *Client) Failover(ctx context.Context, vm string, req api.FailoverRequest) (api.Job, error) {
	return c.job(ctx, "/v1/protections/"+esc(vm)+"/failover", req)
}

// ChangePoint restarts a failed-over VM on another point.
func (c *Client) ChangePoint(ctx context.Context, vm, point string) (api.Job, error) {
	return c.job(ctx, "/v1/protections/"+esc(vm)+"/change-point", api.PointRequest{Point: point})
}

// Commit makes a failover final.
func (c *Client) Commit(ctx context.Context, vm string) (api.Job, error) {
	return c.job(ctx, "/v1/protections/"+esc(vm)+"/commit", struct{}{})
}

// PlanReprotect shows what a reprotect would reuse and create.
func (c *Client) PlanReprotect(ctx context.Context, vm string) (api.ReprotectPlan, error) {
	var out api.ReprotectPlan
	return out, c.call(ctx, "GET", "/v1/protections/"+esc(vm)+"/reprotect-plan", nil, &out)
}

// Reprotect replicates back the other way after a commit.
func (c *Client) Reprotect(ctx context.Context, vm string) (api.Job, error) {
	return c.job(ctx, "/v1/protections/"+esc(vm)+"/reprotect", struct{}{})
}

// Plans lists the recovery plans.
func (c *Client) Plans(ctx context.Context) ([]api.Plan, error) {
	var out []api.Plan
	return out, c.call(ctx, "GET", "/v1/plans", nil, &out)
}

// Plan returns a recovery plan. ErrNotFound without it.
func (c *Client) Plan(ctx context.Context, name string) (api.Plan, error) {
	var out api.Plan
	return out, c.call(ctx, "GET", "/v1/plans/"+esc(name), nil, &out)
}

// PutPlan creates or replaces a recovery plan.
func (c *Client) PutPlan(ctx context.Context, p api.Plan) (api.Plan, error) {
	var out api.Plan
	return out, c.call(ctx, "PUT", "/v1/plans/"+esc(p.Name), p, &out)
}

// DeletePlan removes a recovery plan (not its VMs).
func (c *Client) DeletePlan(ctx context.Context, name string) error {
	return c.call(ctx, "DELETE", "/v1/plans/"+esc(name), nil, nil)
}

// RunPlan starts a plan job.
func (c *Client) RunPlan(ctx context.Context, name string, req api.PlanRun) (api.Job, error) {
	return c.job(ctx, "/v1/plans/"+esc(name)+"/run", req)
}

// ResumeJob confirms the manual action a plan job waits for.
func (c *Client) ResumeJob(ctx context.Context, id string) (api.Job, error) {
	return c.job(ctx, "/v1/jobs/"+esc(id)+"/resume", struct{}{})
}

// RetryJob runs a failed plan job again from its failed step.
func (c *Client) RetryJob(ctx context.Context, id string) (api.Job, error) {
	return c.job(ctx, "/v1/jobs/"+esc(id)+"/retry", struct{}{})
}

// Alerts returns the alerts in force: sites that do not answer,
// protections that are not healthy, each with what to do.
func (c *Client) Alerts(ctx context.Context) ([]api.Alert, error) {
	var out []api.Alert
	return out, c.call(ctx, "GET", "/v1/alerts", nil, &out)
}

// Events returns the vault's event log, newest first, at most limit (0:
// all it keeps, 1,000).
func (c *Client) Events(ctx context.Context, limit int) ([]api.Event, error) {
	q := ""
	if limit > 0 {
		q = "?limit=" + strconv.Itoa(limit)
	}
	var out []api.Event
	return out, c.call(ctx, "GET", "/v1/events"+q, nil, &out)
}

// Jobs lists jobs, of one protection if not empty.
func (c *Client) Jobs(ctx context.Context, protection string) ([]api.Job, error) {
	q := ""
	if protection != "" {
		q = "?protection=" + url.QueryEscape(protection)
	}
	var out []api.Job
	return out, c.call(ctx, "GET", "/v1/jobs"+q, nil, &out)
}

// Job returns one job.
func (c *Client) Job(ctx context.Context, id string) (api.Job, error) {
	var out api.Job
	return out, c.call(ctx, "GET", "/v1/jobs/"+esc(id), nil, &out)
}
