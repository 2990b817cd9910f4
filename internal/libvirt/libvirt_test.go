package libvirt

import (
	"errors"
	"net/netip"
	"slices"
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
	for _, want := range []string{"restrict=on", "net=10.9.0.0/24", "hostfwd=tcp:127.0.0.1:8080-:80", `"driver":"virtio-net-pci","netdev":"fnet0"`} {
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

const operatorDomain = `<domain type='kvm'>
  <name>db</name>
  <uuid>6f1c2d3e-1111-4222-8333-944455566677</uuid>
  <memory unit='GiB'>2</memory>
  <vcpu>4</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader></os>
  <cpu mode='host-passthrough'/>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/var/lib/libvirt/images/db.qcow2'/>
      <backingStore type='file'><format type='qcow2'/><source file='/var/lib/libvirt/images/base.qcow2'/></backingStore>
      <target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><source file='/isos/install.iso'/><target dev='sda' bus='sata'/></disk>
    <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/vg0/db-data'/><target dev='vdb' bus='virtio'/></disk>
    <interface type='network'><mac address='52:54:00:AA:BB:01'/><source network='prod'/><model type='virtio'/></interface>
    <interface type='bridge'><mac address='52:54:00:aa:bb:02'/><source bridge='br-backup'/><model type='virtio'/></interface>
    <channel type='unix'><source mode='bind'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <serial type='pty'/>
  </devices>
</domain>`

// hostileDomain names host resources and programs every way libvirt
// offers: none of it may reach a recovery site.
const hostileDomain = `<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>evil</name>
  <memory unit='MiB'>256</memory>
  <os><type arch='x86_64' machine='q35'>hvm</type><loader readonly='yes' type='pflash'>/etc/shadow</loader><nvram>/etc/passwd</nvram></os>
  <seclabel type='none'/>
  <devices>
    <emulator>/bin/sh</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/x.img'/><target dev='vda' bus='virtio'/></disk>
    <filesystem type='mount'><source dir='/'/><target dir='root'/></filesystem>
    <hostdev mode='subsystem' type='pci'><source><address domain='0' bus='0' slot='2' function='0'/></source></hostdev>
    <interface type='ethernet'><mac address='52:54:00:00:00:09'/><script path='/tmp/evil.sh'/></interface>
    <interface type='bridge'><mac address='52:54:00:00:00:0a'/><source bridge='br0'/><script path='/tmp/evil.sh'/></interface>
    <serial type='file'><source path='/etc/crontab'/></serial>
    <channel type='unix'><source mode='connect' path='/run/docker.sock'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <channel type='unix'><source mode='connect' path='/run/libvirt/libvirt-sock'/><target type='virtio' name='x.y'/></channel>
  </devices>
  <qemu:commandline><qemu:arg value='-chardev'/><qemu:arg value='file,path=/etc/crontab,id=x'/></qemu:commandline>
</domain>`

func TestImportedDefinitionIsSanitized(t *testing.T) {
	spec := qemu.Spec{Name: "evil", MemoryMiB: 256, Domain: hostileDomain, Disks: []qemu.Disk{{Socket: "/run/ferry/nbd.sock", Export: "evil/vda"}}}
	x, err := DomainXML(spec, "tcg", "/var/lib/ferry/vms/evil/console.log")
	if err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"/etc/shadow", "/etc/passwd", "/bin/sh", "filesystem", "hostdev", "evil.sh", "ethernet", "/etc/crontab",
		"docker.sock", "libvirt-sock", "x.y", "seclabel", "commandline", "/x.img"} {
		if strings.Contains(x, bad) {
			t.Errorf("the definition to run still holds %q:\n%s", bad, x)
		}
	}
	var d libvirtxml.Domain
	if err := d.Unmarshal(x); err != nil {
		t.Fatal(err)
	}
	if d.OS.Firmware != "efi" || len(d.Devices.Interfaces) != 1 || d.Devices.Interfaces[0].Source.Bridge.Bridge != "br0" ||
		len(d.Devices.Channels) != 1 || d.Devices.Channels[0].Source.UNIX.Path != "" {
		t.Errorf("kept: firmware %q, NICs %+v, channels %+v", d.OS.Firmware, d.Devices.Interfaces, d.Devices.Channels)
	}
}

func TestDescribeXML(t *testing.T) {
	res, err := describeXML(operatorDomain)
	if err != nil {
		t.Fatal(err)
	}
	want := []api.ImportedDisk{
		{Name: "vda", Source: "/var/lib/libvirt/images/db.qcow2", Format: "qcow2"},
		{Name: "vdb", Source: "/dev/vg0/db-data", Format: "raw"},
	}
	if res.Domain != "db" || res.VCPUs != 4 || res.MemoryMiB != 2048 || !res.QGA || len(res.Disks) != 2 {
		t.Fatalf("describe: %+v", res)
	}
	for i, d := range want {
		if res.Disks[i] != d {
			t.Errorf("disk %d: %+v, want %+v", i, res.Disks[i], d)
		}
	}
	bad := []struct{ name, xml string }{
		{"not XML", "<domain"},
		{"no disk", "<domain type='kvm'><name>x</name><devices><serial type='pty'/></devices></domain>"},
		{"network disk", "<domain type='kvm'><name>x</name><devices><disk type='network' device='disk'><source protocol='rbd' name='p/x'/><target dev='vda'/></disk></devices></domain>"},
	}
	for _, tc := range bad {
		if _, err := describeXML(tc.xml); !errors.Is(err, ErrUnsupported) || !errors.Is(err, api.ErrInvalid) {
			t.Errorf("%s: err = %v, want ErrUnsupported (ErrInvalid)", tc.name, err)
		}
	}
}

func TestImportedXML(t *testing.T) {
	sock := "/run/ferry/nbd.sock"
	spec := qemu.Spec{Name: "db", MemoryMiB: 2048, Domain: operatorDomain,
		Disks: []qemu.Disk{{Socket: sock, Export: "db/vda"}, {Socket: sock, Export: "db/vdb"}}}
	parse := func(spec qemu.Spec, accel string) libvirtxml.Domain {
		t.Helper()
		d, _ := parseDomain(t, spec, accel)
		return d
	}
	// Production, on KVM: the operator's definition, disks on ferry.
	d := parse(spec, "kvm")
	if d.Name != "db" || d.UUID == "" || d.Type != "kvm" || d.CPU == nil || d.OS.Firmware != "efi" || d.OS.Loader != nil {
		t.Errorf("kept: name %q uuid %q type %q cpu %+v; UEFI asked by name: firmware %q loader %+v", d.Name, d.UUID, d.Type, d.CPU, d.OS.Firmware, d.OS.Loader)
	}
	if len(d.Devices.Disks) != 2 {
		t.Fatalf("%d disks, want 2 (the cdrom goes)", len(d.Devices.Disks))
	}
	for i, k := range d.Devices.Disks {
		if n := k.Source.Network; n == nil || n.Name != spec.Disks[i].Export || n.Hosts[0].Socket != sock || k.BackingStore != nil || k.Driver.Type != "raw" {
			t.Errorf("disk %d: source %+v backing %+v driver %+v", i, k.Source, k.BackingStore, k.Driver)
		}
		if k.Target.Dev != []string{"vda", "vdb"}[i] {
			t.Errorf("disk %d target %s", i, k.Target.Dev)
		}
	}
	if len(d.Devices.Interfaces) != 2 || d.QEMUCommandline != nil {
		t.Errorf("production keeps its NICs: %d, command line %+v", len(d.Devices.Interfaces), d.QEMUCommandline)
	}
	if s := d.Devices.Serials; len(s) != 1 || s[0].Log == nil || s[0].Log.File != "/c.log" || s[0].Source.Pty == nil {
		t.Errorf("serial: a pty, logged to the console file: %+v", s)
	}
	// A drill without KVM: another identity, no host CPU, isolated NIC
	// with the first MAC.
	drill := spec
	drill.Name, drill.Net = "db-drill", api.NetIsolated
	drill.Forwards = []api.Forward{{Host: netip.MustParseAddrPort("127.0.0.1:9000"), GuestPort: 80}}
	d = parse(drill, "tcg")
	if d.Name != "db-drill" || d.UUID != "" || d.Type != "qemu" || d.CPU != nil || len(d.Devices.Interfaces) != 0 {
		t.Errorf("drill: name %q uuid %q type %q cpu %+v NICs %d", d.Name, d.UUID, d.Type, d.CPU, len(d.Devices.Interfaces))
	}
	var line []string
	for _, a := range d.QEMUCommandline.Args {
		line = append(line, a.Value)
	}
	for _, want := range []string{"restrict=on", "hostfwd=tcp:127.0.0.1:9000-:80", `"mac":"52:54:00:aa:bb:01"`} {
		if !strings.Contains(strings.Join(line, " "), want) {
			t.Errorf("drill NIC %q lacks %q", line, want)
		}
	}
	// A VM with one disk less than its domain is refused.
	short := spec
	short.Disks = short.Disks[:1]
	if _, err := DomainXML(short, "kvm", "/c.log"); !errors.Is(err, qemu.ErrSpec) {
		t.Errorf("disk count mismatch: %v, want ErrSpec", err)
	}
}

func TestParseMAC(t *testing.T) {
	for in, ok := range map[string]bool{"52:54:00:AA:bb:01": true, "52:54:00:aa:bb": false, "52:54:00:aa:bb:0g": false, "52:54:00:aa:bb:01,x=1": false, "": false} {
		if _, err := parseMAC(in); (err == nil) != ok {
			t.Errorf("parseMAC(%q): %v, want ok %v", in, err, ok)
		}
	}
}

// FuzzDescribeXML: any definition gives a result or an error, never a
// panic; a result names only valid disks.
func FuzzDescribeXML(f *testing.F) {
	f.Add(operatorDomain)
	f.Add("<domain><devices><disk><target dev='../x'/><source file='/a'/></disk></devices></domain>")
	f.Fuzz(func(t *testing.T, x string) {
		res, err := describeXML(x)
		if err != nil {
			return
		}
		for _, d := range res.Disks {
			if api.CheckName(api.KindDisk, d.Name) != nil || d.Source == "" {
				t.Fatalf("invalid disk %+v accepted", d)
			}
		}
	})
}

// TestAttach: a VM on a network with a libvirt attachment gets its NICs
// on that libvirt network or bridge: an imported domain keeps its MACs
// and models, a VM ferry defines gets one virtio NIC; a bad attachment
// is refused.
func TestAttach(t *testing.T) {
	sock := "/run/ferry/nbd.sock"
	spec := qemu.Spec{Name: "db", MemoryMiB: 2048, Domain: operatorDomain,
		NICs:  []qemu.NIC{{Name: "nic0", Net: api.NetUser, Attach: "network:prod-west"}, {Name: "nic1", Net: api.NetUser, Attach: "network:prod-west"}},
		Disks: []qemu.Disk{{Socket: sock, Export: "db/vda"}, {Socket: sock, Export: "db/vdb"}}}
	parse := func(spec qemu.Spec) libvirtxml.Domain {
		t.Helper()
		d, _ := parseDomain(t, spec, "tcg")
		return d
	}
	d := parse(spec)
	if len(d.Devices.Interfaces) != 2 || d.QEMUCommandline != nil {
		t.Fatalf("imported: %d NICs, command line %+v; want both NICs on the network", len(d.Devices.Interfaces), d.QEMUCommandline)
	}
	for i, want := range []string{"52:54:00:AA:BB:01", "52:54:00:aa:bb:02"} {
		n := d.Devices.Interfaces[i]
		if n.Source.Network == nil || n.Source.Network.Network != "prod-west" || n.Source.Bridge != nil ||
			!strings.EqualFold(n.MAC.Address, want) || n.Model == nil || n.Model.Type != "virtio" {
			t.Errorf("NIC %d: %+v (source %+v), want on network prod-west with MAC %s", i, n, n.Source, want)
		}
	}
	own := qemu.Spec{Name: "web", MemoryMiB: 256, Net: api.NetUser, Attach: "bridge:br-prod",
		Forwards: []api.Forward{{Host: netip.MustParseAddrPort("127.0.0.1:9000"), GuestPort: 80}},
		Disks:    []qemu.Disk{{Socket: sock, Export: "web/vda"}}}
	d = parse(own)
	if len(d.Devices.Interfaces) != 1 || d.Devices.Interfaces[0].Source.Bridge == nil ||
		d.Devices.Interfaces[0].Source.Bridge.Bridge != "br-prod" || d.QEMUCommandline != nil {
		t.Fatalf("ferry's VM on a bridge: NICs %+v, command line %+v", d.Devices.Interfaces, d.QEMUCommandline)
	}
	for _, bad := range []string{"prod", "network:", "vlan:7", "bridge:br0'/><x", "network:" + strings.Repeat("n", 65)} {
		own.Attach = bad
		if _, err := DomainXML(own, "tcg", "/c.log"); !errors.Is(err, qemu.ErrSpec) {
			t.Errorf("attachment %q: %v, want ErrSpec", bad, err)
		}
		if err := own.Validate(); !errors.Is(err, qemu.ErrSpec) {
			t.Errorf("Validate with attachment %q: %v, want ErrSpec", bad, err)
		}
	}
}

// TestPerNICNetworks: an imported domain's i-th NIC is the VM's i-th,
// each on its own network, MAC and model kept; a drill puts every NIC on
// the isolated network with its own MAC and slot; and describeXML lists
// the NICs in the order importedXML maps them.
func TestPerNICNetworks(t *testing.T) {
	res, err := describeXML(operatorDomain)
	if err != nil {
		t.Fatal(err)
	}
	wantNICs := []api.ImportedNIC{{MAC: "52:54:00:AA:BB:01", Attach: "network:prod"}, {MAC: "52:54:00:aa:bb:02", Attach: "bridge:br-backup"}}
	if !slices.Equal(res.NICs, wantNICs) {
		t.Errorf("described NICs %+v, want %+v", res.NICs, wantNICs)
	}
	sock := "/run/ferry/nbd.sock"
	base := qemu.Spec{Name: "db", MemoryMiB: 2048, Domain: operatorDomain,
		Disks: []qemu.Disk{{Socket: sock, Export: "db/vda"}, {Socket: sock, Export: "db/vdb"}}}
	parse := func(spec qemu.Spec) (libvirtxml.Domain, string) {
		t.Helper()
		return parseDomain(t, spec, "tcg")
	}

	failover := base
	failover.NICs = []qemu.NIC{{Name: "nic0", Net: api.NetUser, Attach: "network:prod-west"}, {Name: "nic1", Net: api.NetUser, Attach: "bridge:br-backup-west"}}
	d, line := parse(failover)
	if len(d.Devices.Interfaces) != 2 || line != "" {
		t.Fatalf("failover: %d NICs, command line %q", len(d.Devices.Interfaces), line)
	}
	if n := d.Devices.Interfaces[0]; n.Source.Network == nil || n.Source.Network.Network != "prod-west" || !strings.EqualFold(n.MAC.Address, "52:54:00:aa:bb:01") {
		t.Errorf("nic0: source %+v MAC %+v", n.Source, n.MAC)
	}
	if n := d.Devices.Interfaces[1]; n.Source.Bridge == nil || n.Source.Bridge.Bridge != "br-backup-west" || n.MAC.Address != "52:54:00:aa:bb:02" {
		t.Errorf("nic1: source %+v MAC %+v", n.Source, n.MAC)
	}

	drill := base
	drill.Name = "db-drill"
	drill.NICs = []qemu.NIC{
		{Name: "nic0", Net: api.NetIsolated, Subnet: "10.9.0.0/24", Forwards: []api.Forward{{Host: netip.MustParseAddrPort("127.0.0.1:9000"), GuestPort: 80}}},
		{Name: "nic1", Net: api.NetIsolated, Subnet: "10.9.0.0/24"}}
	d, line = parse(drill)
	if len(d.Devices.Interfaces) != 0 {
		t.Errorf("drill keeps %d libvirt NICs, want none", len(d.Devices.Interfaces))
	}
	for _, want := range []string{
		`user,id=fnet0,restrict=on,net=10.9.0.0/24,hostfwd=tcp:127.0.0.1:9000-:80 -device {"driver":"virtio-net-pci","netdev":"fnet0","bus":"pcie.0","addr":"0x10","mac":"52:54:00:aa:bb:01"}`,
		`user,id=fnet1,restrict=on,net=10.9.0.0/24 -device {"driver":"virtio-net-pci","netdev":"fnet1","bus":"pcie.0","addr":"0x11","mac":"52:54:00:aa:bb:02"}`,
	} {
		if !strings.Contains(line, want) {
			t.Errorf("drill command line %q lacks %q", line, want)
		}
	}

	// A NIC with a PCI address (libvirt gives every NIC one) is replaced
	// in its slot: the guest sees its NICs in the same order.
	addressed := drill
	addressed.Domain = strings.Replace(operatorDomain, "<model type='virtio'/></interface>",
		"<model type='virtio'/><address type='pci' domain='0x0000' bus='0x03' slot='0x00' function='0x0'/></interface>", 1)
	if _, line = parse(addressed); !strings.Contains(line, `"netdev":"fnet0","bus":"pci.3","addr":"0x0","mac":"52:54:00:aa:bb:01"`) || !strings.Contains(line, `"netdev":"fnet1","bus":"pcie.0","addr":"0x11"`) {
		t.Errorf("drill of an addressed domain: %q, want nic0 in its slot (bus pci.3)", line)
	}

	// Forwards on the first NIC, the second as the domain has it.
	mixed := base
	mixed.NICs = []qemu.NIC{
		{Name: "nic0", Net: api.NetUser, Forwards: []api.Forward{{Host: netip.MustParseAddrPort("127.0.0.1:9000"), GuestPort: 80}}},
		{Name: "nic1", Net: api.NetUser}}
	d, line = parse(mixed)
	if len(d.Devices.Interfaces) != 1 || d.Devices.Interfaces[0].Source.Bridge == nil || d.Devices.Interfaces[0].Source.Bridge.Bridge != "br-backup" ||
		!strings.Contains(line, "fnet0") || strings.Contains(line, "fnet1") {
		t.Errorf("mixed: NICs %+v, command line %q", d.Devices.Interfaces, line)
	}

	// A VM ferry defines: NICs in order, a libvirt one and a user one.
	own := qemu.Spec{Name: "web", MemoryMiB: 256, Disks: []qemu.Disk{{Socket: sock, Export: "web/vda"}},
		NICs: []qemu.NIC{{Name: "nic0", Net: api.NetUser, Attach: "network:prod"}, {Name: "nic1", Net: api.NetIsolated}}}
	d, line = parse(own)
	if len(d.Devices.Interfaces) != 1 || d.Devices.Interfaces[0].Source.Network.Network != "prod" || !strings.Contains(line, "user,id=fnet1,restrict=on") {
		t.Errorf("own VM: NICs %+v, command line %q", d.Devices.Interfaces, line)
	}
}

// TestNVRAMPath: a UEFI domain's variable store is the file its
// definition names, or libvirt's default for firmware='efi'; a BIOS
// domain has none.
func TestNVRAMPath(t *testing.T) {
	for _, tc := range []struct{ name, os, want string }{
		{"bios", `<os><type>hvm</type></os>`, ""},
		{"auto", `<os firmware='efi'><type>hvm</type></os>`, NVRAMDir + "/auto_VARS.fd"},
		{"named", `<os><type>hvm</type><loader type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader><nvram>/srv/vars/named.fd</nvram></os>`, "/srv/vars/named.fd"},
		{"file", `<os><type>hvm</type><loader type='pflash'>/x.fd</loader><nvram type='file'><source file='/srv/f.fd'/></nvram></os>`, "/srv/f.fd"},
		{"network", `<os><type>hvm</type><loader type='pflash'>/x.fd</loader><nvram type='network'><source protocol='nbd' name='x'/></nvram></os>`, ""},
	} {
		x := "<domain type='kvm'><name>" + tc.name + "</name>" + tc.os + "<devices><disk type='file' device='disk'><source file='/a.img'/><target dev='vda'/></disk></devices></domain>"
		if got := nvramPath(x); got != tc.want {
			t.Errorf("%s: %q, want %q", tc.name, got, tc.want)
		}
		res, err := describeXML(x)
		if err != nil {
			t.Fatal(err)
		}
		if want := map[bool]string{true: "bios", false: "uefi"}[tc.name == "bios"]; res.Firmware != want {
			t.Errorf("%s: firmware %q, want %q", tc.name, res.Firmware, want)
		}
	}
}

// parseDomain is the definition spec runs with (DomainXML), parsed, and
// the QEMU command line it passes through, joined by spaces.
func parseDomain(t *testing.T, spec qemu.Spec, accel string) (libvirtxml.Domain, string) {
	t.Helper()
	x, err := DomainXML(spec, accel, "/c.log")
	if err != nil {
		t.Fatal(err)
	}
	var d libvirtxml.Domain
	if err := d.Unmarshal(x); err != nil {
		t.Fatal(err)
	}
	var line []string
	if d.QEMUCommandline != nil {
		for _, a := range d.QEMUCommandline.Args {
			line = append(line, a.Value)
		}
	}
	return d, strings.Join(line, " ")
}
