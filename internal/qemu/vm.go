// Package qemu runs virtual machines with qemu-system-x86_64: disks
// attached over the site agent's NBD unix socket, a QMP socket for status
// and graceful shutdown, a QEMU guest agent channel for quiescing, the
// serial console captured to a log, and user-mode networking (with host
// port forwards, or isolated for DR drills). KVM is used when it works;
// otherwise TCG.
package qemu

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/atomicfile"
	"github.com/ferry-dr/ferry/internal/qga"
)

// Disk is a disk served over NBD on a unix socket.
type Disk struct {
	Socket string `json:"socket"`
	Export string `json:"export"`
}

// Boot says how the VM boots (api.Boot).
type Boot = api.Boot

// Forward forwards a host TCP address to a guest port (api.Forward):
// typed, so nothing but an address and a port reaches QEMU.
type Forward = api.Forward

// Net modes.
const (
	NetNone     = api.NetNone
	NetUser     = api.NetUser     // user-mode NAT with forwards
	NetIsolated = api.NetIsolated // no route out; only the forwards reach it
)

// Spec describes a VM.
type Spec struct {
	Name      string      `json:"name"`
	VCPUs     int         `json:"vcpus"`
	MemoryMiB int         `json:"memory_mib"`
	Disks     []Disk      `json:"disks"`
	Boot      Boot        `json:"boot"`
	Net       api.NetMode `json:"net"`
	// Subnet is the IPv4 network (CIDR) the guest's NIC gets by DHCP;
	// empty: QEMU's default, 10.0.2.0/24. Each site declares its own.
	Subnet   string    `json:"subnet,omitempty"`
	Forwards []Forward `json:"forwards,omitempty"`
	// QGA adds the guest agent channel (virtio-serial port
	// org.qemu.guest_agent.0).
	QGA bool `json:"qga"`
	// Accel is "auto" (KVM if a probe boot works, else TCG), "kvm" or
	// "tcg" (default auto).
	Accel string `json:"accel,omitempty"`
	// Domain: a libvirt domain definition to run (api.VMRequest.Domain);
	// only the libvirt runtime runs it.
	Domain string `json:"domain,omitempty"`
	// Firmware is "bios" (SeaBIOS, the default) or "uefi" (OVMF, its
	// variables kept per VM).
	Firmware string `json:"firmware,omitempty"`
	// Attach: a libvirt network or bridge for the NICs
	// (api.VMRequest.Attach); only the libvirt runtime has them.
	Attach string `json:"attach,omitempty"`
	// EFIVars, for a UEFI VM, is the export that holds its UEFI variable
	// store (api.EFIVarsDisk), replicated with its disks; without it the
	// variables are a file of the VM's runtime directory, kept at this
	// site only.
	EFIVars *Disk `json:"efivars,omitempty"`
	// NICs, when set, are the VM's NICs in order, and Net, Subnet,
	// Forwards and Attach are not used (api.VMRequest.NICs).
	NICs []NIC `json:"nics,omitempty"`
}

// AddDisk adds a group's disk to the VM: as its UEFI variable store if
// it is the group's api.EFIVarsDisk, else as its next block device.
func (s *Spec) AddDisk(name string, d Disk) {
	if name == api.EFIVarsDisk {
		s.EFIVars = &d
		return
	}
	s.Disks = append(s.Disks, d)
}

// NIC is one NIC of a VM (api.NICRequest).
type NIC = api.NICRequest

// Interfaces returns the VM's NICs: NICs, or the one that Net, Subnet,
// Forwards and Attach describe (none for NetNone without Attach).
func (s *Spec) Interfaces() []NIC {
	return api.VMRequest{Net: s.Net, Subnet: s.Subnet, Forwards: s.Forwards, Attach: s.Attach, NICs: s.NICs}.Interfaces()
}

// OVMF's code and the template of its variables (Debian's ovmf package).
var (
	OVMFCode = "/usr/share/OVMF/OVMF_CODE_4M.fd"
	OVMFVars = "/usr/share/OVMF/OVMF_VARS_4M.fd"
)

// ErrSpec: a spec that cannot run.
var ErrSpec = errors.New("qemu: invalid VM spec")

// Validate refuses specs that cannot start, before anything runs.
func (s *Spec) Validate() error {
	bad := func(format string, a ...any) error { return fmt.Errorf("%w: %s", ErrSpec, fmt.Sprintf(format, a...)) }
	// A drill's name is the VM's plus "-drill": the full name length.
	if err := api.CheckName(api.KindGroup, s.Name); err != nil {
		return bad("%v", err)
	}
	switch {
	case s.VCPUs < 0 || s.VCPUs > 64:
		return bad("%d vCPUs", s.VCPUs)
	case s.MemoryMiB <= 0:
		return bad("memory must be > 0 MiB, got %d", s.MemoryMiB)
	case len(s.Disks) == 0:
		return bad("no disk")
	}
	for i, d := range s.Disks {
		if d.Socket == "" || d.Export == "" {
			return bad("disk %d needs an NBD socket and export", i)
		}
	}
	if s.Boot.Kernel != "" {
		for _, f := range []string{s.Boot.Kernel, s.Boot.Initrd} {
			if f == "" {
				continue
			}
			if _, err := os.Stat(f); err != nil {
				return bad("boot file: %v", err)
			}
		}
	} else if s.Boot.Initrd != "" || s.Boot.Append != "" {
		return bad("initrd or append without a kernel (unknown boot mode)")
	}
	// The single-NIC fields are checked even when NICs replace them or
	// Net is none: nothing invalid is accepted, used or not.
	if err := checkNIC(NIC{Name: "nic0", Net: s.Net, Subnet: s.Subnet, Attach: s.Attach, Forwards: s.Forwards}); err != nil {
		return bad("%v", err)
	}
	nics := s.Interfaces()
	if len(nics) > 8 {
		return bad("%d NICs: at most 8", len(nics))
	}
	names := map[string]bool{}
	for _, n := range nics {
		if err := checkNIC(n); err != nil {
			return bad("NIC %s: %v", n.Name, err)
		}
		if names[n.Name] {
			return bad("two NICs named %s", n.Name)
		}
		names[n.Name] = true
	}
	if s.EFIVars != nil && (s.EFIVars.Socket == "" || s.EFIVars.Export == "") {
		return bad("the UEFI variable store needs an NBD socket and export")
	}
	switch s.Firmware {
	case "", "bios":
		if s.EFIVars != nil {
			return bad("a UEFI variable store (disk %s) for a VM that boots with BIOS: define it with firmware uefi", api.EFIVarsDisk)
		}
	case "uefi":
		if _, err := os.Stat(OVMFCode); err != nil {
			return bad("UEFI firmware: %v (install the ovmf package: make deps)", err)
		}
	default:
		return bad("unknown firmware %q: want bios or uefi", s.Firmware)
	}
	for _, f := range []string{s.Boot.Kernel, s.Boot.Initrd, s.Boot.Append} {
		if strings.ContainsFunc(f, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
			return bad("boot option %q holds control characters", f)
		}
	}
	switch s.Accel {
	case "", "auto", "kvm", "tcg":
	default:
		return bad("unknown accelerator %q", s.Accel)
	}
	return nil
}

// checkNIC validates one NIC: its name, mode, subnet, attachment and
// forwards (what goes into QEMU's option list must parse).
func checkNIC(n NIC) error {
	if err := api.CheckName("NIC", n.Name); err != nil {
		return err
	}
	switch n.Net {
	case "", NetNone, NetUser, NetIsolated:
	default:
		return fmt.Errorf("unknown network mode %q", n.Net)
	}
	if n.Attach != "" {
		if err := api.CheckAttachment(n.Attach); err != nil {
			return err
		}
	}
	if n.Subnet != "" {
		if err := CheckSubnet(n.Subnet); err != nil {
			return err
		}
	}
	for _, f := range n.Forwards {
		if !f.Host.IsValid() || !f.Host.Addr().Is4() || f.Host.Port() == 0 {
			return fmt.Errorf("forward host %v: want an IPv4 address and a port", f.Host)
		}
		if f.GuestPort <= 0 || f.GuestPort > 65535 {
			return fmt.Errorf("forward guest port %d", f.GuestPort)
		}
	}
	return nil
}

// States of a VM.
const (
	StateStarting = api.VMStarting
	StateRunning  = api.VMRunning
	StatePaused   = api.VMPaused
	StateStopping = api.VMStopping
	StateStopped  = api.VMStopped // powered off or stopped on request
	StateCrashed  = api.VMCrashed // QEMU exited on its own without a guest power-off
)

// VM is a running (or ended) QEMU process.
type VM struct {
	Spec  Spec
	dir   string
	log   *slog.Logger
	accel string

	cmd  *exec.Cmd
	qmp  *QMP
	QGA  *qga.Client // nil without a guest agent channel
	done chan struct{}

	mu        sync.Mutex
	state     api.VMState
	exitErr   error
	powerOff  bool // the guest powered off (SHUTDOWN event)
	stopAsked bool
}

// Paths inside the VM's runtime directory.
func (v *VM) qmpPath() string     { return filepath.Join(v.dir, "qmp.sock") }
func (v *VM) qgaPath() string     { return filepath.Join(v.dir, "qga.sock") }
func (v *VM) ConsolePath() string { return filepath.Join(v.dir, "console.log") }

// Start validates spec and starts QEMU with its runtime files in dir.
func Start(ctx context.Context, spec Spec, dir string, log *slog.Logger) (*VM, error) {
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if spec.VCPUs == 0 {
		spec.VCPUs = 1
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	if spec.Firmware == "uefi" && spec.EFIVars == nil {
		// The VM's own UEFI variables (boot order, ...), kept across its
		// restarts at this site.
		if _, err := os.Stat(filepath.Join(dir, "OVMF_VARS.fd")); err != nil {
			b, err := os.ReadFile(OVMFVars)
			if err != nil {
				return nil, fmt.Errorf("UEFI variables template: %w", err)
			}
			if err := os.WriteFile(filepath.Join(dir, "OVMF_VARS.fd"), b, 0o600); err != nil {
				return nil, err
			}
		}
	}
	v := &VM{Spec: spec, dir: dir, log: log, done: make(chan struct{}), state: StateStarting}
	v.accel = spec.Accel
	if v.accel == "" || v.accel == "auto" {
		v.accel = DetectAccel(ctx, spec.Boot)
	}
	os.Remove(v.qmpPath())
	os.Remove(v.qgaPath())
	os.Remove(v.ConsolePath())
	args := v.args()
	v.cmd = exec.Command("qemu-system-x86_64", args...)
	out, err := os.OpenFile(filepath.Join(dir, "qemu.log"), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	v.cmd.Stdout, v.cmd.Stderr = out, out
	v.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := v.cmd.Start(); err != nil {
		out.Close()
		return nil, fmt.Errorf("start qemu: %w", err)
	}
	log.Info("vm starting", "vm", spec.Name, "accel", v.accel, "pid", v.cmd.Process.Pid)
	go func() {
		err := v.cmd.Wait()
		out.Close()
		v.mu.Lock()
		v.exitErr = err
		switch {
		case v.powerOff || v.stopAsked:
			v.state = StateStopped
		default:
			v.state = StateCrashed
		}
		v.mu.Unlock()
		close(v.done)
	}()
	// Connect QMP (the socket appears once QEMU is up).
	deadline := time.Now().Add(15 * time.Second)
	for {
		q, err := DialQMP(ctx, v.qmpPath())
		if err == nil {
			v.qmp = q
			break
		}
		select {
		case <-v.done:
			return nil, fmt.Errorf("qemu exited at start: %v: %s", v.exitErr, v.tail(filepath.Join(dir, "qemu.log"), 10))
		case <-ctx.Done():
			// The caller gave up (a vault that died mid-request): no
			// QEMU is left behind holding the VM's ports and disks for
			// the retry.
			v.Kill()
			return nil, fmt.Errorf("start qemu: %w", ctx.Err())
		default:
		}
		if time.Now().After(deadline) {
			v.Kill()
			return nil, fmt.Errorf("qemu QMP socket not up within 15s: %w", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	go v.watchEvents()
	if spec.QGA {
		v.QGA = &qga.Client{Path: v.qgaPath()}
	}
	v.mu.Lock()
	if v.state == StateStarting {
		v.state = StateRunning
	}
	v.mu.Unlock()
	return v, nil
}

func (v *VM) args() []string {
	s := v.Spec
	a := []string{"-name", s.Name, "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
		"-machine", "q35", "-accel", v.accel, "-smp", fmt.Sprint(s.VCPUs), "-m", fmt.Sprint(s.MemoryMiB),
		"-qmp", "unix:" + optValue(v.qmpPath()) + ",server=on,wait=off",
		"-serial", "file:" + optValue(v.ConsolePath()), "-no-reboot"}
	if v.accel == "kvm" {
		a = append(a, "-cpu", "host")
	}
	if s.Firmware == "uefi" {
		vars := filepath.Join(v.dir, "OVMF_VARS.fd")
		if s.EFIVars != nil {
			vars = "nbd+unix:///" + s.EFIVars.Export + "?socket=" + s.EFIVars.Socket
		}
		a = append(a, "-drive", "if=pflash,format=raw,unit=0,readonly=on,file="+optValue(OVMFCode),
			"-drive", "if=pflash,format=raw,unit=1,file="+optValue(vars))
	}
	for i, d := range s.Disks {
		drive := fmt.Sprintf("file=%s,format=raw,if=none,id=d%d,cache=none,aio=threads", optValue("nbd+unix:///"+d.Export+"?socket="+d.Socket), i)
		dev := fmt.Sprintf("virtio-blk-pci,drive=d%d", i)
		if i == 0 && s.Boot.Kernel == "" {
			dev += ",bootindex=1"
		}
		a = append(a, "-drive", drive, "-device", dev)
	}
	if s.Boot.Kernel != "" {
		a = append(a, "-kernel", s.Boot.Kernel)
		if s.Boot.Initrd != "" {
			a = append(a, "-initrd", s.Boot.Initrd)
		}
		if s.Boot.Append != "" {
			a = append(a, "-append", s.Boot.Append)
		}
	}
	for i, n := range s.Interfaces() {
		if n.Net != NetUser && n.Net != NetIsolated {
			continue
		}
		// Each NIC its own user-mode network; QEMU gives the i-th NIC
		// the i-th MAC from 52:54:00:12:34:56 up, the same at every site.
		nd := fmt.Sprintf("user,id=n%d", i)
		if n.Net == NetIsolated {
			nd += ",restrict=on"
		}
		// Only typed values go into the option list: a parsed prefix,
		// parsed addresses, integers.
		if p, err := netip.ParsePrefix(n.Subnet); err == nil {
			nd += ",net=" + p.String()
		}
		for _, f := range n.Forwards {
			nd += fmt.Sprintf(",hostfwd=tcp:%s:%d-:%d", f.Host.Addr(), f.Host.Port(), f.GuestPort)
		}
		a = append(a, "-netdev", nd, "-device", fmt.Sprintf("virtio-net-pci,netdev=n%d", i))
	}
	if s.QGA {
		a = append(a, "-chardev", "socket,path="+optValue(v.qgaPath())+",server=on,wait=off,id=qga0",
			"-device", "virtio-serial-pci", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0")
	}
	return a
}

func (v *VM) watchEvents() {
	for ev := range v.qmp.Events {
		v.mu.Lock()
		switch ev.Name {
		case "SHUTDOWN":
			v.powerOff = true
			v.state = StateStopping
		case "STOP":
			if v.state == StateRunning {
				v.state = StatePaused
			}
		case "RESUME":
			v.state = StateRunning
		}
		v.mu.Unlock()
	}
}

// Status is a VM's state as QEMU reports it.
type Status = api.VMStatus

// Status reports the VM's state; for a running VM it asks QEMU
// (query-status).
func (v *VM) Status(ctx context.Context) Status {
	v.mu.Lock()
	st := Status{Name: v.Spec.Name, State: v.state, Accel: v.accel, PID: v.cmd.Process.Pid, Console: v.ConsolePath()}
	exitErr := v.exitErr
	v.mu.Unlock()
	if st.State == StateRunning || st.State == StatePaused {
		var qs struct {
			Status string `json:"status"`
		}
		if err := v.qmp.Execute(ctx, "query-status", nil, &qs); err == nil {
			if qs.Status == "paused" {
				st.State = StatePaused
			}
		}
	}
	if st.State == StateCrashed {
		st.Reason = fmt.Sprintf("qemu exited (%v) without a guest power-off; console: %s", exitErr,
			v.tail(v.ConsolePath(), 3))
	}
	return st
}

// tail returns the last n lines of a file, printable only.
func (v *VM) tail(path string, n int) string {
	b, _ := os.ReadFile(path)
	var lines []string
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		lines = append(lines, strings.Map(func(r rune) rune {
			if r < 32 || r == 127 {
				return -1
			}
			return r
		}, sc.Text()))
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}

// Done is closed when QEMU has exited.
func (v *VM) Done() <-chan struct{} { return v.done }

// Shutdown stops the VM gracefully: the ACPI power button
// (system_powerdown) and up to grace for the guest to power off; then
// QMP quit; then SIGKILL. report is told each step. It returns once QEMU
// has exited.
func (v *VM) Shutdown(ctx context.Context, grace time.Duration, report func(step string)) error {
	if report == nil {
		report = func(string) {}
	}
	v.mu.Lock()
	v.stopAsked = true
	v.mu.Unlock()
	select {
	case <-v.done:
		return nil
	default:
	}
	timeout := time.After(grace)
	// The guest agent first: a guest that ignores the ACPI button (no
	// acpid) still powers off, at once, instead of costing the whole
	// grace before quit.
	if v.QGA != nil {
		gctx, cancel := context.WithTimeout(ctx, min(3*time.Second, grace/2))
		err := v.QGA.Shutdown(gctx)
		cancel()
		if err == nil {
			report("guest agent: guest-shutdown accepted")
			select {
			case <-v.done:
				report("guest powered off")
				return nil
			case <-time.After(grace / 2):
				report(fmt.Sprintf("no power-off %v after guest-shutdown: the ACPI button", grace/2))
			case <-ctx.Done():
			}
		} else {
			report("guest agent: no answer (" + err.Error() + "): the ACPI button")
		}
	}
	report("system_powerdown: asking the guest to power off")
	if err := v.qmp.Execute(ctx, "system_powerdown", nil, nil); err != nil {
		report("system_powerdown failed: " + err.Error())
	}
	// A guest still booting misses the button: press it again now and then.
	repress := time.NewTicker(3 * time.Second)
	defer repress.Stop()
wait:
	for {
		select {
		case <-v.done:
			report("guest powered off")
			return nil
		case <-repress.C:
			v.qmp.Execute(ctx, "system_powerdown", nil, nil)
		case <-timeout:
			report(fmt.Sprintf("no power-off within %v: quit", grace))
			break wait
		case <-ctx.Done():
			report("cancelled: quit")
			break wait
		}
	}
	qctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	v.qmp.Execute(qctx, "quit", nil, nil)
	select {
	case <-v.done:
		report("qemu quit")
		return nil
	case <-time.After(5 * time.Second):
		report("qemu did not quit: SIGKILL")
	}
	v.Kill()
	return nil
}

// Quit stops QEMU at once through QMP (the guest is not asked), then kills
// it if it does not exit: for VMs whose disks are discarded anyway.
func (v *VM) Quit(report func(string)) {
	v.mu.Lock()
	v.stopAsked = true
	v.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	v.qmp.Execute(ctx, "quit", nil, nil)
	select {
	case <-v.done:
		report("qemu quit")
	case <-time.After(5 * time.Second):
		report("qemu did not quit: SIGKILL")
		v.Kill()
	}
}

// ErrNoGuestAgent: the VM has no guest agent channel.
var ErrNoGuestAgent = errors.New("no guest agent channel")

// PingGuest asks the guest agent whether it answers.
func (v *VM) PingGuest(ctx context.Context) error {
	if v.QGA == nil {
		return ErrNoGuestAgent
	}
	return v.QGA.Ping(ctx)
}

// Freeze freezes the guest's file systems through its agent.
func (v *VM) Freeze(ctx context.Context) (int, error) {
	if v.QGA == nil {
		return 0, ErrNoGuestAgent
	}
	return v.QGA.Freeze(ctx)
}

// Thaw thaws the guest's file systems through its agent.
func (v *VM) Thaw(ctx context.Context) (int, error) {
	if v.QGA == nil {
		return 0, ErrNoGuestAgent
	}
	return v.QGA.Thaw(ctx)
}

// Kill ends QEMU at once and waits for it.
func (v *VM) Kill() {
	v.mu.Lock()
	v.stopAsked = true
	v.mu.Unlock()
	v.cmd.Process.Kill()
	<-v.done
	if v.qmp != nil {
		v.qmp.Close()
	}
	if v.QGA != nil {
		v.QGA.Close()
	}
}

var (
	accelOnce   sync.Mutex
	accelResult = map[string]string{}
)

// DetectAccel returns "kvm" if /dev/kvm works for a probe boot of the given
// kernel (it must print its banner to the serial console within 4 s), else
// "tcg".
// On some hosts KVM is present but broken (an MSR assertion with -cpu host,
// a hang with the default CPU), which only a real boot reveals. Without a
// kernel to probe with, only FERRY_ACCEL=kvm selects KVM. The result is
// cached per kernel, in memory and in a file under the user's cache
// directory (ferry/accel) that holds until the host reboots or the kernel
// or QEMU changes; deleting the file makes the next VM start probe again.
// FERRY_ACCEL=kvm|tcg overrides.
func DetectAccel(ctx context.Context, boot Boot) string {
	if a := os.Getenv("FERRY_ACCEL"); a == "kvm" || a == "tcg" {
		return a
	}
	if boot.Kernel == "" {
		return "tcg"
	}
	accelOnce.Lock()
	defer accelOnce.Unlock()
	if a, ok := accelResult[boot.Kernel]; ok {
		return a
	}
	key, keyed := accelKey(boot)
	if keyed {
		if a, ok := readAccelCache(key); ok {
			accelResult[boot.Kernel] = a
			return a
		}
	}
	a := "tcg"
	if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err == nil {
		f.Close()
		if probeKVM(ctx, boot) {
			a = "kvm"
		}
	}
	if ctx.Err() != nil {
		return a // a canceled probe proves nothing: neither kept nor cached
	}
	accelResult[boot.Kernel] = a
	if keyed {
		writeAccelCache(key, a)
	}
	return a
}

// accelCacheDir keeps DetectAccel's verdicts across processes: a probe of
// a KVM that hangs takes its whole 4 s, and without the file every agent
// process paid it at its first VM start; a failover right after an agent
// started took 4.1 s instead of 0.4 (bench/scale.sh, docs/benchmarks.md).
// A variable so that tests can point it elsewhere.
var accelCacheDir = func() string {
	d, err := os.UserCacheDir()
	if err != nil {
		return ""
	}
	return filepath.Join(d, "ferry", "accel")
}()

// accelKey names a verdict by what decides it: this boot of the host
// (the KVM module and its state), the kernel and initrd probed with, and
// the QEMU binary. false: no key can be made (and nothing is cached).
func accelKey(boot Boot) (string, bool) {
	id, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil || accelCacheDir == "" {
		return "", false
	}
	h := sha256.New()
	fmt.Fprintf(h, "boot %s\n", bytes.TrimSpace(id))
	qemuPath, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return "", false
	}
	for _, f := range []string{boot.Kernel, boot.Initrd, qemuPath} {
		if f == "" {
			continue
		}
		fi, err := os.Stat(f)
		if err != nil {
			return "", false
		}
		abs, _ := filepath.Abs(f)
		fmt.Fprintf(h, "%s %d %d\n", abs, fi.Size(), fi.ModTime().UnixNano())
	}
	return hex.EncodeToString(h.Sum(nil)[:16]), true
}

// readAccelCache returns a verdict kept under key, if one is.
func readAccelCache(key string) (string, bool) {
	path := filepath.Join(accelCacheDir, key)
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil || int(st.Uid) != os.Geteuid() || st.Mode&0o022 != 0 {
		return "", false // none, or one another user could have written
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", false
	}
	switch a := string(bytes.TrimSpace(b)); a {
	case "kvm", "tcg":
		return a, true
	}
	return "", false // damaged: probe again, and overwrite it
}

// writeAccelCache keeps a verdict, best effort: without it the next
// process probes again. The directory is private to this user: a verdict
// planted by another user could make VMs start on a KVM that hangs.
func writeAccelCache(key, accel string) {
	if err := os.MkdirAll(accelCacheDir, 0o700); err != nil || os.Chmod(accelCacheDir, 0o700) != nil {
		return
	}
	_ = atomicfile.WriteFile(filepath.Join(accelCacheDir, key), []byte(accel+"\n"), 0o600)
}

func probeKVM(ctx context.Context, boot Boot) bool {
	dir, err := os.MkdirTemp("", "ferry-kvm-probe-")
	if err != nil {
		return false
	}
	defer os.RemoveAll(dir)
	console := filepath.Join(dir, "console")
	// A working KVM prints the kernel banner within a fraction of a second.
	ctx, cancel := context.WithTimeout(ctx, 4*time.Second)
	defer cancel()
	args := []string{"-accel", "kvm", "-cpu", "host", "-machine", "q35", "-m", "256", "-nodefaults", "-display", "none",
		"-no-reboot", "-serial", "file:" + console, "-kernel", boot.Kernel, "-append", "console=ttyS0 panic=-1 ferry.job=probe"}
	if boot.Initrd != "" {
		args = append(args, "-initrd", boot.Initrd)
	}
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64", args...)
	if err := cmd.Start(); err != nil {
		return false
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	defer func() { cmd.Process.Kill(); <-exited }()
	for {
		if b, _ := os.ReadFile(console); bytes.Contains(b, []byte("Linux version")) {
			return true
		}
		select {
		case <-exited: // QEMU refused KVM (or crashed on it)
			return false
		case <-ctx.Done(): // hung
			return false
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// optValue escapes a value placed inside a QEMU option list: QEMU reads
// ",," as a literal comma, so a path with a comma cannot start a new
// option.
func optValue(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// CheckSubnet accepts an IPv4 network user-mode networking can serve
// (api.CheckSubnet).
func CheckSubnet(cidr string) error { return api.CheckSubnet(cidr) }
