package libvirt

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/qemu"
)

// ErrRunning: the domain runs, and what was asked needs it shut off (an
// api.ErrConflict).
var ErrRunning = fmt.Errorf("%w: the domain is running", api.ErrConflict)

// ErrUnsupported: a domain ferry cannot import as it is (an
// api.ErrInvalid).
var ErrUnsupported = fmt.Errorf("%w: domain not supported", api.ErrInvalid)

// Describe reads a defined domain: its persistent definition, vCPUs,
// memory, guest agent channel and disks (file or block device, with
// their format), and whether it runs now. It changes nothing.
func (r *Runtime) Describe(ctx context.Context, name string) (api.ImportResult, bool, error) {
	c, err := r.client(ctx)
	if err != nil {
		return api.ImportResult{}, false, err
	}
	dom, err := c.DomainLookupByName(name)
	if golibvirt.IsNotFound(err) {
		return api.ImportResult{}, false, fmt.Errorf("%w: libvirt has no domain %q", api.ErrNotFound, name)
	}
	if err != nil {
		return api.ImportResult{}, false, fmt.Errorf("libvirt: domain %q: %w", name, err)
	}
	x, err := c.DomainGetXMLDesc(dom, golibvirt.DomainXMLInactive)
	if err != nil {
		return api.ImportResult{}, false, fmt.Errorf("libvirt: definition of %q: %w", name, err)
	}
	state, _, err := c.DomainGetState(dom, 0)
	if err != nil {
		return api.ImportResult{}, false, fmt.Errorf("libvirt: state of %q: %w", name, err)
	}
	res, err := describeXML(x)
	if err != nil {
		return api.ImportResult{}, false, err
	}
	// A UEFI domain's NVRAM, once libvirt made it (at its first start),
	// is imported as the group's disk api.EFIVarsDisk.
	if p := nvramPath(x); p != "" {
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() {
			res.Disks = append(res.Disks, api.ImportedDisk{Name: api.EFIVarsDisk, Source: p, Format: "raw"})
		}
	}
	return res, golibvirt.DomainState(state) != golibvirt.DomainShutoff, nil
}

// Domains names the domains libvirt has defined or running, sorted.
func (r *Runtime) Domains(ctx context.Context) ([]string, error) {
	c, err := r.client(ctx)
	if err != nil {
		return nil, err
	}
	doms, _, err := c.ConnectListAllDomains(1, golibvirt.ConnectListDomainsActive|golibvirt.ConnectListDomainsInactive)
	if err != nil {
		return nil, fmt.Errorf("libvirt: list domains: %w", err)
	}
	names := make([]string, 0, len(doms))
	for _, d := range doms {
		names = append(names, d.Name)
	}
	slices.Sort(names)
	return names, nil
}

// NVRAMDir is where libvirt keeps the variable stores of UEFI domains
// whose definition names none (firmware='efi' chosen at start).
var NVRAMDir = "/var/lib/libvirt/qemu/nvram"

// nvramPath is the file of a UEFI domain's variable store, or "".
func nvramPath(x string) string {
	var d libvirtxml.Domain
	if d.Unmarshal(x) != nil || d.OS == nil {
		return ""
	}
	if d.OS.NVRam == nil {
		if d.OS.Firmware == "efi" {
			return filepath.Join(NVRAMDir, d.Name+"_VARS.fd")
		}
		return ""
	}
	if s := d.OS.NVRam.Source; s != nil {
		if s.File != nil {
			return s.File.File
		}
		return ""
	}
	return d.OS.NVRam.NVRam
}

// describeXML reads what an import needs from a domain definition.
func describeXML(x string) (api.ImportResult, error) {
	var d libvirtxml.Domain
	if err := d.Unmarshal(x); err != nil {
		return api.ImportResult{}, fmt.Errorf("%w: definition does not parse: %v", ErrUnsupported, err)
	}
	res := api.ImportResult{Domain: d.Name, Original: x, Firmware: "bios"}
	if d.OS != nil && (d.OS.Firmware == "efi" || d.OS.Loader != nil) {
		res.Firmware = "uefi"
	}
	if d.VCPU != nil {
		res.VCPUs = int(d.VCPU.Value)
	}
	if d.Memory != nil {
		res.MemoryMiB = int(memoryBytes(d.Memory.Value, d.Memory.Unit) >> 20)
	}
	if d.Devices == nil {
		return res, fmt.Errorf("%w: %s has no devices", ErrUnsupported, d.Name)
	}
	for _, ch := range d.Devices.Channels {
		if ch.Target != nil && ch.Target.VirtIO != nil && ch.Target.VirtIO.Name == "org.qemu.guest_agent.0" {
			res.QGA = true
		}
	}
	for _, k := range d.Devices.Disks {
		if k.Device != "" && k.Device != "disk" {
			continue // cdroms and floppies: their media are not the VM's data
		}
		if k.Target == nil || k.Source == nil {
			return res, fmt.Errorf("%w: a disk of %s without a target or source", ErrUnsupported, d.Name)
		}
		disk := api.ImportedDisk{Name: k.Target.Dev, Format: "raw"}
		if k.Driver != nil && k.Driver.Type != "" {
			disk.Format = k.Driver.Type
		}
		switch {
		case k.Source.File != nil:
			disk.Source = k.Source.File.File
		case k.Source.Block != nil:
			disk.Source = k.Source.Block.Dev
		default:
			return res, fmt.Errorf("%w: disk %s of %s is neither a file nor a block device", ErrUnsupported, k.Target.Dev, d.Name)
		}
		if api.CheckName(api.KindDisk, disk.Name) != nil {
			return res, fmt.Errorf("%w: disk target %q of %s is not a valid disk name", ErrUnsupported, disk.Name, d.Name)
		}
		res.Disks = append(res.Disks, disk)
	}
	if len(res.Disks) == 0 {
		return res, fmt.Errorf("%w: %s has no disk", ErrUnsupported, d.Name)
	}
	// The NICs sanitize keeps, in its order.
	for _, n := range d.Devices.Interfaces {
		if n.Source == nil {
			continue
		}
		var nic api.ImportedNIC
		switch {
		case n.Source.Network != nil:
			nic.Attach = "network:" + n.Source.Network.Network
		case n.Source.Bridge != nil:
			nic.Attach = "bridge:" + n.Source.Bridge.Bridge
		case n.Source.User != nil:
		default:
			continue
		}
		if n.MAC != nil {
			nic.MAC = n.MAC.Address
		}
		res.NICs = append(res.NICs, nic)
	}
	return res, nil
}

func memoryBytes(v uint, unit string) int64 {
	n := int64(v)
	switch strings.ToLower(unit) {
	case "b", "bytes":
		return n
	case "k", "kib", "":
		return n << 10
	case "kb":
		return n * 1000
	case "m", "mib":
		return n << 20
	case "mb":
		return n * 1000 * 1000
	case "g", "gib":
		return n << 30
	case "gb":
		return n * 1000 * 1000 * 1000
	}
	return n << 10
}

// Redefine replaces a shut-off domain's definition with def and turns
// its autostart off: ferry starts it from now on (and a fenced site must
// never autostart it); a release gives the original back the same way.
// ErrRunning if it runs.
func (r *Runtime) Redefine(ctx context.Context, name, def string) error {
	c, err := r.client(ctx)
	if err != nil {
		return err
	}
	dom, err := c.DomainLookupByName(name)
	if err != nil {
		return fmt.Errorf("libvirt: domain %q: %w", name, err)
	}
	if state, _, err := c.DomainGetState(dom, 0); err != nil {
		return err
	} else if golibvirt.DomainState(state) != golibvirt.DomainShutoff {
		return fmt.Errorf("%w: %s; shut it down first", ErrRunning, name)
	}
	dom, err = c.DomainDefineXML(def)
	if err != nil {
		return fmt.Errorf("libvirt: redefine %s: %w", name, err)
	}
	if err := c.DomainSetAutostart(dom, 0); err != nil {
		return fmt.Errorf("libvirt: autostart off for %s: %w", name, err)
	}
	return nil
}

// Definition is the definition spec runs with on this host.
func (r *Runtime) Definition(ctx context.Context, spec qemu.Spec, console string) (string, error) {
	accel := spec.Accel
	if accel == "" || accel == "auto" {
		accel = qemu.DetectAccel(ctx, spec.Boot)
	}
	return DomainXML(spec, accel, console)
}

// importedXML is the definition an imported domain runs with: its own
// (firmware, CPU, NICs with their MACs, devices), renamed to spec.Name
// (a new identity for any other name: a drill runs beside production),
// with its disks in order on spec's exports (cdroms and floppies go:
// their media stay where the domain came from), the machine type kept
// but the accelerator this host has, its first serial port also logged
// to console, and on an isolated network (a drill) every NIC replaced by
// ferry's isolated one. Forwards, when the spec has some, replace the
// domain's user-mode NICs.
func importedXML(spec qemu.Spec, accel, console string) (string, error) {
	var d libvirtxml.Domain
	if err := d.Unmarshal(spec.Domain); err != nil {
		return "", fmt.Errorf("%w: the imported definition does not parse: %v", ErrUnsupported, err)
	}
	if d.Name != spec.Name {
		d.UUID = ""
	}
	d.Name = spec.Name
	d.Type = "qemu"
	if accel == "kvm" {
		d.Type = "kvm"
	} else if d.CPU != nil && (d.CPU.Mode == "host-passthrough" || d.CPU.Mode == "host-model") {
		d.CPU = nil // needs KVM
	}
	if d.Devices == nil {
		d.Devices = &libvirtxml.DomainDeviceList{}
	}
	var disks []libvirtxml.DomainDisk
	i := 0
	for _, k := range d.Devices.Disks {
		if k.Device != "" && k.Device != "disk" {
			continue
		}
		if i >= len(spec.Disks) {
			return "", fmt.Errorf("%w: the domain has more disks than the VM's %d", qemu.ErrSpec, len(spec.Disks))
		}
		k.Source = &libvirtxml.DomainDiskSource{Network: &libvirtxml.DomainDiskSourceNetwork{
			Protocol: "nbd", Name: spec.Disks[i].Export,
			Hosts: []libvirtxml.DomainDiskSourceHost{{Transport: "unix", Socket: spec.Disks[i].Socket}},
		}}
		k.Driver = &libvirtxml.DomainDiskDriver{Name: "qemu", Type: "raw", Cache: "none", IO: "threads"}
		k.BackingStore = nil
		disks = append(disks, k)
		i++
	}
	if i != len(spec.Disks) {
		return "", fmt.Errorf("%w: the domain has %d disks, the VM %d", qemu.ErrSpec, i, len(spec.Disks))
	}
	sanitize(&d, console)
	d.Devices.Disks = disks
	if spec.EFIVars != nil {
		if d.OS == nil {
			d.OS = &libvirtxml.DomainOS{}
		}
		d.OS.Firmware = "efi"
		d.OS.NVRam = efiVars(*spec.EFIVars)
	}
	// NIC i of the VM is the domain's i-th kept NIC (describeXML lists
	// them in this order); domain NICs beyond the VM's are left out.
	// A spec that says nothing of NICs keeps the domain's as they are.
	nics := spec.Interfaces()
	if len(nics) == 0 {
		return d.Marshal()
	}
	dom := d.Devices.Interfaces
	d.Devices.Interfaces = nil
	var cmd []libvirtxml.DomainQEMUCommandlineArg
	for i, n := range nics {
		orig, has := libvirtxml.DomainInterface{Model: &libvirtxml.DomainInterfaceModel{Type: "virtio"}}, i < len(dom)
		if has {
			orig = dom[i]
		}
		var mac string
		if orig.MAC != nil {
			mac = orig.MAC.Address
		}
		switch {
		case n.Attach != "":
			// The site's libvirt network or bridge, MAC and slot kept.
			x, err := attachedNIC(n.Attach, orig)
			if err != nil {
				return "", err
			}
			d.Devices.Interfaces = append(d.Devices.Interfaces, x)
		case n.Net == qemu.NetIsolated, n.Net == qemu.NetUser && (len(n.Forwards) > 0 || !has):
			// A drill's isolated network, or the forwards reaching it:
			// ferry's user-mode NIC with the domain's MAC.
			cmd = append(cmd, userNet(n, i, mac, orig.Address)...)
		case n.Net == qemu.NetUser:
			d.Devices.Interfaces = append(d.Devices.Interfaces, orig) // as the domain has it
		}
	}
	if len(cmd) > 0 {
		d.QEMUCommandline = &libvirtxml.DomainQEMUCommandline{Args: cmd}
	}
	return d.Marshal()
}

// efiVars is the firmware's variable store on an NBD export.
func efiVars(k qemu.Disk) *libvirtxml.DomainNVRam {
	return &libvirtxml.DomainNVRam{Source: &libvirtxml.DomainDiskSource{Network: &libvirtxml.DomainDiskSourceNetwork{
		Protocol: "nbd", Name: k.Export,
		Hosts: []libvirtxml.DomainDiskSourceHost{{Transport: "unix", Socket: k.Socket}},
	}}}
}

// attachedNIC is nic (its MAC and model kept) on a libvirt network or
// host bridge: "network:NAME" or "bridge:NAME" (api.CheckAttachment).
func attachedNIC(attach string, nic libvirtxml.DomainInterface) (libvirtxml.DomainInterface, error) {
	if err := api.CheckAttachment(attach); err != nil {
		return nic, fmt.Errorf("%w: %v", qemu.ErrSpec, err)
	}
	kind, name, _ := strings.Cut(attach, ":")
	out := libvirtxml.DomainInterface{MAC: nic.MAC, Model: nic.Model, Address: nic.Address, Source: &libvirtxml.DomainInterfaceSource{}}
	if kind == "network" {
		out.Source.Network = &libvirtxml.DomainInterfaceSourceNetwork{Network: name}
	} else {
		out.Source.Bridge = &libvirtxml.DomainInterfaceSourceBridge{Bridge: name}
	}
	return out, nil
}

// sanitize keeps of an imported definition only what cannot reach
// beyond the VM on the host that runs it. The definition comes from
// another site's libvirt and runs here with libvirt's privileges, so
// whatever names a host resource or a program is dropped: the emulator
// path, QEMU command line passthrough, host directories, devices and
// sockets, file-backed character devices, NVRAM and loader paths (UEFI
// is asked of libvirt by name, which keeps NVRAM in its own place),
// security labels, and NICs other than on a network, bridge or user
// mode (an "ethernet" NIC runs a script). Kept: CPU, memory, features,
// clock, controllers, NICs (MAC and model), the guest agent channel
// (its socket placed by libvirt), a memory balloon, watchdogs, panic
// notifiers; the serial console is a pty logged to console.
func sanitize(d *libvirtxml.Domain, console string) {
	d.QEMUCommandline, d.QEMUCapabilities, d.QEMUOverride, d.QEMUDeprecation = nil, nil, nil, nil
	d.SecLabel = nil
	if d.OS != nil {
		efi := d.OS.Firmware == "efi" || d.OS.Loader != nil
		d.OS.Loader, d.OS.NVRam, d.OS.VarStore, d.OS.FirmwareInfo = nil, nil, nil, nil
		d.OS.Firmware = ""
		if efi {
			d.OS.Firmware = "efi"
		}
		d.OS.DTB, d.OS.ACPI = "", nil
	}
	old := d.Devices
	keep := &libvirtxml.DomainDeviceList{Controllers: old.Controllers, MemBalloon: old.MemBalloon, Watchdogs: old.Watchdogs, Panics: old.Panics}
	for _, n := range old.Interfaces {
		if n.Source == nil || (n.Source.Network == nil && n.Source.Bridge == nil && n.Source.User == nil) {
			continue
		}
		src := &libvirtxml.DomainInterfaceSource{}
		switch {
		case n.Source.Network != nil:
			src.Network = &libvirtxml.DomainInterfaceSourceNetwork{Network: n.Source.Network.Network, PortGroup: n.Source.Network.PortGroup}
		case n.Source.Bridge != nil:
			src.Bridge = &libvirtxml.DomainInterfaceSourceBridge{Bridge: n.Source.Bridge.Bridge}
		default:
			src.User = &libvirtxml.DomainInterfaceSourceUser{}
		}
		keep.Interfaces = append(keep.Interfaces, libvirtxml.DomainInterface{MAC: n.MAC, Model: n.Model, Address: n.Address, Source: src})
	}
	for _, ch := range old.Channels {
		if ch.Target != nil && ch.Target.VirtIO != nil && ch.Target.VirtIO.Name == "org.qemu.guest_agent.0" {
			keep.Channels = []libvirtxml.DomainChannel{{
				Source: &libvirtxml.DomainChardevSource{UNIX: &libvirtxml.DomainChardevSourceUNIX{Mode: "bind"}},
				Target: &libvirtxml.DomainChannelTarget{VirtIO: &libvirtxml.DomainChannelTargetVirtIO{Name: "org.qemu.guest_agent.0"}},
			}}
		}
	}
	keep.Serials = []libvirtxml.DomainSerial{{
		Source: &libvirtxml.DomainChardevSource{Pty: &libvirtxml.DomainChardevSourcePty{}},
		Log:    &libvirtxml.DomainChardevLog{File: console, Append: "off"},
	}}
	d.Devices = keep
}

// userNet is the i-th NIC as QEMU's user-mode NIC with its forwards,
// through libvirt's qemu namespace (libvirt's <interface type='user'> has
// no port forwards without passt). Only typed values go into the option
// list.
func userNet(n qemu.NIC, i int, mac string, at *libvirtxml.DomainAddress) []libvirtxml.DomainQEMUCommandlineArg {
	nd := fmt.Sprintf("user,id=fnet%d", i)
	if n.Net == qemu.NetIsolated {
		nd += ",restrict=on"
	}
	if p, err := netip.ParsePrefix(n.Subnet); err == nil {
		nd += ",net=" + p.String()
	}
	for _, f := range n.Forwards {
		nd += fmt.Sprintf(",hostfwd=tcp:%s:%d-:%d", f.Host.Addr(), f.Host.Port(), f.GuestPort)
	}
	// The slot of the NIC it replaces, so that the guest finds its NICs
	// in the same order and under the same names (its controller, a root
	// port, stays, and libvirt names its bus pci.N); else a fixed slot far
	// above the ones libvirt hands out (from 1 up).
	dev := struct {
		Driver string `json:"driver"`
		Netdev string `json:"netdev"`
		Bus    string `json:"bus"`
		Addr   string `json:"addr"`
		MAC    string `json:"mac,omitempty"`
	}{Driver: "virtio-net-pci", Netdev: fmt.Sprintf("fnet%d", i), Bus: "pcie.0", Addr: fmt.Sprintf("%#x", 0x10+i)}
	if p := pciAddress(at); p != nil {
		if *p.Bus != 0 {
			dev.Bus = fmt.Sprintf("pci.%d", *p.Bus)
		}
		dev.Addr = fmt.Sprintf("%#x", *p.Slot)
	}
	if m, err := parseMAC(mac); err == nil {
		dev.MAC = m
	}
	// JSON, as libvirt gives its own devices: QEMU creates the devices
	// given as key=value options before all JSON ones, when the root
	// port's bus does not exist yet.
	js, _ := json.Marshal(dev)
	return []libvirtxml.DomainQEMUCommandlineArg{{Value: "-netdev"}, {Value: nd}, {Value: "-device"}, {Value: string(js)}}
}

// pciAddress is at's PCI address if it has a complete one on PCI
// domain 0, function 0 (what a NIC of libvirt's gets), else nil.
func pciAddress(at *libvirtxml.DomainAddress) *libvirtxml.DomainAddressPCI {
	if at == nil || at.PCI == nil {
		return nil
	}
	p := at.PCI
	if p.Bus == nil || p.Slot == nil || *p.Bus > 0xff || *p.Slot > 0x1f || (p.Domain != nil && *p.Domain != 0) || (p.Function != nil && *p.Function != 0) {
		return nil
	}
	return p
}

// parseMAC accepts only a MAC address (it goes into a QEMU option list).
func parseMAC(s string) (string, error) {
	parts := strings.Split(s, ":")
	if len(parts) != 6 {
		return "", fmt.Errorf("MAC %q", s)
	}
	for _, p := range parts {
		if len(p) != 2 || strings.Trim(strings.ToLower(p), "0123456789abcdef") != "" {
			return "", fmt.Errorf("MAC %q", s)
		}
	}
	return strings.ToLower(s), nil
}

// LiveCopy moves a running domain's disks (by target: vda) onto NBD
// exports (to[i] for targets[i]) without
// stopping it: a libvirt block copy per disk in write-blocking mode (the
// guest's writes go to both sides once copied, so the copy converges
// however fast it writes), then, once every copy is in step, a pivot of
// each: the guest carries on on the exports, and its own disks are no
// longer written. progress gets the bytes copied so far. On error every
// copy is cancelled and the domain keeps its own disks.
func (r *Runtime) LiveCopy(ctx context.Context, name string, targets []string, to []qemu.Disk, progress func(done int64)) error {
	if len(targets) != len(to) {
		return fmt.Errorf("%w: %d disks to copy onto %d exports", qemu.ErrSpec, len(targets), len(to))
	}
	type liveDisk struct{ Target, Socket, Export string }
	var disks []liveDisk
	for i, t := range targets {
		disks = append(disks, liveDisk{t, to[i].Socket, to[i].Export})
	}
	c, err := r.client(ctx)
	if err != nil {
		return err
	}
	dom, err := c.DomainLookupByName(name)
	if err != nil {
		return fmt.Errorf("libvirt: domain %q: %w", name, err)
	}
	var started []string
	cancel := func() {
		for _, t := range started {
			c.DomainBlockJobAbort(dom, t, 0)
		}
	}
	for _, k := range disks {
		dest := libvirtxml.DomainDisk{
			Driver: &libvirtxml.DomainDiskDriver{Name: "qemu", Type: "raw"},
			Source: &libvirtxml.DomainDiskSource{Network: &libvirtxml.DomainDiskSourceNetwork{
				Protocol: "nbd", Name: k.Export, Hosts: []libvirtxml.DomainDiskSourceHost{{Transport: "unix", Socket: k.Socket}},
			}},
		}
		x, err := dest.Marshal()
		if err != nil {
			cancel()
			return err
		}
		if err := c.DomainBlockCopy(dom, k.Target, x, nil,
			golibvirt.DomainBlockCopyReuseExt|golibvirt.DomainBlockCopyTransientJob|golibvirt.DomainBlockCopySynchronousWrites); err != nil {
			cancel()
			return fmt.Errorf("libvirt: block copy of %s %s: %w", name, k.Target, err)
		}
		started = append(started, k.Target)
	}
	// In step: every job has copied all it knows of, and stays there
	// (write-blocking). Then pivot, retrying a job that is not ready yet.
	for pivoted := 0; pivoted < len(disks); {
		var done int64
		ready := true
		for _, k := range disks {
			found, _, _, cur, end, err := c.DomainGetBlockJobInfo(dom, k.Target, 0)
			if err != nil || found == 0 {
				cancel()
				return fmt.Errorf("libvirt: block copy of %s %s ended (%v): the domain keeps its own disks", name, k.Target, err)
			}
			done += int64(min(cur, end))
			if end == 0 || cur != end {
				ready = false
			}
		}
		progress(done)
		if ready {
			for _, k := range disks[pivoted:] {
				if err := c.DomainBlockJobAbort(dom, k.Target, golibvirt.DomainBlockJobAbortPivot); err != nil {
					if pivoted == 0 {
						break // not ready after all: poll again
					}
					return fmt.Errorf("libvirt: pivot %s %s (%d disks of %d already on ferry): %w", name, k.Target, pivoted, len(disks), err)
				}
				pivoted++
			}
			if pivoted == len(disks) {
				break
			}
		}
		select {
		case <-ctx.Done():
			if pivoted == 0 {
				cancel()
			}
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	// The pivot's job ends asynchronously: wait until no job is left, so
	// that the live definition names the exports.
	deadline := time.Now().Add(30 * time.Second)
	for _, k := range disks {
		for {
			found, _, _, _, _, err := c.DomainGetBlockJobInfo(dom, k.Target, 0)
			if err == nil && found == 0 {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("libvirt: the pivot of %s %s did not finish", name, k.Target)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return nil
}

// DefinePersistent sets the definition a domain boots with next (it may
// run now) and turns its autostart off.
func (r *Runtime) DefinePersistent(ctx context.Context, def string) error {
	c, err := r.client(ctx)
	if err != nil {
		return err
	}
	dom, err := c.DomainDefineXML(def)
	if err != nil {
		return fmt.Errorf("libvirt: define: %w", err)
	}
	return c.DomainSetAutostart(dom, 0)
}
