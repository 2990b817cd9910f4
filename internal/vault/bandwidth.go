package vault

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/bandwidth"
	"github.com/ferry-dr/ferry/internal/store"
)

// kindBandwidth holds the one BandwidthCaps record, under bandwidthID.
const (
	kindBandwidth = "bandwidth"
	bandwidthID   = "caps"
)

// BandwidthCaps returns the replication caps.
func (v *Vault) BandwidthCaps(ctx context.Context) (api.BandwidthCaps, error) {
	c, _, err := get[api.BandwidthCaps](ctx, v.st, kindBandwidth, bandwidthID)
	if errors.Is(err, ErrNotFound) {
		return api.BandwidthCaps{}, nil
	}
	return c, err
}

// SetPairCap sets the cap of what site from streams to site to (a zero
// limit without a schedule removes it). ErrNotFound for an unknown site,
// ErrInvalid for a malformed limit or from == to. The sites get it at
// once if they answer, else at their next poll.
func (v *Vault) SetPairCap(ctx context.Context, from, to string, lim api.BandwidthLimit) error {
	if from == to {
		return fmt.Errorf("%w: a site pair needs two sites", ErrInvalid)
	}
	for _, s := range []string{from, to} {
		if _, _, err := get[api.Site](ctx, v.st, kindSite, s); err != nil {
			return fmt.Errorf("site %q: %w", s, err)
		}
	}
	if err := bandwidth.Check(lim); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	return v.updateCaps(ctx, func(c *api.BandwidthCaps) {
		c.Pairs = slices.DeleteFunc(c.Pairs, func(p api.BandwidthPair) bool { return p.From == from && p.To == to })
		if !unlimited(lim) {
			c.Pairs = append(c.Pairs, api.BandwidthPair{From: from, To: to, Limit: lim})
			slices.SortFunc(c.Pairs, func(a, b api.BandwidthPair) int {
				return strings.Compare(a.From+"\x00"+a.To, b.From+"\x00"+b.To)
			})
		}
	})
}

// SetVMCap sets the cap of one protected VM's stream (a zero limit
// without a schedule removes it). ErrNotFound for an unknown VM,
// ErrInvalid for a malformed limit.
func (v *Vault) SetVMCap(ctx context.Context, vm string, lim api.BandwidthLimit) error {
	if _, _, err := get[VM](ctx, v.st, kindVM, vm); err != nil {
		return fmt.Errorf("VM %q: %w", vm, err)
	}
	if err := bandwidth.Check(lim); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	return v.updateCaps(ctx, func(c *api.BandwidthCaps) {
		delete(c.VMs, vm)
		if !unlimited(lim) {
			if c.VMs == nil {
				c.VMs = map[string]api.BandwidthLimit{}
			}
			c.VMs[vm] = lim
		}
	})
}

func unlimited(l api.BandwidthLimit) bool { return l.BitsPerSecond == 0 && len(l.Schedule) == 0 }

func (v *Vault) updateCaps(ctx context.Context, change func(*api.BandwidthCaps)) error {
	for {
		c, ver, err := get[api.BandwidthCaps](ctx, v.st, kindBandwidth, bandwidthID)
		if err != nil && !errors.Is(err, ErrNotFound) {
			return err
		}
		change(&c)
		if _, err := put(ctx, v.st, kindBandwidth, bandwidthID, c, ver); !errors.Is(err, store.ErrConflict) {
			if err == nil {
				v.pushCapsAll(ctx)
			}
			return err
		}
	}
}

// siteCaps is what site must honour: the pairs it streams from, by peer,
// and the VMs it is the source of.
func (v *Vault) siteCaps(ctx context.Context, site string, c api.BandwidthCaps) api.Bandwidth {
	var bw api.Bandwidth
	for _, p := range c.Pairs {
		if p.From == site {
			if bw.Peers == nil {
				bw.Peers = map[string]api.BandwidthLimit{}
			}
			bw.Peers[p.To] = p.Limit
		}
	}
	if len(c.VMs) > 0 {
		ps, _ := v.Protections(ctx)
		for _, p := range ps {
			if lim, ok := c.VMs[p.VM]; ok && p.Source == site {
				if bw.Groups == nil {
					bw.Groups = map[string]api.BandwidthLimit{}
				}
				bw.Groups[p.VM] = lim
			}
		}
	}
	return bw
}

// pushCaps hands site its caps if they changed since the last push that
// it took (a restarted vault pushes once; an agent keeps what it got
// across its own restarts).
func (v *Vault) pushCaps(ctx context.Context, site string, c Site) {
	caps, err := v.BandwidthCaps(ctx)
	if err != nil {
		return
	}
	want := v.siteCaps(ctx, site, caps)
	v.sitesMu.Lock()
	had, ok := v.pushed[site]
	v.sitesMu.Unlock()
	if ok && reflect.DeepEqual(had, want) {
		return
	}
	if err := c.SetBandwidth(ctx, want); err != nil {
		v.log.Warn("hand bandwidth caps to site; retrying at its next poll", "site", site, "err", err)
		return
	}
	v.sitesMu.Lock()
	v.pushed[site] = want
	v.sitesMu.Unlock()
}

// pushCapsAll pushes to every site now (after a change).
func (v *Vault) pushCapsAll(ctx context.Context) {
	sites, err := v.Sites(ctx)
	if err != nil {
		return
	}
	for _, s := range sites {
		v.pushCaps(ctx, s.Name, v.siteClient(s.Addr, s.Name))
	}
}
