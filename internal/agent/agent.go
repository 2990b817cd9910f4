// Package agent is ferry's site agent: the long-running daemon at each
// site. It owns the site's disk groups (serving their disks to QEMU over
// NBD on a unix socket and journaling every write), ships each protected
// group's journal to its peer site, receives its peers' journals into
// replicas, and opens views of replicas at recovery points. Everything it
// offers over the network (its API and the replication link) runs on one
// listener with mutual TLS 1.3; docs/agent-api.md documents the API.
package agent

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/atomicfile"
	"github.com/ferry-dr/ferry/internal/bandwidth"
	"github.com/ferry-dr/ferry/internal/clock"
	"github.com/ferry-dr/ferry/internal/disk"
	"github.com/ferry-dr/ferry/internal/entropy"
	"github.com/ferry-dr/ferry/internal/httpserver"
	"github.com/ferry-dr/ferry/internal/link"
	"github.com/ferry-dr/ferry/internal/nbd"
	"github.com/ferry-dr/ferry/internal/pki"
	"github.com/ferry-dr/ferry/internal/qemu"
	"github.com/ferry-dr/ferry/internal/replica"
	"github.com/ferry-dr/ferry/internal/replication"
	"github.com/ferry-dr/ferry/internal/vaultclient"
	"golang.org/x/sys/unix"
)

// Config configures an Agent.
type Config struct {
	Dir    string // data directory
	Name   string // site name; also the name of its certificate in PKIDir
	Listen string // host:port for the API and the replication link
	PKIDir string
	Logger *slog.Logger
	// PointInterval is how often a crash-consistent recovery point is
	// recorded in each group that has new writes (default 1 s; 0 keeps
	// the default, negative disables).
	PointInterval time.Duration
	// CheckpointInterval of the groups (default 30 s).
	CheckpointInterval time.Duration
	// Retention is how long replicas keep the journal, so that any instant
	// in it can be recovered (default 24 h); older entries are folded into
	// the replica images every FoldInterval (default 1 min).
	Retention, FoldInterval time.Duration
	// FoldRate bounds the background fold of a committed group (the
	// replica's journal and the VM's writes since its failover moved
	// into plain images), in bytes per second (default 128 MiB/s).
	FoldRate int64
	// Runtime runs the site's VMs (default: QEMU started directly).
	Runtime Runtime
	// NBDGroup, if set, is the group that may connect to the NBD socket
	// (the hypervisor's, for libvirt: libvirt-qemu), with NBDMode (default
	// 0660; bits for others are refused). Without it, the socket is 0600.
	NBDGroup string
	NBDMode  os.FileMode
	// MaxUnfolded bounds each group's recent writes kept only in its
	// journal (disk.Config.MaxUnfolded: 0 is 4 GiB, negative: none).
	MaxUnfolded int64
	// NoFold keeps committed groups from folding in the background (tests
	// drive the fold step by step).
	NoFold bool
	// MaxUnshipped bounds a source journal holding entries the recovery
	// site has not acknowledged; past it the shipper keeps a dirty-block
	// bitmap instead and resynchronizes from it (default 1 GiB).
	MaxUnshipped int64
	// NoCompress: replication streams from this site are not compressed
	// (by default they are compressed with zstd wherever it pays).
	NoCompress bool
	// Points thins the catalog that the API lists.
	Points replica.Policy
	// Now is the clock (default clock.Steady(clock.System()): steps of
	// the system clock do not move it).
	Now func() time.Time
	// Vault, if set (host:port), receives a heartbeat from this agent every
	// second over mutual TLS (the agent's certificate names its site).
	Vault string
	// AppInterval is how often an application-consistent point is taken
	// of each group with a running VM (default 1 h; at least 1 min;
	// negative: never).
	AppInterval time.Duration
	// DivergenceBound bounds the journal a committed group keeps for a
	// reprotect's changed-block tracking: past it, the journal's changes
	// are folded into the divergence record's chunk set and the journal
	// may be trimmed (default 1 GiB; the check runs every 5 s).
	DivergenceBound int64
	// ReadTimeout bounds reading a request with its body (default 30 s;
	// the replication link is exempt); MaxConnsPerClient caps the
	// connections one certificate holds open (default 64).
	ReadTimeout       time.Duration
	MaxConnsPerClient int
}

// Agent is a running site agent.
type Agent struct {
	cfg Config
	log *slog.Logger
	id  *pki.Identity

	nbd     *nbd.Server
	nbdSock string
	runtime Runtime
	httpSrv *http.Server
	ln      net.Listener
	recv    *replication.Receiver
	metrics *metrics

	mu       sync.Mutex
	groups   map[string]*group
	replicas map[string]*replica.Replica
	// monitors are the replicas' ransomware detectors (entropy.go).
	monMu    sync.Mutex
	monitors map[string]*entropy.Monitor
	// files are the file browsing sessions (files.go).
	files     fileSessions
	views     map[string]*openView
	nextView  int
	vms       map[string]*runningVM
	appPoints map[string]AppPointStatus
	imports   map[string]*importState
	// problems are the groups and replicas that did not open: the agent
	// serves the rest; these wait for an operator, untouched.
	problems map[string]api.Problem // by kind/name

	// The highest leader epoch obeyed, and calls refused for an older one
	// (epoch.go).
	epochMu      sync.Mutex
	epoch        int64
	staleRefused int64

	// Replication caps (PUT /v1/bandwidth), by peer site and by group;
	// bwMu guards the maps and the saved config.
	bwMu     sync.Mutex
	bw       api.Bandwidth
	bwPeers  map[string]*bandwidth.Limiter
	bwGroups map[string]*bandwidth.Limiter

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

type group struct {
	name    string
	g       *disk.Group
	repl    *replConfig
	shipper *replication.Shipper
	// kept is the shipper of a fenced group, stopped but keeping its
	// journal hold and dirty-block bitmap: a reprotect asks it what
	// changed here after the failover point.
	kept *replication.Shipper
	// divMu serializes the divergence record's writers and readers (a
	// commit, the compaction loop, a reprotect's copy).
	divMu sync.Mutex
	stop  chan struct{}
	// fenced: a failover made another site the active one (generation);
	// this group must not run its VM or replicate as a source until it
	// is reprotected (turned into a replica).
	fenced int64
}

type replConfig = api.Replicate

type openView struct {
	id      string
	replica string
	disk    string
	seq     uint64
	v       *replica.View
	export  string
	sw      *nbd.Switch // the export's device: a commit switches it to the group
}

// Errors for API callers: the api package's sentinels, so that the
// status code a caller receives maps back to them.
var (
	ErrNotFound = api.ErrNotFound
	ErrConflict = api.ErrConflict
	ErrInvalid  = api.ErrInvalid
)

// New loads the agent's identity and state. Start serves it.
func New(cfg Config) (*Agent, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.PointInterval == 0 {
		cfg.PointInterval = time.Second
	}
	if cfg.CheckpointInterval == 0 {
		cfg.CheckpointInterval = 30 * time.Second
	}
	if cfg.Retention == 0 {
		cfg.Retention = 24 * time.Hour
	}
	if cfg.FoldInterval == 0 {
		cfg.FoldInterval = time.Minute
	}
	if cfg.Now == nil {
		cfg.Now = clock.Steady(clock.System())
	}
	if cfg.AppInterval == 0 {
		cfg.AppInterval = time.Hour
	}
	if cfg.AppInterval > 0 && cfg.AppInterval < time.Minute {
		return nil, fmt.Errorf("app-consistent interval %v is below the 1 minute minimum", cfg.AppInterval)
	}
	if err := api.CheckName(api.KindSite, cfg.Name); err != nil {
		return nil, err
	}
	id, err := pki.Load(cfg.PKIDir, cfg.Name)
	if err != nil {
		return nil, err
	}
	if err := id.Require(pki.RoleSite, cfg.Name); err != nil {
		return nil, err
	}
	if _, err := os.Stat(cfg.Dir); errors.Is(err, os.ErrNotExist) && cfg.NBDGroup != "" {
		// The hypervisor's user must pass through to the NBD socket
		// (search only: it cannot list the directory, and everything
		// below is 0700).
		if err := os.MkdirAll(cfg.Dir, 0o711); err != nil {
			return nil, err
		}
	}
	for _, sub := range []string{"groups", "replicas", "views"} {
		if err := os.MkdirAll(filepath.Join(cfg.Dir, sub), 0o700); err != nil {
			return nil, err
		}
	}
	a := &Agent{cfg: cfg, log: cfg.Logger, id: id,
		groups: map[string]*group{}, replicas: map[string]*replica.Replica{}, monitors: map[string]*entropy.Monitor{}, views: map[string]*openView{},
		vms: map[string]*runningVM{}, appPoints: map[string]AppPointStatus{}, imports: map[string]*importState{}, problems: map[string]api.Problem{},
		bwPeers: map[string]*bandwidth.Limiter{}, bwGroups: map[string]*bandwidth.Limiter{},
		nbd: nbd.New(nbd.Config{Logger: cfg.Logger}), nbdSock: filepath.Join(cfg.Dir, "nbd.sock")}
	a.runtime = cfg.Runtime
	if a.runtime == nil {
		a.runtime = directRuntime{log: cfg.Logger}
	}
	a.recv = &replication.Receiver{ReplicaFor: a.replicaFor}
	a.metrics = newMetrics(a)
	if err := a.loadBandwidth(); err != nil {
		return nil, err
	}
	if err := a.loadEpoch(); err != nil {
		return nil, err
	}
	return a, nil
}

// Start opens the site's groups and replicas, resumes replication and
// serves NBD and the API. It returns once listening.
func (a *Agent) Start(ctx context.Context) error {
	a.ctx, a.cancel = context.WithCancel(ctx)
	acc, err := socketAccess(a.cfg.NBDGroup, a.cfg.NBDMode, a.nbdSock)
	if err != nil {
		return err
	}
	nln, err := nbd.ListenUnixShared(a.nbdSock, acc)
	if err != nil {
		return err
	}
	a.wg.Add(1)
	go func() { defer a.wg.Done(); a.nbd.Serve(a.ctx, nln) }()

	// One group or replica that does not open (a damaged journal) does
	// not stop the site: it is reported, left as it is, and the rest
	// serve.
	entries, _ := os.ReadDir(filepath.Join(a.cfg.Dir, "groups"))
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".") {
			// A commit that died before its group was renamed into
			// place (its replica is still a replica: rolled back below),
			// or a deletion a crash interrupted (atomicfile.RemoveDir).
			os.RemoveAll(filepath.Join(a.cfg.Dir, "groups", e.Name()))
			continue
		}
		if !e.IsDir() {
			continue
		}
		if _, err := os.Stat(filepath.Join(a.groupDir(e.Name()), toReplicaIntent)); err == nil {
			if err := a.finishToReplica(e.Name()); err != nil {
				a.problem("group", e.Name(), fmt.Errorf("turning it into a replica was interrupted and could not finish: %w", err))
			}
			continue
		}
		if err := a.openGroup(e.Name(), nil); err != nil {
			a.problem("group", e.Name(), err)
		}
	}
	entries, _ = os.ReadDir(filepath.Join(a.cfg.Dir, "replicas"))
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), atomicfile.RemovedPrefix) {
			// A removal a crash interrupted (atomicfile.RemoveDir).
			os.RemoveAll(filepath.Join(a.cfg.Dir, "replicas", e.Name()))
			continue
		}
		if !e.IsDir() {
			continue
		}
		a.mu.Lock()
		gr := a.groups[e.Name()]
		a.mu.Unlock()
		if gr != nil && gr.g.Layered() {
			continue // the base of a committed group, opened by it
		}
		if gr != nil {
			a.removeFoldedBase(e.Name())
			continue
		}
		if _, err := a.openReplica(e.Name()); err != nil {
			a.problem("replica", e.Name(), err)
		}
	}
	a.startFolding()
	a.every(time.Minute, nil, func() { a.reapFiles(false) })
	a.startAppPoints()
	a.startHeartbeats()
	os.RemoveAll(filepath.Join(a.cfg.Dir, "views")) // overlays of views from a previous run
	os.MkdirAll(filepath.Join(a.cfg.Dir, "views"), 0o700)

	ln, err := tls.Listen("tcp", a.cfg.Listen, a.id.ServerConfig())
	if err != nil {
		return fmt.Errorf("listen on %s: %w", a.cfg.Listen, err)
	}
	a.ln = ln
	a.httpSrv = httpserver.New(httpserver.Config{Handler: a.routes(), Logger: a.log,
		ReadTimeout: a.cfg.ReadTimeout, MaxConnsPerClient: a.cfg.MaxConnsPerClient})
	a.httpSrv.BaseContext = func(net.Listener) context.Context { return a.ctx }
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		if err := a.httpSrv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.Error("api server", "err", err)
		}
	}()
	a.log.Info("agent up", "site", a.cfg.Name, "listen", ln.Addr().String(), "nbd", a.nbdSock)
	return nil
}

// Addr is the API/link listen address.
func (a *Agent) Addr() string { return a.ln.Addr().String() }

// NBDSocket is the unix socket serving every export of this agent.
func (a *Agent) NBDSocket() string { return a.nbdSock }

// Close stops everything: replication (holds stay), NBD, the API; then
// checkpoints and closes the groups and replicas.
func (a *Agent) Close() error {
	if a.cancel != nil {
		a.cancel()
	}
	if a.httpSrv != nil {
		a.httpSrv.Close()
	}
	a.stopVMs() // before their disks go away
	a.reapFiles(true)
	a.nbd.Close()
	a.mu.Lock()
	groups := a.groups
	a.mu.Unlock()
	for _, g := range groups {
		a.stopGroup(g)
	}
	a.wg.Wait()
	var err error
	for _, g := range groups {
		if cerr := g.g.Close(); cerr != nil && err == nil {
			err = cerr
		}
	}
	for _, v := range a.views {
		v.v.Close()
	}
	for _, r := range a.replicas {
		r.Close()
	}
	a.saveMonitors()
	return err
}

// problem records a group or replica that did not open.
func (a *Agent) problem(kind, name string, err error) {
	a.log.Error(kind+" not opened: the site serves the rest; it waits for an operator, untouched", kind, name, "err", err)
	a.mu.Lock()
	a.problems[kind+"/"+name] = api.Problem{Kind: kind, Name: name, Reason: err.Error(), Since: a.cfg.Now()}
	a.mu.Unlock()
}

// problemErr refuses work on a group or replica that did not open.
func (a *Agent) problemErr(kind, name string) error {
	a.mu.Lock()
	p, ok := a.problems[kind+"/"+name]
	a.mu.Unlock()
	if !ok {
		return nil
	}
	return fmt.Errorf("%w: %s %s did not open (%s); nothing of it was changed: see docs/replication.md, \"Damaged journals\"", ErrConflict, kind, name, p.Reason)
}

// group returns the named group.
func (a *Agent) group(name string) (*group, error) {
	a.mu.Lock()
	gr := a.groups[name]
	a.mu.Unlock()
	if gr == nil {
		if err := a.problemErr("group", name); err != nil {
			return nil, err
		}
		return nil, fmt.Errorf("%w: group %q", ErrNotFound, name)
	}
	return gr, nil
}

func exportName(group, diskName string) string { return group + "/" + diskName }

func (a *Agent) groupDir(name string) string { return filepath.Join(a.cfg.Dir, "groups", name) }

// openGroup opens an existing group, exports its disks and resumes its
// replication. The shipper's hold is placed before the checkpoint loop
// starts, so nothing unshipped can be trimmed.
//
// base, if not nil, is the base of a group a commit just created (the
// replica, still open); otherwise a layered group opens its base from the
// replica directory its manifest names.
func (a *Agent) openGroup(name string, base disk.Base) error {
	g, err := disk.Open(disk.Config{Dir: a.groupDir(name), CheckpointInterval: a.cfg.CheckpointInterval, Now: a.cfg.Now,
		FoldRate: a.cfg.FoldRate, MaxUnfolded: a.cfg.MaxUnfolded, NoFold: a.cfg.NoFold, Logger: a.log.With("group", name),
		OpenBase: func(ref disk.BaseRef) (disk.Base, error) {
			if base != nil {
				return base, nil
			}
			return a.openBase(ref)
		}})
	if err != nil {
		return err
	}
	gr := &group{name: name, g: g, stop: make(chan struct{})}
	if b, err := os.ReadFile(filepath.Join(a.groupDir(name), "fenced")); err == nil {
		// The marker exists: the group is fenced, whatever its content
		// says. One that does not parse (written by an older ferry
		// without fsync, or damaged) still fences; the vault raises it to
		// the real generation on its next poll.
		if _, err := fmt.Sscan(string(b), &gr.fenced); err != nil || gr.fenced <= 0 {
			a.log.Error("fence marker unreadable; keeping the group fenced", "group", name, "content", string(b), "err", err)
			gr.fenced = 1
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		g.Close()
		return fmt.Errorf("read fence marker of %s: %w", name, err)
	}
	if b, err := os.ReadFile(filepath.Join(a.groupDir(name), "replication.json")); err == nil {
		var rc replConfig
		if err := json.Unmarshal(b, &rc); err == nil && gr.fenced == 0 {
			gr.repl = &rc
		} else if err == nil {
			gr.kept = a.newShipper(gr, &rc) // holds the journal; never started
		}
	}
	if d, ok, err := a.loadDivergence(name); err != nil {
		a.log.Error("changed-block tracking unusable; a reprotect will compare checksums", "group", name, "err", err)
	} else if ok {
		g.Hold(divergenceHolder, d.After+1)
	}
	for _, s := range g.Disks() {
		d, _ := g.Disk(s.Name)
		if err := a.nbd.AddExport(nbd.Export{Name: exportName(name, s.Name), Description: "ferry disk " + s.Name + " of " + name,
			Size: s.Size, MultiConn: true, Device: a.metrics.instrument(d)}); err != nil {
			g.Close()
			return err
		}
	}
	a.mu.Lock()
	a.groups[name] = gr
	a.mu.Unlock()
	if gr.repl != nil {
		a.startShipper(gr)
	}
	g.Start(a.ctx)
	a.startPoints(gr)
	a.every(5*time.Second, gr.stop, func() {
		if err := a.compactDivergence(gr, a.cfg.DivergenceBound); err != nil {
			a.log.Error("changed-block tracking", "group", gr.name, "err", err)
		}
	})
	// A group that failed for want of space resumes by itself once there
	// is room again (the failure stays in status and metrics until then).
	a.every(5*time.Second, gr.stop, func() {
		if gr.g.Failed() == nil {
			return
		}
		if err := gr.g.Resume(); err != nil {
			a.log.Debug("failed group does not resume yet", "group", gr.name, "err", err)
			return
		}
		a.log.Info("group resumed after its failure", "group", gr.name)
	})
	return nil
}

func (a *Agent) startShipper(gr *group) {
	gr.shipper = a.newShipper(gr, gr.repl)
	gr.shipper.Start(a.ctx)
}

func (a *Agent) newShipper(gr *group, rc *replConfig) *replication.Shipper {
	var sh *replication.Shipper
	// An initial copy yields the link to streams of new writes.
	class := func() bandwidth.Class {
		if sh != nil && sh.State() == replication.StateInitialSync {
			return bandwidth.Bulk
		}
		return bandwidth.Stream
	}
	peerLim, groupLim := a.limiter(a.bwPeers, rc.PeerName), a.limiter(a.bwGroups, gr.name)
	cfg := replication.ShipperConfig{
		Group: gr.g, Name: gr.name, Source: a.cfg.Name, StateDir: a.groupDir(gr.name), Logger: a.log,
		MaxJournalBytes: a.cfg.MaxUnshipped, Now: a.cfg.Now, NoCompress: a.cfg.NoCompress,
		Dial: func(ctx context.Context) (io.ReadWriteCloser, error) {
			var paced *bandwidth.Conn
			pace := func(c net.Conn) net.Conn {
				paced = bandwidth.NewConn(ctx, c, class, groupLim, peerLim)
				return paced
			}
			conn, err := dialLink(ctx, a.id, rc.PeerAddr, rc.PeerName, pace)
			if err != nil {
				return nil, err
			}
			// The shipper learns the link's speed from under TLS.
			return struct {
				io.ReadWriteCloser
				link.LinkRater
			}{conn, paced}, nil
		},
	}
	if rc.Delta != nil {
		cfg.DeltaChunks = func(upTo uint64) (replication.Chunks, error) { return a.deltaChunks(gr, rc.Delta, upTo) }
		cfg.Copied = func() {
			// The copy is sent: from here on the stream carries every
			// change, and the tracking has done its job.
			a.dropDivergence(gr)
			plain := *rc
			plain.Delta = nil
			if err := writeJSONFile(filepath.Join(a.groupDir(gr.name), "replication.json"), plain); err != nil {
				a.log.Warn("rewrite replication config", "group", gr.name, "err", err)
			}
		}
	}
	sh = replication.NewShipper(cfg)
	return sh
}

// startPoints records a crash-consistent point every PointInterval in a
// group that has new writes since its last point.
func (a *Agent) startPoints(gr *group) {
	if a.cfg.PointInterval < 0 {
		return
	}
	var marked uint64
	a.every(a.cfg.PointInterval, gr.stop, func() {
		if gr.g.Journal().LastSeq() == marked {
			return // no writes since the last point
		}
		seq, err := gr.g.Mark(replica.Marker{Type: "crash"}.Encode())
		if err != nil {
			a.log.Error("recovery point", "group", gr.name, "err", err)
			return
		}
		marked = seq
	})
}

// startFolding folds every replica's journal older than Retention into its
// images, every FoldInterval.
func (a *Agent) startFolding() {
	a.every(a.cfg.FoldInterval, nil, func() {
		a.mu.Lock()
		reps := make(map[string]*replica.Replica, len(a.replicas))
		for name, r := range a.replicas {
			reps[name] = r
		}
		a.mu.Unlock()
		for name, r := range reps {
			cutoff := a.foldCutoff(name, r, a.cfg.Now().Add(-a.cfg.Retention))
			if _, err := r.FoldBefore(a.ctx, cutoff); err != nil && !errors.Is(err, replica.ErrNotReady) {
				a.log.Error("fold replica", "err", err)
			}
		}
		a.saveMonitors()
	})
}

// startHeartbeats tells the vault every second that this site is alive.
func (a *Agent) startHeartbeats() {
	if a.cfg.Vault == "" {
		return
	}
	// Heartbeats go only to a server holding a vault certificate.
	c, err := vaultclient.NewSite(a.id, a.cfg.Vault)
	if err != nil {
		a.log.Error("no heartbeats", "err", err)
		return
	}
	c.SetTimeout(2 * time.Second)
	a.every(time.Second, nil, func() {
		if err := c.Heartbeat(a.ctx); err != nil {
			a.log.Debug("heartbeat to the vault", "err", err)
		}
	})
}

// every runs fn every d on its own goroutine until the agent stops or stop
// (if not nil) is closed. This is every background loop of the agent.
func (a *Agent) every(d time.Duration, stop <-chan struct{}, fn func()) {
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		t := time.NewTicker(d)
		defer t.Stop()
		for {
			select {
			case <-a.ctx.Done():
				return
			case <-stop:
				return
			case <-t.C:
			}
			fn()
		}
	}()
}

// Points lists a replica's recovery points, thinned by the policy.
func (a *Agent) Points(name string) ([]replica.Point, error) {
	a.mu.Lock()
	rep := a.replicas[name]
	a.mu.Unlock()
	if rep == nil {
		return nil, fmt.Errorf("%w: replica %q", ErrNotFound, name)
	}
	pts := replica.Prune(rep.Points(), a.cfg.Now(), a.cfg.Points)
	if pts == nil {
		pts = []replica.Point{}
	}
	return pts, nil
}

func (a *Agent) stopGroup(gr *group) {
	select {
	case <-gr.stop:
	default:
		close(gr.stop)
	}
	if gr.shipper != nil {
		gr.shipper.Close()
	}
}

// CreateGroup creates a group with the given disks and exports them.
func (a *Agent) CreateGroup(name string, disks []disk.Spec) error {
	if err := api.CheckName(api.KindGroup, name); err != nil {
		return err
	}
	if len(disks) == 0 {
		return fmt.Errorf("%w: a group needs at least one disk", ErrInvalid)
	}
	a.mu.Lock()
	_, exists := a.groups[name]
	a.mu.Unlock()
	if exists {
		return fmt.Errorf("%w: group %q exists", ErrConflict, name)
	}
	if _, err := os.Stat(a.groupDir(name)); err == nil {
		return fmt.Errorf("%w: group %q exists on disk", ErrConflict, name)
	}
	g, err := disk.Open(disk.Config{Dir: a.groupDir(name), Now: a.cfg.Now})
	if err != nil {
		return err
	}
	for _, d := range disks {
		if api.CheckName(api.KindDisk, d.Name) != nil || d.Size <= 0 {
			g.Close()
			os.RemoveAll(a.groupDir(name))
			return fmt.Errorf("%w: disk %q of size %d", ErrInvalid, d.Name, d.Size)
		}
		dk, err := g.CreateDisk(d.Name, d.Size)
		if err == nil && d.Name == api.EFIVarsDisk {
			err = initEFIVars(dk)
		}
		if err != nil {
			g.Close()
			os.RemoveAll(a.groupDir(name))
			return fmt.Errorf("%w: %v", ErrInvalid, err)
		}
	}
	if err := g.Close(); err != nil {
		return err
	}
	return a.openGroup(name, nil)
}

// initEFIVars fills a new UEFI variable store with OVMF's template: an
// empty store the firmware would have to format itself. An import then
// copies the domain's own NVRAM over it.
func initEFIVars(d *disk.Disk) error {
	b, err := os.ReadFile(qemu.OVMFVars)
	if err != nil {
		return fmt.Errorf("UEFI variables template: %v (install the ovmf package: make deps)", err)
	}
	if int64(len(b)) != d.Size() {
		// Another firmware build's store, as an import copies it: QEMU
		// refuses to start with the wrong size, saying so.
		return nil
	}
	return d.WriteAt(context.Background(), b, 0)
}

// DeleteGroup removes a group that does not replicate: its exports are
// withdrawn (disconnecting clients), and its images and journal deleted.
// A replicating group is refused: stop replication first, so that deleting
// data is always a deliberate second step.
func (a *Agent) DeleteGroup(ctx context.Context, name string) error {
	gr, err := a.group(name)
	if err != nil {
		return err
	}
	if gr.repl != nil {
		return fmt.Errorf("%w: group %q replicates to %s; stop that first (DELETE /v1/groups/%s/replication)", ErrConflict, name, gr.repl.PeerName, name)
	}
	if v := a.runningOn(ctx, name); v != nil {
		return fmt.Errorf("%w: VM %s runs on group %q; stop it first", ErrConflict, v.name, name)
	}
	a.mu.Lock()
	delete(a.groups, name)
	a.mu.Unlock()
	if gr.kept != nil {
		gr.kept.Close()
	}
	a.stopGroup(gr)
	for _, d := range gr.g.Disks() {
		a.nbd.RemoveExport(exportName(name, d.Name))
	}
	// Remove also deletes the base of a committed group still folding.
	return gr.g.Remove()
}

// Fence records that generation gen of the group is active at another site
// (after a failover): the group stops replicating as a source and will not
// run its VM, across restarts, until it is reprotected. Idempotent.
func (a *Agent) Fence(name string, gen int64) error {
	gr, err := a.group(name)
	if err != nil {
		return err
	}
	if gen <= 0 {
		return fmt.Errorf("%w: generation %d", ErrInvalid, gen)
	}
	a.mu.Lock()
	cur := gr.fenced
	a.mu.Unlock()
	if gen <= cur {
		return nil // already fenced at this generation or a newer one
	}
	if err := atomicfile.WriteFile(filepath.Join(a.groupDir(name), "fenced"), []byte(fmt.Sprint(gen)), 0o600); err != nil {
		return err
	}
	a.mu.Lock()
	gr.fenced = gen
	a.mu.Unlock()
	if gr.shipper != nil {
		// Stop shipping, but keep the journal hold and the bitmap: they
		// say what changed here that the other site lacks.
		gr.shipper.Close()
		gr.kept, gr.shipper, gr.repl = gr.shipper, nil, nil
	}
	a.log.Warn("group fenced: another site runs a newer generation", "group", name, "generation", gen)
	return nil
}

// GroupToReplica turns a group that no VM runs on (the old source after a
// failover) into a replica of the same name whose images a delta copy
// reuses: replication stops, the exports go, the journal is dropped and the
// images are moved into the replica. It returns the disks reused and, when
// since (the failover point) is not zero, what the group changed after it
// as far as its journal and bitmap tell (nil if they cannot). Idempotent:
// asked again after it succeeded, it returns what it returned then.
//
// source, the site that will stream to the replica, is recorded first:
// the link takes the replica's stream from that site only.
func (a *Agent) GroupToReplica(ctx context.Context, name string, since uint64, source string) ([]disk.Spec, *PeerChanges, error) {
	if err := api.CheckName(api.KindSite, source); err != nil {
		return nil, nil, fmt.Errorf("to-replica needs the site that will stream to it: %w", err)
	}
	if source == a.cfg.Name {
		return nil, nil, fmt.Errorf("%w: a replica's source cannot be this site", ErrInvalid)
	}
	a.mu.Lock()
	gr := a.groups[name]
	rep := a.replicas[name]
	a.mu.Unlock()
	if gr == nil && rep == nil {
		return nil, nil, fmt.Errorf("%w: group %q", ErrNotFound, name)
	}
	if err := a.recordSource(name, source); err != nil {
		return nil, nil, err
	}
	if gr == nil && rep != nil {
		var pc *PeerChanges
		if b, err := os.ReadFile(a.changesPath(name)); err == nil && json.Unmarshal(b, &pc) == nil && pc.After == since {
			return rep.Disks(), pc, nil
		}
		return rep.Disks(), nil, nil
	}
	if gr == nil {
		return nil, nil, fmt.Errorf("%w: group %q", ErrNotFound, name)
	}
	if a.runningOn(ctx, name) != nil {
		return nil, nil, fmt.Errorf("%w: a VM runs on group %q; shut it down first", ErrConflict, name)
	}
	var pc *PeerChanges
	if since > 0 {
		c, err := a.GroupChanges(name, since)
		if err != nil {
			a.log.Warn("no changed-block tracking from the old source; the reprotect compares checksums", "group", name, "err", err)
		} else {
			pc = &c
		}
	}
	if gr.g.Layered() {
		// The replica takes plain images: the commit's fold ends first
		// (it is bounded by what the VM and the old replica wrote, not by
		// the disks' size).
		if err := gr.g.FinishFold(ctx); err != nil {
			return nil, nil, fmt.Errorf("finish the fold of %s before it becomes a replica: %w", name, err)
		}
	}
	if gr.shipper != nil {
		a.DisableReplication(name)
	}
	if gr.kept != nil {
		gr.kept.Close()
	}
	a.stopGroup(gr)
	specs := gr.g.Disks()
	for _, d := range specs {
		a.nbd.RemoveExport(exportName(name, d.Name))
	}
	gr.g.Observe(nil)
	if err := gr.g.Close(); err != nil {
		return nil, nil, fmt.Errorf("close group %s: %w", name, err)
	}
	a.mu.Lock()
	delete(a.groups, name)
	for n, v := range a.vms {
		if v.group == name {
			delete(a.vms, n)
		}
	}
	a.mu.Unlock()
	a.dropReplica(name)
	// The intent first: a restart that finds it finishes the move instead
	// of opening a group whose images may be half gone.
	if err := atomicfile.WriteFile(filepath.Join(a.groupDir(name), toReplicaIntent), []byte(source), 0o600); err != nil {
		return nil, nil, err
	}
	crash("to-replica-intent")
	rep, err := a.adoptGroup(name, specs)
	if err != nil {
		return nil, nil, err
	}
	if pc != nil {
		if err := writeJSONFile(a.changesPath(name), pc); err != nil {
			a.log.Warn("keep the old source's changes", "group", name, "err", err)
		}
	}
	crash("to-replica-adopted")
	if err := os.RemoveAll(a.groupDir(name)); err != nil {
		rep.Close()
		return nil, nil, err
	}
	a.mu.Lock()
	a.replicas[name] = rep
	a.mu.Unlock()
	return specs, pc, nil
}

// toReplicaIntent, in a group's directory, says that GroupToReplica is
// moving the group's images into a replica of the same name.
const toReplicaIntent = "to-replica"

// adoptGroup moves a closed group's images into a replica of its name.
func (a *Agent) adoptGroup(name string, specs []disk.Spec) (*replica.Replica, error) {
	images := map[string]string{}
	for _, d := range specs {
		images[d.Name] = filepath.Join(a.groupDir(name), "images", d.Name+".img")
	}
	return replica.Adopt(a.replicaConfig(name), name, specs, images)
}

// finishToReplica completes a GroupToReplica that a crash interrupted:
// the images left in the group move to the replica, the group goes.
func (a *Agent) finishToReplica(name string) error {
	specs, err := disk.ReadSpecs(a.groupDir(name))
	if err != nil {
		return err
	}
	rep, err := a.adoptGroup(name, specs)
	if err != nil {
		return err
	}
	rep.Close()
	a.log.Warn("finished turning a group into a replica after a restart", "group", name)
	return os.RemoveAll(a.groupDir(name))
}

// EnableReplication starts replicating group to the peer agent.
func (a *Agent) EnableReplication(name string, rc replConfig) error {
	if rc.PeerAddr == "" || rc.PeerName == "" {
		return fmt.Errorf("%w: peer_addr and peer_name are required", ErrInvalid)
	}
	gr, err := a.group(name)
	if err != nil {
		return err
	}
	if gr.repl != nil {
		if gr.repl.PeerName == rc.PeerName && gr.repl.PeerAddr == rc.PeerAddr {
			return nil // asked again (a retried job): already so
		}
		return fmt.Errorf("%w: group %q already replicates to %s", ErrConflict, name, gr.repl.PeerName)
	}
	if err := writeJSONFile(filepath.Join(a.groupDir(name), "replication.json"), rc); err != nil {
		return err
	}
	gr.repl = &rc
	a.startShipper(gr)
	return nil
}

// DisableReplication stops replicating group and releases its journal
// hold. Idempotent: a group that does not replicate is left as it is (a
// vault that died between this and recording it retries).
func (a *Agent) DisableReplication(name string) error {
	gr, err := a.group(name)
	if err != nil {
		return err
	}
	if gr.shipper != nil {
		gr.shipper.Close()
	}
	gr.shipper, gr.repl = nil, nil
	gr.g.Observe(nil) // a dirty-block bitmap, if any, is no longer needed
	gr.g.Hold("shipper", 0)
	for _, f := range []string{"replication.json", "shipper.json", "bitmap.json"} {
		os.Remove(filepath.Join(a.groupDir(name), f))
	}
	return nil
}

// Mark records a named recovery point in the group and makes it durable.
func (a *Agent) Mark(ctx context.Context, name string, m replica.Marker) (uint64, error) {
	gr, err := a.group(name)
	if err != nil {
		return 0, err
	}
	if m.Type == "" {
		m.Type = "named"
	}
	seq, err := gr.g.Mark(m.Encode())
	if err != nil {
		return 0, err
	}
	return seq, gr.g.Flush(ctx)
}

func (a *Agent) openReplica(name string) (*replica.Replica, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if r := a.replicas[name]; r != nil {
		return r, nil
	}
	if a.groups[name] != nil {
		return nil, fmt.Errorf("%w: %s is a group at this site", ErrConflict, name)
	}
	r, err := replica.Open(a.replicaConfig(name))
	if err != nil {
		return nil, err
	}
	if group, _ := r.Committed(); group != "" {
		// The commit did not create its group (it died before the
		// group's directory was renamed into place): the replica is a
		// replica again, recovery points and all.
		a.log.Warn("a commit did not finish; the replica is kept as it was", "replica", name)
		if err := r.Uncommit(); err != nil {
			r.Close()
			return nil, err
		}
	}
	a.replicas[name] = r
	return r, nil
}

// removeFoldedBase deletes what a finished fold left of the replica a
// group was committed from (a crash between the group's plain manifest and
// the base's removal). A replica of the same name that is not that base is
// left alone and reported.
func (a *Agent) removeFoldedBase(name string) {
	dir := filepath.Join(a.cfg.Dir, "replicas", name)
	r, err := replica.Open(replica.Config{Dir: dir, Logger: a.log})
	if err != nil {
		a.problem("replica", name, fmt.Errorf("a group of the same name exists, and the replica does not open: %w", err))
		return
	}
	group, _ := r.Committed()
	r.Close()
	if group != name {
		a.problem("replica", name, fmt.Errorf("%w: a group of the same name exists at this site", ErrConflict))
		return
	}
	if err := atomicfile.RemoveDir(dir); err != nil {
		a.log.Warn("remove the folded base of a committed group", "group", name, "err", err)
		return
	}
	a.log.Info("removed the base a finished fold left behind", "group", name)
}

// openBase opens the committed replica a layered group is folding.
func (a *Agent) openBase(ref disk.BaseRef) (disk.Base, error) {
	if err := api.CheckName(api.KindGroup, ref.Name); err != nil {
		return nil, err
	}
	r, err := replica.Open(replica.Config{Dir: filepath.Join(a.cfg.Dir, "replicas", ref.Name), Logger: a.log.With("replica", ref.Name)})
	if err != nil {
		return nil, err
	}
	if group, seq := r.Committed(); group != ref.Name || seq != ref.Seq {
		r.Close()
		return nil, fmt.Errorf("replica %s is committed to %q at %d, not to the group at %d", ref.Name, group, seq, ref.Seq)
	}
	b, err := r.Base()
	if err != nil {
		r.Close()
		return nil, err
	}
	return b, nil
}

func (a *Agent) sourcePath(name string) string {
	return filepath.Join(a.cfg.Dir, "replicas", name+".source")
}

// ReplicaSource is the site recorded as the source of replica name ("" if
// none is).
func (a *Agent) ReplicaSource(name string) (string, error) {
	b, err := os.ReadFile(a.sourcePath(name))
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("read the source of replica %s: %w", name, err)
	}
	src := strings.TrimSpace(string(b))
	if err := api.CheckName(api.KindSite, src); err != nil {
		return "", fmt.Errorf("source of replica %s: %w", name, err)
	}
	return src, nil
}

// ExpectReplica records that replica name (existing or still to come) is
// streamed by site source, and by no other: the vault calls it before it
// enables replication towards this site, and again when a reprotect turns
// the direction around. Idempotent; it replaces an earlier source.
func (a *Agent) ExpectReplica(name, source string) error {
	if err := api.CheckName(api.KindGroup, name); err != nil {
		return err
	}
	if err := api.CheckName(api.KindSite, source); err != nil {
		return err
	}
	if source == a.cfg.Name {
		return fmt.Errorf("%w: site %s cannot replicate to itself", ErrInvalid, source)
	}
	a.mu.Lock()
	_, isSource := a.groups[name]
	a.mu.Unlock()
	if isSource {
		return fmt.Errorf("%w: %s is a source group here; turn it into a replica with to-replica", ErrConflict, name)
	}
	return a.recordSource(name, source)
}

func (a *Agent) recordSource(name, source string) error {
	cur, err := a.ReplicaSource(name)
	if err != nil {
		return err
	}
	if cur == source {
		return nil
	}
	if err := atomicfile.WriteFile(a.sourcePath(name), []byte(source+"\n"), 0o600); err != nil {
		return err
	}
	a.log.Info("replica source recorded", "replica", name, "source", source, "was", cur)
	return nil
}

// admitLink decides whether peer may stream the replica its Hello names:
// only a site certificate whose name is both the Hello's source and the
// source recorded for that replica. A replica kept by an older ferry has
// no record yet: the first site that streams it under its own name is
// recorded (and logged).
func (a *Agent) admitLink(peer pki.Peer, h link.Hello) error {
	if peer.Role != pki.RoleSite {
		return fmt.Errorf("%w: %s is not a site", api.ErrForbidden, peer)
	}
	if err := api.CheckName(api.KindGroup, h.Group); err != nil {
		return err
	}
	if h.Source != peer.Name {
		a.log.Warn("refused a replication stream: the certificate does not name the claimed source",
			"group", h.Group, "claimed", h.Source, "certificate", peer.String())
		return fmt.Errorf("%w: the certificate is %s but the stream claims to come from site %q", api.ErrForbidden, peer, h.Source)
	}
	src, err := a.ReplicaSource(h.Group)
	if err != nil {
		return err
	}
	if src == "" {
		if _, err := os.Stat(filepath.Join(a.cfg.Dir, "replicas", h.Group, "replica.json")); err != nil {
			return fmt.Errorf("%w: no replica %q is expected here; the vault (or 'ferry agent replicate') records its source first", api.ErrForbidden, h.Group)
		}
		a.log.Warn("replica without a recorded source (kept by an older ferry): recording its first stream's site", "replica", h.Group, "source", peer.Name)
		return a.recordSource(h.Group, peer.Name)
	}
	if src != peer.Name {
		a.log.Warn("refused a replication stream from a site that is not the replica's source", "group", h.Group, "source", src, "caller", peer.String())
		return fmt.Errorf("%w: replica %q is streamed by site %s, not %s", api.ErrForbidden, h.Group, src, peer.Name)
	}
	return nil
}

func (a *Agent) replicaFor(h link.Hello) (*replica.Replica, error) {
	if err := a.problemErr("replica", h.Group); err != nil {
		return nil, err
	}
	if err := api.CheckName(api.KindGroup, h.Group); err != nil {
		return nil, err
	}
	// Split-brain guard: a group that is a source here (promoted by a
	// failover), or a replica a failed-over VM runs on, takes no stream
	// from the old source; the vault reprotects in the other direction.
	a.mu.Lock()
	_, isSource := a.groups[h.Group]
	onIt := false
	for _, v := range a.vms {
		if v.group == h.Group && len(v.views) > 0 {
			onIt = true
		}
	}
	a.mu.Unlock()
	if isSource || onIt {
		return nil, fmt.Errorf("%w: %s runs here since a failover; %s holds an old generation and must be reprotected, not replicate", ErrConflict, h.Group, h.Source)
	}
	return a.openReplica(h.Group)
}

// OpenView opens a view of a replica's disk at seq (0: the newest point)
// and exports it over NBD.
func (a *Agent) OpenView(replicaName, diskName string, seq uint64, writable bool) (*openView, error) {
	a.mu.Lock()
	r := a.replicas[replicaName]
	a.mu.Unlock()
	if r == nil {
		return nil, fmt.Errorf("%w: replica %q", ErrNotFound, replicaName)
	}
	if seq == 0 {
		pts := r.Points() // the newest point is never pruned
		if len(pts) == 0 {
			return nil, fmt.Errorf("%w: replica %q has no recovery point yet", ErrNotFound, replicaName)
		}
		seq = pts[len(pts)-1].Seq
	}
	a.mu.Lock()
	a.nextView++
	id := "v" + strconv.Itoa(a.nextView)
	a.mu.Unlock()
	overlay := ""
	if writable {
		overlay = filepath.Join(a.cfg.Dir, "views", id+".overlay")
	}
	v, err := r.OpenView(diskName, seq, overlay)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	ov := &openView{id: id, replica: replicaName, disk: diskName, seq: seq, v: v, export: "view/" + id, sw: nbd.NewSwitch(v)}
	if err := a.nbd.AddExport(nbd.Export{Name: ov.export, Description: fmt.Sprintf("%s/%s at %d", replicaName, diskName, seq),
		Size: v.Size(), ReadOnly: !writable, Device: a.metrics.instrument(ov.sw)}); err != nil {
		v.Close()
		return nil, err
	}
	a.mu.Lock()
	a.views[id] = ov
	a.mu.Unlock()
	return ov, nil
}

// CloseView unexports a view and discards its overlay.
func (a *Agent) CloseView(id string) error {
	a.mu.Lock()
	ov := a.views[id]
	delete(a.views, id)
	a.mu.Unlock()
	if ov == nil {
		return fmt.Errorf("%w: view %q", ErrNotFound, id)
	}
	a.nbd.RemoveExport(ov.export)
	return ov.v.Close()
}

// GroupStatus is one group in Status.
type GroupStatus = api.GroupStatus

// Status is the agent's report.
type Status = api.AgentStatus

// ViewInfo describes an open view.
type ViewInfo = api.ViewInfo

func (a *Agent) viewInfo(ov *openView) ViewInfo {
	return ViewInfo{ID: ov.id, Replica: ov.replica, Disk: ov.disk, Seq: ov.seq, Writable: ov.v.Writable(), Export: ov.export, Socket: a.nbdSock}
}

// Status reports groups, replication, replicas and views.
func (a *Agent) Status() Status {
	a.mu.Lock()
	defer a.mu.Unlock()
	st := Status{Site: a.cfg.Name, NBDSocket: a.nbdSock, Groups: []GroupStatus{}, Replicas: []replica.Status{}, Views: []ViewInfo{}}
	st.LeaderEpoch, st.StaleLeaderRefused = a.Epoch()
	for _, gr := range a.groups {
		gs := GroupStatus{Name: gr.name, Disks: gr.g.Disks(), LastSeq: gr.g.Journal().LastSeq(), JournalBytes: gr.g.Journal().Size(), UnfoldedBytes: gr.g.Unfolded(), Fenced: gr.fenced}
		if err := gr.g.Failed(); err != nil {
			gs.Failed = err.Error()
		}
		if gr.g.Layered() {
			f := gr.g.Fold()
			gs.Fold = &f
		}
		for _, d := range gs.Disks {
			gs.Exports = append(gs.Exports, exportName(gr.name, d.Name))
		}
		if gr.shipper != nil {
			s := gr.shipper.Status()
			s.CapBitsPerSecond = a.capOf(gr.name, gr.repl.PeerName)
			gs.Replication = &s
			gs.PeerName = gr.repl.PeerName
		}
		if ap, ok := a.appPoints[gr.name]; ok {
			gs.AppPoint = &ap
		}
		st.Groups = append(st.Groups, gs)
	}
	sort.Slice(st.Groups, func(i, j int) bool { return st.Groups[i].Name < st.Groups[j].Name })
	for name, r := range a.replicas {
		rs := r.Status()
		rs.Entropy = a.entropyStatus(name, r)
		st.Replicas = append(st.Replicas, rs)
	}
	sort.Slice(st.Replicas, func(i, j int) bool { return st.Replicas[i].Group < st.Replicas[j].Group })
	for _, ov := range a.views {
		st.Views = append(st.Views, a.viewInfo(ov))
	}
	sort.Slice(st.Views, func(i, j int) bool { return st.Views[i].ID < st.Views[j].ID })
	for _, p := range a.problems {
		st.Problems = append(st.Problems, p)
	}
	sort.Slice(st.Problems, func(i, j int) bool {
		return st.Problems[i].Kind+st.Problems[i].Name < st.Problems[j].Kind+st.Problems[j].Name
	})
	return st
}

// FullStatus is Status plus the VMs (whose status asks QEMU, so it is
// gathered outside the agent's lock).
func (a *Agent) FullStatus(ctx context.Context) Status {
	st := a.Status()
	st.VMs = a.vmStatuses(ctx)
	st.MemAvailable, st.DiskFree = capacity(a.cfg.Dir)
	return st
}

// capacity reads MemAvailable from /proc/meminfo and the free space of dir.
func capacity(dir string) (mem, disk int64) {
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(line, "MemAvailable:") {
				fmt.Sscanf(strings.TrimPrefix(line, "MemAvailable:"), "%d", &mem)
				mem *= 1024
			}
		}
	}
	var fs unix.Statfs_t
	if unix.Statfs(dir, &fs) == nil {
		disk = int64(fs.Bavail) * fs.Bsize
	}
	return mem, disk
}
