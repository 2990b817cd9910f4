package vault

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/bandwidth"
	"github.com/ferry-dr/ferry/internal/clock"
	"github.com/ferry-dr/ferry/internal/store"
)

// Config configures a Vault.
type Config struct {
	Store  store.Store
	Logger *slog.Logger
	Now    func() time.Time // default clock.Steady(clock.System())
	// Site returns a client for the agent of site name at addr
	// (agentclient.New fits).
	Site func(addr, name string) Site
	// HeartbeatInterval is how often sites are polled (default 1 s); a
	// site is unreachable after 3 missed polls.
	HeartbeatInterval time.Duration
	// Heartbeats can be switched off for tests that drive them.
	NoHeartbeats bool
	// ScriptDir holds the scripts recovery plans may run (by file name);
	// empty: plans have no scripts.
	ScriptDir string
	// Leadership elects the one vault that acts among several sharing
	// the store (leader.Etcd fits); nil: this vault is the only one.
	Leadership Leadership
	// Advertise is this vault's API address, recorded in the jobs it runs.
	Advertise string
}

// Leadership elects one vault among several (package leader).
type Leadership interface {
	// Campaign blocks until this vault leads or ctx ends, and returns a
	// channel closed when it no longer leads.
	Campaign(ctx context.Context) (lost <-chan struct{}, err error)
	// Leader names the leading vault ("" if none).
	Leader(ctx context.Context) (string, error)
	// Resign gives the leadership up.
	Resign(ctx context.Context) error
	// Epoch is the fencing token of this vault's leadership, greater for
	// every later leader (0 before it led). Jobs record it; the vault's
	// calls to sites carry it, so a site refuses an older leader's calls
	// (api.LeaderEpochHeader).
	Epoch() int64
}

// Vault is the control plane.
type Vault struct {
	cfg Config
	st  store.Store
	log *slog.Logger

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	// leading: this vault acts (runs jobs, polls sites, takes changes).
	leading atomic.Bool
	lost    chan struct{}
	// lostCtx ends when lost is closed (detached writes stop then).
	lostCtx    context.Context
	lostCancel context.CancelFunc
	// deposed is closed when a site refused a call for a newer leader's
	// sake (Deposed).
	deposed     chan struct{}
	deposedOnce sync.Once

	metrics  *metrics
	hist     *history
	alerting alerting

	// sitesMu guards what the vault keeps per site in memory.
	sitesMu sync.Mutex
	clients map[string]Site // by "name@addr"
	// problems each site reported at its last poll.
	problems map[string][]api.Problem
	// pushed: the bandwidth caps each site took last.
	pushed map[string]api.Bandwidth
}

// New returns a vault over cfg.Store.
func New(cfg Config) *Vault {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = clock.Steady(clock.System())
	}
	if cfg.HeartbeatInterval <= 0 {
		cfg.HeartbeatInterval = time.Second
	}
	v := &Vault{cfg: cfg, st: cfg.Store, log: cfg.Logger, hist: newHistory(), deposed: make(chan struct{}), clients: map[string]Site{}, problems: map[string][]api.Problem{}, pushed: map[string]api.Bandwidth{}}
	v.metrics = newMetrics(v)
	return v
}

func (v *Vault) now() time.Time { return v.cfg.Now() }

// Start fails (and releases) the jobs a previous run left running, and
// starts the heartbeat loop.
func (v *Vault) Start(ctx context.Context) error {
	v.ctx, v.cancel = context.WithCancel(ctx)
	v.lost = make(chan struct{})
	v.lostCtx, v.lostCancel = context.WithCancel(context.Background())
	if v.cfg.Leadership != nil {
		// One of several vaults: it acts only once elected.
		v.wg.Add(1)
		go func() {
			defer v.wg.Done()
			v.lead()
		}()
		return nil
	}
	v.leading.Store(true)
	return v.act(ctx)
}

// lead campaigns for the leadership, acts while it leads, and stops the
// vault as soon as it no longer does, so that two vaults never act at
// once: the new leader fails or finishes what this one left.
func (v *Vault) lead() {
	var lost <-chan struct{}
	for {
		var err error
		if lost, err = v.cfg.Leadership.Campaign(v.ctx); err == nil {
			break
		}
		if v.ctx.Err() != nil {
			return // stopping before it ever led
		}
		v.log.Warn("cannot campaign for the leadership: trying again", "err", err)
		select {
		case <-v.ctx.Done():
			return
		case <-time.After(time.Second):
		}
	}
	v.log.Info("this vault leads")
	if err := v.act(v.ctx); err != nil {
		v.log.Error("cannot act as the leader", "err", err)
	}
	v.leading.Store(true)
	select {
	case <-lost:
		v.leading.Store(false)
		v.log.Error("lost the leadership: this vault stops acting so that the new leader acts alone")
		v.stopActing()
	case <-v.deposed:
		// A site obeys a newer leader: this vault's lease is gone or
		// about to be, and waiting for it to say so would only let this
		// vault's jobs fail call after call.
		v.leading.Store(false)
		v.log.Error("lost the leadership: a site obeys a newer leader; this vault stops acting so that the new leader acts alone")
		v.stopActing()
	case <-v.ctx.Done():
		v.leading.Store(false)
		rctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		v.cfg.Leadership.Resign(rctx)
		cancel()
	}
}

// stopActing stops a vault that lost the leadership. The contexts end
// before Lost is closed: whoever sees Lost (the process, a test) may
// rely on every job of this vault seeing its context canceled, so that
// no step that returns after it records anything (finish checks v.ctx).
func (v *Vault) stopActing() {
	v.cancel()
	v.lostCancel()
	close(v.lost)
}

// Deposed tells the vault that a site refused one of its calls because
// it obeys a newer leader (api.ErrStaleLeader): the vault stops acting
// at once, as when its lease is lost. Without Leadership it does
// nothing. Safe for concurrent use; idempotent.
func (v *Vault) Deposed() {
	if v.cfg.Leadership == nil {
		return
	}
	v.deposedOnce.Do(func() { close(v.deposed) })
}

// endTimeout bounds the store writes that record how a job ended.
const endTimeout = 10 * time.Second

// detached returns the context of the writes that record what was begun
// (a job's outcome, a protection's release). They outlive ctx's
// cancellation, so that a stopping vault does not leave a job half
// recorded; but they end when this vault loses the leadership (its
// successor owns the records now) and after endTimeout, because a store
// that does not answer (etcd cut off, with requests that wait for a
// connection) must not keep the vault from stopping: Close waits for
// the job goroutines that make them.
func (v *Vault) detached(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), endTimeout)
	if v.lostCtx == nil {
		return ctx, cancel
	}
	stop := context.AfterFunc(v.lostCtx, cancel)
	return ctx, func() { stop(); cancel() }
}

// Lost is closed when this vault lost the leadership and stopped: its
// process should exit (a supervisor restarts it as a follower).
func (v *Vault) Lost() <-chan struct{} { return v.lost }

// epoch is the fencing token of this vault's leadership (0 for a lone
// vault).
func (v *Vault) epoch() int64 {
	if v.cfg.Leadership == nil {
		return 0
	}
	return v.cfg.Leadership.Epoch()
}

// Leading reports whether this vault acts (always, without Leadership).
func (v *Vault) Leading() bool { return v.leading.Load() }

// act takes over: jobs a previous leader (or this vault's last run) left
// running are failed or resumed, and sites are polled.
func (v *Vault) act(ctx context.Context) error {
	if err := v.recoverJobs(ctx); err != nil {
		return err
	}
	if err := v.loadHistory(ctx); err != nil {
		v.log.Warn("the charts start empty", "err", err)
	}
	if !v.cfg.NoHeartbeats {
		v.wg.Add(1)
		go func() {
			defer v.wg.Done()
			t := time.NewTicker(v.cfg.HeartbeatInterval)
			defer t.Stop()
			for {
				select {
				case <-v.ctx.Done():
					return
				case <-t.C:
				}
				v.Heartbeat(v.ctx)
			}
		}()
	}
	return nil
}

// Close stops the vault; running jobs stop where they are and are failed
// at the next Start.
func (v *Vault) Close() error {
	leading := v.Leading()
	if v.cancel != nil {
		v.cancel()
	}
	v.wg.Wait()
	if leading {
		// The samples since the last save, so that a restart keeps the
		// charts whole (a crash loses at most a minute of them).
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		v.flushHistory(ctx)
	}
	if v.lostCancel != nil {
		v.lostCancel() // releases lostCtx; the job goroutines are done
	}
	return nil
}

// --- tokens ---

// Roles.
const (
	RoleReader   = "reader"
	RoleOperator = "operator"
	RoleEnroll   = "enroll" // one-time, for a site agent to enroll
)

type token struct {
	Role    string    `json:"role"`
	Name    string    `json:"name"`
	Created time.Time `json:"created"`
	// Expires, if set, ends the token.
	Expires time.Time `json:"expires,omitzero"`
	// Reenroll, on an enroll token, is the one existing site it may
	// re-address (an operator asked for it explicitly).
	Reenroll string `json:"reenroll,omitempty"`
}

// TokenInfo describes a token without its secret: ID (the start of its
// hash) is what revoking takes.
type TokenInfo = api.TokenInfo

// TokenRequest asks for a new token.
type TokenRequest = api.TokenRequest

const tokenIDLen = 12

func hashToken(t string) string {
	h := sha256.Sum256([]byte(t))
	return hex.EncodeToString(h[:])
}

// CreateToken makes a new token for role; only its hash is stored.
func (v *Vault) CreateToken(ctx context.Context, role, name string) (string, error) {
	t, _, err := v.NewToken(ctx, TokenRequest{Role: role, Name: name})
	return t, err
}

// NewToken makes a token as asked and returns it (shown only now) and its
// description.
func (v *Vault) NewToken(ctx context.Context, req TokenRequest) (string, TokenInfo, error) {
	switch req.Role {
	case RoleReader, RoleOperator, RoleEnroll:
	default:
		return "", TokenInfo{}, fmt.Errorf("%w: role %q (reader, operator or enroll)", ErrInvalid, req.Role)
	}
	if len(req.Name) > 128 || strings.ContainsFunc(req.Name, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		return "", TokenInfo{}, fmt.Errorf("%w: a token's name is up to 128 printable characters", ErrInvalid)
	}
	tk := token{Role: req.Role, Name: req.Name, Created: v.now()}
	if req.TTL != "" {
		d, err := time.ParseDuration(req.TTL)
		if err != nil || d <= 0 {
			return "", TokenInfo{}, fmt.Errorf("%w: ttl %q: want a positive duration such as 24h", ErrInvalid, req.TTL)
		}
		tk.Expires = tk.Created.Add(d)
	}
	if req.Reenroll != "" {
		if req.Role != RoleEnroll {
			return "", TokenInfo{}, fmt.Errorf("%w: only an enroll token re-enrolls a site", ErrInvalid)
		}
		if _, _, err := get[api.Site](ctx, v.st, kindSite, req.Reenroll); err != nil {
			return "", TokenInfo{}, fmt.Errorf("re-enroll: %w", err)
		}
		tk.Reenroll = req.Reenroll
	}
	b := make([]byte, 24)
	rand.Read(b)
	t := "fy_" + hex.EncodeToString(b)
	h := hashToken(t)
	_, err := put(ctx, v.st, kindToken, h, tk, 0)
	return t, tokenInfo(h, tk), err
}

func tokenInfo(hash string, tk token) TokenInfo {
	return TokenInfo{ID: hash[:tokenIDLen], Role: tk.Role, Name: tk.Name, Created: tk.Created, Expires: tk.Expires, Reenroll: tk.Reenroll}
}

// Tokens lists the tokens (never their secrets).
func (v *Vault) Tokens(ctx context.Context) ([]TokenInfo, error) {
	docs, err := v.st.List(ctx, kindToken)
	if err != nil {
		return nil, err
	}
	out := []TokenInfo{}
	for _, d := range docs {
		var tk token
		if err := json.Unmarshal(d.Data, &tk); err != nil {
			return nil, fmt.Errorf("decode token %s: %w", d.ID[:tokenIDLen], err)
		}
		out = append(out, tokenInfo(d.ID, tk))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Created.Before(out[j].Created) })
	return out, nil
}

// RevokeToken deletes the token whose ID is id; it stops working at once.
func (v *Vault) RevokeToken(ctx context.Context, id string) error {
	if len(id) != tokenIDLen {
		return fmt.Errorf("%w: a token ID has %d characters (ferry token list)", ErrInvalid, tokenIDLen)
	}
	docs, err := v.st.List(ctx, kindToken)
	if err != nil {
		return err
	}
	for _, d := range docs {
		if strings.HasPrefix(d.ID, id) {
			if err := v.st.Delete(ctx, kindToken, d.ID, d.Version); err != nil && !errors.Is(err, store.ErrNotFound) {
				return err
			}
			v.log.Info("token revoked", "id", id)
			return nil
		}
	}
	return fmt.Errorf("%w: token %s", ErrNotFound, id)
}

// Authenticate returns the role of a token.
func (v *Vault) Authenticate(ctx context.Context, t string) (string, error) {
	if t == "" {
		return "", fmt.Errorf("%w: no token (send Authorization: Bearer TOKEN)", ErrAuth)
	}
	tk, _, err := get[token](ctx, v.st, kindToken, hashToken(t))
	if err != nil {
		return "", fmt.Errorf("%w: unknown token", ErrAuth)
	}
	if !tk.Expires.IsZero() && !v.now().Before(tk.Expires) {
		return "", fmt.Errorf("%w: token expired at %s; ask an operator for a new one", ErrAuth, tk.Expires.Format(time.RFC3339))
	}
	return tk.Role, nil
}

// --- sites ---

// Enroll registers a site agent with a one-time enroll token. A name that
// is already enrolled is refused, unless the token was made to re-enroll
// that very site (ferry token create --role enroll --reenroll NAME).
func (v *Vault) Enroll(ctx context.Context, enrollToken, name, addr string) error {
	if err := checkSite(name, addr); err != nil {
		return err
	}
	h := hashToken(enrollToken)
	tk, ver, err := get[token](ctx, v.st, kindToken, h)
	if err != nil || tk.Role != RoleEnroll {
		return fmt.Errorf("%w: not a valid enroll token", ErrAuth)
	}
	if !tk.Expires.IsZero() && !v.now().Before(tk.Expires) {
		return fmt.Errorf("%w: enroll token expired", ErrAuth)
	}
	_, _, gerr := get[api.Site](ctx, v.st, kindSite, name)
	exists := gerr == nil
	if exists && tk.Reenroll != name {
		return fmt.Errorf("%w: site %q is enrolled already; to move it, an operator creates a re-enrollment token (ferry token create --role enroll --reenroll %s)", ErrForbidden, name, name)
	}
	if !exists && tk.Reenroll != "" {
		return fmt.Errorf("%w: this token re-enrolls site %q only", ErrRole, tk.Reenroll)
	}
	if err := v.st.Delete(ctx, kindToken, h, ver); err != nil { // one time only
		return fmt.Errorf("%w: enroll token already used", ErrAuth)
	}
	return v.putSite(ctx, name, addr, exists)
}

// AddSite registers a new site; an existing one is re-addressed only if
// readdress is set.
func (v *Vault) AddSite(ctx context.Context, name, addr string, readdress bool) error {
	if err := checkSite(name, addr); err != nil {
		return err
	}
	return v.putSite(ctx, name, addr, readdress)
}

func (v *Vault) putSite(ctx context.Context, name, addr string, readdress bool) error {
	s, ver, err := get[api.Site](ctx, v.st, kindSite, name)
	if err != nil && !errors.Is(err, ErrNotFound) {
		return err
	}
	if ver != 0 && !readdress {
		return fmt.Errorf("%w: site %q exists (at %s); re-address it explicitly (ferry site add --readdress)", ErrForbidden, name, s.Addr)
	}
	if ver == 0 {
		s = api.Site{Name: name, Enrolled: v.now(), Networks: defaultNetworks()}
	}
	if s.Addr != addr && ver != 0 {
		v.log.Warn("site re-addressed", "site", name, "from", s.Addr, "to", addr)
	}
	s.Addr = addr
	_, err = put(ctx, v.st, kindSite, name, s, ver)
	if errors.Is(err, store.ErrConflict) {
		return fmt.Errorf("%w: site %q changed meanwhile; try again", ErrBusy, name)
	}
	return err
}

// checkSite validates a site's name and its agent's address (HOST:PORT).
func checkSite(name, addr string) error {
	if err := api.CheckName(api.KindSite, name); err != nil {
		return err
	}
	host, port, err := net.SplitHostPort(addr)
	n, perr := strconv.Atoi(port)
	if err != nil || perr != nil || n <= 0 || n > 65535 || host == "" {
		return fmt.Errorf("%w: site address %q: want HOST:PORT", ErrInvalid, addr)
	}
	if _, err := netip.ParseAddr(host); err != nil && !dnsName(host) {
		return fmt.Errorf("%w: site address %q: the host is neither an IP address nor a DNS name", ErrInvalid, addr)
	}
	return nil
}

// dnsName reports whether s is a DNS host name: dot-separated labels of 1
// to 63 letters, digits and inner hyphens, 253 characters at most.
func dnsName(s string) bool {
	if len(s) > 253 {
		return false
	}
	for _, l := range strings.Split(s, ".") {
		if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
			return false
		}
		for _, c := range l {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
				return false
			}
		}
	}
	return true
}

// DeleteSite forgets a site; refused while a VM runs there or a
// protection replicates from or to it.
func (v *Vault) DeleteSite(ctx context.Context, name string) error {
	s, ver, err := get[api.Site](ctx, v.st, kindSite, name)
	if err != nil {
		return err
	}
	var users []string
	vms, err := v.VMs(ctx)
	if err != nil {
		return err
	}
	for _, vm := range vms {
		if vm.Site == name {
			users = append(users, "VM "+vm.Name)
		}
	}
	ps, err := v.Protections(ctx)
	if err != nil {
		return err
	}
	for _, p := range ps {
		if p.Source == name || p.Target == name {
			users = append(users, "protection of "+p.VM)
		}
	}
	if len(users) > 0 {
		return fmt.Errorf("%w: site %s is used by %s; move or delete them first", ErrForbidden, name, strings.Join(users, ", "))
	}
	if err := v.st.Delete(ctx, kindSite, s.Name, ver); err != nil {
		if errors.Is(err, store.ErrConflict) {
			return fmt.Errorf("%w: site %q changed meanwhile; try again", ErrBusy, name)
		}
		return err
	}
	v.log.Info("site deleted", "site", name)
	return nil
}

// Sites lists the sites.
func (v *Vault) Sites(ctx context.Context) ([]api.Site, error) {
	return list[api.Site](ctx, v.st, kindSite)
}

func (v *Vault) site(ctx context.Context, name string) (api.Site, Site, error) {
	s, _, err := get[api.Site](ctx, v.st, kindSite, name)
	if err != nil {
		return s, nil, err
	}
	return s, v.siteClient(s.Addr, s.Name), nil
}

// siteClient returns the client of site name at addr, made once: a client
// keeps its connections for the next call (a new one per call would leave
// idle connections behind until the agent's per-client cap refuses more).
func (v *Vault) siteClient(addr, name string) Site {
	v.sitesMu.Lock()
	defer v.sitesMu.Unlock()
	key := name + "@" + addr
	c, ok := v.clients[key]
	if !ok {
		c = v.cfg.Site(addr, name)
		v.clients[key] = c
	}
	return c
}

// SiteHeartbeat records a heartbeat a site agent sent over mutual TLS (the
// site is the name in its client certificate).
func (v *Vault) SiteHeartbeat(ctx context.Context, site string) error {
	for {
		cur, ver, err := get[api.Site](ctx, v.st, kindSite, site)
		if err != nil {
			return err
		}
		cur.LastSeen, cur.Reachable = v.now(), true
		if _, err := put(ctx, v.st, kindSite, site, cur, ver); !errors.Is(err, store.ErrConflict) {
			return err
		}
	}
}

// Heartbeat polls every site once and updates reachability: a site is
// unreachable once 3 heartbeat intervals passed without an answer to a poll
// and without a heartbeat from it.
func (v *Vault) Heartbeat(ctx context.Context) {
	sites, err := v.Sites(ctx)
	if err != nil {
		return
	}
	for _, s := range sites {
		c := v.siteClient(s.Addr, s.Name)
		cctx, cancel := context.WithTimeout(ctx, v.cfg.HeartbeatInterval)
		st, err := c.Status(cctx)
		cancel()
		reachable := s.Reachable
		for {
			cur, ver, gerr := get[api.Site](ctx, v.st, kindSite, s.Name)
			if gerr != nil {
				break
			}
			if err == nil {
				cur.LastSeen, cur.Reachable = v.now(), true
			} else {
				cur.Reachable = v.now().Sub(cur.LastSeen) < 3*v.cfg.HeartbeatInterval
			}
			reachable = cur.Reachable
			if _, perr := put(ctx, v.st, kindSite, s.Name, cur, ver); !errors.Is(perr, store.ErrConflict) {
				break
			}
		}
		switch {
		case err == nil:
			v.updateRPO(ctx, s.Name, st)
			v.siteProblems(ctx, s.Name, st)
			v.fence(ctx, s.Name, c, st)
			v.restartVMs(ctx, s.Name, c, st)
			v.pushCaps(ctx, s.Name, c)
		case !reachable:
			v.sourceDown(ctx, s.Name)
		}
	}
	v.checkAlerts(ctx)
}

// siteProblems turns critical, with the reason, the protections whose
// group (at their source) or replica (at their recovery site) did not open
// at site.
func (v *Vault) siteProblems(ctx context.Context, site string, st api.AgentStatus) {
	v.sitesMu.Lock()
	v.problems[site] = st.Problems
	v.sitesMu.Unlock()
	for _, pr := range st.Problems {
		reason := fmt.Sprintf("the %s at %s did not open: %s", pr.Kind, site, pr.Reason)
		v.updateProtection(ctx, pr.Name, func(p *Protection) error {
			mine := pr.Kind == "group" && p.Source == site || pr.Kind == "replica" && p.Target == site
			if !mine || p.Health == api.Critical && p.HealthReason == reason {
				return errors.New("unchanged")
			}
			p.Health, p.HealthReason = api.Critical, reason
			return nil
		})
	}
}

// replicaProblem is why the replica of vm at site did not open, as that
// site last reported ("" if it did).
func (v *Vault) replicaProblem(site, vm string) string {
	v.sitesMu.Lock()
	defer v.sitesMu.Unlock()
	for _, pr := range v.problems[site] {
		if pr.Kind == "replica" && pr.Name == vm {
			return fmt.Sprintf("the replica at %s did not open: %s", site, pr.Reason)
		}
	}
	return ""
}

// sourceDown marks the protections replicating from an unreachable site
// critical: nobody can say how far behind the recovery site is, and the
// VM may be lost (the portal, the CLI and the metrics must not keep
// showing the last healthy figures).
func (v *Vault) sourceDown(ctx context.Context, site string) {
	ps, err := v.Protections(ctx)
	if err != nil {
		return
	}
	for _, p := range ps {
		if p.Source != site || p.Health == "critical" || (p.State != StateProtected && p.State != StateInitialSync) {
			continue
		}
		v.updateProtection(ctx, p.VM, func(p *Protection) error {
			p.Health, p.HealthReason = api.Critical, fmt.Sprintf("the source site %s is unreachable", site)
			return nil
		})
		v.log.Warn("source site unreachable: protection critical", "vm", p.VM, "site", site)
	}
}

// fence makes a reachable site that was the source of a failed-over
// protection hold the group fenced at the protection's generation. It
// trusts the site's status, not its own record: every poll compares the
// generation the site reports with the protection's and sends the fence
// again until they agree, so a fence the site lost (a crash, a restored
// disk) is sent again. A site without the group has nothing to fence.
func (v *Vault) fence(ctx context.Context, site string, c Site, st api.AgentStatus) {
	ps, err := v.Protections(ctx)
	if err != nil {
		return
	}
	groups := map[string]api.GroupStatus{}
	for _, g := range st.Groups {
		groups[g.Name] = g
	}
	damaged := map[string]bool{}
	for _, pr := range st.Problems {
		if pr.Kind == "group" {
			damaged[pr.Name] = true
		}
	}
	for _, p := range ps {
		if p.Source != site || (p.State != StateFailedOver && p.State != StateCommitted) {
			continue
		}
		if damaged[p.VM] {
			// The group is there but did not open: it cannot take the
			// fence now, and must not be counted as fenced (it would
			// replicate as a source once repaired). Retried every poll.
			v.log.Warn("old source's group did not open: fence pending", "vm", p.VM, "site", site)
			continue
		}
		g, has := groups[p.VM]
		if has && g.Fenced < p.Generation {
			err := c.Fence(ctx, p.VM, p.Generation)
			if err != nil && !errors.Is(err, api.ErrNotFound) {
				v.log.Warn("fence the old source: will retry", "vm", p.VM, "site", site, "err", err)
				continue
			}
		}
		if p.Fenced {
			continue
		}
		v.updateProtection(ctx, p.VM, func(p *Protection) error { p.Fenced = true; return nil })
		v.log.Info("old source fenced", "vm", p.VM, "site", site, "generation", p.Generation, "had_group", has)
	}
}

// updateRPO copies RPO from a source site's status into its protections
// and sets health from the policy's thresholds; from a recovery site's, the
// newest points.
func (v *Vault) updateRPO(ctx context.Context, site string, st api.AgentStatus) {
	for _, r := range st.Replicas {
		if r.LastPoint.IsZero() {
			continue
		}
		var inc *api.EntropyIncident
		if r.Entropy != nil {
			inc = r.Entropy.Incident
		}
		var policy string
		v.updateProtection(ctx, r.Group, func(p *Protection) error {
			if p.Target != site {
				return errors.New("not the target")
			}
			policy = p.Policy
			if p.LastPoint.Equal(r.LastPoint) && p.LastAppPoint.Equal(r.LastAppPoint) && sameIncident(p.Ransomware, inc) {
				return errors.New("unchanged")
			}
			p.LastPoint, p.LastAppPoint, p.Ransomware = r.LastPoint, r.LastAppPoint, inc
			return nil
		})
		if policy != "" && r.Entropy != nil {
			v.syncDetector(ctx, site, r.Group, v.policy(ctx, policy).Ransomware, r.Entropy.Policy)
			v.hist.addLowHigh(r.Group, v.now(), r.Entropy.LowToHighBytes)
		}
	}
	for _, g := range st.Groups {
		if g.Replication == nil {
			continue
		}
		rpo := g.Replication.RPO
		link := g.Replication
		now, due := v.now(), false
		v.updateProtection(ctx, g.Name, func(p *Protection) error {
			if p.Source != site {
				return errors.New("not the source")
			}
			pol := v.policy(ctx, p.Policy)
			p.RPOSeconds = rpo
			p.Link = link
			due = v.hist.add(p.VM, now, RPOSample{RPO: rpo, Throughput: link.ThroughputBps, Pending: link.PendingBytes, Journal: g.JournalBytes})
			lag := time.Duration(rpo * float64(time.Second))
			switch {
			case g.Failed != "":
				p.Health, p.HealthReason = api.Critical, fmt.Sprintf("the disks at %s refuse writes: %s", site, g.Failed)
			case g.Replication.State != api.ReplStreaming:
				p.Health, p.HealthReason = api.Critical, fmt.Sprintf("replication is %s", g.Replication.State)
				if g.Replication.LastError != "" {
					p.HealthReason += ": " + g.Replication.LastError
				}
			case lag >= pol.RPOCritical:
				p.Health, p.HealthReason = api.Critical, fmt.Sprintf("RPO %v is over the critical threshold %v", lag.Round(time.Millisecond), pol.RPOCritical)+backlogText(link)
			case lag >= pol.RPOWarning:
				p.Health, p.HealthReason = api.Warning, fmt.Sprintf("RPO %v is over the warning threshold %v", lag.Round(time.Millisecond), pol.RPOWarning)+backlogText(link)
			default:
				p.Health, p.HealthReason = api.Healthy, ""
				if r := v.replicaProblem(p.Target, p.VM); r != "" {
					p.Health, p.HealthReason = api.Critical, r
				}
			}
			return nil
		})
		if due {
			v.saveHistory(ctx, g.Name, now)
		}
	}
}

// backlogText says, for an RPO over a threshold, how the backlog goes.
func backlogText(l *api.ReplicationStatus) string {
	if l.BacklogBytes < 1<<20 {
		return ""
	}
	capped := ""
	if l.CapBitsPerSecond > 0 {
		capped = fmt.Sprintf(" (cap %s)", bandwidth.FormatRate(l.CapBitsPerSecond))
	}
	if l.ClearsInSeconds < 0 {
		return fmt.Sprintf("; backlog %d MiB is not shrinking: writes come faster than the link%s carries", l.BacklogBytes>>20, capped)
	}
	return fmt.Sprintf("; backlog %d MiB clears in about %v at the current pace%s", l.BacklogBytes>>20,
		time.Duration(l.ClearsInSeconds*float64(time.Second)).Round(time.Second), capped)
}

// --- VMs, policies, protections ---

// DefineVM records a VM (its spec and the site it runs at) and creates its
// disks there (a group named after the VM; an existing one is kept).
func (v *Vault) DefineVM(ctx context.Context, vm VM) error {
	if len(vm.Members) > 0 {
		return v.defineGroup(ctx, vm)
	}
	if vm.Firmware == "uefi" && !slices.ContainsFunc(vm.Disks, func(d DiskSpec) bool { return d.Name == api.EFIVarsDisk }) {
		// Its UEFI variables, replicated with its disks: a failed-over
		// VM boots from the entries it had.
		vm.Disks = append(vm.Disks, DiskSpec{Name: api.EFIVarsDisk, Size: api.EFIVarsSize})
	}
	if err := checkVM(vm); err != nil {
		return err
	}
	if vm.Domain != "" {
		// A definition runs with libvirt's privileges at every site: it
		// comes only from a site's own libvirt, through an import.
		return fmt.Errorf("%w: a VM's libvirt definition comes only from an import (ferry vm import --libvirt)", ErrInvalid)
	}
	site, c, err := v.site(ctx, vm.Site)
	if err != nil {
		return err
	}
	if err := checkNICs(&vm, site); err != nil {
		return err
	}
	if _, _, err := get[VM](ctx, v.st, kindVM, vm.Name); err == nil {
		return fmt.Errorf("%w: VM %q exists", ErrForbidden, vm.Name)
	}
	if err := v.nameFree(ctx, vm.Name); err != nil {
		return err
	}
	return v.createVM(ctx, c, vm)
}

// defineGroup records a multi-VM consistency group and creates its
// disks (every member's) as one group at its site.
func (v *Vault) defineGroup(ctx context.Context, g VM) error {
	if err := api.CheckName(api.KindVM, g.Name); err != nil {
		return err
	}
	site, c, err := v.site(ctx, g.Site)
	if err != nil {
		return err
	}
	if _, _, err := get[VM](ctx, v.st, kindVM, g.Name); err == nil {
		return fmt.Errorf("%w: VM or group %q exists", ErrForbidden, g.Name)
	}
	if err := v.nameFree(ctx, g.Name); err != nil {
		return err
	}
	if err := v.checkGroup(ctx, &g, site); err != nil {
		return err
	}
	return v.createVM(ctx, c, g)
}

// nameFree: no group has a member of that name.
func (v *Vault) nameFree(ctx context.Context, name string) error {
	vms, err := v.VMs(ctx)
	if err != nil {
		return err
	}
	for _, e := range vms {
		if slices.ContainsFunc(e.Members, func(m VM) bool { return m.Name == name }) {
			return fmt.Errorf("%w: %s is a member of group %s", ErrForbidden, name, e.Name)
		}
	}
	return nil
}

// createVM creates vm's disks at its site and records it.
func (v *Vault) createVM(ctx context.Context, c Site, vm VM) error {
	var disks []api.DiskSpec
	for _, d := range vm.Disks {
		disks = append(disks, api.DiskSpec{Name: d.Name, Size: d.Size})
	}
	if err := c.CreateGroup(ctx, vm.Name, disks); err != nil && !errors.Is(err, api.ErrConflict) {
		return fmt.Errorf("create the disks of %s at %s: %w", vm.Name, vm.Site, err)
	}
	vm.Running = false // the vault's to say, once it started it
	_, err := put(ctx, v.st, kindVM, vm.Name, vm, 0)
	if errors.Is(err, store.ErrConflict) {
		return fmt.Errorf("%w: VM %q exists", ErrForbidden, vm.Name)
	}
	return err
}

// checkVM validates everything in a VM's definition that a site agent or
// QEMU will see.
func checkVM(vm VM) error {
	if err := api.CheckName(api.KindVM, vm.Name); err != nil {
		return err
	}
	if err := api.CheckName(api.KindSite, vm.Site); err != nil {
		return err
	}
	n := len(vm.Disks)
	if slices.ContainsFunc(vm.Disks, func(d DiskSpec) bool { return d.Name == api.EFIVarsDisk }) {
		n-- // the UEFI variables are not one of the guest's disks
	}
	if n <= 0 || n > 16 {
		return fmt.Errorf("%w: a VM needs 1 to 16 disks, got %d", ErrInvalid, n)
	}
	seen := map[string]bool{}
	for _, d := range vm.Disks {
		if err := api.CheckName(api.KindDisk, d.Name); err != nil {
			return err
		}
		if d.Name == api.EFIVarsDisk && vm.Firmware != "uefi" {
			return fmt.Errorf("%w: disk %s holds a UEFI VM's variables; name the disk otherwise, or define the VM with firmware uefi", ErrInvalid, d.Name)
		}
		if seen[d.Name] {
			return fmt.Errorf("%w: disk %q given twice", ErrInvalid, d.Name)
		}
		seen[d.Name] = true
		if d.Size <= 0 || d.Size > 1<<50 {
			return fmt.Errorf("%w: disk %s: size %d out of range (1 B to 1 PiB)", ErrInvalid, d.Name, d.Size)
		}
	}
	if vm.MemoryMiB <= 0 || vm.MemoryMiB > 1<<20 {
		return fmt.Errorf("%w: memory %d MiB out of range (1 MiB to 1 TiB)", ErrInvalid, vm.MemoryMiB)
	}
	if vm.VCPUs < 0 || vm.VCPUs > 64 {
		return fmt.Errorf("%w: %d vCPUs out of range (0: one, up to 64)", ErrInvalid, vm.VCPUs)
	}
	if vm.ShutdownTimeout < 0 || vm.ShutdownTimeout > time.Hour {
		return fmt.Errorf("%w: shutdown timeout %v: want up to 1h", ErrInvalid, vm.ShutdownTimeout)
	}
	if vm.GuestPort < 0 || vm.GuestPort > 65535 {
		return fmt.Errorf("%w: guest port %d out of range", ErrInvalid, vm.GuestPort)
	}
	if vm.Firmware != "" && vm.Firmware != "bios" && vm.Firmware != "uefi" {
		return fmt.Errorf("%w: firmware %q: want bios or uefi", ErrInvalid, vm.Firmware)
	}
	for _, f := range []struct{ what, s string }{{"kernel", vm.Kernel}, {"initrd", vm.Initrd}, {"append", vm.Append}} {
		if strings.ContainsFunc(f.s, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
			return fmt.Errorf("%w: %s holds control characters", ErrInvalid, f.what)
		}
	}
	return checkForwards(vm.Forwards, false)
}

// Console returns a VM's serial console from offset, wherever it runs.
func (v *Vault) Console(ctx context.Context, name string, off int64) (api.Console, error) {
	vm, _, err := get[VM](ctx, v.st, kindVM, name)
	if err != nil {
		return api.Console{}, err
	}
	// A group's console is its first member's.
	return v.consoleAt(ctx, vm.Site, members(vm)[0].Name, off)
}

// TestConsole returns the serial console of the VM a test failover of
// name runs at its recovery site (ErrConflict when none runs).
func (v *Vault) TestConsole(ctx context.Context, name string, off int64) (api.Console, error) {
	p, err := v.Protection(ctx, name)
	if err != nil {
		return api.Console{}, err
	}
	if !p.TestPending {
		return api.Console{}, fmt.Errorf("%w: no test failover of %s runs (start one: ferry test-failover %s)", api.ErrConflict, name, name)
	}
	vm, _, err := get[VM](ctx, v.st, kindVM, name)
	if err != nil {
		return api.Console{}, err
	}
	return v.consoleAt(ctx, p.Target, members(vm)[0].Name+"-drill", off)
}

func (v *Vault) consoleAt(ctx context.Context, site, vmName string, off int64) (api.Console, error) {
	_, c, err := v.site(ctx, site)
	if err != nil {
		return api.Console{}, err
	}
	out, err := c.Console(ctx, vmName, off)
	out.Site = site
	return out, err
}

// StartVM starts a defined VM at the site where it is (not for a VM that
// a failover runs on views: the failover starts that one).
func (v *Vault) StartVM(ctx context.Context, name string) (api.VMStatus, error) {
	vm, _, err := get[VM](ctx, v.st, kindVM, name)
	if err != nil {
		return api.VMStatus{}, err
	}
	_, c, err := v.site(ctx, vm.Site)
	if err != nil {
		return api.VMStatus{}, err
	}
	var pp *Protection
	if p, err := v.Protection(ctx, name); err == nil {
		pp = &p
	}
	if len(vm.Members) > 0 {
		var said []string
		err := v.startGroup(ctx, pp, vm, c, vm.Site, "", 0, false, func(f string, a ...any) { said = append(said, fmt.Sprintf(f, a...)) }, nil)
		if err == nil {
			v.setRunning(ctx, name, true)
		}
		return api.VMStatus{Name: name, State: api.VMRunning, Reason: strings.Join(said, "; ")}, err
	}
	nets, err := v.attach(ctx, pp, vm, vm.Site, false)
	if err != nil {
		return api.VMStatus{}, err
	}
	st, err := c.StartVM(ctx, vmRequest(vm, vm.Name, vm.Site, 0, nets))
	if err == nil {
		v.setRunning(ctx, name, true)
	}
	return st, err
}

// setRunning records whether an operator wants the VM running.
func (v *Vault) setRunning(ctx context.Context, name string, running bool) {
	for {
		vm, ver, err := get[VM](ctx, v.st, kindVM, name)
		if err != nil || vm.Running == running {
			return
		}
		vm.Running = running
		if _, err := put(ctx, v.st, kindVM, name, vm, ver); !errors.Is(err, store.ErrConflict) {
			return
		}
	}
}

// restartVMs starts again, at site, the VMs an operator started that
// should run there and are not there at all (not even stopped): the
// site's agent restarted, and a VM's QEMU dies with its agent. A VM runs
// again on its group (not a fenced one: the VM runs at the other site);
// a failed-over VM not yet committed, on views of its replica at the
// failover point (the old views' overlays did not outlive the agent:
// what it wrote since the failover is lost, and the log says so). Not
// while a job runs on the VM's protection.
func (v *Vault) restartVMs(ctx context.Context, site string, c Site, st api.AgentStatus) {
	vms, err := v.VMs(ctx)
	if err != nil {
		return
	}
	present := map[string]bool{}
	for _, x := range st.VMs {
		present[x.Name] = true
	}
	groups := map[string]api.GroupStatus{}
	for _, g := range st.Groups {
		groups[g.Name] = g
	}
	replicas := map[string]bool{}
	for _, r := range st.Replicas {
		replicas[r.Group] = true
	}
	for _, vm := range vms {
		if vm.Site != site || !vm.Running || present[members(vm)[0].Name] {
			continue
		}
		var pp *Protection
		var seq uint64 // a failed-over VM runs on views of its replica at this point
		if p, err := v.Protection(ctx, vm.Name); err == nil {
			if p.Job != "" || p.State == StateFailingOver {
				continue
			}
			if p.State == StateFailedOver {
				if !replicas[vm.Name] {
					continue
				}
				seq = p.FailoverSeq
			}
			pp = &p
		}
		if g, has := groups[vm.Name]; seq == 0 && (!has || g.Fenced != 0 || g.Failed != "") {
			continue
		}
		var err error
		if len(vm.Members) > 0 {
			err = v.startGroup(ctx, pp, vm, c, site, "", seq, false, func(string, ...any) {}, nil)
		} else {
			var nets []Network
			nets, err = v.attach(ctx, pp, vm, site, false)
			if err == nil {
				_, err = c.StartVM(ctx, vmRequest(vm, vm.Name, site, seq, nets))
			}
		}
		if err == nil && seq != 0 {
			v.log.Warn("failed-over VM started again at its failover point: what it wrote since the failover did not outlive its agent", "vm", vm.Name, "site", site, "point", seq)
			continue
		}
		if err != nil {
			v.log.Warn("start the VM again after its site's agent restarted: will retry", "vm", vm.Name, "site", site, "err", err)
			continue
		}
		v.log.Info("VM started again: its site's agent had restarted", "vm", vm.Name, "site", site)
	}
}

// VMs lists the VMs.
func (v *Vault) VMs(ctx context.Context) ([]VM, error) { return list[VM](ctx, v.st, kindVM) }

// PutPolicy creates or replaces a policy.
func (v *Vault) PutPolicy(ctx context.Context, p Policy) error {
	if err := api.CheckName(api.KindPolicy, p.Name); err != nil {
		return err
	}
	if p.Name == "" || p.Retention <= 0 || p.RPOWarning <= 0 || p.RPOCritical < p.RPOWarning {
		return fmt.Errorf("%w: a policy needs a name, retention > 0 and 0 < RPO warning <= critical", ErrInvalid)
	}
	if p.AppInterval > 0 && p.AppInterval < time.Minute {
		return fmt.Errorf("%w: app-consistent interval below 1 minute", ErrInvalid)
	}
	if r := p.Ransomware; r.MinBytes < 0 || r.Factor < 0 || r.Window < 0 || r.Window > 24*time.Hour {
		return fmt.Errorf("%w: ransomware thresholds must be positive (0: the default) and the window at most 24h", ErrInvalid)
	}
	_, ver, _ := get[Policy](ctx, v.st, kindPolicy, p.Name)
	_, err := put(ctx, v.st, kindPolicy, p.Name, p, ver)
	return err
}

// Policies lists the policies, the default one first.
func (v *Vault) Policies(ctx context.Context) ([]Policy, error) {
	ps, err := list[Policy](ctx, v.st, kindPolicy)
	if err != nil {
		return nil, err
	}
	if !slices.ContainsFunc(ps, func(p Policy) bool { return p.Name == DefaultPolicy.Name }) {
		ps = append([]Policy{DefaultPolicy}, ps...)
	}
	return ps, nil
}

// Policy returns one policy ("default" exists until replaced).
func (v *Vault) Policy(ctx context.Context, name string) (Policy, error) {
	p, _, err := get[Policy](ctx, v.st, kindPolicy, name)
	if errors.Is(err, ErrNotFound) && name == DefaultPolicy.Name {
		return DefaultPolicy, nil
	}
	return p, err
}

// StopVM shuts a VM down gracefully where it runs. A VM that runs on a
// failover's views is not stopped this way (its writes would be lost):
// commit first, or change its recovery point.
func (v *Vault) StopVM(ctx context.Context, name string) ([]string, error) {
	vm, _, err := get[VM](ctx, v.st, kindVM, name)
	if err != nil {
		return nil, err
	}
	if p, err := v.Protection(ctx, name); err == nil {
		if p.Job != "" {
			return nil, fmt.Errorf("%w: job %s is running on %s; wait for it", ErrBusy, p.Job, name)
		}
		if p.State == StateFailedOver || p.State == StateFailingOver {
			return nil, fmt.Errorf("%w: %s runs on a failover's recovery point; commit first (ferry commit %s), or its writes are lost", ErrForbidden, name, name)
		}
	}
	_, c, err := v.site(ctx, vm.Site)
	if err != nil {
		return nil, err
	}
	v.setRunning(ctx, name, false) // first: a restart of its site must not bring it back
	if len(vm.Members) > 0 {
		var said []string
		err := stopGroup(ctx, c, vm, "", api.StopOptions{Timeout: vm.ShutdownTimeout}, func(f string, a ...any) { said = append(said, fmt.Sprintf(f, a...)) })
		return said, err
	}
	return c.StopVM(ctx, name, api.StopOptions{Timeout: vm.ShutdownTimeout})
}

// DeleteVM deletes a VM that is not protected and does not run, with its
// disks at its site.
func (v *Vault) DeleteVM(ctx context.Context, name string) error {
	vm, ver, err := get[VM](ctx, v.st, kindVM, name)
	if err != nil {
		return err
	}
	if p, err := v.Protection(ctx, name); err == nil && p.State != StateDisabled {
		return fmt.Errorf("%w: %s is protected (%s); disable protection first (ferry disable %s)", ErrForbidden, name, p.State, name)
	}
	_, c, err := v.site(ctx, vm.Site)
	if err != nil {
		return err
	}
	if err := c.DeleteGroup(ctx, name); err != nil && !errors.Is(err, api.ErrNotFound) {
		if errors.Is(err, api.ErrConflict) {
			return fmt.Errorf("%w: %s still runs or replicates at %s; stop it first (ferry vm stop %s): %v", ErrForbidden, name, vm.Site, name, err)
		}
		return err
	}
	return v.forgetVM(ctx, name, ver)
}

// forgetVM deletes a VM's record (at version ver) and its disabled
// protection's.
func (v *Vault) forgetVM(ctx context.Context, name string, ver int64) error {
	if err := v.st.Delete(ctx, kindVM, name, ver); err != nil {
		return err
	}
	if _, pver, err := get[Protection](ctx, v.st, kindProtection, name); err == nil {
		v.st.Delete(ctx, kindProtection, name, pver)
	}
	return nil
}

// policy is the named policy, or the default one if it is gone.
func (v *Vault) policy(ctx context.Context, name string) Policy {
	if p, err := v.Policy(ctx, name); err == nil {
		return p
	}
	return DefaultPolicy
}

// Protections lists the protections.
func (v *Vault) Protections(ctx context.Context) ([]Protection, error) {
	return list[Protection](ctx, v.st, kindProtection)
}

// Protection returns one.
func (v *Vault) Protection(ctx context.Context, vm string) (Protection, error) {
	p, _, err := get[Protection](ctx, v.st, kindProtection, vm)
	return p, err
}

// Points lists the recovery points of a protection at its recovery site.
func (v *Vault) Points(ctx context.Context, vm string) ([]api.Point, error) {
	p, err := v.Protection(ctx, vm)
	if err != nil {
		return nil, err
	}
	_, c, err := v.site(ctx, p.Target)
	if err != nil {
		return nil, err
	}
	return c.Points(ctx, vm)
}

// choosePoint resolves latest-processed, latest-app-consistent, a sequence
// number or an RFC 3339 time against the catalog.
func choosePoint(pts []api.Point, want string) (api.Point, error) {
	if len(pts) == 0 {
		return api.Point{}, fmt.Errorf("%w: the recovery site has no recovery point yet", ErrForbidden)
	}
	switch want {
	case "", "latest-processed":
		return pts[len(pts)-1], nil
	case "latest-app-consistent":
		for i := len(pts) - 1; i >= 0; i-- {
			if pts[i].Type == "app" {
				return pts[i], nil
			}
		}
		return api.Point{}, fmt.Errorf("%w: no application-consistent point; take one (ferry point --app) or pick another", ErrNotFound)
	}
	if seq, err := strconv.ParseUint(want, 10, 64); err == nil {
		for _, p := range pts {
			if p.Seq == seq {
				return p, nil
			}
		}
		return api.Point{}, fmt.Errorf("%w: no recovery point %d (list them with ferry points)", ErrNotFound, seq)
	}
	if t, err := time.Parse(time.RFC3339Nano, want); err == nil {
		i := sort.Search(len(pts), func(i int) bool { return pts[i].Time.After(t) })
		if i == 0 {
			return api.Point{}, fmt.Errorf("%w: no recovery point at or before %s", ErrNotFound, want)
		}
		return pts[i-1], nil
	}
	return api.Point{}, fmt.Errorf("%w: point %q: want latest, latest-processed, latest-app-consistent, a point id or an RFC 3339 time", ErrInvalid, want)
}
