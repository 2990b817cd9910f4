package vault

import (
	"context"
	"fmt"
	"slices"

	"github.com/ferry-dr/ferry/internal/api"
)

// MaxMembers bounds a multi-VM consistency group (as Azure Site
// Recovery's multi-VM consistency does).
const MaxMembers = 16

// memberDisk is the name of a member's disk in the group's disks.
func memberDisk(member, disk string) string { return member + "-" + disk }

// members returns the VMs that run on vm's disks: vm itself, or each
// member of a consistency group, at the group's site, with its disks
// named as the group has them.
func members(vm VM) []VM {
	if len(vm.Members) == 0 {
		return []VM{vm}
	}
	out := make([]VM, len(vm.Members))
	for i, m := range vm.Members {
		m.Site = vm.Site
		disks := make([]DiskSpec, len(m.Disks))
		for j, d := range m.Disks {
			disks[j] = DiskSpec{Name: memberDisk(m.Name, d.Name), Size: d.Size}
		}
		m.Disks = disks
		out[i] = m
	}
	return out
}

// checkGroup validates a consistency group and fills in its disks from
// its members'. Each member is checked as a VM; names must be unique
// among the members and the vault's VMs.
func (v *Vault) checkGroup(ctx context.Context, g *VM, site api.Site) error {
	if len(g.Members) < 2 || len(g.Members) > MaxMembers {
		return fmt.Errorf("%w: a consistency group has 2 to %d VMs, not %d", ErrInvalid, MaxMembers, len(g.Members))
	}
	if len(g.Disks) > 0 || len(g.NICs) > 0 || g.Kernel != "" || g.Domain != "" {
		return fmt.Errorf("%w: a consistency group's disks, NICs and boot are its members'", ErrInvalid)
	}
	existing, err := v.VMs(ctx)
	if err != nil {
		return err
	}
	taken := map[string]string{}
	for _, e := range existing {
		taken[e.Name] = "VM " + e.Name
		for _, m := range e.Members {
			taken[m.Name] = "a member of " + e.Name
		}
	}
	g.Disks = nil
	for i := range g.Members {
		m := &g.Members[i]
		if len(m.Members) > 0 {
			return fmt.Errorf("%w: member %s is a group itself", ErrInvalid, m.Name)
		}
		if err := api.CheckName(api.KindVM, m.Name); err != nil {
			return err
		}
		if m.Name == g.Name {
			return fmt.Errorf("%w: member %s has the group's name", ErrInvalid, m.Name)
		}
		if what, ok := taken[m.Name]; ok {
			return fmt.Errorf("%w: %s: the name %s is taken (%s)", api.ErrConflict, g.Name, m.Name, what)
		}
		taken[m.Name] = "another member of " + g.Name
		if m.Domain != "" {
			return fmt.Errorf("%w: member %s: an imported libvirt domain cannot join a group", ErrInvalid, m.Name)
		}
		m.Site = g.Site
		if m.Firmware == "uefi" && !slices.ContainsFunc(m.Disks, func(d DiskSpec) bool { return d.Name == api.EFIVarsDisk }) {
			m.Disks = append(m.Disks, DiskSpec{Name: api.EFIVarsDisk, Size: api.EFIVarsSize})
		}
		if err := checkVM(*m); err != nil {
			return fmt.Errorf("member %s: %w", m.Name, err)
		}
		if err := checkNICs(m, site); err != nil {
			return err
		}
		for _, d := range m.Disks {
			g.Disks = append(g.Disks, DiskSpec{Name: memberDisk(m.Name, d.Name), Size: d.Size})
		}
	}
	return nil
}

// memberRequest is the request that starts member m of group g as
// m.Name+suffix at site: on the group's disks, or on its replica at seq.
func memberRequest(g, m VM, suffix, site string, seq uint64, nets []Network) api.VMRequest {
	req := vmRequest(m, m.Name+suffix, site, seq, nets)
	if seq != 0 {
		req.Replica = g.Name
	} else {
		req.Group = g.Name
	}
	for _, d := range m.Disks {
		req.Disks = append(req.Disks, d.Name)
	}
	return req
}

// startGroup starts every member of group g at site (named with suffix),
// on the group's disks or on its replica at seq (one point for all), its
// NICs as attach maps them (drill: the drill network). A member that
// already runs there (an interrupted attempt started it) is kept. It
// says what it did through say; step, if set, is called with each
// member's name before it starts (a job's step per VM).
func (v *Vault) startGroup(ctx context.Context, p *Protection, g VM, c Site, site, suffix string, seq uint64, drill bool, say func(string, ...any), step func(member string)) error {
	for _, m := range members(g) {
		if step != nil {
			step(m.Name)
		}
		nets, err := v.attach(ctx, p, m, site, drill)
		if err != nil {
			return fmt.Errorf("member %s: %w", m.Name, err)
		}
		if seq != 0 {
			if st, running := runningOnReplica(ctx, c, m.Name+suffix, g.Name); running {
				say("%s%s already runs at %s from point %d (started by an interrupted attempt): kept", m.Name, suffix, site, st.Point)
				continue
			}
		}
		st, err := c.StartVM(ctx, memberRequest(g, m, suffix, site, seq, nets))
		if err != nil {
			return fmt.Errorf("start %s%s: %w", m.Name, suffix, err)
		}
		say("%s%s %s at %s (%s), %s", m.Name, suffix, st.State, site, st.Accel, describeNets(m, nets))
		if addr := forwardAddr(m, site, nets[0]); addr != "" {
			say("%s%s service address: %s", m.Name, suffix, addr)
		}
	}
	return nil
}

// stopGroup stops every member of group g named with suffix at c; a
// member that does not run there is skipped.
func stopGroup(ctx context.Context, c Site, g VM, suffix string, opts api.StopOptions, say func(string, ...any)) error {
	for _, m := range members(g) {
		steps, err := c.StopVM(ctx, m.Name+suffix, opts)
		if err != nil && !isNotFound(err) {
			return fmt.Errorf("stop %s%s: %w", m.Name, suffix, err)
		}
		for _, s := range steps {
			say("%s%s: %s", m.Name, suffix, s)
		}
	}
	return nil
}

// memoryMiB is what vm needs to run: all its members.
func memoryMiB(vm VM) int {
	n := 0
	for _, m := range members(vm) {
		n += m.MemoryMiB
	}
	return n
}

// groupSteps is a job's step list for vm: for a consistency group, the
// step named one is replaced by a step per member, named by perMember
// (a format with the member's name).
func (v *Vault) groupSteps(ctx context.Context, vmName string, steps []string, one, perMember string) []string {
	vm, _, err := get[VM](ctx, v.st, kindVM, vmName)
	if err != nil || len(vm.Members) == 0 {
		return steps
	}
	var out []string
	for _, s := range steps {
		if s != one {
			out = append(out, s)
			continue
		}
		for _, m := range vm.Members {
			out = append(out, fmt.Sprintf(perMember, m.Name))
		}
	}
	return out
}
