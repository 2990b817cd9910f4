package libvirt

import (
	"net/netip"
	"strings"
	"testing"

	"libvirt.org/go/libvirtxml"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/qemu"
)

func TestDiskTarget(t *testing.T) {
	tests := []struct {
		i    int
		want string
	}{{0, "vda"}, {1, "vdb"}, {25, "vdz"}, {26, "vdaa"}, {27, "vdab"}, {51, "vdaz"}, {52, "vdba"}}
	for _, tc := range tests {
		if got := diskTarget(tc.i); got != tc.want {
			t.Errorf("diskTarget(%d) = %q, want %q", tc.i, got, tc.want)
		}
	}
}

func TestDomainXML(t *testing.T) {
	spec := qemu.Spec{Name: "web", VCPUs: 2, MemoryMiB: 512, QGA: true, Net: api.NetIsolated, Subnet: "10.9.0.0/24",
		Disks:    []qemu.Disk{{Socket: "/run/ferry/nbd.sock", Export: "web/vda"}, {Socket: "/run/ferry/nbd.sock", Export: "web/vdb"}},
		Forwards: []api.Forward{{Host: netip.MustParseAddrPort("127.0.0.1:8080"), GuestPort: 80}}}
	x, err := DomainXML(spec, "tcg", "/var/lib/ferry/vms/web/console.log")
	if err != nil {
		t.Fatal(err)
	}
	var d libvirtxml.Domain
	if err := d.Unmarshal(x); err != nil {
		t.Fatalf("the XML does not parse back: %v\n%s", err, x)
	}
	if d.Type != "qemu" || d.Name != "web" || d.VCPU.Value != 2 || d.Memory.Value != 512 || d.Memory.Unit != "MiB" {
		t.Errorf("domain %s %q, %d vCPUs, %d %s", d.Type, d.Name, d.VCPU.Value, d.Memory.Value, d.Memory.Unit)
	}
	if d.OnReboot != "destroy" || d.OS.Kernel != "" {
		t.Errorf("on_reboot %q, kernel %q", d.OnReboot, d.OS.Kernel)
	}
	if len(d.Devices.Disks) != 2 {
		t.Fatalf("%d disks, want 2", len(d.Devices.Disks))
	}
	for i, k := range d.Devices.Disks {
		n := k.Source.Network
		if n == nil || n.Protocol != "nbd" || n.Name != spec.Disks[i].Export || len(n.Hosts) != 1 ||
			n.Hosts[0].Transport != "unix" || n.Hosts[0].Socket != spec.Disks[i].Socket {
			t.Errorf("disk %d source %+v, want NBD export %s on %s", i, n, spec.Disks[i].Export, spec.Disks[i].Socket)
		}
		if k.Target.Dev != diskTarget(i) || k.Driver.Type != "raw" || k.Driver.Cache != "none" {
			t.Errorf("disk %d: target %s, driver %+v", i, k.Target.Dev, k.Driver)
		}
		if (k.Boot != nil) != (i == 0) {
			t.Errorf("disk %d boot %+v: only the first disk boots without a kernel", i, k.Boot)
		}
	}
	if len(d.Devices.Channels) != 1 || d.Devices.Channels[0].Target.VirtIO.Name != "org.qemu.guest_agent.0" {
		t.Errorf("guest agent channel: %+v", d.Devices.Channels)
	}
	if len(d.Devices.Serials) != 1 || d.Devices.Serials[0].Source.File.Path != "/var/lib/ferry/vms/web/console.log" {
		t.Errorf("serial console: %+v", d.Devices.Serials)
	}
	var args []string
	for _, a := range d.QEMUCommandline.Args {
		args = append(args, a.Value)
	}
	line := strings.Join(args, " ")
	for _, want := range []string{"restrict=on", "net=10.9.0.0/24", "hostfwd=tcp:127.0.0.1:8080-:80", "virtio-net-pci,netdev=fnet0"} {
		if !strings.Contains(line, want) {
			t.Errorf("QEMU command line %q lacks %q", line, want)
		}
	}

	// Kernel boot, KVM, no network, no guest agent.
	spec.Boot = api.Boot{Kernel: "/boot/vmlinuz", Initrd: "/boot/initrd", Append: "console=ttyS0"}
	spec.Net, spec.QGA, spec.Forwards = api.NetNone, false, nil
	x, err = DomainXML(spec, "kvm", "/c.log")
	if err != nil {
		t.Fatal(err)
	}
	d = libvirtxml.Domain{}
	if err := d.Unmarshal(x); err != nil {
		t.Fatal(err)
	}
	if d.Type != "kvm" || d.CPU == nil || d.CPU.Mode != "host-passthrough" {
		t.Errorf("kvm domain: type %q cpu %+v", d.Type, d.CPU)
	}
	if d.OS.Kernel != "/boot/vmlinuz" || d.OS.Initrd != "/boot/initrd" || d.OS.Cmdline != "console=ttyS0" {
		t.Errorf("kernel boot: %+v", d.OS)
	}
	if d.Devices.Disks[0].Boot != nil || d.QEMUCommandline != nil || len(d.Devices.Channels) != 0 {
		t.Errorf("kernel boot, no net, no agent: disk boot %+v, command line %+v, channels %+v",
			d.Devices.Disks[0].Boot, d.QEMUCommandline, d.Devices.Channels)
	}
}
