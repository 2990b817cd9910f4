package cli

import (
	"context"

	"github.com/ferry-dr/ferry/internal/agent"
	"github.com/ferry-dr/ferry/internal/libvirt"
	"github.com/ferry-dr/ferry/internal/qemu"
)

// vmRuntime builds the agent's VM runtime from --runtime and
// --libvirt-uri; the returned func releases it.
func vmRuntime(ctx context.Context, e *env, name, uri string) (agent.Runtime, func(), error) {
	switch name {
	case "", "qemu":
		return nil, func() {}, nil // the agent's default
	case "libvirt":
		rt, err := libvirt.Dial(ctx, libvirt.Config{URI: uri, Logger: e.log})
		if err != nil {
			return nil, nil, err
		}
		return libvirtRuntime{rt}, func() { rt.Close() }, nil
	}
	return nil, nil, usagef("--runtime %q: want qemu or libvirt", name)
}

// libvirtRuntime gives libvirt's domains to the agent as Machines.
type libvirtRuntime struct{ *libvirt.Runtime }

func (r libvirtRuntime) Start(ctx context.Context, spec qemu.Spec, dir string) (agent.Machine, error) {
	d, err := r.Runtime.Start(ctx, spec, dir)
	if err != nil {
		return nil, err
	}
	return d, nil
}

var _ agent.Runtime = libvirtRuntime{}
var _ agent.Importer = libvirtRuntime{}
var _ agent.Machine = (*libvirt.Domain)(nil)
