// Package libvirt runs ferry's VMs as libvirt domains, for sites whose
// hosts are managed with libvirt: the same VM spec as the direct QEMU
// runtime (internal/qemu), turned into domain XML whose disks are the
// agent's NBD exports on its unix socket. It talks to libvirtd over its
// RPC protocol (github.com/digitalocean/go-libvirt, pure Go).
//
// Domains ferry starts for its own VMs, and for imported ones at a
// recovery site, are transient (created, never defined): they vanish when
// they stop, so a fenced or dead site never autostarts one, and nothing is
// left to clean up on the host. An imported domain at its own site stays
// the operator's defined domain, redefined onto ferry's disks with
// autostart off (domain.go).
package libvirt

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/qemu"
)

// Config configures a Runtime.
type Config struct {
	// URI of the libvirt daemon: qemu:///system (the default) or
	// qemu+unix:///system?socket=PATH.
	URI    string
	Logger *slog.Logger
}

// ErrUnavailable: the libvirt daemon cannot be reached.
var ErrUnavailable = errors.New("libvirt daemon unavailable")

// Runtime starts domains through one libvirt connection, reconnecting
// when the daemon restarts. Safe for concurrent use.
type Runtime struct {
	cfg Config
	log *slog.Logger
	uri *url.URL

	mu   sync.Mutex
	conn *golibvirt.Libvirt
}

// Dial connects to the libvirt daemon at cfg.URI.
func Dial(ctx context.Context, cfg Config) (*Runtime, error) {
	if cfg.URI == "" {
		cfg.URI = "qemu:///system"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	u, err := url.Parse(cfg.URI)
	if err != nil {
		return nil, fmt.Errorf("libvirt URI %q: %w", cfg.URI, err)
	}
	if u.Scheme != "qemu" && u.Scheme != "qemu+unix" {
		return nil, fmt.Errorf("libvirt URI %q: only local qemu URIs (qemu:///system, qemu+unix:///system?socket=PATH)", cfg.URI)
	}
	r := &Runtime{cfg: cfg, log: cfg.Logger, uri: u}
	if _, err := r.client(ctx); err != nil {
		return nil, err
	}
	return r, nil
}

// client returns a live connection, making a new one if the daemon went
// away since.
func (r *Runtime) client(ctx context.Context) (*golibvirt.Libvirt, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.conn != nil {
		select {
		case <-r.conn.Disconnected():
			r.conn = nil
		default:
			return r.conn, nil
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	c, err := golibvirt.ConnectToURI(r.uri)
	if err != nil {
		return nil, fmt.Errorf("%w at %s: %v (is libvirtd running?)", ErrUnavailable, r.cfg.URI, err)
	}
	r.conn = c
	return c, nil
}

// Close drops the connection; domains keep running.
func (r *Runtime) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.conn == nil {
		return nil
	}
	err := r.conn.Disconnect()
	r.conn = nil
	return err
}

// Domain is a VM ferry runs as a libvirt domain (transient, or an
// imported domain's own definition).
type Domain struct {
	r     *Runtime
	spec  qemu.Spec
	dir   string
	accel string
}

// Start creates a transient domain for spec and returns once libvirt runs
// it. dir keeps the serial console's log.
func (r *Runtime) Start(ctx context.Context, spec qemu.Spec, dir string) (*Domain, error) {
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	if spec.VCPUs == 0 {
		spec.VCPUs = 1
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	d := &Domain{r: r, spec: spec, dir: dir, accel: spec.Accel}
	if d.accel == "" || d.accel == "auto" {
		d.accel = qemu.DetectAccel(ctx, spec.Boot)
	}
	x, err := DomainXML(spec, d.accel, d.ConsolePath())
	if err != nil {
		return nil, err
	}
	c, err := r.client(ctx)
	if err != nil {
		return nil, err
	}
	var dom golibvirt.Domain
	if old, err := c.DomainLookupByName(spec.Name); err == nil {
		// Only an imported domain's own definition may be there (shut
		// off): it is redefined as ferry runs it and started.
		state, _, err := c.DomainGetState(old, 0)
		if err != nil {
			return nil, fmt.Errorf("libvirt: state of %s: %w", spec.Name, err)
		}
		switch st := golibvirt.DomainState(state); {
		case spec.Domain != "" && (st == golibvirt.DomainRunning || st == golibvirt.DomainPaused):
			// An imported domain already runs (imported live, or it
			// outlived an agent restart: libvirt's domains do): ferry
			// takes it as it is.
			r.log.Info("vm attached: its domain runs already", "vm", spec.Name)
			return d, nil
		case spec.Domain == "" || st != golibvirt.DomainShutoff:
			return nil, fmt.Errorf("%w: libvirt already has a domain named %q (%s)", qemu.ErrSpec, spec.Name, stateName(state))
		}
		os.Remove(d.ConsolePath()) // a new boot, a new console log
		if dom, err = c.DomainDefineXML(x); err != nil {
			return nil, fmt.Errorf("libvirt: redefine domain %s: %w", spec.Name, err)
		}
		if err := c.DomainSetAutostart(dom, 0); err != nil {
			return nil, fmt.Errorf("libvirt: autostart off for %s: %w", spec.Name, err)
		}
		if err := c.DomainCreate(dom); err != nil {
			return nil, fmt.Errorf("libvirt: start domain %s: %w", spec.Name, err)
		}
	} else {
		os.Remove(d.ConsolePath()) // a new boot, a new console log
		if dom, err = c.DomainCreateXML(x, golibvirt.DomainNone); err != nil {
			return nil, fmt.Errorf("libvirt: create domain %s: %w", spec.Name, err)
		}
	}
	if ctx.Err() != nil { // the caller gave up: leave nothing behind
		c.DomainDestroy(dom)
		return nil, fmt.Errorf("start domain %s: %w", spec.Name, ctx.Err())
	}
	r.log.Info("vm starting", "vm", spec.Name, "runtime", "libvirt", "accel", d.accel)
	return d, nil
}

// DomainXML is the domain definition of spec: its disks over NBD on the
// agent's socket (raw, no host cache: the agent's FLUSH is the barrier),
// the serial console to console, the guest agent channel if asked, and
// user-mode networking with the spec's forwards (libvirt's own <interface
// type='user'> has no port forwards without passt, so the NIC goes on
// QEMU's command line through libvirt's qemu namespace).
func DomainXML(spec qemu.Spec, accel, console string) (string, error) {
	if spec.Domain != "" {
		return importedXML(spec, accel, console)
	}
	typ := "qemu"
	if accel == "kvm" {
		typ = "kvm"
	}
	d := libvirtxml.Domain{
		Type:       typ,
		Name:       spec.Name,
		Memory:     &libvirtxml.DomainMemory{Value: uint(spec.MemoryMiB), Unit: "MiB"},
		VCPU:       &libvirtxml.DomainVCPU{Value: uint(max(spec.VCPUs, 1))},
		OS:         &libvirtxml.DomainOS{Type: &libvirtxml.DomainOSType{Type: "hvm", Arch: "x86_64", Machine: "q35"}},
		Features:   &libvirtxml.DomainFeatureList{ACPI: &libvirtxml.DomainFeature{}},
		OnPoweroff: "destroy", OnReboot: "destroy", OnCrash: "destroy",
		Devices: &libvirtxml.DomainDeviceList{
			Serials: []libvirtxml.DomainSerial{{Source: &libvirtxml.DomainChardevSource{File: &libvirtxml.DomainChardevSourceFile{Path: console}}}},
		},
	}
	if accel == "kvm" {
		d.CPU = &libvirtxml.DomainCPU{Mode: "host-passthrough"}
	}
	if spec.Boot.Kernel != "" {
		d.OS.Kernel, d.OS.Initrd, d.OS.Cmdline = spec.Boot.Kernel, spec.Boot.Initrd, spec.Boot.Append
	}
	if spec.Firmware == "uefi" {
		d.OS.Firmware = "efi" // libvirt picks OVMF from its firmware descriptors
		if spec.EFIVars != nil {
			d.OS.NVRam = efiVars(*spec.EFIVars) // replicated; else libvirt keeps one per domain
		}
	}
	for i, k := range spec.Disks {
		disk := libvirtxml.DomainDisk{
			Device: "disk",
			Driver: &libvirtxml.DomainDiskDriver{Name: "qemu", Type: "raw", Cache: "none", IO: "threads"},
			Source: &libvirtxml.DomainDiskSource{Network: &libvirtxml.DomainDiskSourceNetwork{
				Protocol: "nbd", Name: k.Export,
				Hosts: []libvirtxml.DomainDiskSourceHost{{Transport: "unix", Socket: k.Socket}},
			}},
			Target: &libvirtxml.DomainDiskTarget{Dev: diskTarget(i), Bus: "virtio"},
		}
		if i == 0 && spec.Boot.Kernel == "" {
			disk.Boot = &libvirtxml.DomainDeviceBoot{Order: 1}
		}
		d.Devices.Disks = append(d.Devices.Disks, disk)
	}
	if spec.QGA {
		d.Devices.Channels = append(d.Devices.Channels, libvirtxml.DomainChannel{
			Source: &libvirtxml.DomainChardevSource{UNIX: &libvirtxml.DomainChardevSourceUNIX{Mode: "bind"}},
			Target: &libvirtxml.DomainChannelTarget{VirtIO: &libvirtxml.DomainChannelTargetVirtIO{Name: "org.qemu.guest_agent.0"}},
		})
	}
	var cmd []libvirtxml.DomainQEMUCommandlineArg
	for i, n := range spec.Interfaces() {
		switch {
		case n.Attach != "":
			x, err := attachedNIC(n.Attach, libvirtxml.DomainInterface{Model: &libvirtxml.DomainInterfaceModel{Type: "virtio"}})
			if err != nil {
				return "", err
			}
			d.Devices.Interfaces = append(d.Devices.Interfaces, x)
		case n.Net == qemu.NetUser || n.Net == qemu.NetIsolated:
			cmd = append(cmd, userNet(n, i, "", nil)...)
		}
	}
	if len(cmd) > 0 {
		d.QEMUCommandline = &libvirtxml.DomainQEMUCommandline{Args: cmd}
	}
	return d.Marshal()
}

// diskTarget names the i-th virtio disk: vda..vdz, vdaa...
func diskTarget(i int) string {
	s := ""
	for i++; i > 0; i = (i - 1) / 26 {
		s = string(rune('a'+(i-1)%26)) + s
	}
	return "vd" + s
}

// ConsolePath is the file the serial console is written to.
func (d *Domain) ConsolePath() string { return filepath.Join(d.dir, "console.log") }

// lookup returns the domain, or ok=false once it is gone or shut off
// (transient domains go when they stop; an imported one stays defined).
func (d *Domain) lookup(ctx context.Context) (*golibvirt.Libvirt, golibvirt.Domain, bool, error) {
	c, err := d.r.client(ctx)
	if err != nil {
		return nil, golibvirt.Domain{}, false, err
	}
	dom, err := c.DomainLookupByName(d.spec.Name)
	if golibvirt.IsNotFound(err) {
		return c, dom, false, nil
	}
	if err != nil {
		return nil, dom, false, fmt.Errorf("libvirt: look up domain %s: %w", d.spec.Name, err)
	}
	state, _, err := c.DomainGetState(dom, 0)
	if golibvirt.IsNotFound(err) {
		return c, dom, false, nil
	}
	if err != nil {
		return nil, dom, false, fmt.Errorf("libvirt: state of domain %s: %w", d.spec.Name, err)
	}
	if golibvirt.DomainState(state) == golibvirt.DomainShutoff {
		return c, dom, false, nil
	}
	return c, dom, true, nil
}

func stateName(s int32) string {
	switch golibvirt.DomainState(s) {
	case golibvirt.DomainRunning:
		return "running"
	case golibvirt.DomainPaused:
		return "paused"
	case golibvirt.DomainShutoff:
		return "shut off"
	case golibvirt.DomainCrashed:
		return "crashed"
	}
	return fmt.Sprintf("state %d", s)
}

// Status reports the domain's state; a domain libvirt no longer has is
// stopped (transient domains go when they stop).
func (d *Domain) Status(ctx context.Context) api.VMStatus {
	st := api.VMStatus{Name: d.spec.Name, State: api.VMStopped, Accel: d.accel, Console: d.ConsolePath()}
	c, dom, ok, err := d.lookup(ctx)
	if err != nil {
		st.State, st.Reason = api.VMRunning, err.Error() // unknown: the daemon is away, the VM likely runs
		return st
	}
	if !ok {
		return st
	}
	state, _, err := c.DomainGetState(dom, 0)
	if err != nil {
		st.State, st.Reason = api.VMRunning, err.Error()
		return st
	}
	switch golibvirt.DomainState(state) {
	case golibvirt.DomainPaused, golibvirt.DomainPmsuspended:
		st.State = api.VMPaused
	case golibvirt.DomainShutoff, golibvirt.DomainShutdown:
		st.State = api.VMStopped
	case golibvirt.DomainCrashed:
		st.State = api.VMCrashed
	default:
		st.State = api.VMRunning
	}
	return st
}

// waitGone polls until the domain is gone, up to d.
func (d *Domain) waitGone(ctx context.Context, limit time.Duration) bool {
	deadline := time.Now().Add(limit)
	for {
		_, _, ok, err := d.lookup(ctx)
		if err == nil && !ok {
			return true
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return false
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Shutdown stops the domain gracefully: the guest agent's shutdown if the
// domain has the channel, then the ACPI button (pressed again now and
// then: a guest still booting misses it), then destroy after grace.
func (d *Domain) Shutdown(ctx context.Context, grace time.Duration, report func(step string)) error {
	if report == nil {
		report = func(string) {}
	}
	c, dom, ok, err := d.lookup(ctx)
	if err != nil {
		return err
	}
	if !ok {
		return nil
	}
	start := time.Now()
	if d.spec.QGA {
		if err := c.DomainShutdownFlags(dom, golibvirt.DomainShutdownGuestAgent); err == nil {
			report("guest agent: shutdown accepted")
			if d.waitGone(ctx, grace/2) {
				report("guest powered off")
				return nil
			}
			report(fmt.Sprintf("no power-off %v after the guest agent's shutdown: the ACPI button", grace/2))
		} else {
			report("guest agent: no answer (" + err.Error() + "): the ACPI button")
		}
	}
	for {
		left := grace - time.Since(start)
		if left <= 0 || ctx.Err() != nil {
			break
		}
		report("ACPI power button: asking the guest to power off")
		if err := c.DomainShutdownFlags(dom, golibvirt.DomainShutdownAcpiPowerBtn); err != nil && !golibvirt.IsNotFound(err) {
			report("ACPI power button failed: " + err.Error())
		}
		if d.waitGone(ctx, min(left, 3*time.Second)) {
			report("guest powered off")
			return nil
		}
	}
	report(fmt.Sprintf("no power-off within %v: destroy", grace))
	d.Quit(func(string) {})
	report("domain destroyed")
	return nil
}

// Quit destroys the domain at once (the guest is not asked).
func (d *Domain) Quit(report func(step string)) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, dom, ok, err := d.lookup(ctx)
	if err != nil || !ok {
		return
	}
	if err := c.DomainDestroy(dom); err != nil && !golibvirt.IsNotFound(err) {
		report("destroy failed: " + err.Error())
		return
	}
	d.waitGone(ctx, 5*time.Second)
	report("domain destroyed")
}

// PingGuest asks the guest agent whether it answers.
func (d *Domain) PingGuest(ctx context.Context) error {
	if !d.spec.QGA {
		return qemu.ErrNoGuestAgent
	}
	c, dom, ok, err := d.lookup(ctx)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("domain %s is not running", d.spec.Name)
	}
	_, err = c.QEMUDomainAgentCommand(dom, `{"execute":"guest-ping"}`, agentTimeout(ctx), 0)
	return err
}

// Freeze freezes the guest's file systems (libvirt's fsfreeze, through
// the guest agent).
func (d *Domain) Freeze(ctx context.Context) (int, error) {
	return d.fs(ctx, true)
}

// Thaw thaws them.
func (d *Domain) Thaw(ctx context.Context) (int, error) {
	return d.fs(ctx, false)
}

func (d *Domain) fs(ctx context.Context, freeze bool) (int, error) {
	if !d.spec.QGA {
		return 0, qemu.ErrNoGuestAgent
	}
	c, dom, ok, err := d.lookup(ctx)
	if err != nil {
		return 0, err
	}
	if !ok {
		return 0, fmt.Errorf("domain %s is not running", d.spec.Name)
	}
	var n int32
	if freeze {
		n, err = c.DomainFsfreeze(dom, nil, 0)
	} else {
		n, err = c.DomainFsthaw(dom, nil, 0)
	}
	return int(n), err
}

// agentTimeout is the guest agent command's timeout in seconds, from ctx.
func agentTimeout(ctx context.Context) int32 {
	if dl, ok := ctx.Deadline(); ok {
		return int32(max(time.Until(dl)/time.Second, 1))
	}
	return 5
}
