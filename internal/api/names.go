package api

import (
	"fmt"
	"net/netip"
)

// Kinds of names, for messages and for their length limits.
const (
	KindSite     = "site"
	KindVM       = "VM"
	KindDisk     = "disk"
	KindGroup    = "group"
	KindNetwork  = "network"
	KindPolicy   = "policy"
	KindPlan     = "plan"
	KindIdentity = "identity" // the name in a certificate (operator, vault)
)

// MaxName is the longest name of any kind. A VM's name is shorter by the
// suffix a drill adds to it ("-drill"), so that the drill's name is valid
// too.
const (
	MaxName   = 63
	MaxVMName = MaxName - len("-drill")
)

// CheckName is the one validator for every name a user gives ferry: 1 to
// MaxName ASCII letters, digits, '-' and '_', starting with a letter or a
// digit. Such a name is safe as a path segment, a file name, a QEMU
// option value and a label; anything else is refused with ErrInvalid.
func CheckName(kind, s string) error {
	limit := MaxName
	if kind == KindVM {
		limit = MaxVMName
	}
	if s == "" {
		return fmt.Errorf("%w: a %s name is required", ErrInvalid, kind)
	}
	if len(s) > limit {
		return fmt.Errorf("%w: %s name %.20q... is %d characters long; the limit is %d", ErrInvalid, kind, s, len(s), limit)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || i > 0 && (c == '-' || c == '_')
		if !ok {
			return fmt.Errorf("%w: %s name %q: use letters, digits, '-' and '_', starting with a letter or a digit", ErrInvalid, kind, s)
		}
	}
	return nil
}

// CheckSubnet accepts an IPv4 network in CIDR notation that user-mode
// networking can serve: between /8 and /28, so that it has room for the
// gateway, DNS and DHCP addresses.
func CheckSubnet(cidr string) error {
	p, err := netip.ParsePrefix(cidr)
	if err != nil || !p.Addr().Is4() {
		return fmt.Errorf("%w: subnet %q is not an IPv4 network in CIDR notation (like 10.20.0.0/24)", ErrInvalid, cidr)
	}
	if p.Bits() < 8 || p.Bits() > 28 {
		return fmt.Errorf("%w: subnet %q: the prefix must be between /8 and /28", ErrInvalid, cidr)
	}
	if p.Masked() != p {
		return fmt.Errorf("%w: subnet %q has host bits set; did you mean %s?", ErrInvalid, cidr, p.Masked())
	}
	return nil
}
