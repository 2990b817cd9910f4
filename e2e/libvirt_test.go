package e2e

import (
	"context"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/guest"
)

// libvirtURI returns a URI of a running libvirt daemon, starting libvirtd
// and virtlogd (no systemd needed) when none answers; what it started it
// stops at the end of the test.
func libvirtURI(t *testing.T) string {
	t.Helper()
	need(t, "libvirtd", "virtlogd", "virsh")
	const uri = "qemu:///system"
	up := func() bool { return exec.Command("virsh", "-c", uri, "version").Run() == nil }
	if up() {
		return uri
	}
	var started []string
	for _, d := range []string{"virtlogd", "libvirtd"} {
		if exec.Command("pgrep", "-x", d).Run() == nil {
			continue
		}
		if out, err := exec.Command(d, "-d").CombinedOutput(); err != nil {
			t.Fatalf("start %s: %v\n%s", d, err, out)
		}
		started = append(started, d)
	}
	t.Cleanup(func() {
		for _, d := range started {
			exec.Command("pkill", "-x", d).Run()
		}
	})
	until(t, 20*time.Second, "libvirtd to answer", up)
	return uri
}

// openToHypervisor lets other users through dir and its parents up to
// the temporary directory: libvirt runs QEMU as libvirt-qemu, which must
// reach the agent's NBD socket (the socket itself is the group's only).
func openToHypervisor(t *testing.T, dir string) {
	t.Helper()
	for d := dir; d != "/" && d != os.TempDir(); d = filepath.Dir(d) {
		if err := os.Chmod(d, 0o711); err != nil {
			t.Fatal(err)
		}
	}
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
// runs as a libvirt domain whose disk is the group's NBD export (reached
// by libvirt's QEMU user through the socket's group), an
// application-consistent point goes through libvirt's fsfreeze, the
// planned shutdown through libvirt's guest agent, and a drill at the
// recovery site boots a domain on a view with every record that was
// durable before the shutdown.
func TestLibvirtRuntime(t *testing.T) {
	need(t, "qemu-system-x86_64", "qemu-img", "mkfs.ext4")
	uri := libvirtURI(t)
	g := guestDir(t)
	openToHypervisor(t, g)
	st2 := twoSitesWith(t, []string{"--runtime", "libvirt", "--libvirt-uri", uri, "--nbd-group", "libvirt-qemu"},
		func(root string) { openToHypervisor(t, root) })
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
	if err := ca.CreateGroup(ctx, "vm1", []api.DiskSpec{{Name: "vda", Size: size}}); err != nil {
		t.Fatal(err)
	}
	fs := filepath.Join(root, "fs.img")
	f, _ := os.Create(fs)
	f.Truncate(size)
	f.Close()
	run(t, "mkfs.ext4", "-q", "-F", fs)
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
	vs, err := ca.StartVM(ctx, api.VMRequest{Name: "lvguest", Group: "vm1", MemoryMiB: 256, QGA: true, Net: api.NetUser,
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
	var before guest.WorkloadState
	until(t, 120*time.Second, "the workload in the libvirt domain", func() bool {
		st, err := workload(web)
		before = st
		return err == nil && st.LastDurable > 30
	})
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
	drillWeb := freePort(t)
	if _, err := cb.StartVM(ctx, api.VMRequest{Name: "lvguest-drill", Replica: "vm1", MemoryMiB: 256, QGA: true, Net: api.NetIsolated,
		Forwards: []api.Forward{{Host: netip.MustParseAddrPort(drillWeb), GuestPort: 80}}, Boot: boot}); err != nil {
		t.Fatal(err)
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
