package e2e

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/guest"
	"github.com/ferry-dr/ferry/internal/qemu"
)

// libvirtd holds the daemons this test binary started; TestMain stops
// them after the last test. Starting them once per binary rather than
// per test matters: a daemon stopped at one test's end is still exiting
// when the next test looks for it, and pgrep would find the dying one.
var libvirtd struct {
	sync.Mutex
	started []string
}

// libvirtURI returns a URI of a running libvirt daemon, starting libvirtd
// and virtlogd (no systemd needed) when none answers.
func libvirtURI(t *testing.T) string {
	t.Helper()
	need(t, "libvirtd", "virtlogd", "virsh")
	const uri = "qemu:///system"
	up := func() bool { return exec.Command("virsh", "-c", uri, "version").Run() == nil }
	libvirtd.Lock()
	defer libvirtd.Unlock()
	if up() {
		return uri
	}
	for _, d := range []string{"virtlogd", "libvirtd"} {
		if exec.Command("pgrep", "-x", d).Run() == nil {
			continue
		}
		if out, err := exec.Command(d, "-d").CombinedOutput(); err != nil {
			t.Fatalf("start %s: %v\n%s", d, err, out)
		}
		libvirtd.started = append(libvirtd.started, d)
	}
	until(t, 20*time.Second, "libvirtd to answer", up)
	return uri
}

// stopLibvirt stops the daemons libvirtURI started and waits (bounded)
// until they are gone, so that the next test binary starts afresh.
func stopLibvirt() {
	libvirtd.Lock()
	defer libvirtd.Unlock()
	for i := len(libvirtd.started) - 1; i >= 0; i-- {
		d := libvirtd.started[i]
		exec.Command("pkill", "-x", d).Run()
		deadline := time.Now().Add(10 * time.Second)
		for exec.Command("pgrep", "-x", d).Run() == nil && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
	}
	libvirtd.started = nil
}

// openToHypervisor lets other users through dir and its parents up to
// the temporary directory: libvirt runs QEMU as libvirt-qemu, which must
// reach the agent's NBD socket (the socket itself is the group's only).
func openToHypervisor(t *testing.T, dir string) {
	t.Helper()
	if !strings.HasPrefix(dir, os.TempDir()+"/") {
		t.Fatalf("openToHypervisor(%s): only below %s", dir, os.TempDir())
	}
	for d := dir; d != os.TempDir(); d = filepath.Dir(d) {
		if err := os.Chmod(d, 0o711); err != nil {
			t.Fatal(err)
		}
	}
}

// hypervisorGuest copies the test guest's kernel and initrd where
// libvirt's QEMU user may read them, and returns that directory.
func hypervisorGuest(t *testing.T) string {
	t.Helper()
	g := guestDir(t)
	dir := t.TempDir()
	for _, f := range []string{"vmlinuz", "initrd.img"} {
		b, err := os.ReadFile(filepath.Join(g, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, f), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	openToHypervisor(t, dir)
	return dir
}

// libvirtSites is two sites whose agents run VMs through libvirt, their
// NBD sockets open to libvirt's QEMU user.
func libvirtSites(t *testing.T, uri string) *sites {
	t.Helper()
	return twoSitesWith(t, []string{"--runtime", "libvirt", "--libvirt-uri", uri, "--nbd-group", "libvirt-qemu"},
		func(root string) { openToHypervisor(t, root) })
}

// operatorDomain is a domain definition as an operator would write it:
// the test guest booted from g with its workload on vda, the given disk
// and NIC elements, a guest agent channel, a pty console, and its own
// QEMU user-mode NIC forwarding web to the workload's HTTP.
func operatorDomain(name, g, devices, web string) string {
	return `<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>` + name + `</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <kernel>` + filepath.Join(g, "vmlinuz") + `</kernel><initrd>` + filepath.Join(g, "initrd.img") + `</initrd>
    <cmdline>console=ttyS0 panic=-1 ferry.job=workload ferry.data=vda ferry.rate=100 ferry.qga=1</cmdline></os>
  <features><acpi/></features>
  <on_reboot>destroy</on_reboot>
  <devices>
    ` + devices + `
    <channel type='unix'><source mode='bind'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <serial type='pty'/>
  </devices>
  <qemu:commandline><qemu:arg value='-netdev'/><qemu:arg value='user,id=t0,hostfwd=tcp:` + web + `-:80'/>
    <qemu:arg value='-device'/><qemu:arg value='virtio-net-pci,netdev=t0,bus=pcie.0,addr=0x11'/></qemu:commandline>
</domain>`
}

func domains(t *testing.T, uri string) string {
	t.Helper()
	out, err := exec.Command("virsh", "-c", uri, "list", "--name").CombinedOutput()
	if err != nil {
		t.Fatalf("virsh list: %v\n%s", err, out)
	}
	return string(out)
}

// TestLibvirtRuntime runs both sites with --runtime libvirt: the guest
// runs as a libvirt domain under UEFI whose disk is the group's NBD export (reached
// by libvirt's QEMU user through the socket's group), an
// application-consistent point goes through libvirt's fsfreeze, the
// planned shutdown through libvirt's guest agent, and a drill at the
// recovery site boots a domain on a view with every record that was
// durable before the shutdown.
func TestLibvirtRuntime(t *testing.T) {
	need(t, "qemu-system-x86_64", "qemu-img", "mkfs.ext4")
	uri := libvirtURI(t)
	g := hypervisorGuest(t)
	st2 := libvirtSites(t, uri)
	a, ca, cb, root := st2.a, st2.ca, st2.cb, st2.root
	ctx := context.Background()
	t.Cleanup(func() { // a failed test leaves no domain behind
		for _, n := range []string{"lvguest", "lvguest-drill"} {
			exec.Command("virsh", "-c", uri, "destroy", n).Run()
		}
	})
	fi, err := os.Stat(filepath.Join(a.dir, "nbd.sock"))
	if err != nil {
		t.Fatal(err)
	}
	if m := fi.Mode().Perm(); m != 0o660 {
		t.Fatalf("NBD socket mode %v, want 0660 (group libvirt-qemu)", m)
	}
	const size = 64 << 20
	// A UEFI VM's variable store is a disk of its group, replicated with
	// it; a new one holds OVMF's template.
	if err := ca.CreateGroup(ctx, "vm1", []api.DiskSpec{{Name: "vda", Size: size}, {Name: api.EFIVarsDisk, Size: api.EFIVarsSize}}); err != nil {
		t.Fatal(err)
	}
	varsURL := "nbd+unix:///vm1/" + api.EFIVarsDisk + "?socket=" + filepath.Join(a.dir, "nbd.sock")
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", qemu.OVMFVars, varsURL)
	fs := filepath.Join(root, "fs.img")
	ext4Image(t, fs, size)
	run(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", fs, "nbd+unix:///vm1/vda?socket="+filepath.Join(a.dir, "nbd.sock"))
	if err := cb.ExpectReplica(ctx, "vm1", "siteA"); err != nil {
		t.Fatal(err)
	}
	if err := ca.Replicate(ctx, "vm1", api.Replicate{PeerAddr: st2.b.addr, PeerName: "siteB"}); err != nil {
		t.Fatal(err)
	}
	boot := api.Boot{Kernel: filepath.Join(g, "vmlinuz"), Initrd: filepath.Join(g, "initrd.img"),
		Append: "console=ttyS0 panic=-1 ferry.job=workload ferry.data=vda ferry.rate=100 ferry.qga=1"}
	web := freePort(t)
	vs, err := ca.StartVM(ctx, api.VMRequest{Name: "lvguest", Group: "vm1", MemoryMiB: 256, QGA: true, Net: api.NetUser, Firmware: "uefi",
		Forwards: []api.Forward{{Host: netip.MustParseAddrPort(web), GuestPort: 80}}, Boot: boot})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(domains(t, uri), "lvguest") {
		t.Fatalf("VM %+v started, but libvirt has no domain lvguest:\n%s", vs, domains(t, uri))
	}
	xml, err := exec.Command("virsh", "-c", uri, "dumpxml", "lvguest").CombinedOutput()
	if err != nil || !strings.Contains(string(xml), "protocol='nbd' name='vm1/vda'") {
		t.Fatalf("domain XML (%v) has no NBD disk vm1/vda:\n%s", err, xml)
	}
	if !regexp.MustCompile(`<nvram[^>]*type='network'`).Match(xml) || !strings.Contains(string(xml), "name='vm1/efivars'") {
		t.Fatalf("the domain's NVRAM is not the group's disk %s:\n%s", api.EFIVarsDisk, xml)
	}
	var before guest.WorkloadState
	until(t, 120*time.Second, "the workload in the libvirt domain", func() bool {
		st, err := workload(web)
		before = st
		return err == nil && st.LastDurable > 30
	})
	if !strings.Contains(string(xml), "OVMF") {
		t.Fatalf("a UEFI VM's domain runs without OVMF:\n%s", xml)
	}
	if con, _ := os.ReadFile(vs.Console); !strings.Contains(string(con), "efi: EFI v") {
		t.Fatalf("the guest did not boot under UEFI: console %s", vs.Console)
	}
	ap, err := ca.AppPoint(ctx, "vm1", "libvirt")
	if err != nil || !ap.Succeeded {
		t.Fatalf("application-consistent point through libvirt: %+v, %v", ap, err)
	}
	t.Logf("app point at seq %d, guest frozen %.1f ms (libvirt fsfreeze)", ap.Seq, ap.FreezeMS)
	steps, err := ca.StopVM(ctx, "lvguest", api.StopOptions{Timeout: 60 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("shutdown: %q", steps)
	if !strings.Contains(strings.Join(steps, "\n"), "guest powered off") {
		t.Fatalf("the guest did not power off gracefully: %q", steps)
	}
	final, err := ca.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// The firmware wrote its variables at boot: into the group.
	srcVars := filepath.Join(root, "vars.fd")
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", varsURL, srcVars)
	if exec.Command("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", qemu.OVMFVars, srcVars).Run() == nil {
		t.Fatal("the UEFI variables are still OVMF's template after a boot: the firmware did not write to the group's store")
	}
	if strings.Contains(domains(t, uri), "lvguest") {
		t.Fatalf("domain lvguest still there after the shutdown:\n%s", domains(t, uri))
	}
	// The recovery site boots a drill on the newest point once it holds
	// everything the source wrote.
	last := final.Groups[0].LastSeq
	until(t, 30*time.Second, "replication to drain", func() bool {
		s, err := cb.Status(ctx)
		return err == nil && len(s.Replicas) == 1 && s.Replicas[0].LastSeq >= last
	})
	// The recovery site holds the variables as the source left them.
	vi, err := cb.OpenView(ctx, "vm1", api.OpenView{Disk: api.EFIVarsDisk})
	if err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", srcVars, "nbd+unix:///"+vi.Export+"?socket="+vi.Socket)
	cb.CloseView(ctx, vi.ID)
	drillWeb := freePort(t)
	if _, err := cb.StartVM(ctx, api.VMRequest{Name: "lvguest-drill", Replica: "vm1", MemoryMiB: 256, QGA: true, Net: api.NetIsolated, Firmware: "uefi",
		Forwards: []api.Forward{{Host: netip.MustParseAddrPort(drillWeb), GuestPort: 80}}, Boot: boot}); err != nil {
		t.Fatal(err)
	}
	if x := virsh(t, uri, "dumpxml", "lvguest-drill"); !regexp.MustCompile(`<nvram[^>]*type='network'`).MatchString(x) {
		t.Fatalf("the drill does not boot with the replicated UEFI variables:\n%s", x)
	}
	var drill guest.WorkloadState
	until(t, 120*time.Second, "the drill's workload", func() bool {
		st, err := workload(drillWeb)
		drill = st
		return err == nil && st.ResumedAfter > 0
	})
	if drill.ResumedAfter < before.LastDurable || drill.ChecksumErrors != 0 {
		t.Fatalf("drill resumed after record %d with %d checksum errors; %d were durable before the shutdown",
			drill.ResumedAfter, drill.ChecksumErrors, before.LastDurable)
	}
	if _, err := cb.StopVM(ctx, "lvguest-drill", api.StopOptions{Force: true}); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(domains(t, uri), "lvguest-drill") {
		t.Fatal("drill domain still there after it was stopped")
	}
}

// defineDomain defines a libvirt domain from XML and undefines it (and
// stops it) at the end of the test.
func defineDomain(t *testing.T, uri, name, xml string) {
	t.Helper()
	f := filepath.Join(t.TempDir(), name+".xml")
	if err := os.WriteFile(f, []byte(xml), 0o644); err != nil {
		t.Fatal(err)
	}
	run(t, "virsh", "-c", uri, "define", f)
	t.Cleanup(func() {
		exec.Command("virsh", "-c", uri, "destroy", name).Run()
		exec.Command("virsh", "-c", uri, "undefine", "--nvram", name).Run()
	})
}

func virsh(t *testing.T, uri string, args ...string) string {
	t.Helper()
	out, err := exec.Command("virsh", append([]string{"-c", uri}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("virsh %v: %v\n%s", args, err, out)
	}
	return string(out)
}

// TestLibvirtImportOffline imports a shut-off domain that an operator
// defined with virsh: its system disk a qcow2 image over a qcow2 backing
// file, its second disk a raw block device (a loop device, as an LVM
// volume would be). ferry copies both into a group (only their data),
// switches the domain's disks to its exports (autostart off), runs the
// domain as defined, and its workload resumes after the last record the
// original disk held; a release gives the domain its own disks back,
// untouched.
func TestLibvirtImportOffline(t *testing.T) {
	need(t, "qemu-system-x86_64", "qemu-img", "mkfs.ext4", "losetup", "debugfs")
	uri := libvirtURI(t)
	g := hypervisorGuest(t)
	st := libvirtSites(t, uri)
	a, ca, root := st.a, st.ca, st.root
	ctx := context.Background()
	const name = "lvimport"
	imgs := filepath.Join(root, "images")
	if err := os.Mkdir(imgs, 0o755); err != nil {
		t.Fatal(err)
	}
	// The system disk: ext4 in a qcow2 over a qcow2 backing file.
	raw := filepath.Join(root, "fs.raw")
	ext4Image(t, raw, 64<<20)
	base, top := filepath.Join(imgs, "base.qcow2"), filepath.Join(imgs, "top.qcow2")
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, base)
	run(t, "qemu-img", "create", "-f", "qcow2", "-F", "qcow2", "-b", base, top)
	// The data disk: a raw block device with a pattern in its middle.
	loopImg := filepath.Join(root, "loop.img")
	f, _ := os.Create(loopImg)
	f.Truncate(16 << 20)
	f.WriteAt([]byte(strings.Repeat("ferry-block-device", 1000)), 5<<20)
	f.Close()
	loop := strings.TrimSpace(run(t, "losetup", "-f", "--show", loopImg))
	t.Cleanup(func() { exec.Command("losetup", "-d", loop).Run() })

	web := freePort(t)
	const mac, mac2 = "52:54:00:fe:44:01", "52:54:00:fe:44:02"
	xml := operatorDomain(name, g, `<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='`+top+`'/><target dev='vda' bus='virtio'/></disk>
    <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='`+loop+`'/><target dev='vdb' bus='virtio'/></disk>
    <interface type='user'><mac address='`+mac+`'/><model type='virtio'/></interface>
    <interface type='user'><mac address='`+mac2+`'/><model type='virtio'/></interface>`, web)
	// UEFI: libvirt makes the domain's NVRAM at its first start.
	xml = strings.Replace(xml, "<os>", "<os firmware='efi'>", 1)
	defineDomain(t, uri, name, xml)
	original := virsh(t, uri, "dumpxml", "--inactive", name)

	// The operator's VM runs (under libvirt, not ferry) and writes.
	virsh(t, uri, "start", name)
	until(t, 120*time.Second, "the workload before the import", func() bool {
		s, err := workload(web)
		return err == nil && s.LastDurable > 30
	})
	virsh(t, uri, "shutdown", name)
	until(t, 60*time.Second, "the domain to shut off", func() bool {
		return strings.Contains(virsh(t, uri, "domstate", name), "shut off")
	})
	held := recordsInQcow2(t, top)

	// The site's inventory offers it: a domain ferry does not run, with
	// its disks, importable.
	listed := func() *api.DomainInfo {
		ds, err := ca.Domains(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range ds {
			if d.Name == name {
				return &d
			}
		}
		return nil
	}
	if d := listed(); d == nil || !d.Importable || d.Running || len(d.Disks) < 2 || d.NICs != 2 || d.Firmware != "uefi" {
		t.Fatalf("the domain in the site's inventory: %+v", d)
	}
	// And the portal's inventory, through a vault, offers its import.
	_, vp := startVaultProc(t, st)
	bctx := operatorBrowser(t, vp, "the domain in the portal's inventory", 60*time.Second, goHash("#/vms"),
		chromedp.WaitVisible(chromedp.CSS(`#domains tr[data-domain="siteA/`+name+`"] .act-import-domain`)),
		chromedp.Click(chromedp.CSS(`#domains tr[data-domain="siteA/`+name+`"] .act-import-domain`)), chromedp.WaitVisible(chromedp.CSS("#dialog[open] #imp-domain")))
	if got := eval[string](t, bctx, `document.querySelector("#imp-domain").value + " at " + document.querySelector("#imp-site").value`); got != name+" at siteA" {
		t.Fatalf("the import dialog opened from the inventory holds %q", got)
	}
	row := eval[string](t, bctx, `document.querySelector('#domains tr[data-domain="siteA/`+name+`"]').textContent`)
	if !strings.Contains(row, "vda") || !strings.Contains(row, "UEFI") || !strings.Contains(row, "shut off") {
		t.Fatalf("the domain's row in the portal: %q", row)
	}

	start := time.Now()
	is, err := ca.Import(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	until(t, 120*time.Second, "the import", func() bool {
		is, err = ca.ImportStatus(ctx, name)
		if err != nil || is.State == api.ImportFailed {
			t.Fatalf("import: %+v, %v", is, err)
		}
		return is.State == api.ImportDone
	})
	res := is.Result
	t.Logf("imported in %v: %+v", time.Since(start).Round(time.Millisecond), res.Disks)
	if d := listed(); d != nil {
		t.Fatalf("an imported domain is still offered for import: %+v", d)
	}
	if len(res.Disks) != 3 || res.Disks[0].Name != "vda" || res.Disks[1].Name != "vdb" || res.Disks[0].Format != "qcow2" ||
		res.Disks[1].Source != loop || res.Disks[2].Name != api.EFIVarsDisk || res.Firmware != "uefi" || res.VCPUs != 1 || res.MemoryMiB != 256 || !res.QGA {
		t.Fatalf("import result %+v", res)
	}
	if len(res.NICs) != 2 || res.NICs[0].MAC != mac || res.NICs[1].MAC != mac2 {
		t.Fatalf("imported NICs %+v, want %s and %s in order", res.NICs, mac, mac2)
	}
	if c := res.Disks[1].Copied; c <= 0 || c > 1<<20 {
		t.Errorf("block device: %d bytes of data copied; want only its one written extent, not its 16 MiB", c)
	}
	sock := filepath.Join(a.dir, "nbd.sock")
	for _, d := range []struct{ fmt, src, disk string }{{"qcow2", top, "vda"}, {"raw", loop, "vdb"}, {"raw", res.Disks[2].Source, api.EFIVarsDisk}} {
		run(t, "qemu-img", "compare", "-f", d.fmt, "-F", "raw", d.src, "nbd+unix:///"+name+"/"+d.disk+"?socket="+sock)
	}
	now := virsh(t, uri, "dumpxml", "--inactive", name)
	if !strings.Contains(now, "protocol='nbd' name='"+name+"/vda'") || strings.Contains(now, top) || !strings.Contains(now, mac) {
		t.Fatalf("after the import the domain should run on ferry's exports with its MAC:\n%s", now)
	}
	if info := virsh(t, uri, "dominfo", name); !strings.Contains(info, "Autostart:      disable") {
		t.Fatalf("autostart is not off after the import:\n%s", info)
	}

	// ferry runs it as defined (its MAC, its guest agent), disks on the group.
	ferryWeb := freePort(t)
	if _, err := ca.StartVM(ctx, api.VMRequest{Name: name, Group: name, MemoryMiB: res.MemoryMiB, VCPUs: res.VCPUs, QGA: res.QGA, Domain: res.Original, Firmware: res.Firmware,
		NICs: []api.NICRequest{{Name: "nic0", Net: api.NetUser, Forwards: []api.Forward{{Host: netip.MustParseAddrPort(ferryWeb), GuestPort: 80}}},
			{Name: "nic1", Net: api.NetUser}}}); err != nil {
		t.Fatal(err)
	}
	var after guest.WorkloadState
	until(t, 120*time.Second, "the workload on ferry's disks", func() bool {
		s, err := workload(ferryWeb)
		after = s
		return err == nil && s.LastDurable > s.ResumedAfter+10
	})
	// Both NICs, in the domain's order, with its MACs.
	wantNICs := []string{"eth0 " + mac, "eth1 " + mac2}
	if !slices.Equal(after.NICs, wantNICs) {
		t.Errorf("the guest on ferry sees NICs %q, want %q", after.NICs, wantNICs)
	}
	if after.ResumedAfter != held || after.ChecksumErrors != 0 {
		t.Fatalf("on ferry's disks the workload resumed after record %d (%d checksum errors); the original disk held %d",
			after.ResumedAfter, after.ChecksumErrors, held)
	}
	if _, err := ca.AppPoint(ctx, name, "imported"); err != nil {
		t.Fatalf("app point of the imported domain: %v", err)
	}
	// Protected: a drill at the recovery site runs the domain's own
	// definition as a transient NAME-drill, disks on views, on an
	// isolated network.
	cb := st.cb
	if err := cb.ExpectReplica(ctx, name, "siteA"); err != nil {
		t.Fatal(err)
	}
	if err := ca.Replicate(ctx, name, api.Replicate{PeerAddr: st.b.addr, PeerName: "siteB"}); err != nil {
		t.Fatal(err)
	}
	var durable, want uint64
	until(t, 60*time.Second, "replication to stream", func() bool {
		s, err := workload(ferryWeb)
		if err != nil {
			return false
		}
		durable = s.LastDurable
		src, err := ca.Status(ctx)
		if err != nil || len(src.Groups) != 1 || src.Groups[0].Replication == nil || src.Groups[0].Replication.State != api.ReplStreaming {
			return false
		}
		want = src.Groups[0].LastSeq // holds every record durable above
		return true
	})
	until(t, 60*time.Second, "a recovery point after the records", func() bool {
		pts, err := cb.Points(ctx, name)
		return err == nil && len(pts) > 0 && pts[len(pts)-1].Seq >= want
	})
	drillWeb := freePort(t)
	if _, err := cb.StartVM(ctx, api.VMRequest{Name: name + "-drill", Replica: name, MemoryMiB: res.MemoryMiB, QGA: res.QGA, Domain: res.Original, Firmware: res.Firmware,
		NICs: []api.NICRequest{{Name: "nic0", Net: api.NetIsolated, Forwards: []api.Forward{{Host: netip.MustParseAddrPort(drillWeb), GuestPort: 80}}},
			{Name: "nic1", Net: api.NetIsolated}}}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { exec.Command("virsh", "-c", uri, "destroy", name+"-drill").Run() })
	var drill guest.WorkloadState
	until(t, 120*time.Second, "the drill's workload", func() bool {
		s, err := workload(drillWeb)
		drill = s
		return err == nil && s.ResumedAfter > 0
	})
	if !slices.Equal(drill.NICs, wantNICs) {
		t.Errorf("the drill at the recovery site sees NICs %q, want %q (both on the isolated network)", drill.NICs, wantNICs)
	}
	if drill.ResumedAfter < durable || drill.ChecksumErrors != 0 {
		t.Fatalf("drill resumed after record %d (%d checksum errors); %d were durable before", drill.ResumedAfter, drill.ChecksumErrors, durable)
	}
	if _, err := cb.StopVM(ctx, name+"-drill", api.StopOptions{Force: true}); err != nil {
		t.Fatal(err)
	}
	if err := ca.Unreplicate(ctx, name); err != nil {
		t.Fatal(err)
	}
	if err := ca.Release(ctx, name); !errors.Is(err, api.ErrConflict) {
		t.Fatalf("release while it runs: %v, want ErrConflict", err)
	}
	if _, err := ca.StopVM(ctx, name, api.StopOptions{Timeout: 60 * time.Second}); err != nil {
		t.Fatal(err)
	}
	if err := ca.Release(ctx, name); err != nil {
		t.Fatal(err)
	}
	if back := virsh(t, uri, "dumpxml", "--inactive", name); !strings.Contains(back, top) || strings.Contains(back, "protocol='nbd'") {
		t.Fatalf("after the release the domain should have its own disks again:\n%s\n(before the import:\n%s)", back, original)
	}
	if got := recordsInQcow2(t, top); got != held {
		t.Fatalf("the original disk changed: %d records, had %d", got, held)
	}
}

// recordsInQcow2 counts the workload's intact records in a qcow2 image.
func recordsInQcow2(t *testing.T, img string) uint64 {
	t.Helper()
	raw := filepath.Join(t.TempDir(), "disk.raw")
	run(t, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, raw)
	return recordsIn(t, raw)
}

// poller asks the guest's HTTP every 100 ms and keeps the longest time
// between two answers.
type poller struct {
	stop    chan struct{}
	done    chan struct{}
	longest time.Duration
	last    guest.WorkloadState
}

func pollGuest(addr string) *poller {
	p := &poller{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(p.done)
		lastOK := time.Now()
		for {
			select {
			case <-p.stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			if s, err := workload(addr); err == nil {
				p.longest = max(p.longest, time.Since(lastOK))
				p.last, lastOK = s, time.Now()
			}
		}
	}()
	return p
}

func (p *poller) end() (time.Duration, guest.WorkloadState) {
	close(p.stop)
	<-p.done
	return p.longest, p.last
}

// TestLibvirtImportLive imports a running domain while its workload
// writes: a block copy of each disk onto ferry's exports and a pivot. The
// guest's HTTP, polled every 100 ms, never stops answering; afterwards the
// domain runs on ferry's disks as ferry's VM, and the workload's records
// are intact and go on from where they were.
func TestLibvirtImportLive(t *testing.T) {
	need(t, "qemu-system-x86_64", "qemu-img", "mkfs.ext4")
	uri := libvirtURI(t)
	g := hypervisorGuest(t)
	st := libvirtSites(t, uri)
	ca, root := st.ca, st.root
	ctx := context.Background()
	const name = "lvlive"
	imgs := filepath.Join(root, "images")
	if err := os.Mkdir(imgs, 0o755); err != nil {
		t.Fatal(err)
	}
	raw := filepath.Join(root, "fs.raw")
	ext4Image(t, raw, 64<<20)
	img := filepath.Join(imgs, "live.qcow2")
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, img)
	web := freePort(t)
	xml := operatorDomain(name, g, `<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='`+img+`'/><target dev='vda' bus='virtio'/></disk>`, web)
	defineDomain(t, uri, name, xml)
	virsh(t, uri, "start", name)
	var before guest.WorkloadState
	until(t, 120*time.Second, "the workload before the import", func() bool {
		s, err := workload(web)
		before = s
		return err == nil && s.LastDurable > 30
	})
	p := pollGuest(web)
	start := time.Now()
	is, err := ca.Import(ctx, name)
	if err != nil {
		p.end()
		t.Fatal(err)
	}
	until(t, 120*time.Second, "the live import", func() bool {
		is, err = ca.ImportStatus(ctx, name)
		if err != nil || is.State == api.ImportFailed {
			p.end()
			t.Fatalf("import: %+v, %v", is, err)
		}
		return is.State == api.ImportDone
	})
	took := time.Since(start)
	// A while on ferry's disks, still polled.
	until(t, 60*time.Second, "records written on ferry's disks", func() bool {
		s, err := workload(web)
		return err == nil && s.LastDurable > before.LastDurable+50
	})
	gap, last := p.end()
	t.Logf("live import took %v; longest gap of the guest's HTTP %v; records %d -> %d", took.Round(time.Millisecond), gap.Round(time.Millisecond), before.LastDurable, last.LastDurable)
	if !is.Result.Live {
		t.Fatalf("result %+v: want a live import", is.Result)
	}
	if gap > time.Second {
		t.Fatalf("the guest stopped answering for %v during the live import", gap)
	}
	if last.ChecksumErrors != 0 || last.Error != "" {
		t.Fatalf("workload after the live import: %+v", last)
	}
	if live := virsh(t, uri, "dumpxml", name); !strings.Contains(live, "protocol='nbd' name='"+name+"/vda'") || strings.Contains(live, img) {
		t.Fatalf("the running domain is not on ferry's export:\n%s", live)
	}
	if inactive := virsh(t, uri, "dumpxml", "--inactive", name); !strings.Contains(inactive, "protocol='nbd'") {
		t.Fatalf("the domain's next boot is not on ferry's export:\n%s", inactive)
	}
	// It is ferry's VM now: an app point, a graceful stop.
	if ap, err := ca.AppPoint(ctx, name, "after-live-import"); err != nil || !ap.Succeeded {
		t.Fatalf("app point after the live import: %+v %v", ap, err)
	}
	if _, err := ca.StopVM(ctx, name, api.StopOptions{Timeout: 60 * time.Second}); err != nil {
		t.Fatal(err)
	}
	ferryImg := filepath.Join(root, "ferry.raw")
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", "nbd+unix:///"+name+"/vda?socket="+filepath.Join(st.a.dir, "nbd.sock"), ferryImg)
	if n := recordsIn(t, ferryImg); n < last.LastDurable {
		t.Fatalf("ferry's disk holds %d records; %d were durable", n, last.LastDurable)
	}
}

// TestLibvirtNetworkAttach runs a VM attached to a site network that is
// a libvirt network on the host (network:NAME): its NIC is on that
// network's bridge, it gets its address from libvirt's DHCP there, and
// its workload answers at that address.
func TestLibvirtNetworkAttach(t *testing.T) {
	need(t, "qemu-system-x86_64", "qemu-img", "mkfs.ext4")
	uri := libvirtURI(t)
	g := hypervisorGuest(t)
	const net, bridge = "ferry-e2e", "virbr-fe2e"
	f := filepath.Join(t.TempDir(), "net.xml")
	os.WriteFile(f, []byte(`<network><name>`+net+`</name><bridge name='`+bridge+`'/>
  <ip address='10.77.0.1' netmask='255.255.255.0'><dhcp><range start='10.77.0.10' end='10.77.0.100'/></dhcp></ip></network>`), 0o644)
	exec.Command("virsh", "-c", uri, "net-destroy", net).Run() // a leftover of a killed run
	virsh(t, uri, "net-create", f)
	t.Cleanup(func() { exec.Command("virsh", "-c", uri, "net-destroy", net).Run() })
	st := libvirtSites(t, uri)
	ca, root := st.ca, st.root
	ctx := context.Background()
	const size = 64 << 20
	if err := ca.CreateGroup(ctx, "vm1", []api.DiskSpec{{Name: "vda", Size: size}}); err != nil {
		t.Fatal(err)
	}
	fs := filepath.Join(root, "fs.img")
	ext4Image(t, fs, size)
	run(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", fs, "nbd+unix:///vm1/vda?socket="+filepath.Join(st.a.dir, "nbd.sock"))
	t.Cleanup(func() { exec.Command("virsh", "-c", uri, "destroy", "lvnet").Run() })
	if _, err := ca.StartVM(ctx, api.VMRequest{Name: "lvnet", Group: "vm1", MemoryMiB: 256, QGA: true, Net: api.NetUser, Attach: "network:" + net,
		Boot: api.Boot{Kernel: filepath.Join(g, "vmlinuz"), Initrd: filepath.Join(g, "initrd.img"),
			Append: "console=ttyS0 panic=-1 ferry.job=workload ferry.data=vda ferry.rate=100 ferry.qga=1"}}); err != nil {
		t.Fatal(err)
	}
	if nics := virsh(t, uri, "domiflist", "lvnet"); !strings.Contains(nics, net) {
		t.Fatalf("the VM's NIC is not on libvirt's network %s:\n%s", net, nics)
	}
	var addr string
	until(t, 120*time.Second, "a DHCP lease on "+net, func() bool {
		for _, l := range strings.Split(virsh(t, uri, "net-dhcp-leases", net), "\n") {
			if i := strings.Index(l, "10.77.0."); i >= 0 {
				addr, _, _ = strings.Cut(l[i:], "/")
				return true
			}
		}
		return false
	})
	until(t, 120*time.Second, "the workload at "+addr, func() bool {
		s, err := workload(addr + ":80")
		return err == nil && s.LastDurable > 0 && s.Addr == addr
	})
	if _, err := ca.StopVM(ctx, "lvnet", api.StopOptions{Force: true}); err != nil {
		t.Fatal(err)
	}
}
