package agent

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/qemu"
)

// Runtime runs the site's VMs on the agent's NBD exports: QEMU started
// directly (the default, qemu.Runtime) or libvirt domains
// (libvirt.Runtime), chosen per site (`ferry agent run --runtime`).
type Runtime interface {
	// Start boots a VM as spec says (its disks are NBD exports on the
	// agent's socket), keeping its private files in dir, and returns
	// once the hypervisor runs it. ctx bounds the start only: if it is
	// cancelled, no VM is left behind. An invalid spec fails with
	// qemu.ErrSpec before anything runs. Safe for concurrent use.
	Start(ctx context.Context, spec qemu.Spec, dir string) (Machine, error)
}

// Machine is one VM a Runtime started. Its methods are safe for
// concurrent use.
type Machine interface {
	// Status reports the VM's state (api.StateStopped once it ended).
	Status(ctx context.Context) api.VMStatus
	// Shutdown stops the VM gracefully (guest agent, then the ACPI
	// button) and hard after grace; report is told each step. It
	// returns once the VM no longer runs. Idempotent.
	Shutdown(ctx context.Context, grace time.Duration, report func(step string)) error
	// Quit stops the VM at once, without asking the guest: for a VM
	// whose writes are discarded anyway. Idempotent.
	Quit(report func(step string))
	// PingGuest, Freeze and Thaw talk to the guest agent; without a
	// guest agent channel they fail with qemu.ErrNoGuestAgent. Freeze
	// and Thaw return the number of file systems they froze or thawed.
	PingGuest(ctx context.Context) error
	Freeze(ctx context.Context) (int, error)
	Thaw(ctx context.Context) (int, error)
	// ConsolePath is the file the VM's serial console is written to.
	ConsolePath() string
}

// directRuntime starts qemu-system-x86_64 itself.
type directRuntime struct{ log *slog.Logger }

var _ Runtime = directRuntime{}
var _ Machine = (*qemu.VM)(nil)

func (r directRuntime) Start(ctx context.Context, spec qemu.Spec, dir string) (Machine, error) {
	for _, n := range spec.Interfaces() {
		if n.Attach != "" {
			return nil, fmt.Errorf("%w: NIC %s of VM %s is to attach to libvirt's %s; this site runs QEMU directly: run its agent with --runtime libvirt, or attach the NIC to a network without a libvirt attachment", qemu.ErrSpec, n.Name, spec.Name, n.Attach)
		}
	}
	if spec.Domain != "" {
		return nil, fmt.Errorf("%w: VM %s was imported from libvirt and runs as its libvirt domain; this site runs QEMU directly: run its agent with --runtime libvirt", qemu.ErrSpec, spec.Name)
	}
	vm, err := qemu.Start(ctx, spec, dir, r.log)
	if err != nil {
		return nil, err
	}
	return vm, nil
}
