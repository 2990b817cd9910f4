package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/disk"
	"github.com/ferry-dr/ferry/internal/guest"
	"github.com/ferry-dr/ferry/internal/nbd"
	"github.com/ferry-dr/ferry/internal/qga"
)

func TestSpecValidate(t *testing.T) {
	good := Spec{Name: "vm", MemoryMiB: 256, Disks: []Disk{{Socket: "/s", Export: "e"}}}
	tests := []struct {
		name string
		mod  func(*Spec)
	}{
		{"no disk", func(s *Spec) { s.Disks = nil }},
		{"zero memory", func(s *Spec) { s.MemoryMiB = 0 }},
		{"unknown boot mode", func(s *Spec) { s.Boot = Boot{Initrd: "/x"} }},
		{"kernel missing", func(s *Spec) { s.Boot = Boot{Kernel: "/nonexistent/vmlinuz"} }},
		{"bad net", func(s *Spec) { s.Net = "bridge" }},
		{"bad name", func(s *Spec) { s.Name = "a b" }},
		{"disk without export", func(s *Spec) { s.Disks = []Disk{{Socket: "/s"}} }},
		{"subnet not CIDR", func(s *Spec) { s.Subnet = "10.1.2.3" }},
		{"subnet IPv6", func(s *Spec) { s.Subnet = "fd00::/64" }},
		{"subnet too small", func(s *Spec) { s.Subnet = "10.1.2.0/30" }},
		{"subnet host bits", func(s *Spec) { s.Subnet = "10.1.2.3/24" }},
		{"unknown firmware", func(s *Spec) { s.Firmware = "coreboot" }},
	}
	if err := good.Validate(); err != nil {
		t.Fatalf("good spec: %v", err)
	}
	for _, tc := range tests {
		s := good
		tc.mod(&s)
		if err := s.Validate(); !errors.Is(err, ErrSpec) {
			t.Errorf("%s: %v, want ErrSpec", tc.name, err)
		}
		if _, err := Start(context.Background(), s, t.TempDir(), nil); !errors.Is(err, ErrSpec) {
			t.Errorf("%s: Start: %v, want ErrSpec before anything runs", tc.name, err)
		}
	}
}

// guestFiles returns the test guest (built by make guest).
func guestFiles(t *testing.T) (kernel, initrd string) {
	t.Helper()
	dir, _ := filepath.Abs("../../build/guest")
	kernel, initrd = filepath.Join(dir, "vmlinuz"), filepath.Join(dir, "initrd.img")
	for _, f := range []string{kernel, initrd} {
		if _, err := os.Stat(f); err != nil {
			t.Fatalf("test guest missing (%v): run 'make guest'", err)
		}
	}
	return kernel, initrd
}

// ext4Disk serves a group with one disk holding a fresh ext4 file system.
func ext4Disk(t *testing.T, size int64) (sock string, g *disk.Group) {
	t.Helper()
	dir := t.TempDir()
	fs := filepath.Join(dir, "fs.img")
	f, _ := os.Create(fs)
	f.Truncate(size)
	f.Close()
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", fs).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v %s", err, out)
	}
	g, err := disk.Open(disk.Config{Dir: filepath.Join(dir, "group")})
	if err != nil {
		t.Fatal(err)
	}
	d, _ := g.CreateDisk("vda", size)
	b, _ := os.ReadFile(fs)
	for off := 0; off < len(b); off += 1 << 20 {
		chunk := b[off:min(len(b), off+1<<20)]
		if !allZero(chunk) {
			d.WriteAt(context.Background(), chunk, int64(off))
		}
	}
	srv := nbd.New(nbd.Config{})
	srv.AddExport(nbd.Export{Name: "vda", Size: size, Device: d, MultiConn: true})
	sock = filepath.Join(dir, "nbd.sock")
	ln, err := nbd.ListenUnix(sock)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(context.Background(), ln)
	t.Cleanup(func() { srv.Close(); g.Close() })
	return sock, g
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

func freeAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func workloadState(addr string) (guest.WorkloadState, error) { return guest.FetchState(addr) }

func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestWorkloadVM boots the test guest with its ext4 data disk over ferry's
// NBD, lets the workload write, checks its HTTP state through the
// forwarded port, freezes and thaws through the guest agent, shuts down
// gracefully, and checks the file system and the records.
func TestWorkloadVM(t *testing.T) {
	kernel, initrd := guestFiles(t)
	sock, g := ext4Disk(t, 64<<20)
	web := freeAddr(t)
	start := time.Now()
	vm, err := Start(context.Background(), Spec{
		Name: "wl", MemoryMiB: 256, Disks: []Disk{{Socket: sock, Export: "vda"}},
		Boot: Boot{Kernel: kernel, Initrd: initrd, Append: "console=ttyS0 panic=-1 ferry.job=workload ferry.data=vda ferry.rate=100"},
		Net:  NetUser, Forwards: []Forward{{Host: netip.MustParseAddrPort(web), GuestPort: 80}}, QGA: true, Accel: "auto",
	}, t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Kill()
	var st guest.WorkloadState
	waitFor(t, 60*time.Second, "the workload's HTTP state", func() bool {
		st, err = workloadState(web)
		return err == nil && st.LastDurable > 10
	})
	t.Logf("boot to 10 durable records: %v (accel %s)", time.Since(start).Round(time.Millisecond), vm.Status(context.Background()).Accel)
	ctx := context.Background()
	if err := vm.QGA.Ping(ctx); err != nil {
		t.Fatalf("guest agent: %v", err)
	}
	n, err := vm.QGA.Freeze(ctx)
	if err != nil || n != 1 {
		t.Fatalf("freeze: %d %v", n, err)
	}
	frozenAt := time.Now()
	s1, _ := workloadState(web)
	time.Sleep(500 * time.Millisecond)
	s2, _ := workloadState(web)
	if fs, _ := vm.QGA.FreezeStatus(ctx); fs != "frozen" {
		t.Fatalf("status %q", fs)
	}
	if _, err := vm.QGA.Thaw(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("frozen for %v", time.Since(frozenAt).Round(time.Millisecond))
	if s2.LastDurable > s1.LastDurable+1 {
		t.Fatalf("records became durable while frozen: %d -> %d", s1.LastDurable, s2.LastDurable)
	}
	waitFor(t, 20*time.Second, "writes after thaw", func() bool {
		s3, err := workloadState(web)
		return err == nil && s3.LastDurable > s2.LastDurable+5
	})
	if got := vm.Status(ctx).State; got != StateRunning {
		t.Fatalf("state %s", got)
	}
	var steps []string
	if err := vm.Shutdown(ctx, 30*time.Second, func(s string) { steps = append(steps, s) }); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(steps) == "" || !strings.Contains(strings.Join(steps, ";"), "guest powered off") {
		t.Fatalf("graceful shutdown steps: %q\nconsole: %s", steps, vm.tail(vm.ConsolePath(), 10))
	}
	if got := vm.Status(ctx).State; got != StateStopped {
		t.Fatalf("state after shutdown %s", got)
	}
	g.Checkpoint(ctx)
	img := filepath.Join(filepath.Dir(sock), "group", "images", "vda.img")
	if out, err := exec.Command("e2fsck", "-fn", img).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn: %v\n%s", err, out)
	}
	checkRecords(t, img, st.LastDurable)
}

// checkRecords dumps records.log from an ext4 image with debugfs and
// verifies it holds at least min records, intact and in order.
func checkRecords(t *testing.T, img string, atLeast uint64) uint64 {
	t.Helper()
	out := filepath.Join(t.TempDir(), "records.log")
	if b, err := exec.Command("debugfs", "-R", "dump /records.log "+out, img).CombinedOutput(); err != nil {
		t.Fatalf("debugfs: %v %s", err, b)
	}
	log, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	n, err := guest.VerifyRecords(log)
	if err != nil {
		t.Fatal(err)
	}
	if n < atLeast {
		t.Fatalf("%d records in the image, %d were durable", n, atLeast)
	}
	return n
}

// TestNetworkModes boots the guest in user and isolated mode: in both the
// forwarded port reaches the workload; only in user mode can the guest
// reach a service on the host.
func TestNetworkModes(t *testing.T) {
	kernel, initrd := guestFiles(t)
	hostLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer hostLn.Close()
	go http.Serve(hostLn, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	_, port, _ := net.SplitHostPort(hostLn.Addr().String())
	for _, tc := range []struct {
		mode api.NetMode
		want string
	}{{NetUser, "probe reached"}, {NetIsolated, "probe blocked"}} {
		t.Run(string(tc.mode), func(t *testing.T) {
			sock, _ := ext4Disk(t, 32<<20)
			web := freeAddr(t)
			vm, err := Start(context.Background(), Spec{
				Name: "net", MemoryMiB: 256, Disks: []Disk{{Socket: sock, Export: "vda"}},
				Boot: Boot{Kernel: kernel, Initrd: initrd, Append: "console=ttyS0 panic=-1 ferry.job=workload ferry.data=vda ferry.qga=0 ferry.probe=10.0.2.2:" + port},
				Net:  tc.mode, Forwards: []Forward{{Host: netip.MustParseAddrPort(web), GuestPort: 80}}, Accel: "auto",
			}, t.TempDir(), nil)
			if err != nil {
				t.Fatal(err)
			}
			defer vm.Kill()
			waitFor(t, 60*time.Second, "the forwarded port", func() bool {
				st, err := workloadState(web)
				return err == nil && st.LastDurable > 0
			})
			waitFor(t, 30*time.Second, "the probe's verdict", func() bool {
				b, _ := os.ReadFile(vm.ConsolePath())
				return strings.Contains(string(b), "ferry-guest: probe")
			})
			if b, _ := os.ReadFile(vm.ConsolePath()); !strings.Contains(string(b), tc.want) {
				t.Fatalf("%s network: console does not say %q:\n%s", tc.mode, tc.want, vm.tail(vm.ConsolePath(), 5))
			}
		})
	}
}

// TestUEFIBoot boots the test guest under OVMF (UEFI) instead of SeaBIOS:
// the kernel reports EFI firmware, the workload runs, and the VM keeps its
// own UEFI variables file.
func TestUEFIBoot(t *testing.T) {
	kernel, initrd := guestFiles(t)
	sock, g := ext4Disk(t, 32<<20)
	// The variables on an export of the group (as the agent gives a UEFI
	// VM its disk api.EFIVarsDisk), starting from OVMF's template.
	tmpl, err := os.ReadFile(OVMFVars)
	if err != nil {
		t.Fatal(err)
	}
	ev, err := g.CreateDisk(api.EFIVarsDisk, int64(len(tmpl)))
	if err != nil {
		t.Fatal(err)
	}
	if err := ev.WriteAt(context.Background(), tmpl, 0); err != nil {
		t.Fatal(err)
	}
	srv := nbd.New(nbd.Config{})
	srv.AddExport(nbd.Export{Name: "efivars", Size: ev.Size(), Device: ev})
	varsSock := filepath.Join(t.TempDir(), "vars.sock")
	ln, err := nbd.ListenUnix(varsSock)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(context.Background(), ln)
	t.Cleanup(func() { srv.Close() })
	web := freeAddr(t)
	dir := t.TempDir()
	vm, err := Start(context.Background(), Spec{
		Name: "uefi", MemoryMiB: 256, Disks: []Disk{{Socket: sock, Export: "vda"}}, Firmware: "uefi", EFIVars: &Disk{Socket: varsSock, Export: "efivars"},
		Boot: Boot{Kernel: kernel, Initrd: initrd, Append: "console=ttyS0 panic=-1 ferry.job=workload ferry.data=vda ferry.qga=0"},
		Net:  NetUser, Forwards: []Forward{{Host: netip.MustParseAddrPort(web), GuestPort: 80}}, Accel: "auto",
	}, dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Kill()
	waitFor(t, 120*time.Second, "the workload under UEFI", func() bool {
		st, err := workloadState(web)
		return err == nil && st.LastDurable > 0
	})
	if b, _ := os.ReadFile(vm.ConsolePath()); !strings.Contains(string(b), "efi: EFI v") {
		t.Fatalf("the kernel does not report EFI firmware:\n%s", vm.tail(vm.ConsolePath(), 20))
	}
	got := make([]byte, len(tmpl))
	if err := ev.ReadAt(context.Background(), got, 0); err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(got, tmpl) {
		t.Fatal("the firmware did not write its variables to their export")
	}
	if _, err := os.Stat(filepath.Join(dir, "OVMF_VARS.fd")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a VM with a variable store export has a variables file too: %v", err)
	}
}

func TestCrashAndNoGuestAgent(t *testing.T) {
	kernel, initrd := guestFiles(t)
	sock, _ := ext4Disk(t, 32<<20)
	vm, err := Start(context.Background(), Spec{
		Name: "nq", MemoryMiB: 256, Disks: []Disk{{Socket: sock, Export: "vda"}},
		Boot: Boot{Kernel: kernel, Initrd: initrd, Append: "console=ttyS0 panic=-1 ferry.job=workload ferry.data=vda ferry.qga=0"},
		QGA:  true, Accel: "auto",
	}, t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Kill()
	waitFor(t, 60*time.Second, "the guest to boot", func() bool {
		b, _ := os.ReadFile(vm.ConsolePath())
		return strings.Contains(string(b), "workload started")
	})
	vm.QGA.Timeout = time.Second
	if err := vm.QGA.Ping(context.Background()); !errors.Is(err, qga.ErrNoAgent) {
		t.Fatalf("ping without a guest agent: %v, want ErrNoAgent", err)
	}
	// QEMU dies unexpectedly.
	vm.cmd.Process.Signal(os.Kill)
	<-vm.Done()
	st := vm.Status(context.Background())
	if st.State != StateCrashed || !strings.Contains(st.Reason, "without a guest power-off") {
		t.Fatalf("status after kill: %+v", st)
	}
}

// TestShutdownIgnoredACPI: a guest that ignores the ACPI power button
// (ferry.acpi=0) powers off through its guest agent at once; the ACPI
// path alone would cost the whole timeout before quit.
func TestShutdownIgnoredACPI(t *testing.T) {
	kernel, initrd := guestFiles(t)
	sock, g := ext4Disk(t, 32<<20)
	web := freeAddr(t)
	ctx := context.Background()
	start := func(qga bool) *VM {
		vm, err := Start(ctx, Spec{
			Name: "noacpi", MemoryMiB: 256, Disks: []Disk{{Socket: sock, Export: "vda"}},
			Boot: Boot{Kernel: kernel, Initrd: initrd, Append: "console=ttyS0 panic=-1 ferry.job=workload ferry.data=vda ferry.rate=50 ferry.acpi=0"},
			Net:  NetUser, Forwards: []Forward{{Host: netip.MustParseAddrPort(web), GuestPort: 80}}, QGA: qga, Accel: "auto",
		}, t.TempDir(), nil)
		if err != nil {
			t.Fatal(err)
		}
		waitFor(t, 90*time.Second, "the workload", func() bool {
			st, err := workloadState(web)
			return err == nil && st.LastDurable > 5
		})
		return vm
	}
	vm := start(true)
	defer vm.Kill()
	var steps []string
	began := time.Now()
	if err := vm.Shutdown(ctx, 40*time.Second, func(s string) { steps = append(steps, s) }); err != nil {
		t.Fatal(err)
	}
	took := time.Since(began)
	joined := strings.Join(steps, "; ")
	if !strings.Contains(joined, "guest-shutdown accepted") || !strings.Contains(joined, "guest powered off") || strings.Contains(joined, "quit") {
		t.Fatalf("steps: %s", joined)
	}
	if took > 20*time.Second {
		t.Fatalf("the guest agent's shutdown took %v", took)
	}
	t.Logf("guest without ACPI handling, through its agent: %v (%s)", took.Round(time.Millisecond), joined)
	// A clean shutdown, as qemu-guest-agent's: the file system needs no
	// journal replay.
	g.Checkpoint(ctx)
	img := filepath.Join(filepath.Dir(sock), "group", "images", "vda.img")
	if out, err := exec.Command("e2fsck", "-fn", img).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn after guest-shutdown: %v\n%s", err, out)
	}
	// Without a guest agent the same guest costs the timeout, then quit.
	vm2 := start(false)
	defer vm2.Kill()
	steps = nil
	began = time.Now()
	vm2.Shutdown(ctx, 5*time.Second, func(s string) { steps = append(steps, s) })
	if j := strings.Join(steps, "; "); !strings.Contains(j, "no power-off within 5s: quit") || time.Since(began) < 5*time.Second {
		t.Fatalf("without an agent: %s in %v", j, time.Since(began))
	}
}

// TestStartAbandoned: a caller that gives up while QEMU starts (a vault
// that died mid-request) leaves no QEMU behind holding the VM's ports.
func TestStartAbandoned(t *testing.T) {
	kernel, initrd := guestFiles(t)
	sock, _ := ext4Disk(t, 32<<20)
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := Start(ctx, Spec{
		Name: "gone", MemoryMiB: 128, Disks: []Disk{{Socket: sock, Export: "vda"}},
		Boot: Boot{Kernel: kernel, Initrd: initrd, Append: "console=ttyS0"}, Accel: "tcg",
	}, dir, nil)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("start with the caller gone: %v, want context.Canceled", err)
	}
	if out, err := exec.Command("pgrep", "-f", dir).Output(); err == nil {
		t.Fatalf("a QEMU for %s still runs: pid %s", dir, out)
	}
}
