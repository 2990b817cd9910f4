package qemu

import (
	"encoding/json"
	"net/netip"
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
