package agent

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/atomicfile"
	"github.com/ferry-dr/ferry/internal/disk"
	"github.com/ferry-dr/ferry/internal/nbd"
	"github.com/ferry-dr/ferry/internal/qemu"
	"github.com/ferry-dr/ferry/internal/replica"
)

// MaxFreeze bounds how long a guest's file systems stay frozen for an
// application-consistent point.
const MaxFreeze = 10 * time.Second

// VMRequest asks the agent to run a VM on a group's disks (attached in
// the group's order: vda, vdb, ...).
type VMRequest = api.VMRequest

type runningVM struct {
	name  string
	group string   // or the replica it runs on
	disks []string // the disks of the group it attaches
	vm    Machine
	views []string // writable views it runs on (closed when it stops)
	seq   uint64   // the point, for a VM on a replica
	// exports are the exports of views a commit switched to the group:
	// the VM still uses them; they go when it stops.
	exports []string
}

// AppPointStatus is the outcome of the last application-consistent point.
type AppPointStatus = api.AppPointStatus

// StartVM starts a VM on a group's disks.
func (a *Agent) StartVM(ctx context.Context, req VMRequest) (qemu.Status, error) {
	owner := req.Group
	if req.Replica != "" {
		owner = req.Replica
	}
	if err := api.CheckName(api.KindGroup, req.Name); err != nil {
		return qemu.Status{}, err
	}
	if (req.Group == "") == (req.Replica == "") {
		return qemu.Status{}, fmt.Errorf("%w: a VM needs either a group or a replica", ErrInvalid)
	}
	a.mu.Lock()
	gr := a.groups[req.Group]
	rep := a.replicas[req.Replica]
	_, exists := a.vms[req.Name]
	var fenced int64
	if gr != nil {
		fenced = gr.fenced // written under a.mu by Fence
	}
	a.mu.Unlock()
	if gr == nil && rep == nil {
		return qemu.Status{}, fmt.Errorf("%w: group or replica %q", ErrNotFound, owner)
	}
	if fenced != 0 {
		return qemu.Status{}, fmt.Errorf("%w: group %q is fenced: generation %d runs at another site since a failover; reprotect it", ErrConflict, owner, fenced)
	}
	if exists {
		return qemu.Status{}, fmt.Errorf("%w: VM %q exists", ErrConflict, req.Name)
	}
	var all []disk.Spec
	if gr != nil {
		all = gr.g.Disks()
	} else {
		all = rep.Disks()
	}
	disks, err := pickDisks(all, req.Disks)
	if err != nil {
		return qemu.Status{}, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if v, d := a.diskInUse(ctx, owner, disks); v != nil {
		return qemu.Status{}, fmt.Errorf("%w: VM %q already runs on disk %s of %q", ErrConflict, v.name, d, owner)
	}
	spec := qemu.Spec{Name: req.Name, VCPUs: req.VCPUs, MemoryMiB: req.MemoryMiB, Boot: req.Boot, Net: req.Net,
		Subnet: req.Subnet, Forwards: req.Forwards, QGA: req.QGA, Accel: req.Accel, Domain: req.Domain, Firmware: req.Firmware, Attach: req.Attach, NICs: req.NICs}
	rv := &runningVM{name: req.Name, group: owner, disks: disks}
	if gr != nil {
		for _, d := range disks {
			spec.AddDisk(d, qemu.Disk{Socket: a.nbdSock, Export: exportName(req.Group, d)})
		}
	} else {
		for _, d := range disks {
			ov, err := a.OpenView(req.Replica, d, req.Seq, true)
			if err != nil {
				a.closeViews(rv.views)
				return qemu.Status{}, err
			}
			rv.views = append(rv.views, ov.id)
			rv.seq = ov.seq
			spec.AddDisk(d, qemu.Disk{Socket: a.nbdSock, Export: ov.export})
		}
	}
	if err := spec.Validate(); err != nil {
		a.closeViews(rv.views)
		return qemu.Status{}, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	vm, err := a.runtime.Start(ctx, spec, filepath.Join(a.cfg.Dir, "vms", req.Name))
	if err != nil {
		a.closeViews(rv.views)
		if errors.Is(err, qemu.ErrSpec) {
			err = fmt.Errorf("%w: %v", ErrInvalid, err)
		}
		return qemu.Status{}, err
	}
	rv.vm = vm
	a.mu.Lock()
	a.vms[req.Name] = rv
	a.mu.Unlock()
	return vm.Status(ctx), nil
}

// PingGuest asks a running VM's guest agent whether it answers (a
// recovery plan waits for it before booting the next group).
// ErrNotFound if the VM does not run; ErrNoQuiesce, wrapping why, if its
// guest agent does not answer (none, or not up yet).
func (a *Agent) PingGuest(ctx context.Context, name string) error {
	a.mu.Lock()
	rv := a.vms[name]
	a.mu.Unlock()
	if rv == nil {
		return fmt.Errorf("%w: VM %q", ErrNotFound, name)
	}
	qctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	if err := rv.vm.PingGuest(qctx); err != nil {
		return fmt.Errorf("%w: VM %s: %v", ErrNoQuiesce, name, err)
	}
	return nil
}

// StopVM shuts a VM down gracefully (or at once with force, for a VM whose
// writes are discarded anyway) and returns the steps taken.
func (a *Agent) StopVM(ctx context.Context, name string, opts api.StopOptions) ([]string, error) {
	a.mu.Lock()
	rv := a.vms[name]
	delete(a.vms, name)
	a.mu.Unlock()
	if rv == nil {
		return nil, fmt.Errorf("%w: VM %q", ErrNotFound, name)
	}
	var steps []string
	report := func(s string) {
		steps = append(steps, s)
		a.log.Info("vm shutdown", "vm", name, "step", s)
	}
	var err error
	if opts.Force {
		rv.vm.Quit(report)
	} else {
		err = rv.vm.Shutdown(ctx, cmp.Or(opts.Timeout, api.DefaultStopTimeout), report)
	}
	if len(rv.views) > 0 {
		a.closeViews(rv.views)
		steps = append(steps, "writable views closed: the VM's writes since its point are discarded")
	}
	for _, e := range rv.exports {
		a.nbd.RemoveExport(e)
	}
	return steps, err
}

func (a *Agent) closeViews(ids []string) {
	for _, id := range ids {
		a.CloseView(id)
	}
}

func (a *Agent) vmStatuses(ctx context.Context) []qemu.Status {
	a.mu.Lock()
	vms := make([]*runningVM, 0, len(a.vms))
	for _, v := range a.vms {
		vms = append(vms, v)
	}
	a.mu.Unlock()
	out := []qemu.Status{}
	for _, v := range vms {
		st := v.vm.Status(ctx)
		a.mu.Lock()
		if len(v.views) > 0 {
			st.Replica, st.Point = v.group, v.seq
		}
		a.mu.Unlock()
		out = append(out, st)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// ErrNoQuiesce: the group's VM cannot be quiesced (no VM, no guest agent
// channel, or the guest agent failed); the point is not taken.
var ErrNoQuiesce = errors.New("cannot quiesce the guest")

// AppPoint takes an application-consistent point of a group: sync with
// the guest agent, freeze the guest's file systems, record the point in
// the journal and make it durable, thaw. The thaw always runs, also on
// error and timeout, and the freeze never lasts more than MaxFreeze. If
// the guest agent is missing or fails, no point is taken; the reason is
// returned and recorded, and crash-consistent points go on.
func (a *Agent) AppPoint(ctx context.Context, group, label string) (AppPointStatus, error) {
	a.mu.Lock()
	gr := a.groups[group]
	a.mu.Unlock()
	if gr == nil {
		return AppPointStatus{}, fmt.Errorf("%w: group %q", ErrNotFound, group)
	}
	vms := a.runningAll(ctx, group)
	st := AppPointStatus{Time: a.cfg.Now()}
	err := func() error {
		if len(vms) == 0 {
			return fmt.Errorf("%w: group %q has no running VM", ErrNoQuiesce, group)
		}
		// Every VM of the group answers before any is frozen: a freeze
		// that cannot complete would hold the others for nothing.
		for _, rv := range vms {
			qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			err := rv.vm.PingGuest(qctx)
			cancel()
			if errors.Is(err, qemu.ErrNoGuestAgent) {
				return fmt.Errorf("%w: VM %s of group %q has no guest agent channel", ErrNoQuiesce, rv.name, group)
			} else if err != nil {
				return fmt.Errorf("%w: VM %s: %v", ErrNoQuiesce, rv.name, err)
			}
		}
		// One bound for the whole freeze of all of them; every VM frozen
		// (or whose freeze was asked) is thawed, whatever happens.
		fctx, fcancel := context.WithTimeout(ctx, MaxFreeze)
		defer fcancel()
		frozenAt := time.Now()
		var asked []*runningVM
		defer func() {
			for _, rv := range asked {
				a.thaw(rv, group)
			}
			st.FreezeMS = float64(time.Since(frozenAt).Microseconds()) / 1000
		}()
		for _, rv := range vms {
			asked = append(asked, rv)
			if _, err := rv.vm.Freeze(fctx); err != nil {
				return fmt.Errorf("%w: freeze VM %s: %v", ErrNoQuiesce, rv.name, err)
			}
		}
		seq, err := gr.g.Mark(replica.Marker{Type: "app", Label: label}.Encode())
		if err != nil {
			return err
		}
		if err := gr.g.Flush(fctx); err != nil {
			return err
		}
		st.Seq = seq
		return nil
	}()
	if err != nil {
		st.Error = err.Error()
	} else {
		st.Succeeded = true
	}
	a.mu.Lock()
	a.appPoints[group] = st
	a.mu.Unlock()
	if err != nil {
		a.log.Warn("application-consistent point not taken", "group", group, "err", err)
	}
	return st, err
}

// thaw always runs with its own deadline, whatever happened to the caller.
func (a *Agent) thaw(rv *runningVM, group string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := rv.vm.Thaw(ctx); err != nil {
		a.log.Error("thaw failed; the guest agent thaws by itself after its own limit", "group", group, "err", err)
	}
}

// startAppPoints takes an application-consistent point of every group with
// a running VM every AppInterval.
func (a *Agent) startAppPoints() {
	if a.cfg.AppInterval <= 0 {
		return
	}
	a.every(a.cfg.AppInterval, nil, func() {
		a.mu.Lock()
		var groups []string
		for _, v := range a.vms {
			if !slices.Contains(groups, v.group) {
				groups = append(groups, v.group)
			}
		}
		a.mu.Unlock()
		for _, g := range groups {
			a.AppPoint(a.ctx, g, "scheduled")
		}
	})
}

func (a *Agent) stopVMs() {
	a.mu.Lock()
	vms := a.vms
	a.vms = map[string]*runningVM{}
	a.mu.Unlock()
	for name, v := range vms {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		v.vm.Shutdown(ctx, 20*time.Second, func(s string) { a.log.Info("vm shutdown", "vm", name, "step", s) })
		cancel()
	}
	os.RemoveAll(filepath.Join(a.cfg.Dir, "vms"))
}

// CommitVM makes a VM that runs on writable views of a replica (a failover)
// standalone, without stopping it: the views' overlays become the top
// layers of a new group of the same name over the replica at the point
// (its base), the VM's exports switch to the group's disks between two of
// its requests, and the replica's recovery points go. A background fold
// then makes the group's disks plain images (docs/architecture.md,
// "Commit"). The job's time does not depend on the disks' size: it syncs
// the overlays and writes a few small files. It returns the steps taken.
//
// Crash safety: the group is built aside and renamed into place; the
// replica is marked committed just before. A crash before the rename
// leaves the replica as it was (Start rolls the mark back); after it, the
// group opens over its base.
func (a *Agent) CommitVM(ctx context.Context, name string) ([]string, error) {
	a.mu.Lock()
	rv := a.vms[name]
	var rep *replica.Replica
	var members []*runningVM // every VM on the replica's views: one group, one commit
	var views []*openView
	exports := map[*runningVM][]string{}
	if rv != nil && len(rv.views) > 0 {
		rep = a.replicas[rv.group]
		for _, v := range a.vms {
			if v.group == rv.group && len(v.views) > 0 {
				members = append(members, v)
				for _, id := range v.views {
					if ov := a.views[id]; ov != nil {
						views = append(views, ov)
						exports[v] = append(exports[v], ov.export)
					}
				}
			}
		}
	}
	a.mu.Unlock()
	if rv == nil || len(rv.views) == 0 || rep == nil {
		return nil, fmt.Errorf("%w: no VM %q running on a replica", ErrNotFound, name)
	}
	for _, v := range members {
		if v.seq != rv.seq {
			return nil, fmt.Errorf("%w: VMs %s and %s run on %q at different points (%d, %d): stop one", ErrConflict, rv.name, v.name, rv.group, rv.seq, v.seq)
		}
	}
	steps, err := a.commitViews(ctx, rv.group, rep, views)
	if err != nil {
		return steps, err
	}
	a.mu.Lock()
	for _, v := range members {
		v.exports = append(v.exports, exports[v]...)
		v.views, v.seq = nil, 0
	}
	a.mu.Unlock()
	for _, v := range members {
		steps = append(steps, fmt.Sprintf("VM %s kept running", v.name))
	}
	return steps, nil
}

// commitViews is the commit of the writable views a VM runs on (any
// client of their exports): see CommitVM. The views' exports stay, now
// serving the group's disks.
func (a *Agent) commitViews(ctx context.Context, repName string, rep *replica.Replica, views []*openView) ([]string, error) {
	if _, err := a.group(repName); err == nil {
		return nil, fmt.Errorf("%w: a group %q exists at this site already", ErrConflict, repName)
	}
	var steps []string
	say := func(format string, args ...any) {
		s := fmt.Sprintf(format, args...)
		steps = append(steps, s)
		a.log.Info("commit", "group", repName, "step", s)
	}
	start := time.Now()
	seq := views[0].seq
	// Divergence first, while the replica still offers its index: what
	// the VM wrote and what the replica received after the point.
	var specs []disk.Spec
	for _, d := range rep.Disks() {
		specs = append(specs, disk.Spec{ID: d.ID, Name: d.Name, Size: d.Size})
	}
	div, divErr := replicaDivergence(rep, seq)

	for _, ov := range views {
		ov.sw.Pause()
	}
	paused := time.Now()
	resumed := false
	resume := func(gr *group) {
		if resumed {
			return
		}
		resumed = true
		for _, ov := range views {
			var next nbd.Device
			if gr != nil {
				next, _ = gr.g.Disk(ov.disk)
			}
			ov.sw.Resume(next)
		}
	}
	defer resume(nil)

	aside := filepath.Join(a.cfg.Dir, "groups", "."+repName+".commit")
	os.RemoveAll(aside)
	layers := map[uint16]disk.Layer{}
	ids := map[string]uint16{}
	for _, s := range specs {
		ids[s.Name] = s.ID
	}
	var written int64
	for _, ov := range views {
		path, present, err := ov.v.TakeOverlay()
		if err != nil {
			return steps, err
		}
		layers[ids[ov.disk]] = disk.Layer{Path: path, Present: present}
		written += present.Len() * disk.BlockSize
		if divErr == nil {
			ov.v.Written(func(off, n int64) { div.Chunks.Add(ov.disk, off, n) })
		}
	}
	rollback := func() {
		// The overlays go back where the views find them (their files
		// stay open either way), the replica is a replica again.
		for _, ov := range views {
			os.Rename(filepath.Join(aside, "images", ov.disk+".top"), layers[ids[ov.disk]].Path)
		}
		os.RemoveAll(aside)
		rep.Uncommit()
	}
	if err := disk.CreateLayered(aside, specs, layers, disk.BaseRef{Name: repName, Seq: seq}); err != nil {
		rollback()
		return steps, fmt.Errorf("build the committed group: %w", err)
	}
	if err := rep.CommitAt(seq, repName); err != nil {
		rollback()
		return steps, err
	}
	crash("commit-replica-marked")
	if err := os.Rename(aside, a.groupDir(repName)); err != nil {
		rollback()
		return steps, fmt.Errorf("put the committed group in place: %w", err)
	}
	// From here the overlays are the group's top layers: the views must
	// never be written again. If the group does not open, the VM's I/O
	// stays paused (it hangs rather than write past the group's journal);
	// a restart of the agent opens the group.
	resumed = true
	if err := atomicfile.SyncDir(filepath.Join(a.cfg.Dir, "groups")); err != nil {
		return steps, err
	}
	crash("commit-group-in-place")
	base, err := rep.Base()
	if err != nil {
		return steps, err
	}
	a.mu.Lock()
	delete(a.replicas, repName)
	a.mu.Unlock()
	a.dropMonitor(repName)
	if err := a.openGroup(repName, base); err != nil {
		// The group is in place and complete: a restart opens it.
		return steps, fmt.Errorf("open the committed group (restart the agent to open it): %w", err)
	}
	gr, err := a.group(repName)
	if err != nil {
		return steps, err
	}
	if divErr == nil {
		divErr = a.saveDivergence(gr, div)
	}
	resumed = false
	resume(gr)
	pause := time.Since(paused)
	say("disks switched to the standalone group %s at point %d under the running VM (I/O paused %s); %d bytes the VM wrote since the failover kept as top layers",
		repName, seq, pause.Round(time.Microsecond), written)
	if divErr != nil {
		a.log.Warn("no changed-block tracking: a reprotect will compare checksums", "group", repName, "err", divErr)
		say("changed-block tracking unavailable (%v): a reprotect will compare checksums", divErr)
	} else {
		say("changed-block tracking kept for a reprotect")
	}
	a.mu.Lock()
	for _, ov := range views {
		delete(a.views, ov.id)
	}
	a.mu.Unlock()
	for _, ov := range views {
		ov.v.Close() // the overlay file now belongs to the group
	}
	say("recovery points of %s removed; the replica's journal up to the point folds into the group's images in the background", repName)
	say("commit took %s", time.Since(start).Round(time.Millisecond))
	return steps, nil
}

// CrashPoint, if set (tests only), is called at each named step of a
// multi-file change; a test makes the process die there and restarts it.
var CrashPoint func(name string)

func crash(name string) {
	if CrashPoint != nil {
		CrashPoint(name)
	}
}

// dropReplica closes and deletes a replica.
// DeleteReplica deletes a replica with its journal and recovery points
// (protection disabled). Refused while a VM runs on it or a view is open.
func (a *Agent) DeleteReplica(name string) error {
	if err := api.CheckName(api.KindGroup, name); err != nil {
		return err
	}
	a.closeIdleFiles(name)
	a.mu.Lock()
	rep := a.replicas[name]
	busy := a.replicaBusy(name)
	a.mu.Unlock()
	if rep == nil {
		if src, _ := a.ReplicaSource(name); src != "" {
			return os.Remove(a.sourcePath(name)) // expected, never streamed
		}
		return fmt.Errorf("%w: replica %q", ErrNotFound, name)
	}
	if busy != "" {
		return fmt.Errorf("%w: replica %s: %s", ErrConflict, name, busy)
	}
	a.log.Info("replica deleted", "replica", name)
	return a.dropReplica(name)
}

// replicaBusy says what uses a replica ("" if nothing). Caller holds a.mu.
func (a *Agent) replicaBusy(name string) string {
	for _, v := range a.vms {
		if v.group == name {
			return "a VM runs on it"
		}
	}
	for _, ov := range a.views {
		if ov.replica == name {
			return "view " + ov.id + " is open"
		}
	}
	if a.groups[name] != nil {
		return "it is a group at this site"
	}
	return ""
}

func (a *Agent) dropReplica(name string) error {
	a.mu.Lock()
	rep := a.replicas[name]
	delete(a.replicas, name)
	a.mu.Unlock()
	if rep == nil {
		return nil
	}
	rep.Close()
	a.dropMonitor(name)
	if err := atomicfile.RemoveDir(filepath.Join(a.cfg.Dir, "replicas", name)); err != nil {
		return err
	}
	if err := os.Remove(a.sourcePath(name)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// Console returns the VM's serial console from byte offset off (at most
// 256 KiB) and the offset to ask for next.
func (a *Agent) Console(name string, off int64) ([]byte, int64, error) {
	a.mu.Lock()
	rv := a.vms[name]
	a.mu.Unlock()
	if rv == nil {
		return nil, off, fmt.Errorf("%w: VM %q", ErrNotFound, name)
	}
	f, err := os.Open(rv.vm.ConsolePath())
	if err != nil {
		return nil, off, err
	}
	defer f.Close()
	buf := make([]byte, 256<<10)
	n, _ := f.ReadAt(buf, off)
	return buf[:n], off + int64(n), nil
}

// runningOn returns a VM that is not stopped on the group or replica
// owner, or nil. Its status is asked of QEMU outside the agent's lock.
// pickDisks returns the names of the disks of all that want names, in
// want's order (all of them if want is empty).
func pickDisks(all []disk.Spec, want []string) ([]string, error) {
	if len(want) == 0 {
		names := make([]string, len(all))
		for i, d := range all {
			names[i] = d.Name
		}
		return names, nil
	}
	seen := map[string]bool{}
	for _, w := range want {
		if seen[w] {
			return nil, fmt.Errorf("disk %q named twice", w)
		}
		seen[w] = true
		if !slices.ContainsFunc(all, func(d disk.Spec) bool { return d.Name == w }) {
			return nil, fmt.Errorf("no disk %q in the group", w)
		}
	}
	return want, nil
}

// diskInUse returns a running VM on owner that attaches one of disks,
// and that disk.
func (a *Agent) diskInUse(ctx context.Context, owner string, disks []string) (*runningVM, string) {
	for _, v := range a.runningAll(ctx, owner) {
		for _, d := range disks {
			if len(v.disks) == 0 || slices.Contains(v.disks, d) {
				return v, d
			}
		}
	}
	return nil, ""
}

// runningAll returns every VM that runs on owner (a group or replica).
func (a *Agent) runningAll(ctx context.Context, owner string) []*runningVM {
	a.mu.Lock()
	var same []*runningVM
	for _, v := range a.vms {
		if v.group == owner {
			same = append(same, v)
		}
	}
	a.mu.Unlock()
	var up []*runningVM
	for _, v := range same {
		if v.vm.Status(ctx).State != qemu.StateStopped {
			up = append(up, v)
		}
	}
	sort.Slice(up, func(i, j int) bool { return up[i].name < up[j].name })
	return up
}

// runningOn returns a VM that runs on owner (the first by name), or nil.
func (a *Agent) runningOn(ctx context.Context, owner string) *runningVM {
	if up := a.runningAll(ctx, owner); len(up) > 0 {
		return up[0]
	}
	return nil
}
