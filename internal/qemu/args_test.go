package qemu

import (
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
)

// TestForwardIsTyped: a forward's host is decoded as an address and a
// port, so an option smuggled into it never decodes (it once became
// "hostfwd=tcp:127.0.0.1:8080,guestfwd=...-cmd:touch /tmp/pwned").
func TestForwardIsTyped(t *testing.T) {
	for _, host := range []string{
		"127.0.0.1:8080,guestfwd=tcp:10.0.2.100:1234-cmd:touch /tmp/pwned,x=y",
		"127.0.0.1:8080,restrict=off",
		"127.0.0.1",
		"localhost:80",
	} {
		var s Spec
		err := json.Unmarshal([]byte(`{"name":"web","forwards":[{"host":`+quote(host)+`,"guest_port":80}]}`), &s)
		if err == nil {
			t.Errorf("forward host %q decoded: %+v", host, s.Forwards)
		}
	}
}

func quote(s string) string { b, _ := json.Marshal(s); return string(b) }

// TestArgsOnlyTypedValues: the option lists hold only validated names,
// parsed addresses and escaped paths.
func TestArgsOnlyTypedValues(t *testing.T) {
	s := Spec{Name: "web-drill", MemoryMiB: 64, Net: NetIsolated, Subnet: "10.99.0.0/24", QGA: true,
		Disks:    []Disk{{Socket: "/run/ferry,x=y/nbd.sock", Export: "view/v1"}},
		Forwards: []Forward{{Host: netip.MustParseAddrPort("127.0.0.1:8080"), GuestPort: 80}}}
	if err := s.Validate(); err != nil {
		t.Fatal(err)
	}
	v := &VM{Spec: s, dir: "/var/lib/ferry/vms/a,b", accel: "tcg"}
	args := v.args()
	i := slices.Index(args, "-netdev")
	if i < 0 {
		t.Fatalf("no -netdev in %q", args)
	}
	if got, want := args[i+1], "user,id=n0,restrict=on,net=10.99.0.0/24,hostfwd=tcp:127.0.0.1:8080-:80"; got != want {
		t.Errorf("netdev %q, want %q", got, want)
	}
	for _, a := range args {
		if strings.Contains(a, "x=y") && !strings.Contains(a, ",,x=y") {
			t.Errorf("a comma in a path was not escaped: %q", a)
		}
		if strings.Contains(a, "a,b") && !strings.Contains(a, "a,,b") {
			t.Errorf("a comma in a path was not escaped: %q", a)
		}
	}
	for _, bad := range []Spec{
		{Name: "web,x=y", MemoryMiB: 64, Disks: s.Disks},
		{Name: "web", MemoryMiB: 64, Disks: s.Disks, Forwards: []Forward{{GuestPort: 80}}},
		{Name: "web", MemoryMiB: 64, Disks: s.Disks, Forwards: []Forward{{Host: netip.MustParseAddrPort("[::1]:80"), GuestPort: 80}}},
		{Name: "web", MemoryMiB: 64, Disks: s.Disks, Forwards: []Forward{{Host: netip.MustParseAddrPort("127.0.0.1:80"), GuestPort: 70000}}},
		{Name: "web", MemoryMiB: 64, Disks: s.Disks, Subnet: "10.0.0.0/24,restrict=off"},
	} {
		if err := bad.Validate(); err == nil {
			t.Errorf("spec accepted: %+v", bad)
		}
	}
}

// TestSeveralNICs: each NIC is its own user-mode network in order, the
// forwards on the NIC that has them, a NIC on no network left out, and a
// bad NIC (name, subnet, forward, duplicate) refused before anything runs.
func TestSeveralNICs(t *testing.T) {
	disks := []Disk{{Socket: "/run/ferry/nbd.sock", Export: "db/vda"}}
	s := Spec{Name: "db", MemoryMiB: 64, Disks: disks, NICs: []NIC{
		{Name: "nic0", Net: NetUser, Subnet: "10.5.0.0/24", Forwards: []Forward{{Host: netip.MustParseAddrPort("127.0.0.1:8080"), GuestPort: 80}}},
		{Name: "nic1", Net: NetNone},
		{Name: "nic2", Net: NetIsolated, Subnet: "10.6.0.0/24"},
	}}
	if err := s.Validate(); err != nil {
		t.Fatal(err)
	}
	args := (&VM{Spec: s, dir: "/d", accel: "tcg"}).args()
	var netdevs, devices []string
	for i, a := range args {
		switch {
		case a == "-netdev":
			netdevs = append(netdevs, args[i+1])
		case strings.HasPrefix(a, "virtio-net-pci"):
			devices = append(devices, a)
		}
	}
	wantNet := []string{"user,id=n0,net=10.5.0.0/24,hostfwd=tcp:127.0.0.1:8080-:80", "user,id=n2,restrict=on,net=10.6.0.0/24"}
	wantDev := []string{"virtio-net-pci,netdev=n0", "virtio-net-pci,netdev=n2"}
	if !slices.Equal(netdevs, wantNet) || !slices.Equal(devices, wantDev) {
		t.Errorf("netdevs %q devices %q, want %q %q", netdevs, devices, wantNet, wantDev)
	}
	for name, nics := range map[string][]NIC{
		"bad name":     {{Name: "nic,0", Net: NetUser}},
		"duplicate":    {{Name: "nic0", Net: NetUser}, {Name: "nic0", Net: NetIsolated}},
		"bad subnet":   {{Name: "nic0", Net: NetUser}, {Name: "nic1", Net: NetUser, Subnet: "10.0.0.0/24,restrict=off"}},
		"bad forward":  {{Name: "nic0", Net: NetUser, Forwards: []Forward{{Host: netip.MustParseAddrPort("127.0.0.1:80"), GuestPort: 0}}}},
		"unknown mode": {{Name: "nic0", Net: "tap"}},
		"bad attach":   {{Name: "nic0", Net: NetUser, Attach: "direct:eth0"}},
		"more than 8":  slices.Repeat([]NIC{{Net: NetUser}}, 9),
	} {
		if name == "more than 8" {
			for i := range nics {
				nics[i].Name = "nic" + string(rune('0'+i))
			}
		}
		bad := Spec{Name: "db", MemoryMiB: 64, Disks: disks, NICs: nics}
		if err := bad.Validate(); !errors.Is(err, ErrSpec) {
			t.Errorf("%s: %v, want ErrSpec", name, err)
		}
	}
}

// TestEFIVarsExport: a UEFI VM's variables come from their export when it
// has one (replicated), else from a file of its own; a BIOS VM with a
// variable store is refused.
func TestEFIVarsExport(t *testing.T) {
	if _, err := os.Stat(OVMFCode); err != nil {
		t.Skipf("no OVMF: %v", err) // validation needs the firmware file
	}
	disks := []Disk{{Socket: "/run/ferry/nbd.sock", Export: "db/vda"}}
	s := Spec{Name: "db", MemoryMiB: 64, Disks: disks, Firmware: "uefi"}
	s.AddDisk("efivars", Disk{Socket: "/run/ferry/nbd.sock", Export: "db/efivars"})
	if err := s.Validate(); err != nil || len(s.Disks) != 1 {
		t.Fatalf("validate: %v, disks %+v", err, s.Disks)
	}
	args := strings.Join((&VM{Spec: s, dir: "/d", accel: "tcg"}).args(), " ")
	if !strings.Contains(args, "if=pflash,format=raw,unit=1,file=nbd+unix:///db/efivars?socket=/run/ferry/nbd.sock") {
		t.Errorf("args %q: the variables are not the export", args)
	}
	s.EFIVars = nil
	if args := strings.Join((&VM{Spec: s, dir: "/d", accel: "tcg"}).args(), " "); !strings.Contains(args, "unit=1,file=/d/OVMF_VARS.fd") {
		t.Errorf("args %q: without an export the variables are the VM's file", args)
	}
	bios := Spec{Name: "db", MemoryMiB: 64, Disks: disks, EFIVars: &Disk{Socket: "/s", Export: "db/efivars"}}
	if err := bios.Validate(); !errors.Is(err, ErrSpec) {
		t.Errorf("BIOS VM with a variable store: %v, want ErrSpec", err)
	}
}
