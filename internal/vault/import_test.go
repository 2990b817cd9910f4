package vault

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/store"
)

// TestImportAndRelease: an import at a site defines the VM from what the
// site read of the domain, once; a second import of the name is refused;
// a release is refused while the VM is protected, then gives the domain
// back at its site and forgets the VM.
func TestImportAndRelease(t *testing.T) {
	f := newFixture(t, store.NewMem())
	f.setup(t)
	f.east.mu.Lock()
	f.east.domains = []string{"db"}
	f.east.mu.Unlock()
	var ds []api.DomainInfo
	if code := f.call(t, f.reader, "GET", "/v1/sites/east/domains", nil, &ds); code != 200 || len(ds) != 1 || ds[0].Name != "db" || !ds[0].Importable {
		t.Fatalf("domains at east before the import: %d %+v", code, ds)
	}
	var st api.ImportStatus
	if code := f.call(t, f.reader, "POST", "/v1/imports", api.VaultImport{Site: "east", Domain: "db"}, nil); code != 403 {
		t.Fatalf("import with a read-only token: %d, want 403", code)
	}
	f.refused(t, "/v1/imports", api.VaultImport{Site: "east", Domain: "db", Forwards: map[string]string{"east": "127.0.0.1:80,guestfwd=x"}}, 400, "forward")
	imp := api.VaultImport{Site: "east", Domain: "db", Forwards: map[string]string{"east": "127.0.0.1:18090"}, GuestPort: 80}
	if code := f.call(t, f.op, "POST", "/v1/imports", imp, &st); code != 200 || st.State != api.ImportDone {
		t.Fatalf("import: %d %+v", code, st)
	}
	vm, _, err := get[VM](context.Background(), f.st, kindVM, "db")
	if err != nil {
		t.Fatalf("the imported VM is not defined: %v", err)
	}
	if code := f.call(t, f.reader, "GET", "/v1/sites/east/domains", nil, &ds); code != 200 || len(ds) != 0 {
		t.Fatalf("domains at east after the import: %d %+v, want none (ferry runs it)", code, ds)
	}
	if vm.Site != "east" || vm.VCPUs != 2 || vm.MemoryMiB != 512 || !vm.QGA || vm.Domain == "" ||
		len(vm.Disks) != 1 || vm.Disks[0] != (api.VMDisk{Name: "vda", Size: 1 << 30}) || len(vm.NICs) != 1 ||
		vm.Forwards["east"] != "127.0.0.1:18090" || vm.GuestPort != 80 {
		t.Fatalf("imported VM %+v", vm)
	}
	if _, _, err := get[api.VaultImport](context.Background(), f.st, kindImport, "db"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("the import's record outlived the VM's definition: %v", err)
	}
	// Looking again is idempotent; importing again is refused.
	if code := f.call(t, f.op, "GET", "/v1/imports/east/db", nil, &st); code != 200 || st.State != api.ImportDone {
		t.Fatalf("status: %d %+v", code, st)
	}
	f.refused(t, "/v1/imports", api.VaultImport{Site: "east", Domain: "db"}, 409, "exists")
	f.refused(t, "/v1/imports", api.VaultImport{Site: "nowhere", Domain: "web"}, 404, "nowhere")
	f.refused(t, "/v1/imports", api.VaultImport{Site: "east", Domain: "../x"}, 400, "cannot name a VM")
	f.refused(t, "/v1/vms/vm1/release", struct{}{}, 400, "not imported")
	f.refused(t, "/v1/vms", VM{Name: "x", Site: "east", MemoryMiB: 256, Disks: []DiskSpec{{Name: "vda", Size: 1 << 20}}, Domain: "<domain/>"}, 400, "only from an import")

	j := f.job(t, "/v1/protections", EnableRequest{VM: "db", Target: "west"})
	if j.State != JobSucceeded {
		t.Fatalf("protect the imported VM: %+v", j)
	}
	f.refused(t, "/v1/vms/db/release", struct{}{}, 409, "disable protection first")
	if j := f.job(t, "/v1/protections/db/disable", api.DisableRequest{}); j.State != JobSucceeded {
		t.Fatalf("disable: %+v", j)
	}
	if code := f.call(t, f.op, "POST", "/v1/vms/db/release", struct{}{}, nil); code != 200 {
		t.Fatalf("release: %d", code)
	}
	if len(f.east.released) != 1 || f.east.released[0] != "db" {
		t.Fatalf("the site was asked to release %v", f.east.released)
	}
	if _, _, err := get[VM](context.Background(), f.st, kindVM, "db"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("released VM still defined: %v", err)
	}
}

// TestLibvirtAttachment: a network declared with a libvirt attachment
// sends it to the site with every VM attached there (a failover of an
// imported VM); a malformed one is refused.
func TestLibvirtAttachment(t *testing.T) {
	f := newFixture(t, store.NewMem())
	f.setup(t)
	var e map[string]string
	if code := f.call(t, f.op, "PUT", "/v1/sites/west/networks/bad", api.Network{Kind: KindProduction, Subnet: "10.20.0.0/24", Libvirt: "vlan:7"}, &e); code != 400 || !strings.Contains(e["error"], "network:NAME or bridge:NAME") {
		t.Fatalf("a malformed attachment: %d %q, want 400", code, e["error"])
	}
	if code := f.call(t, f.op, "PUT", "/v1/sites/west/networks/prod-west", api.Network{Kind: KindProduction, Subnet: "10.20.0.0/24", Libvirt: "network:prod"}, nil); code != 200 {
		t.Fatalf("declare a network with a libvirt attachment: %d", code)
	}
	if code := f.call(t, f.op, "POST", "/v1/imports", api.VaultImport{Site: "east", Domain: "db"}, nil); code != 200 {
		t.Fatalf("import: %d", code)
	}
	if j := f.job(t, "/v1/protections", EnableRequest{VM: "db", Target: "west", Networks: map[string]string{"nic0": "prod-west"}}); j.State != JobSucceeded {
		t.Fatalf("protect: %+v", j)
	}
	if j := f.job(t, "/v1/protections/db/failover", api.FailoverRequest{Point: "latest"}); j.State != JobSucceeded {
		t.Fatalf("failover: %+v", j)
	}
	f.west.mu.Lock()
	req := f.west.vms["db"]
	f.west.mu.Unlock()
	if req.Attach != "network:prod" || req.Domain == "" {
		t.Fatalf("the recovery site was asked to start %+v; want it on libvirt's network prod, as its domain", req)
	}
}

// TestSyncFailsOnDamagedReplica: a protect (or reprotect) whose recovery
// site reports the replica as one it cannot open fails with that reason
// at once, instead of waiting for a stream that cannot resume.
func TestSyncFailsOnDamagedReplica(t *testing.T) {
	f := newFixture(t, store.NewMem())
	f.setup(t)
	f.west.mu.Lock()
	f.west.problems = []api.Problem{{Kind: "replica", Name: "vm1", Reason: "open replica image \"vda\": no such file"}}
	f.west.mu.Unlock()
	j := f.job(t, "/v1/protections", EnableRequest{VM: "vm1", Target: "west"})
	if j.State != JobFailed || !strings.Contains(j.Error, "cannot open the replica of vm1") || !strings.Contains(j.Error, "no such file") {
		t.Fatalf("protect onto a damaged replica: %s %q; want failed with the recovery site's reason", j.State, j.Error)
	}
}

// TestImportedNICs: each NIC of an imported domain goes to the site's
// production network with the same libvirt attachment, else to its first
// production network.
func TestImportedNICs(t *testing.T) {
	s := api.Site{Name: "east", Networks: []Network{
		{Name: "drill", Kind: KindIsolated, Libvirt: "network:default"},
		{Name: "prod", Kind: KindProduction, Libvirt: "network:default"},
		{Name: "backend", Kind: KindProduction, Libvirt: "bridge:br1"},
	}}
	got := importedNICs([]api.ImportedNIC{{Attach: "bridge:br1"}, {Attach: "network:default"}, {}, {Attach: "network:other"}}, s)
	want := []NIC{{Name: "nic0", Network: "backend"}, {Name: "nic1", Network: "prod"}, {Name: "nic2", Network: "prod"}, {Name: "nic3", Network: "prod"}}
	if !slices.Equal(got, want) {
		t.Errorf("got %+v, want %+v", got, want)
	}
	if got := importedNICs([]api.ImportedNIC{{}}, api.Site{Name: "x"}); got != nil {
		t.Errorf("a site without a production network: %+v, want none (checkNICs says what to declare)", got)
	}
}
