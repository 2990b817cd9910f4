package vault

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/store"
)

// EnableRequest asks to protect a VM.
type EnableRequest = api.EnableRequest

// Enable starts protecting a VM (running at its site) to a recovery site
// under a policy, with its NICs mapped to the recovery site's networks: a
// job that starts replication and waits for the initial copy.
func (v *Vault) Enable(ctx context.Context, req EnableRequest) (Job, error) {
	vmName, target, policy := req.VM, req.Target, req.Policy
	vm, _, err := get[VM](ctx, v.st, kindVM, vmName)
	if err != nil {
		return Job{}, err
	}
	if target == "" || target == vm.Site {
		return Job{}, fmt.Errorf("%w: the recovery site must be another site than %s", ErrInvalid, vm.Site)
	}
	dstSite, _, err := get[api.Site](ctx, v.st, kindSite, target)
	if err != nil {
		return Job{}, err
	}
	srcSite, _, err := get[api.Site](ctx, v.st, kindSite, vm.Site)
	if err != nil {
		return Job{}, err
	}
	if policy == "" {
		policy = DefaultPolicy.Name
	}
	p := Protection{VM: vmName, Source: vm.Site, Target: target, State: StateEnabling, Policy: policy, Generation: 1, Health: "warning"}
	if err := mapNetworks(&p, vm, srcSite, dstSite, req.Networks, req.TestNetwork); err != nil {
		return Job{}, err
	}
	ver := int64(0)
	if cur, cver, err := get[Protection](ctx, v.st, kindProtection, vmName); err == nil && cur.Job == "" {
		switch {
		case cur.State == StateDisabled:
			ver, p.History = cver, cur.History // protected again after a disable
		case cur.State == StateEnabling && cur.Target == target:
			// A retry of an enable that failed (or whose vault stopped):
			// its steps are idempotent, and replication may already run.
			ver, p.History = cver, cur.History
		case cur.State == StateEnabling:
			return Job{}, fmt.Errorf("%w: %s is being enabled to %s; retry with that target, or disable it first", ErrForbidden, vmName, cur.Target)
		}
	}
	if _, err := put(ctx, v.st, kindProtection, vmName, p, ver); err != nil {
		if errors.Is(err, store.ErrConflict) {
			cur, _ := v.Protection(ctx, vmName)
			return Job{}, fmt.Errorf("%w: %s is already protected (%s, %s -> %s)", ErrForbidden, vmName, cur.State, cur.Source, cur.Target)
		}
		return Job{}, err
	}
	steps := []string{"prerequisites check", "start replication", "initial replication", "protected"}
	return v.startJob(ctx, vmName, ActEnable, steps, map[string]string{"target": target}, func(ctx context.Context, r *run, p Protection) (func(*Protection), error) {
		r.Step(ctx, "prerequisites check")
		src, sc, err := v.site(ctx, p.Source)
		if err != nil {
			return nil, err
		}
		dst, dc, err := v.site(ctx, p.Target)
		if err != nil {
			return nil, err
		}
		if !src.Reachable || !dst.Reachable {
			return nil, fmt.Errorf("both sites must be reachable (%s: %v, %s: %v)", src.Name, src.Reachable, dst.Name, dst.Reachable)
		}
		r.Step(ctx, "start replication")
		// The recovery site takes this replica's stream from the source
		// site only.
		if err := expectReplica(ctx, dc, p.VM, src.Name); err != nil {
			return nil, err
		}
		started := v.now()
		if err := sc.Replicate(ctx, p.VM, api.Replicate{PeerAddr: dst.Addr, PeerName: dst.Name}); err != nil {
			return nil, err
		}
		v.updateProtection(ctx, p.VM, func(p *Protection) error { p.State = StateInitialSync; return nil })
		r.Step(ctx, "initial replication")
		sent, total, err := v.waitInSync(ctx, r, sc, dc, p.VM, "copied")
		if err != nil {
			return nil, err
		}
		r.Say(ctx, 100, "initial replication took %v: %d bytes of disks, %d sent (holes and zeros are not)",
			v.now().Sub(started).Round(time.Millisecond), total, sent)
		r.Step(ctx, "protected")
		return func(p *Protection) { p.State = StateProtected; p.Health = "healthy" }, nil
	})
}

// waitInSync follows a group's replication at its source until the initial
// (or delta) copy is over and the recovery site has every entry, reporting
// progress; it returns the bytes sent and the disks' size. It fails, with
// the recovery site's reason, once that site reports the replica as one it
// could not open: the stream cannot resume before an operator repairs it,
// and a job must not wait for that.
func (v *Vault) waitInSync(ctx context.Context, r *run, c, dc Site, vm, verb string) (sent, total int64, err error) {
	for {
		if st, err := dc.Status(ctx); err == nil {
			for _, pr := range st.Problems {
				if pr.Kind == "replica" && pr.Name == vm {
					return 0, 0, fmt.Errorf("the recovery site cannot open the replica of %s (%s); repair it there (ferry agent replica resync %s, or move the replica aside) and retry", vm, pr.Reason, vm)
				}
			}
		}
		if st, err := c.Status(ctx); err == nil {
			for _, g := range st.Groups {
				if g.Name != vm || g.Replication == nil {
					continue
				}
				rs := g.Replication
				sent, total = rs.SentBytes, rs.CopyTotal
				if total > 0 {
					r.Say(ctx, int(rs.CopyDone*100/total), "%s %d of %d bytes, sent %d", verb, rs.CopyDone, total, sent)
				}
				if rs.State == api.ReplStreaming && rs.AckedSeq == g.LastSeq {
					return sent, total, nil
				}
			}
		}
		select {
		case <-ctx.Done():
			return 0, 0, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// failoverPoint asks the recovery site for its points and picks one.
func (v *Vault) failoverPoint(ctx context.Context, p Protection, want string) (api.Point, error) {
	pts, err := v.Points(ctx, p.VM)
	if err != nil {
		return api.Point{}, fmt.Errorf("list recovery points at %s: %w", p.Target, err)
	}
	if want == PointLastClean {
		return lastCleanPoint(p, pts)
	}
	return choosePoint(pts, want)
}

// recoverySite is the prerequisites check shared by drills and failovers:
// the VM's definition, and a reachable recovery site with room for it.
func (v *Vault) recoverySite(ctx context.Context, r *run, p Protection) (VM, api.Site, Site, error) {
	vm, _, err := get[VM](ctx, v.st, kindVM, p.VM)
	if err != nil {
		return vm, api.Site{}, nil, err
	}
	dst, dc, err := v.site(ctx, p.Target)
	if err != nil {
		return vm, dst, nil, err
	}
	if !dst.Reachable {
		return vm, dst, nil, fmt.Errorf("the recovery site %s is unreachable", dst.Name)
	}
	r.Say(ctx, -1, "recovery site %s reachable", dst.Name)
	return vm, dst, dc, v.checkCapacity(ctx, r, dc, dst.Name, vm)
}

// checkCapacity verifies that the recovery site can run vm: memory for it
// and disk for its overlays (at worst the size of its disks).
func (v *Vault) checkCapacity(ctx context.Context, r *run, c Site, site string, vm VM) error {
	st, err := c.Status(ctx)
	if err != nil {
		return fmt.Errorf("the recovery site %s does not answer: %w", site, err)
	}
	need := int64(memoryMiB(vm)) << 20
	if st.MemAvailable > 0 && st.MemAvailable < need {
		return fmt.Errorf("%s has %d MiB of memory available; %s needs %d MiB", site, st.MemAvailable>>20, vm.Name, memoryMiB(vm))
	}
	var disks int64
	for _, d := range vm.Disks {
		disks += d.Size
	}
	if st.DiskFree > 0 && st.DiskFree < disks {
		return fmt.Errorf("%s has %d MiB of disk free; %s's writes may need up to %d MiB", site, st.DiskFree>>20, vm.Name, disks>>20)
	}
	r.Say(ctx, -1, "%s: %d MiB memory available (needs %d), %d MiB disk free", site, st.MemAvailable>>20, memoryMiB(vm), st.DiskFree>>20)
	return nil
}

// TestFailover boots a copy of the VM at the recovery site, in the
// isolated network, on a writable view of a point; replication goes on.
func (v *Vault) TestFailover(ctx context.Context, vmName, point string) (Job, error) {
	if err := v.checkLastClean(ctx, vmName, point); err != nil {
		return Job{}, err
	}
	steps := v.groupSteps(ctx, vmName, []string{"prerequisites check", "create test VM", "start test VM"}, "start test VM", "start test VM %s-drill")
	return v.startJob(ctx, vmName, ActTestFailover, steps, map[string]string{"point": point}, func(ctx context.Context, r *run, p Protection) (func(*Protection), error) {
		r.Step(ctx, "prerequisites check")
		vm, dst, dc, err := v.recoverySite(ctx, r, p)
		if err != nil {
			return nil, err
		}
		pt, err := v.failoverPoint(ctx, p, point)
		if err != nil {
			return nil, err
		}
		r.Say(ctx, 100, "recovery point %d (%s, %s)", pt.Seq, pt.Type, pt.Time.Format(time.RFC3339Nano))
		r.Step(ctx, "create test VM")
		start := v.now()
		drilled := func(seq uint64) func(*Protection) {
			return func(p *Protection) {
				p.TestPending = true
				p.History = append(p.History, HistoryEntry{Action: "test-failover", Time: start, Point: seq,
					Duration: v.now().Sub(start).Round(time.Millisecond).String()})
			}
		}
		if len(vm.Members) > 0 {
			say := func(f string, a ...any) { r.Say(ctx, -1, f, a...) }
			step := func(m string) { r.Step(ctx, "start test VM "+m+"-drill") }
			if err := v.startGroup(ctx, &p, vm, dc, dst.Name, "-drill", pt.Seq, true, say, step); err != nil {
				return nil, err
			}
			r.Say(ctx, 100, "the %d VMs of group %s run at %s on point %d", len(vm.Members), p.VM, dst.Name, pt.Seq)
			return drilled(pt.Seq), nil
		}
		nets, err := v.attach(ctx, &p, vm, dst.Name, true)
		if err != nil {
			return nil, err
		}
		st, running := runningOnReplica(ctx, dc, p.VM+"-drill", p.VM)
		if running {
			// An interrupted attempt (its vault stopped) started it.
			pt = api.Point{Seq: st.Point}
			r.Say(ctx, 100, "test VM %s-drill already runs at %s from point %d (started by an interrupted attempt): kept", p.VM, dst.Name, st.Point)
		} else if st, err = dc.StartVM(ctx, vmRequest(vm, p.VM+"-drill", dst.Name, pt.Seq, nets)); err != nil {
			return nil, err
		}
		r.Step(ctx, "start test VM")
		r.Say(ctx, 100, "test VM %s-drill %s at %s on point %d, %s; its console: ferry vm console %s --test, or the VM's page in the portal", p.VM, st.State, dst.Name, pt.Seq, describeNets(vm, nets), p.VM)
		if addr := forwardAddr(vm, dst.Name, nets[0]); addr != "" {
			r.Say(ctx, -1, "test VM service address: %s", addr)
		}
		return drilled(pt.Seq), nil
	})
}

// CleanupTestFailover removes the drill's VM and overlays and records the
// drill with notes.
func (v *Vault) CleanupTestFailover(ctx context.Context, vmName, notes string) (Job, error) {
	steps := []string{"stop test VM", "record drill"}
	return v.startJob(ctx, vmName, ActCleanupTest, steps, map[string]string{"notes": notes}, func(ctx context.Context, r *run, p Protection) (func(*Protection), error) {
		r.Step(ctx, "stop test VM")
		dst, dc, err := v.site(ctx, p.Target)
		if err != nil {
			return nil, err
		}
		if !dst.Reachable {
			return nil, fmt.Errorf("the recovery site %s is unreachable: retry the cleanup when it is back (its test VM and overlays do not survive its restart)", dst.Name)
		}
		vm, _, err := get[VM](ctx, v.st, kindVM, p.VM)
		if err != nil {
			return nil, err
		}
		if err := stopGroup(ctx, dc, vm, "-drill", api.StopOptions{Force: true}, func(f string, a ...any) { r.Say(ctx, -1, f, a...) }); err != nil {
			return nil, err
		}
		r.Step(ctx, "record drill")
		return func(p *Protection) {
			p.TestPending = false
			p.History = append(p.History, HistoryEntry{Action: "cleanup-test-failover", Time: v.now(), Notes: notes})
		}, nil
	})
}

// expectReplica tells the site behind c that replica vm is streamed by
// site source, and by no other.
func expectReplica(ctx context.Context, c Site, vm, source string) error {
	if err := c.ExpectReplica(ctx, vm, source); err != nil {
		return fmt.Errorf("record %s as the source of replica %s: %w", source, vm, err)
	}
	return nil
}

func isNotFound(err error) bool { return errors.Is(err, api.ErrNotFound) }

// Failover moves the VM to the recovery site at a point: "latest" (all
// the data the recovery site can get, then a new point), "latest-processed",
// "latest-app-consistent", a point id or a time. With shutdownSource (and
// the source reachable) the source VM is shut down first and every write
// it made reaches the recovery site before the point is made: no data loss.
func (v *Vault) Failover(ctx context.Context, vmName string, req api.FailoverRequest) (Job, error) {
	point, shutdownSource := req.Point, req.ShutdownSource == nil || *req.ShutdownSource
	if req.ShutdownTimeout < 0 || req.ShutdownTimeout > time.Hour {
		return Job{}, fmt.Errorf("%w: shutdown timeout %v: want up to 1h", ErrInvalid, req.ShutdownTimeout)
	}
	if err := v.checkLastClean(ctx, vmName, point); err != nil {
		return Job{}, err
	}
	steps := v.groupSteps(ctx, vmName, []string{"prerequisites check", "shut down source VM", "synchronize latest data", "create recovery point", "start VM at recovery site"},
		"start VM at recovery site", "start %s at recovery site")
	params := map[string]string{"point": point, "shutdown_source": fmt.Sprint(shutdownSource)}
	return v.startJob(ctx, vmName, ActFailover, steps, params, func(ctx context.Context, r *run, p Protection) (func(*Protection), error) {
		started := v.now()
		r.Step(ctx, "prerequisites check")
		vm, dst, dc, err := v.recoverySite(ctx, r, p)
		if err != nil {
			return nil, err
		}
		src, sc, err := v.site(ctx, p.Source)
		if err != nil {
			return nil, err
		}
		r.Say(ctx, 100, "source site %s %s", src.Name, map[bool]string{true: "reachable", false: "UNREACHABLE"}[src.Reachable])
		r.Step(ctx, "shut down source VM")
		shutdownStart := v.now()
		if shutdownSource && src.Reachable {
			timeout := cmp.Or(req.ShutdownTimeout, vm.ShutdownTimeout, api.DefaultStopTimeout)
			r.Say(ctx, -1, "shutting %s down: the guest agent, then the ACPI button, then quit after %v", p.VM, timeout)
			if err := stopGroup(ctx, sc, vm, "", api.StopOptions{Timeout: timeout}, func(f string, a ...any) { r.Say(ctx, -1, f, a...) }); err != nil {
				r.Say(ctx, -1, "shutdown failed, going on: %v", err)
			}
		} else if !src.Reachable {
			r.Say(ctx, -1, "the source site is down: no shutdown; writes it had not sent are lost (unplanned failover)")
		} else {
			r.Say(ctx, -1, "not asked to shut down the source VM")
		}
		shutdown := v.now().Sub(shutdownStart)
		r.Step(ctx, "synchronize latest data")
		want := point
		if src.Reachable && (shutdownSource || point == "latest") {
			seq, err := v.markAndWait(ctx, r, sc, dc, p.VM, "failover")
			if err != nil {
				r.Say(ctx, -1, "could not synchronize with the source (%v); using what the recovery site has", err)
			} else if point == "latest" || point == "" {
				want = fmt.Sprint(seq)
			}
		} else {
			r.Say(ctx, -1, "nothing to synchronize: using what the recovery site has")
		}
		r.Step(ctx, "create recovery point")
		var pt api.Point
		if want == "latest" || want == "" {
			// Everything the recovery site received: every entry boundary
			// is crash-consistent, so the newest one is a point too.
			pt, err = v.newestInstant(ctx, dc, p.VM)
			if err != nil {
				r.Say(ctx, -1, "%v; using the newest listed point", err)
				want = "latest-processed"
			}
		}
		if pt.Seq == 0 {
			if pt, err = v.failoverPoint(ctx, p, want); err != nil {
				return nil, err
			}
		}
		r.Say(ctx, 100, "recovery point %d (%s) from %s", pt.Seq, pt.Type, pt.Time.Format(time.RFC3339Nano))
		r.Step(ctx, "start VM at recovery site")
		failedOver := func(seq uint64) func(*Protection) {
			return func(p *Protection) {
				p.State, p.FailoverSeq, p.Fenced = StateFailedOver, seq, false
				p.Generation++
				p.History = append(p.History, HistoryEntry{Action: "failover", Time: started, Point: seq,
					Duration: v.now().Sub(started).Round(time.Millisecond).String()})
			}
		}
		if len(vm.Members) > 0 {
			step := func(m string) { r.Step(ctx, "start "+m+" at recovery site") }
			if err := v.startGroup(ctx, &p, vm, dc, dst.Name, "", pt.Seq, false, func(f string, a ...any) { r.Say(ctx, -1, f, a...) }, step); err != nil {
				return nil, err
			}
			r.Say(ctx, 100, "the %d VMs of group %s run at %s on point %d; failover took %v excluding guest boot and the sources' shutdown (%v)", len(vm.Members), p.VM, dst.Name, pt.Seq,
				(v.now().Sub(started) - shutdown).Round(time.Millisecond), shutdown.Round(time.Millisecond))
			v.moveVM(ctx, p.VM, dst.Name)
			return failedOver(pt.Seq), nil
		}
		nets, err := v.attach(ctx, &p, vm, dst.Name, false)
		if err != nil {
			return nil, err
		}
		st, running := runningOnReplica(ctx, dc, p.VM, p.VM)
		if running {
			// An interrupted attempt (its vault stopped) started it: it
			// is kept, with whatever it wrote since, rather than
			// discarded for a new start.
			pt = api.Point{Seq: st.Point}
			r.Say(ctx, 100, "VM %s already runs at %s from point %d (started by an interrupted attempt): kept", p.VM, dst.Name, st.Point)
		} else if st, err = dc.StartVM(ctx, vmRequest(vm, p.VM, dst.Name, pt.Seq, nets)); err != nil {
			return nil, err
		}
		// The failover's own time: the source's shutdown is the guest's
		// (reported on its own), as is the boot at the recovery site.
		r.Say(ctx, 100, "VM %s %s at %s (%s), %s; failover took %v excluding guest boot and the source's shutdown (%v)", p.VM, st.State, dst.Name, st.Accel,
			describeNets(vm, nets), (v.now().Sub(started) - shutdown).Round(time.Millisecond), shutdown.Round(time.Millisecond))
		if addr := forwardAddr(vm, dst.Name, nets[0]); addr != "" {
			r.Say(ctx, -1, "service address: %s", addr)
		}
		if lines := v.firstConsoleLines(ctx, dc, p.VM, 3, 15*time.Second); len(lines) > 0 {
			r.Say(ctx, -1, "console: %s", strings.Join(lines, " | "))
		}
		v.moveVM(ctx, p.VM, dst.Name)
		return failedOver(pt.Seq), nil
	})
}

// firstConsoleLines waits up to d for the VM's first n console lines.
func (v *Vault) firstConsoleLines(ctx context.Context, c Site, vm string, n int, d time.Duration) []string {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if out, err := c.Console(ctx, vm, 0); err == nil {
			var lines []string
			for _, l := range strings.Split(out.Data, "\n") {
				l = strings.TrimSpace(strings.Map(func(r rune) rune {
					if r < 32 || r == 127 {
						return -1
					}
					return r
				}, l))
				if l != "" {
					lines = append(lines, l)
				}
				if len(lines) == n {
					return lines
				}
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(250 * time.Millisecond):
		}
	}
	return nil
}

// newestInstant is the newest sequence the recovery site holds for vm.
func (v *Vault) newestInstant(ctx context.Context, dc Site, vm string) (api.Point, error) {
	st, err := dc.Status(ctx)
	if err != nil {
		return api.Point{}, err
	}
	for _, r := range st.Replicas {
		if r.Group == vm && r.LastSeq > 0 && r.ConsistentSeq > 0 {
			return api.Point{Seq: r.LastSeq, Time: r.LastTime, Type: "latest"}, nil
		}
	}
	return api.Point{}, fmt.Errorf("no replica of %s at the recovery site", vm)
}

// markAndWait records a point at the source and waits until the recovery
// site has it (everything written before it is then there).
func (v *Vault) markAndWait(ctx context.Context, r *run, sc, dc Site, vm, label string) (uint64, error) {
	seq, err := sc.Mark(ctx, vm, api.Marker{Type: api.PointNamed, Label: label})
	if err != nil {
		return 0, err
	}
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) {
		if pts, err := dc.Points(ctx, vm); err == nil {
			for _, p := range pts {
				if p.Seq == seq {
					r.Say(ctx, 100, "the recovery site has everything up to point %d", seq)
					return seq, nil
				}
			}
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return 0, fmt.Errorf("point %d did not reach the recovery site within 2 minutes", seq)
}

func (v *Vault) moveVM(ctx context.Context, name, site string) {
	for {
		vm, ver, err := get[VM](ctx, v.st, kindVM, name)
		if err != nil {
			return
		}
		vm.Site = site
		if _, err := put(ctx, v.st, kindVM, name, vm, ver); !errors.Is(err, store.ErrConflict) {
			return
		}
	}
}

// ChangePoint restarts the failed-over VM on another point; its writes
// since the failover are discarded.
func (v *Vault) ChangePoint(ctx context.Context, vmName, point string) (Job, error) {
	if err := v.checkLastClean(ctx, vmName, point); err != nil {
		return Job{}, err
	}
	steps := v.groupSteps(ctx, vmName, []string{"stop VM at recovery site", "start VM on the new point"}, "start VM on the new point", "start %s on the new point")
	return v.startJob(ctx, vmName, ActChangePoint, steps, map[string]string{"point": point}, func(ctx context.Context, r *run, p Protection) (func(*Protection), error) {
		vm, _, err := get[VM](ctx, v.st, kindVM, p.VM)
		if err != nil {
			return nil, err
		}
		dst, dc, err := v.site(ctx, p.Target)
		if err != nil {
			return nil, err
		}
		pt, err := v.failoverPoint(ctx, p, point)
		if err != nil {
			return nil, err
		}
		r.Step(ctx, "stop VM at recovery site")
		// Its writes since the failover are discarded: no need to wait
		// for a clean shutdown.
		if err := stopGroup(ctx, dc, vm, "", api.StopOptions{Force: true}, func(f string, a ...any) { r.Say(ctx, -1, f, a...) }); err != nil {
			return nil, err
		}
		r.Step(ctx, "start VM on the new point")
		if len(vm.Members) > 0 {
			step := func(m string) { r.Step(ctx, "start "+m+" on the new point") }
			if err := v.startGroup(ctx, &p, vm, dc, dst.Name, "", pt.Seq, false, func(f string, a ...any) { r.Say(ctx, -1, f, a...) }, step); err != nil {
				return nil, err
			}
			r.Say(ctx, 100, "the VMs of group %s run on point %d", p.VM, pt.Seq)
			return func(p *Protection) { p.FailoverSeq = pt.Seq }, nil
		}
		nets, err := v.attach(ctx, &p, vm, dst.Name, false)
		if err != nil {
			return nil, err
		}
		if _, err := dc.StartVM(ctx, vmRequest(vm, p.VM, dst.Name, pt.Seq, nets)); err != nil {
			return nil, err
		}
		r.Say(ctx, 100, "VM %s runs on point %d", p.VM, pt.Seq)
		return func(p *Protection) { p.FailoverSeq = pt.Seq }, nil
	})
}

// Commit makes the failed-over VM's disks standalone at the recovery site
// and deletes the recovery points; change recovery point is refused from
// then on.
func (v *Vault) Commit(ctx context.Context, vmName string) (Job, error) {
	steps := []string{"make disks standalone", "delete recovery points"}
	return v.startJob(ctx, vmName, ActCommit, steps, nil, func(ctx context.Context, r *run, p Protection) (func(*Protection), error) {
		_, dc, err := v.site(ctx, p.Target)
		if err != nil {
			return nil, err
		}
		r.Step(ctx, "make disks standalone")
		vm, _, err := get[VM](ctx, v.st, kindVM, p.VM)
		if err != nil {
			return nil, err
		}
		// A group's members all run on the replica's views: committing one
		// commits the group, and every member keeps running.
		steps, err := dc.CommitVM(ctx, members(vm)[0].Name)
		if err != nil {
			return nil, err
		}
		for _, s := range steps {
			r.Say(ctx, -1, "%s", s)
		}
		r.Step(ctx, "delete recovery points")
		return func(p *Protection) { p.State, p.Ransomware = StateCommitted, nil }, nil
	})
}

// ReprotectPlan says what a reprotect will reuse and create at the site
// that becomes the recovery site (api.ReprotectPlan).
type ReprotectPlan = api.ReprotectPlan

// reprotectPlan is the plan with what the reprotect itself needs.
type reprotectPlan struct {
	api.ReprotectPlan
	replicaReady bool // the disks already are the replica (a retry)
	div          *api.Divergence
}

// PlanItem is one thing reused or created.
type PlanItem = api.PlanItem

// PlanReprotect shows what a reprotect of vm would do.
func (v *Vault) PlanReprotect(ctx context.Context, vmName string) (ReprotectPlan, error) {
	p, err := v.planReprotect(ctx, vmName)
	return p.ReprotectPlan, err
}

func (v *Vault) planReprotect(ctx context.Context, vmName string) (reprotectPlan, error) {
	p, err := v.Protection(ctx, vmName)
	if err != nil {
		return reprotectPlan{}, err
	}
	if err := guard(&p, ActReprotect); err != nil {
		return reprotectPlan{}, err
	}
	vm, _, err := get[VM](ctx, v.st, kindVM, vmName)
	if err != nil {
		return reprotectPlan{}, err
	}
	other, oc, err := v.site(ctx, p.Source)
	if err != nil {
		return reprotectPlan{}, err
	}
	if !other.Reachable {
		return reprotectPlan{}, fmt.Errorf("%w: %s is unreachable; reprotect needs it back", ErrForbidden, other.Name)
	}
	st, err := oc.Status(ctx)
	if err != nil {
		return reprotectPlan{}, err
	}
	have := map[string]int64{}
	for _, g := range st.Groups {
		if g.Name == vmName {
			for _, d := range g.Disks {
				have[d.Name] = d.Size
			}
		}
	}
	isReplica := false
	for _, rp := range st.Replicas { // an interrupted reprotect already turned them
		if rp.Group == vmName && len(have) == 0 {
			isReplica = true
			for _, d := range rp.Disks {
				have[d.Name] = d.Size
			}
		}
	}
	plan := reprotectPlan{ReprotectPlan: api.ReprotectPlan{From: p.Target, To: p.Source, VM: PlanItem{Name: vmName, Action: "reuse"}}, replicaReady: isReplica}
	if len(have) == 0 {
		plan.VM.Action = "create (new)"
	}
	reuse := 0
	for _, d := range vm.Disks {
		it := PlanItem{Name: d.Name, Size: d.Size, Action: "create (new)"}
		if have[d.Name] == d.Size {
			it.Action = "reuse"
			reuse++
		}
		plan.Disks = append(plan.Disks, it)
		plan.MaxBytes += d.Size
	}
	plan.Method, plan.ExpectedBytes = "full copy", plan.MaxBytes
	if reuse == 0 {
		return plan, nil
	}
	plan.Method = "checksum compare"
	_, fc, err := v.site(ctx, plan.From)
	if err != nil {
		return reprotectPlan{}, err
	}
	div, err := fc.Divergence(ctx, vmName)
	if err != nil {
		plan.Why = fmt.Sprintf("%s keeps no changed-block tracking: %v", plan.From, err)
		return plan, nil
	}
	plan.div = &div
	if isReplica {
		// An earlier attempt turned the disks; what it learnt is kept.
		plan.Method, plan.ExpectedBytes = "changed-block tracking", div.Chunks.Bytes()
		return plan, nil
	}
	pc, err := oc.Changes(ctx, vmName, div.Base)
	if err != nil {
		plan.Why = fmt.Sprintf("%s cannot tell what it changed after the failover point: %v", plan.To, err)
		return plan, nil
	}
	if pc.From > div.Received+1 {
		plan.Why = fmt.Sprintf("%s's journal starts at %d, after what %s received (%d)", plan.To, pc.From, plan.From, div.Received)
		return plan, nil
	}
	all := api.NewChunks()
	all.Union(div.Chunks)
	all.Union(pc.Chunks)
	plan.Method, plan.ExpectedBytes = "changed-block tracking", min(plan.MaxBytes, all.Bytes())
	return plan, nil
}

// Reprotect replicates the VM in the reverse direction: from where it runs
// now back to the site it failed over from, reusing the disks there and
// sending only the chunks that differ.
func (v *Vault) Reprotect(ctx context.Context, vmName string) (Job, error) {
	plan, err := v.planReprotect(ctx, vmName)
	if err != nil {
		return Job{}, err
	}
	steps := []string{"prerequisites check", "shut down VM at " + plan.To, "reuse disks at " + plan.To, "start replication", "synchronize differences", "protected"}
	return v.startJob(ctx, vmName, ActReprotect, steps, map[string]string{"from": plan.From, "to": plan.To}, func(ctx context.Context, r *run, p Protection) (func(*Protection), error) {
		r.Step(ctx, "prerequisites check")
		for _, d := range plan.Disks {
			r.Say(ctx, 100, "disk %s (%d bytes): %s", d.Name, d.Size, d.Action)
		}
		_, fc, err := v.site(ctx, plan.From)
		if err != nil {
			return nil, err
		}
		to, tc, err := v.site(ctx, plan.To)
		if err != nil {
			return nil, err
		}
		r.Step(ctx, "shut down VM at "+to.Name)
		vm, _, err := get[VM](ctx, v.st, kindVM, vmName)
		if err != nil {
			return nil, err
		}
		for _, m := range members(vm) {
			steps, err := tc.StopVM(ctx, m.Name, api.StopOptions{Timeout: m.ShutdownTimeout})
			if err != nil && !isNotFound(err) {
				return nil, err
			}
			for _, s := range steps {
				r.Say(ctx, -1, "%s", s)
			}
		}
		r.Step(ctx, "reuse disks at "+to.Name)
		var delta *api.PeerChanges
		if plan.replicaReady || plan.VM.Action == "reuse" {
			var since uint64
			if plan.div != nil {
				since = plan.div.Base
			}
			out, err := tc.ToReplica(ctx, vmName, api.ToReplica{Since: since, Source: plan.From})
			if err != nil {
				return nil, err
			}
			if plan.replicaReady {
				r.Say(ctx, 100, "the old disks at %s already are the replica (an earlier attempt)", to.Name)
			} else {
				r.Say(ctx, 100, "the old disks at %s are now the replica", to.Name)
			}
			switch {
			case plan.div == nil:
				r.Say(ctx, -1, "differences found by checksum compare: %s", plan.Why)
			case out.Changes == nil:
				r.Say(ctx, -1, "differences found by checksum compare: %s could not tell what it changed after the failover point", to.Name)
			case out.Changes.From > plan.div.Received+1:
				r.Say(ctx, -1, "differences found by checksum compare: %s's journal starts after what %s received", to.Name, plan.From)
			default:
				delta = out.Changes
				r.Say(ctx, -1, "changed-block tracking: %d blocks of 4 KiB written at %s since the failover point, %d changed at %s after it",
					plan.div.Chunks.Count(), plan.From, delta.Chunks.Count(), to.Name)
			}
		} else {
			r.Skip(ctx, "reuse disks at "+to.Name, "no disks to reuse: a full copy")
		}
		r.Step(ctx, "start replication")
		if err := expectReplica(ctx, tc, vmName, plan.From); err != nil {
			return nil, err
		}
		if err := fc.Replicate(ctx, vmName, api.Replicate{PeerAddr: to.Addr, PeerName: to.Name, Delta: delta}); err != nil {
			return nil, err
		}
		r.Step(ctx, "synchronize differences")
		sent, total, err := v.waitInSync(ctx, r, fc, tc, vmName, "went through")
		if err != nil {
			return nil, err
		}
		r.Step(ctx, "protected")
		r.Say(ctx, 100, "sent %d bytes for %d bytes of disks (%.3f)", sent, total, float64(sent)/float64(max(total, 1)))
		return func(p *Protection) {
			p.Source, p.Target = plan.From, plan.To
			p.State, p.FailoverSeq, p.Health, p.Fenced = StateProtected, 0, "healthy", false
			p.History = append(p.History, HistoryEntry{Action: "reprotect", Time: v.now(), Notes: fmt.Sprintf("sent %d of %d bytes", sent, total)})
		}, nil
	})
}

// Disable stops protecting a VM: replication stops at the source and the
// replica with its recovery points is deleted at the recovery site, or
// kept if keepReplica (for a later reprotect-free look, or to copy it
// elsewhere). The VM keeps running; the protection stays listed as
// disabled and can be enabled again (a full initial copy).
func (v *Vault) Disable(ctx context.Context, vmName string, keepReplica bool) (Job, error) {
	steps := []string{"stop replication", "delete replica"}
	return v.startJob(ctx, vmName, ActDisable, steps, map[string]string{"keep_replica": fmt.Sprint(keepReplica)}, func(ctx context.Context, r *run, p Protection) (func(*Protection), error) {
		r.Step(ctx, "stop replication")
		src, sc, err := v.site(ctx, p.Source)
		if err != nil {
			return nil, err
		}
		if !src.Reachable {
			return nil, fmt.Errorf("the source site %s is unreachable: its replication cannot be stopped; retry when it is back", src.Name)
		}
		if err := sc.Unreplicate(ctx, p.VM); err != nil && !isNotFound(err) {
			return nil, err
		}
		r.Say(ctx, 100, "%s no longer replicates %s", src.Name, p.VM)
		r.Step(ctx, "delete replica")
		if keepReplica {
			r.Skip(ctx, "delete replica", "kept as asked: delete it at "+p.Target+" when done")
		} else {
			_, dc, err := v.site(ctx, p.Target)
			if err != nil {
				return nil, err
			}
			if err := dc.DeleteReplica(ctx, p.VM); err != nil && !isNotFound(err) {
				return nil, err
			}
			r.Say(ctx, 100, "replica of %s and its recovery points deleted at %s", p.VM, p.Target)
		}
		return func(p *Protection) {
			p.State, p.Health, p.RPOSeconds, p.Ransomware = StateDisabled, "", 0, nil
			p.History = append(p.History, HistoryEntry{Action: ActDisable, Time: v.now()})
		}, nil
	})
}

// runningOnReplica reports the VM named name if it runs at a site on
// writable views of the replica rep.
func runningOnReplica(ctx context.Context, c Site, name, rep string) (api.VMStatus, bool) {
	st, err := c.Status(ctx)
	if err != nil {
		return api.VMStatus{}, false
	}
	for _, vm := range st.VMs {
		if vm.Name == name && vm.Replica == rep && vm.Point != 0 && (vm.State == api.VMRunning || vm.State == api.VMPaused || vm.State == api.VMStarting) {
			return vm, true
		}
	}
	return api.VMStatus{}, false
}
