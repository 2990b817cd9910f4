package vault

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
)

// fakeAgent is a site for the vault's tests: a little state (groups, one
// replica's points, VMs) and the error contract of Site, checked by the
// same conformance suite as the real agent (sitetest). Its replication is
// always streaming and in sync.
type fakeAgent struct {
	mu      sync.Mutex
	site    string
	down    bool
	domains []string // libvirt domains it has (Domains)
	groups  map[string]bool
	sources map[string]string
	points  []api.Point // of every replica it has
	vms     map[string]api.VMRequest
	calls   []string
	block   chan struct{} // if set, StartVM waits on it
	peer    *fakeAgent    // where this site's points replicate to
	mem     int64         // memory available it reports
	// fenced is the generation its status reports for vm1; a fence sets
	// it only if keepFence (else the site "loses" it, as in a crash).
	fenced    int64
	keepFence bool
	fences    int
	// fencedAt is every other group's fence (always kept).
	fencedAt map[string]int64
	// problems it reports in its status.
	problems []api.Problem
	// imports it ran (each finished at once) and releases asked.
	imports  map[string]api.ImportStatus
	released []string
	// silent lists VMs whose guest agent does not answer.
	silent map[string]bool
	// started records the order VMs were started in.
	started []string
	// bw is the caps the vault handed it.
	bw api.Bandwidth
	// blockCall: a call whose name starts with it waits on blockC.
	blockCall string
	blockC    chan struct{}
	// ransomware is the detector policy set per replica; incident, vm1's
	// replica's open incident.
	ransomware map[string]api.RansomwarePolicy
	incident   *api.EntropyIncident
}

var _ Site = (*fakeAgent)(nil)

// newFakeAgent returns a fake site that runs the VMs named (each on a
// group of its name).
func newFakeAgent(site string, vms ...string) *fakeAgent {
	f := &fakeAgent{site: site, groups: map[string]bool{}, sources: map[string]string{}, vms: map[string]api.VMRequest{}, fencedAt: map[string]int64{}}
	for _, v := range vms {
		f.groups[v] = true
		f.vms[v] = api.VMRequest{Name: v, Group: v}
	}
	return f
}

func (f *fakeAgent) vm(name string) (api.VMRequest, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	v, ok := f.vms[name]
	return v, ok
}

// enter records a call and fails it if the site is down; it returns with
// f.mu held.
func (f *fakeAgent) enter(call string) error {
	f.mu.Lock()
	if f.down {
		f.mu.Unlock()
		return errors.New("dial tcp: connection refused")
	}
	f.calls = append(f.calls, call)
	if f.blockCall != "" && strings.HasPrefix(call, f.blockCall) {
		c := f.blockC
		f.mu.Unlock()
		<-c
		f.mu.Lock()
	}
	return nil
}

func notFound(format string, a ...any) error {
	return &api.StatusError{Code: 404, Message: fmt.Sprintf(format, a...)}
}

func (f *fakeAgent) Status(ctx context.Context) (api.AgentStatus, error) {
	if err := f.enter("status"); err != nil {
		return api.AgentStatus{}, err
	}
	defer f.mu.Unlock()
	st := api.AgentStatus{Site: f.site, MemAvailable: f.mem, Problems: f.problems}
	for g := range f.groups {
		gs := api.GroupStatus{Name: g, LastSeq: 10, Replication: &api.ReplicationStatus{State: api.ReplStreaming, AckedSeq: 10, LastSeq: 10},
			Disks: []api.DiskSpec{{Name: "vda", Size: 1 << 20}}}
		gs.Fenced = f.fencedAt[g]
		if g == "vm1" {
			gs.Fenced = f.fenced
		}
		st.Groups = append(st.Groups, gs)
	}
	if len(f.groups) == 0 {
		// The vault's tests run vm1 at east; a recovery site still
		// reports vm1's group as the source of a reprotect would.
		st.Groups = append(st.Groups, api.GroupStatus{Name: "vm1", LastSeq: 10, Fenced: f.fenced,
			Replication: &api.ReplicationStatus{State: api.ReplStreaming, AckedSeq: 10, LastSeq: 10}})
	}
	if f.points != nil { // the replica of vm1 is here
		rs := api.ReplicaStatus{Group: "vm1"}
		if f.incident != nil {
			rs.LastPoint = f.points[len(f.points)-1].Time
			rs.Entropy = &api.EntropyStatus{Policy: f.ransomware["vm1"].WithDefaults(), Incident: f.incident, LowToHighBytes: f.incident.PeakBytes}
		}
		st.Replicas = append(st.Replicas, rs)
	}
	for name, req := range f.vms {
		vs := api.VMStatus{Name: name, State: api.VMRunning}
		if req.Replica != "" {
			vs.Replica, vs.Point = req.Replica, req.Seq
		}
		st.VMs = append(st.VMs, vs)
	}
	return st, nil
}

func (f *fakeAgent) CreateGroup(ctx context.Context, name string, disks []api.DiskSpec) error {
	if err := api.CheckName(api.KindGroup, name); err != nil {
		return err
	}
	if err := f.enter("create group " + name); err != nil {
		return err
	}
	defer f.mu.Unlock()
	if f.groups[name] {
		return &api.StatusError{Code: 409, Message: "group exists"}
	}
	f.groups[name] = true
	return nil
}

func (f *fakeAgent) DeleteGroup(ctx context.Context, name string) error {
	if err := f.enter("delete group " + name); err != nil {
		return err
	}
	defer f.mu.Unlock()
	if !f.groups[name] {
		return notFound("group %q", name)
	}
	if _, ok := f.vms[name]; ok {
		return &api.StatusError{Code: 409, Message: "a VM runs on it"}
	}
	delete(f.groups, name)
	delete(f.fencedAt, name)
	return nil
}

func (f *fakeAgent) Replicate(ctx context.Context, group string, r api.Replicate) error {
	if err := f.enter("replicate " + group); err != nil {
		return err
	}
	defer f.mu.Unlock()
	if !f.groups[group] && group != "vm1" {
		return notFound("group %q", group)
	}
	return nil
}

func (f *fakeAgent) Unreplicate(ctx context.Context, group string) error {
	if err := f.enter("unreplicate " + group); err != nil {
		return err
	}
	defer f.mu.Unlock()
	if !f.groups[group] {
		return notFound("group %q", group)
	}
	return nil
}

func (f *fakeAgent) ExpectReplica(ctx context.Context, replica, source string) error {
	if err := api.CheckName(api.KindGroup, replica); err != nil {
		return err
	}
	if err := api.CheckName(api.KindSite, source); err != nil {
		return err
	}
	if err := f.enter("expect replica " + replica + " from " + source); err != nil {
		return err
	}
	defer f.mu.Unlock()
	if f.groups[replica] {
		return &api.StatusError{Code: 409, Message: replica + " is a source group here"}
	}
	f.sources[replica] = source
	return nil
}

func (f *fakeAgent) DeleteReplica(ctx context.Context, name string) error {
	if err := f.enter("delete replica " + name); err != nil {
		return err
	}
	defer f.mu.Unlock()
	if _, ok := f.sources[name]; !ok && len(f.points) == 0 {
		return notFound("replica %q", name)
	}
	delete(f.sources, name)
	f.points = nil
	return nil
}

func (f *fakeAgent) Mark(ctx context.Context, group string, m api.Marker) (uint64, error) {
	if err := f.enter("mark " + group); err != nil {
		return 0, err
	}
	defer f.mu.Unlock()
	if !f.groups[group] {
		return 0, notFound("group %q", group)
	}
	// The point replicates to the peer at once.
	p := f.peer
	if p == nil {
		return 100, nil
	}
	p.mu.Lock()
	seq := uint64(100 + len(p.points))
	p.points = append(p.points, api.Point{Seq: seq, Time: time.Now(), Type: m.Type, Label: m.Label})
	p.mu.Unlock()
	return seq, nil
}

func (f *fakeAgent) SetRansomwarePolicy(ctx context.Context, replica string, p api.RansomwarePolicy) error {
	if err := f.enter("ransomware-policy " + replica); err != nil {
		return err
	}
	defer f.mu.Unlock()
	if f.ransomware == nil {
		f.ransomware = map[string]api.RansomwarePolicy{}
	}
	f.ransomware[replica] = p
	return nil
}

func (f *fakeAgent) Files(ctx context.Context, replica string, seq uint64, path string) (api.FileListing, error) {
	if err := f.enter("files " + replica); err != nil {
		return api.FileListing{}, err
	}
	defer f.mu.Unlock()
	return api.FileListing{}, &api.StatusError{Code: 422, Message: "the fake reads no file system"}
}

func (f *fakeAgent) FileContent(ctx context.Context, replica string, seq uint64, path string, raw bool) (*http.Response, error) {
	if err := f.enter("file content " + replica); err != nil {
		return nil, err
	}
	defer f.mu.Unlock()
	return nil, &api.StatusError{Code: 422, Message: "the fake reads no file system"}
}

func (f *fakeAgent) DismissIncident(ctx context.Context, replica string) error {
	if err := f.enter("ransomware-dismiss " + replica); err != nil {
		return err
	}
	defer f.mu.Unlock()
	if f.incident == nil || replica != "vm1" {
		return notFound("no open incident for %q", replica)
	}
	f.incident = nil
	return nil
}

func (f *fakeAgent) Points(ctx context.Context, replica string) ([]api.Point, error) {
	if err := f.enter("points " + replica); err != nil {
		return nil, err
	}
	defer f.mu.Unlock()
	if len(f.points) == 0 && f.sources[replica] == "" {
		return nil, notFound("replica %q", replica)
	}
	return append([]api.Point{}, f.points...), nil
}

func (f *fakeAgent) StartVM(ctx context.Context, req api.VMRequest) (api.VMStatus, error) {
	if err := f.enter("start VM " + req.Name); err != nil {
		return api.VMStatus{}, err
	}
	if f.block != nil {
		block := f.block
		f.mu.Unlock()
		select {
		case <-block:
		case <-ctx.Done():
		}
		f.mu.Lock()
	}
	defer f.mu.Unlock()
	if req.Group != "" && !f.groups[req.Group] {
		return api.VMStatus{}, notFound("group %q", req.Group)
	}
	if req.Replica != "" && len(f.points) == 0 {
		return api.VMStatus{}, notFound("replica %q", req.Replica)
	}
	if _, ok := f.vms[req.Name]; ok {
		return api.VMStatus{}, &api.StatusError{Code: 409, Message: "VM exists"}
	}
	f.vms[req.Name] = req
	f.started = append(f.started, req.Name)
	return api.VMStatus{Name: req.Name, State: api.VMRunning}, nil
}

func (f *fakeAgent) StopVM(ctx context.Context, name string, opts api.StopOptions) ([]string, error) {
	if err := f.enter("stop VM " + name); err != nil {
		return nil, err
	}
	defer f.mu.Unlock()
	if _, ok := f.vms[name]; !ok {
		return nil, notFound("no VM %s", name)
	}
	delete(f.vms, name)
	return []string{"guest powered off"}, nil
}

func (f *fakeAgent) PingGuest(ctx context.Context, name string) error {
	if err := f.enter("ping guest " + name); err != nil {
		return err
	}
	defer f.mu.Unlock()
	if _, ok := f.vms[name]; !ok {
		return notFound("no VM %s", name)
	}
	if f.silent[name] {
		return fmt.Errorf("guest agent of %s does not answer", name)
	}
	return nil
}

func (f *fakeAgent) CommitVM(ctx context.Context, name string) ([]string, error) {
	if err := f.enter("commit VM " + name); err != nil {
		return nil, err
	}
	defer f.mu.Unlock()
	v, ok := f.vms[name]
	if !ok || v.Replica == "" {
		return nil, notFound("no VM %s on views", name)
	}
	// Every VM on the replica's views (a consistency group's members)
	// now runs on the group.
	rep := v.Replica
	f.groups[rep] = true
	for n, x := range f.vms {
		if x.Replica == rep {
			x.Group, x.Replica = rep, ""
			f.vms[n] = x
		}
	}
	return []string{"committed"}, nil
}

func (f *fakeAgent) Console(ctx context.Context, name string, off int64) (api.Console, error) {
	if err := f.enter("console " + name); err != nil {
		return api.Console{}, err
	}
	defer f.mu.Unlock()
	if _, ok := f.vms[name]; !ok {
		return api.Console{}, notFound("no VM %s", name)
	}
	return api.Console{Data: "Linux version 6.1\nferry-guest: up\nready\n", Next: 40}, nil
}

func (f *fakeAgent) Fence(ctx context.Context, group string, gen int64) error {
	if err := f.enter("fence " + group); err != nil {
		return err
	}
	defer f.mu.Unlock()
	if !f.groups[group] && group != "vm1" {
		return notFound("group %q", group)
	}
	if group != "vm1" {
		f.fencedAt[group] = max(f.fencedAt[group], gen)
		return nil
	}
	f.fences++
	if f.keepFence && gen > f.fenced {
		f.fenced = gen
	}
	return nil
}

func (f *fakeAgent) ToReplica(ctx context.Context, group string, req api.ToReplica) (api.ToReplicaResult, error) {
	if err := f.enter("to-replica " + group); err != nil {
		return api.ToReplicaResult{}, err
	}
	defer f.mu.Unlock()
	if !f.groups[group] {
		return api.ToReplicaResult{}, notFound("group %q", group)
	}
	delete(f.groups, group)
	f.sources[group] = req.Source
	return api.ToReplicaResult{Replica: group}, nil
}

func (f *fakeAgent) SetBandwidth(ctx context.Context, bw api.Bandwidth) error {
	if err := f.enter("bandwidth"); err != nil {
		return err
	}
	defer f.mu.Unlock()
	for _, m := range []map[string]api.BandwidthLimit{bw.Peers, bw.Groups} {
		for _, l := range m {
			if l.BitsPerSecond < 0 {
				return &api.StatusError{Code: 400, Message: "negative rate"}
			}
		}
	}
	f.bw = bw
	return nil
}

func (f *fakeAgent) Changes(ctx context.Context, group string, since uint64) (api.PeerChanges, error) {
	if err := f.enter("changes " + group); err != nil {
		return api.PeerChanges{}, err
	}
	defer f.mu.Unlock()
	return api.PeerChanges{}, notFound("group %q keeps no changes", group)
}

func (f *fakeAgent) Divergence(ctx context.Context, group string) (api.Divergence, error) {
	if err := f.enter("divergence " + group); err != nil {
		return api.Divergence{}, err
	}
	defer f.mu.Unlock()
	return api.Divergence{}, notFound("group %q has no divergence record", group)
}

func (f *fakeAgent) Import(ctx context.Context, domain string) (api.ImportStatus, error) {
	if err := f.enter("import " + domain); err != nil {
		return api.ImportStatus{}, err
	}
	defer f.mu.Unlock()
	if f.imports == nil {
		f.imports = map[string]api.ImportStatus{}
	}
	if f.groups[domain] {
		return api.ImportStatus{}, fmt.Errorf("%w: group %q exists", api.ErrConflict, domain)
	}
	f.groups[domain] = true
	res := api.ImportResult{Domain: domain, VCPUs: 2, MemoryMiB: 512, QGA: true, Original: "<domain type='kvm'><name>" + domain + "</name></domain>",
		Disks: []api.ImportedDisk{{Name: "vda", Source: "/img/" + domain + ".qcow2", Format: "qcow2", Size: 1 << 30, Copied: 1 << 20}}}
	st := api.ImportStatus{Domain: domain, State: api.ImportDone, DoneBytes: 1 << 30, TotalBytes: 1 << 30, Result: &res}
	f.imports[domain] = st
	return st, nil
}

func (f *fakeAgent) Domains(ctx context.Context) ([]api.DomainInfo, error) {
	if err := f.enter("domains"); err != nil {
		return nil, err
	}
	defer f.mu.Unlock()
	out := []api.DomainInfo{}
	for _, n := range f.domains {
		if !f.groups[n] {
			out = append(out, api.DomainInfo{Name: n, Importable: true, VCPUs: 2, MemoryMiB: 512, NICs: 1})
		}
	}
	return out, nil
}

func (f *fakeAgent) ImportStatus(ctx context.Context, domain string) (api.ImportStatus, error) {
	if err := f.enter("import status " + domain); err != nil {
		return api.ImportStatus{}, err
	}
	defer f.mu.Unlock()
	st, ok := f.imports[domain]
	if !ok {
		return api.ImportStatus{}, notFound("import %q", domain)
	}
	return st, nil
}

func (f *fakeAgent) Release(ctx context.Context, domain string) error {
	if err := f.enter("release " + domain); err != nil {
		return err
	}
	defer f.mu.Unlock()
	if _, ok := f.imports[domain]; !ok {
		return notFound("import %q", domain)
	}
	f.released = append(f.released, domain)
	return nil
}

// callsNamed returns the calls that start with prefix.
func (f *fakeAgent) callsNamed(prefix string) []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for _, c := range f.calls {
		if strings.HasPrefix(c, prefix) {
			out = append(out, c)
		}
	}
	return out
}
