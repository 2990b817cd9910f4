package vault

import (
	"context"
	"errors"
	"fmt"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/store"
)

// ImportVM starts importing a shut-off libvirt domain at a site (ferry vm
// import --libvirt): the site copies its disks into a group of its name.
// The VM is defined in the vault once the copy is done, by the first
// ImportStatus that sees it done. ErrForbidden if a VM of that name
// exists already.
func (v *Vault) ImportVM(ctx context.Context, req api.VaultImport) (api.ImportStatus, error) {
	site, domain := req.Site, req.Domain
	if err := checkForwards(req.Forwards, false); err != nil {
		return api.ImportStatus{}, err
	}
	if req.GuestPort < 0 || req.GuestPort > 65535 {
		return api.ImportStatus{}, fmt.Errorf("%w: guest port %d", ErrInvalid, req.GuestPort)
	}
	if err := api.CheckName(api.KindVM, domain); err != nil {
		return api.ImportStatus{}, fmt.Errorf("%w: domain %q cannot name a VM: %v", ErrInvalid, domain, err)
	}
	if _, _, err := get[VM](ctx, v.st, kindVM, domain); err == nil {
		return api.ImportStatus{}, fmt.Errorf("%w: VM %q exists", ErrForbidden, domain)
	}
	_, c, err := v.site(ctx, site)
	if err != nil {
		return api.ImportStatus{}, err
	}
	// What the VM gets besides what the site reads, until it is defined.
	_, ver, _ := get[api.VaultImport](ctx, v.st, kindImport, domain)
	if _, err := put(ctx, v.st, kindImport, domain, req, ver); err != nil {
		return api.ImportStatus{}, err
	}
	st, err := c.Import(ctx, domain)
	if err != nil {
		return st, fmt.Errorf("import %s at %s: %w", domain, site, err)
	}
	return v.importDone(ctx, site, st)
}

// Domains lists a site's libvirt domains that ferry does not run yet:
// what the portal's inventory offers to import.
func (v *Vault) Domains(ctx context.Context, site string) ([]api.DomainInfo, error) {
	_, c, err := v.site(ctx, site)
	if err != nil {
		return nil, err
	}
	ds, err := c.Domains(ctx)
	if err != nil {
		return nil, fmt.Errorf("domains at %s: %w", site, err)
	}
	return ds, nil
}

// ImportStatus reports an import at a site, and defines the VM once it
// is done (idempotent).
func (v *Vault) ImportStatus(ctx context.Context, site, domain string) (api.ImportStatus, error) {
	_, c, err := v.site(ctx, site)
	if err != nil {
		return api.ImportStatus{}, err
	}
	st, err := c.ImportStatus(ctx, domain)
	if err != nil {
		return st, err
	}
	return v.importDone(ctx, site, st)
}

// importDone defines the VM of a finished import, from what the site
// read of the domain: its vCPUs, memory, guest agent, disks and
// definition (which the site's libvirt runs it with, here or at a
// recovery site).
func (v *Vault) importDone(ctx context.Context, site string, st api.ImportStatus) (api.ImportStatus, error) {
	if st.State != api.ImportDone || st.Result == nil {
		return st, nil
	}
	res := st.Result
	if vm, _, err := get[VM](ctx, v.st, kindVM, res.Domain); err == nil {
		if vm.Site == site && vm.Domain != "" {
			return st, nil // defined by an earlier look
		}
		return st, fmt.Errorf("%w: VM %q exists, not from this import", ErrForbidden, res.Domain)
	}
	s, _, err := get[api.Site](ctx, v.st, kindSite, site)
	if err != nil {
		return st, err
	}
	// A domain imported live runs on as the VM: the vault restarts it if
	// it goes missing, as for a VM it started.
	vm := VM{Name: res.Domain, Site: site, VCPUs: max(res.VCPUs, 1), MemoryMiB: res.MemoryMiB, QGA: res.QGA, Domain: res.Original, Running: res.Live}
	if res.Firmware == "uefi" {
		vm.Firmware = "uefi"
	}
	req, rver, rerr := get[api.VaultImport](ctx, v.st, kindImport, res.Domain)
	if rerr == nil && req.Site == site {
		vm.Forwards, vm.GuestPort = req.Forwards, req.GuestPort
	}
	for _, d := range res.Disks {
		vm.Disks = append(vm.Disks, api.VMDisk{Name: d.Name, Size: d.Size})
	}
	vm.NICs = importedNICs(res.NICs, s)
	if err := checkVM(vm); err != nil {
		return st, err
	}
	if err := checkNICs(&vm, s); err != nil {
		return st, err
	}
	if _, err := put(ctx, v.st, kindVM, vm.Name, vm, 0); err != nil && !errors.Is(err, store.ErrConflict) {
		return st, err
	}
	if rerr == nil {
		v.st.Delete(ctx, kindImport, res.Domain, rver)
	}
	v.log.Info("VM imported from libvirt", "vm", vm.Name, "site", site, "disks", len(vm.Disks))
	return st, nil
}

// ReleaseVM gives an imported VM back to libvirt as it was before the
// import (its own disks) and forgets it; its group stays at the site
// with what the VM wrote since (delete it with the site's agent once
// sure). The VM must be stopped and unprotected.
func (v *Vault) ReleaseVM(ctx context.Context, name string) error {
	vm, ver, err := get[VM](ctx, v.st, kindVM, name)
	if err != nil {
		return err
	}
	if vm.Domain == "" {
		return fmt.Errorf("%w: %s was not imported from libvirt", ErrInvalid, name)
	}
	if p, err := v.Protection(ctx, name); err == nil && p.State != StateDisabled {
		return fmt.Errorf("%w: %s is protected (%s); disable protection first (ferry disable %s)", ErrForbidden, name, p.State, name)
	}
	_, c, err := v.site(ctx, vm.Site)
	if err != nil {
		return err
	}
	if err := c.Release(ctx, name); err != nil {
		if errors.Is(err, api.ErrConflict) {
			return fmt.Errorf("%w: %s runs at %s; stop it first (ferry vm stop %s): %v", ErrForbidden, name, vm.Site, name, err)
		}
		return err
	}
	return v.forgetVM(ctx, name, ver)
}

// importedNICs names the domain's NICs nic0, nic1, ... in its order, each
// on the site's network with the same libvirt attachment (a domain on
// libvirt's "default" network goes to the site network declared
// --libvirt network:default), or else on the site's first production
// network. None (a domain without NICs, a site without a production
// network) leaves the default, or the error, to checkNICs.
func importedNICs(nics []api.ImportedNIC, s api.Site) []NIC {
	var out []NIC
	prod, ok := firstOfKind(s, KindProduction)
	if !ok {
		return nil // checkNICs says what to declare
	}
	for i, n := range nics {
		nic := NIC{Name: fmt.Sprintf("nic%d", i), Network: prod.Name}
		for _, sn := range s.Networks {
			if n.Attach != "" && sn.Libvirt == n.Attach && sn.Kind == KindProduction {
				nic.Network = sn.Name
				break
			}
		}
		out = append(out, nic)
	}
	return out
}
