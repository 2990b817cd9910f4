package vault

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/store"
)

// Network kinds.
const (
	// KindProduction: NAT to the outside, the VMs' published ports
	// forwarded from the site's host addresses.
	KindProduction = api.NetworkProduction
	// KindIsolated: no route out of the network; DR drills run here so a
	// test VM cannot reach, or be mistaken for, the production VM.
	KindIsolated = api.NetworkIsolated
)

// Network is a network a site offers to VMs.
type Network = api.Network

// NIC is a VM's network interface, attached at the VM's site to Network.
type NIC = api.NIC

// defaultNetworks are what a new site offers until it declares its own:
// the same subnets everywhere, as QEMU's defaults.
func defaultNetworks() []Network {
	return []Network{
		{Name: "production", Kind: KindProduction, Subnet: "10.0.2.0/24"},
		{Name: "isolated", Kind: KindIsolated, Subnet: "10.0.3.0/24"},
	}
}

// PutNetwork declares (or changes) a network of a site.
func (v *Vault) PutNetwork(ctx context.Context, site string, n Network) (api.Site, error) {
	if err := api.CheckName(api.KindNetwork, n.Name); err != nil {
		return api.Site{}, err
	}
	if n.Kind != KindProduction && n.Kind != KindIsolated {
		return api.Site{}, fmt.Errorf("%w: network kind %q: want %s or %s", ErrInvalid, n.Kind, KindProduction, KindIsolated)
	}
	if err := api.CheckSubnet(n.Subnet); err != nil {
		return api.Site{}, err
	}
	if n.Libvirt != "" {
		if err := api.CheckAttachment(n.Libvirt); err != nil {
			return api.Site{}, err
		}
	}
	for {
		s, ver, err := get[api.Site](ctx, v.st, kindSite, site)
		if err != nil {
			return s, err
		}
		i := slices.IndexFunc(s.Networks, func(x Network) bool { return x.Name == n.Name })
		if i >= 0 && s.Networks[i].Kind != n.Kind {
			if users := v.networkUsers(ctx, site, n.Name); len(users) > 0 {
				return s, fmt.Errorf("%w: network %s at %s is used by %v; a new kind would change what a failover or drill attaches them to: declare another network", ErrForbidden, n.Name, site, users)
			}
		}
		if i >= 0 {
			s.Networks[i] = n
		} else {
			s.Networks = append(s.Networks, n)
		}
		if _, err := put(ctx, v.st, kindSite, site, s, ver); err == nil {
			return s, nil
		} else if !isConflict(err) {
			return s, err
		}
	}
}

// DeleteNetwork removes a network from a site; refused while a VM or a
// protection uses it.
func (v *Vault) DeleteNetwork(ctx context.Context, site, name string) error {
	if users := v.networkUsers(ctx, site, name); len(users) > 0 {
		return fmt.Errorf("%w: network %s at %s is used by %v; map them to another network first", ErrForbidden, name, site, users)
	}
	for {
		s, ver, err := get[api.Site](ctx, v.st, kindSite, site)
		if err != nil {
			return err
		}
		i := slices.IndexFunc(s.Networks, func(x Network) bool { return x.Name == name })
		if i < 0 {
			return fmt.Errorf("%w: network %s at %s", ErrNotFound, name, site)
		}
		s.Networks = slices.Delete(s.Networks, i, i+1)
		if _, err := put(ctx, v.st, kindSite, site, s, ver); err == nil || !isConflict(err) {
			return err
		}
	}
}

// networkUsers names the VMs and protections that use network name at site.
func (v *Vault) networkUsers(ctx context.Context, site, name string) []string {
	var users []string
	vms, _ := v.VMs(ctx)
	for _, vm := range vms {
		for _, nic := range vm.NICs {
			if vm.Site == site && nic.Network == name {
				users = append(users, "VM "+vm.Name)
			}
		}
	}
	ps, _ := v.Protections(ctx)
	for _, p := range ps {
		for k, n := range p.Networks {
			if strings.HasPrefix(k, site+"/") && n == name {
				users = append(users, "protection "+p.VM)
			}
		}
		if p.TestNetworks[site] == name {
			users = append(users, "protection "+p.VM+" (drills)")
		}
	}
	return users
}

func siteNetwork(s api.Site, name string) (Network, bool) {
	i := slices.IndexFunc(s.Networks, func(n Network) bool { return n.Name == name })
	if i < 0 {
		return Network{}, false
	}
	return s.Networks[i], true
}

// firstOfKind is the site's first network of kind, the default mapping.
func firstOfKind(s api.Site, kind api.NetworkKind) (Network, bool) {
	i := slices.IndexFunc(s.Networks, func(n Network) bool { return n.Kind == kind })
	if i < 0 {
		return Network{}, false
	}
	return s.Networks[i], true
}

// nics returns the VM's NICs; a VM defined without any has one, nic0, on
// its site's first production network.
func vmNICs(vm VM) []NIC {
	if len(vm.NICs) == 0 {
		return []NIC{{Name: "nic0", Network: ""}}
	}
	return vm.NICs
}

// maxNICs bounds a VM's NICs (as the agent does).
const maxNICs = 8

// checkNICs validates a VM's NICs against its site's networks and fills in
// the default network.
func checkNICs(vm *VM, site api.Site) error {
	if len(vm.NICs) == 0 {
		n, ok := firstOfKind(site, KindProduction)
		if !ok {
			return fmt.Errorf("%w: site %s declares no production network for %s's NIC; add one (ferry site network add %s NAME --kind production --subnet CIDR)", ErrInvalid, site.Name, vm.Name, site.Name)
		}
		vm.NICs = []NIC{{Name: "nic0", Network: n.Name}}
	}
	if len(vm.NICs) > maxNICs {
		return fmt.Errorf("%w: %s has %d NICs; ferry attaches at most %d", ErrInvalid, vm.Name, len(vm.NICs), maxNICs)
	}
	seen := map[string]bool{}
	for _, nic := range vm.NICs {
		if err := api.CheckName("NIC", nic.Name); err != nil {
			return err
		}
		if seen[nic.Name] {
			return fmt.Errorf("%w: %s has two NICs named %s", ErrInvalid, vm.Name, nic.Name)
		}
		seen[nic.Name] = true
		if _, ok := siteNetwork(site, nic.Network); !ok {
			return fmt.Errorf("%w: NIC %s of %s: site %s has no network %q (it has %s)", ErrInvalid, nic.Name, vm.Name, site.Name, nic.Network, networkNames(site))
		}
	}
	return nil
}

func networkNames(s api.Site) string {
	var names []string
	for _, n := range s.Networks {
		names = append(names, n.Name+" ("+string(n.Kind)+")")
	}
	if len(names) == 0 {
		return "none"
	}
	return fmt.Sprint(names)
}

// mapNetworks fills in a protection's network mapping: the VM's NICs as
// they are at the source, at the target as asked (nic -> network) or to
// the target's first production network, and the target's drill network
// as asked or its first isolated network. Both sites' drill networks are
// set, so that a drill after a reprotect finds one.
func mapNetworks(p *Protection, vm VM, src, dst api.Site, want map[string]string, testNet string) error {
	p.Networks, p.TestNetworks = map[string]string{}, map[string]string{}
	for nic := range want {
		if !slices.ContainsFunc(vmNICs(vm), func(n NIC) bool { return n.Name == nic }) {
			return fmt.Errorf("%w: %s has no NIC %q to map", ErrInvalid, vm.Name, nic)
		}
	}
	for _, nic := range vmNICs(vm) {
		p.Networks[src.Name+"/"+nic.Name] = nic.Network
		name := want[nic.Name]
		if name == "" {
			n, ok := firstOfKind(dst, KindProduction)
			if !ok {
				return fmt.Errorf("%w: %s declares no production network to attach %s's %s to on failover", ErrInvalid, dst.Name, vm.Name, nic.Name)
			}
			name = n.Name
		}
		n, ok := siteNetwork(dst, name)
		if !ok {
			return fmt.Errorf("%w: %s has no network %q for %s (it has %s)", ErrInvalid, dst.Name, name, nic.Name, networkNames(dst))
		}
		if n.Kind != KindProduction {
			return fmt.Errorf("%w: %s's network %s is %s; a failover attaches the VM to a production network (drills use the isolated one)", ErrInvalid, dst.Name, name, n.Kind)
		}
		p.Networks[dst.Name+"/"+nic.Name] = name
	}
	for _, s := range []api.Site{dst, src} {
		name := ""
		if s.Name == dst.Name {
			name = testNet
		}
		if name == "" {
			n, ok := firstOfKind(s, KindIsolated)
			if !ok {
				if s.Name == dst.Name {
					return fmt.Errorf("%w: %s declares no isolated network for drills; add one (ferry site network add %s NAME --kind isolated --subnet CIDR)", ErrInvalid, s.Name, s.Name)
				}
				continue
			}
			name = n.Name
		}
		n, ok := siteNetwork(s, name)
		if !ok || n.Kind != KindIsolated {
			return fmt.Errorf("%w: %s has no isolated network %q for drills (it has %s)", ErrInvalid, s.Name, name, networkNames(s))
		}
		p.TestNetworks[s.Name] = name
	}
	return nil
}

// attach returns the networks the VM's NICs use at site, in the VM's
// order: for a drill, the site's drill network for every NIC; otherwise
// the protection's mapping (or, unprotected, the VM's own).
func (v *Vault) attach(ctx context.Context, p *Protection, vm VM, site string, drill bool) ([]Network, error) {
	s, _, err := get[api.Site](ctx, v.st, kindSite, site)
	if err != nil {
		return nil, err
	}
	var nets []Network
	for _, nic := range vmNICs(vm) {
		name := nic.Network
		if p != nil && drill {
			name = p.TestNetworks[site]
		} else if p != nil && p.Networks[site+"/"+nic.Name] != "" {
			name = p.Networks[site+"/"+nic.Name]
		}
		if name == "" { // a VM or protection from before networks were declared
			kind := KindProduction
			if drill {
				kind = KindIsolated
			}
			n, ok := firstOfKind(s, kind)
			if !ok {
				return nil, fmt.Errorf("%w: %s has no %s network for %s", ErrInvalid, site, kind, vm.Name)
			}
			nets = append(nets, n)
			continue
		}
		n, ok := siteNetwork(s, name)
		if !ok && p != nil && p.Networks[site+"/"+nic.Name] == "" {
			// A member of a consistency group: the protection maps the
			// group's NICs, not its members'; a network of the same name,
			// else the site's first production network.
			n, ok = firstOfKind(s, KindProduction)
		}
		if !ok {
			return nil, fmt.Errorf("%w: %s no longer has network %q that %s's %s maps to; declare it again", ErrInvalid, site, name, vm.Name, nic.Name)
		}
		nets = append(nets, n)
	}
	return nets, nil
}

// describeNets says where the VM's NICs attach, for a job's messages:
// "network prod (production, 10.0.5.0/24)" for one NIC, "NICs nic0 on
// prod (production, 10.0.5.0/24), nic1 on ..." for several.
func describeNets(vm VM, nets []Network) string {
	if len(nets) == 1 {
		n := nets[0]
		return fmt.Sprintf("network %s (%s, %s)", n.Name, n.Kind, n.Subnet)
	}
	nics := vmNICs(vm)
	var parts []string
	for i, n := range nets {
		parts = append(parts, fmt.Sprintf("%s on %s (%s, %s)", nics[i].Name, n.Name, n.Kind, n.Subnet))
	}
	return "NICs " + strings.Join(parts, ", ")
}

// vmRequest is the request that starts vm (as name) at site, on a replica
// point if seq is not zero, its NICs attached to nets (one each, in
// order). The forwards reach the guest port through the first NIC.
func vmRequest(vm VM, name, site string, seq uint64, nets []Network) api.VMRequest {
	req := api.VMRequest{Name: name, VCPUs: vm.VCPUs, MemoryMiB: vm.MemoryMiB, QGA: vm.QGA,
		Boot: api.Boot{Kernel: vm.Kernel, Initrd: vm.Initrd, Append: vm.Append}, Domain: vm.Domain, Firmware: vm.Firmware}
	if seq != 0 {
		req.Replica, req.Seq = vm.Name, seq
	} else {
		req.Group = vm.Name
	}
	nics := vmNICs(vm)
	for i, n := range nets {
		nic := api.NICRequest{Name: nics[i].Name, Net: api.NetUser, Subnet: n.Subnet, Attach: n.Libvirt}
		if n.Kind == KindIsolated {
			nic.Net = api.NetIsolated
		}
		if addr := forwardAddr(vm, site, n); i == 0 && addr != "" && vm.GuestPort > 0 {
			// Stored forwards were validated; one that no longer parses (an
			// older vault stored it) is left out rather than passed on.
			if ap, err := parseForward(addr); err == nil {
				nic.Forwards = []api.Forward{{Host: ap, GuestPort: vm.GuestPort}}
			}
		}
		req.NICs = append(req.NICs, nic)
	}
	if len(req.NICs) > 0 { // for an agent from before several NICs
		first := req.NICs[0]
		req.Net, req.Subnet, req.Attach, req.Forwards = first.Net, first.Subnet, first.Attach, first.Forwards
	}
	return req
}

// SetForwards changes a VM's published addresses: each key "site" or
// "site/network" gets the host address given, or loses it if "". They take
// effect the next time the VM starts there (a failover, a drill).
func (v *Vault) SetForwards(ctx context.Context, name string, fw map[string]string) (VM, error) {
	if err := checkForwards(fw, true); err != nil {
		return VM{}, err
	}
	for k := range fw {
		site, _, _ := strings.Cut(k, "/")
		if _, _, err := get[api.Site](ctx, v.st, kindSite, site); err != nil {
			return VM{}, fmt.Errorf("forward %q: %w", k, err)
		}
	}
	for {
		vm, ver, err := get[VM](ctx, v.st, kindVM, name)
		if err != nil {
			return vm, err
		}
		if vm.Forwards == nil {
			vm.Forwards = map[string]string{}
		}
		for k, addr := range fw {
			if addr == "" {
				delete(vm.Forwards, k)
			} else {
				vm.Forwards[k] = addr
			}
		}
		if _, err := put(ctx, v.st, kindVM, name, vm, ver); err == nil || !isConflict(err) {
			return vm, err
		}
	}
}

// forwardAddr is the host address at site that reaches the VM's service
// on network n: VM.Forwards["site/network"], or for a production network
// VM.Forwards["site"].
func forwardAddr(vm VM, site string, n Network) string {
	if a := vm.Forwards[site+"/"+n.Name]; a != "" {
		return a
	}
	if n.Kind == KindProduction {
		return vm.Forwards[site]
	}
	return ""
}

func isConflict(err error) bool { return errors.Is(err, store.ErrConflict) }

// checkForwards validates published addresses: each key is "site" or
// "site/network" (valid names), each value an IPv4 address and a port
// (net/netip), or "" to remove one if removal is allowed. Nothing else
// can reach QEMU's option list.
func checkForwards(fw map[string]string, removal bool) error {
	for k, addr := range fw {
		site, network, hasNet := strings.Cut(k, "/")
		if err := api.CheckName(api.KindSite, site); err != nil {
			return fmt.Errorf("forward %q: %w", k, err)
		}
		if hasNet {
			if err := api.CheckName(api.KindNetwork, network); err != nil {
				return fmt.Errorf("forward %q: %w", k, err)
			}
		}
		if addr == "" && removal {
			continue
		}
		if _, err := parseForward(addr); err != nil {
			return fmt.Errorf("forward %q: %w", k, err)
		}
	}
	return nil
}

// parseForward parses a published address: an IPv4 address and a port.
func parseForward(addr string) (netip.AddrPort, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil || !ap.Addr().Is4() || ap.Port() == 0 {
		return netip.AddrPort{}, fmt.Errorf("%w: %q is not an IPv4 address and a port (like 127.0.0.1:8080)", ErrInvalid, addr)
	}
	return ap, nil
}
