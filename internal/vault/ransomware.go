package vault

import (
	"context"
	"fmt"

	"github.com/ferry-dr/ferry/internal/api"
)

// This file: the ransomware detector's incidents as the vault sees them
// (the detection itself runs at the recovery site: internal/entropy).

// PointLastClean names the newest recovery point before an open
// ransomware incident's first suspicious write.
const PointLastClean = "last-clean"

func sameIncident(a, b *api.EntropyIncident) bool {
	switch {
	case a == nil || b == nil:
		return a == b
	case a.LastClean == nil || b.LastClean == nil:
		return a.FirstSeq == b.FirstSeq && a.PeakBytes == b.PeakBytes && (a.LastClean == nil) == (b.LastClean == nil)
	}
	return a.FirstSeq == b.FirstSeq && a.PeakBytes == b.PeakBytes && a.LastClean.Seq == b.LastClean.Seq
}

// syncDetector sends the protection's policy to the recovery site's
// detector when what it runs with differs (have is with defaults).
func (v *Vault) syncDetector(ctx context.Context, site, vm string, want, have api.RansomwarePolicy) {
	if want.WithDefaults() == have {
		return
	}
	_, c, err := v.site(ctx, site)
	if err == nil {
		err = c.SetRansomwarePolicy(ctx, vm, want)
	}
	if err != nil {
		v.log.Warn("set the ransomware policy at the recovery site", "vm", vm, "site", site, "err", err)
	}
}

// DismissIncident closes a protection's open ransomware incident at its
// recovery site, once an operator has dealt with it: the alert clears and
// retention no longer holds its last clean point. ErrNotFound if none is
// open.
func (v *Vault) DismissIncident(ctx context.Context, vm string) error {
	p, err := v.Protection(ctx, vm)
	if err != nil {
		return err
	}
	if p.Ransomware == nil {
		return fmt.Errorf("%w: %s has no open ransomware incident", ErrNotFound, vm)
	}
	_, c, err := v.site(ctx, p.Target)
	if err != nil {
		return err
	}
	if err := c.DismissIncident(ctx, vm); err != nil {
		return fmt.Errorf("dismiss the incident at %s: %w", p.Target, err)
	}
	v.logEvent(ctx, Event{Object: "ransomware/" + vm, Severity: sevInfo, Kind: "dismissed", Message: vm + ": the ransomware incident was dismissed"})
	_, err = v.updateProtection(ctx, vm, func(p *Protection) error { p.Ransomware = nil; return nil })
	return err
}

// checkLastClean refuses "last-clean" up front for a protection without
// an open incident (the job would only fail).
func (v *Vault) checkLastClean(ctx context.Context, vm, point string) error {
	if point != PointLastClean {
		return nil
	}
	p, err := v.Protection(ctx, vm)
	if err != nil || p.Ransomware != nil {
		return nil // the job reports a missing protection as before
	}
	_, err = lastCleanPoint(p, nil)
	return err
}

// lastCleanPoint is the newest of pts before p's open incident.
func lastCleanPoint(p Protection, pts []api.Point) (api.Point, error) {
	inc := p.Ransomware
	if inc == nil {
		return api.Point{}, fmt.Errorf("%w: %s has no open ransomware incident; %q names the newest point before one", ErrNotFound, p.VM, PointLastClean)
	}
	for i := len(pts) - 1; i >= 0; i-- {
		if pts[i].Seq < inc.FirstSeq {
			return pts[i], nil
		}
	}
	return api.Point{}, fmt.Errorf("%w: the recovery site holds no point before the incident's first write (%s)", ErrNotFound, inc.Start.Format("2006-01-02 15:04:05 MST"))
}

// ransomwareAlert is the alert of an open incident.
func ransomwareAlert(p Protection) Alert {
	inc := p.Ransomware
	clean := "no point before it is left"
	if inc.LastClean != nil {
		clean = fmt.Sprintf("the last clean point is %d (%s)", inc.LastClean.Seq, inc.LastClean.Time.UTC().Format("2006-01-02 15:04:05 MST"))
	}
	return Alert{Object: "ransomware/" + p.VM, Severity: sevCritical,
		Message: fmt.Sprintf("%s: ransomware suspected: low-entropy data overwritten with high-entropy data since %s (%s in one window; the most before was %s); %s",
			p.VM, inc.Start.UTC().Format("2006-01-02 15:04:05 MST"), mib(inc.PeakBytes), mib(inc.BaselineBytes), clean),
		Action: fmt.Sprintf("Check the VM. Restore files from before it (ferry files ls %[1]s --point last-clean), drill it (ferry test-failover %[1]s --point last-clean) "+
			"or fail over to it (ferry failover %[1]s --point last-clean); then dismiss the incident (ferry ransomware dismiss %[1]s). "+
			"Retention keeps that point until then.", p.VM)}
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }
