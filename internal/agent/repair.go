package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/disk"
	"github.com/ferry-dr/ferry/internal/replica"
)

// ResyncReplica is the way out for a replica whose journal is damaged (it
// did not open; see docs/replication.md, "Damaged journals"), or that an
// operator no longer trusts: its journal is set aside (nothing is
// deleted), its images kept, and the source's next stream copies again by
// comparing chunk checksums, sending only what differs. The recovery
// points the damaged journal held are gone from the catalog. Refused
// while a VM or a view uses the replica.
func (a *Agent) ResyncReplica(ctx context.Context, name string) (api.Repair, error) {
	if err := api.CheckName(api.KindGroup, name); err != nil {
		return api.Repair{}, err
	}
	dir := filepath.Join(a.cfg.Dir, "replicas", name)
	if _, err := os.Stat(filepath.Join(dir, "replica.json")); err != nil {
		return api.Repair{}, fmt.Errorf("%w: replica %q", ErrNotFound, name)
	}
	a.closeIdleFiles(name)
	a.mu.Lock()
	rep := a.replicas[name]
	busy := a.replicaBusy(name)
	a.mu.Unlock()
	if busy != "" {
		return api.Repair{}, fmt.Errorf("%w: replica %s: %s", ErrConflict, name, busy)
	}
	r := api.Repair{Name: name}
	if rep != nil {
		// An open replica is closed first; its stream, if any, drops.
		a.mu.Lock()
		delete(a.replicas, name)
		a.mu.Unlock()
		rep.Close()
		r.Steps = append(r.Steps, "replica closed")
	}
	kept, err := replica.ResetForResync(dir, a.cfg.Now())
	if err != nil {
		return r, err
	}
	r.Kept = kept
	r.Steps = append(r.Steps, "damaged journal set aside in "+kept+" (delete it once the VM is protected again)",
		"images kept: the source's next stream compares chunk checksums and sends what differs")
	a.mu.Lock()
	delete(a.problems, "replica/"+name)
	a.mu.Unlock()
	if _, err := a.openReplica(name); err != nil {
		a.problem("replica", name, err)
		return r, err
	}
	a.log.Warn("replica reset for a resync by checksum compare", "replica", name, "kept", kept)
	return r, nil
}

// ReseedGroup is the way out for a source group whose journal is damaged
// (it did not open): the images are taken as they are (synced), the
// journal is set aside (nothing is deleted), a new journal starts past
// the old one, and the group opens and serves again. Its replica is then
// behind the new journal, so the next stream copies the disks again by
// checksum compare (re-seeds it). Writes that were only in the damaged
// journal past the last checkpoint may be missing from the images; if
// that matters, fail over to the replica instead (it received them).
func (a *Agent) ReseedGroup(ctx context.Context, name string) (api.Repair, error) {
	if err := api.CheckName(api.KindGroup, name); err != nil {
		return api.Repair{}, err
	}
	a.mu.Lock()
	_, open := a.groups[name]
	_, damaged := a.problems["group/"+name]
	a.mu.Unlock()
	if open {
		return api.Repair{}, fmt.Errorf("%w: group %s is open and healthy; only a group whose journal did not open is reseeded", ErrConflict, name)
	}
	if !damaged {
		return api.Repair{}, fmt.Errorf("%w: group %q (not a damaged group at this site)", ErrNotFound, name)
	}
	dir := a.groupDir(name)
	kept, first, lost, err := disk.Reseed(dir, a.cfg.Now())
	r := api.Repair{Name: name, Kept: kept}
	if err != nil {
		return r, err
	}
	// Replication state that described the old journal goes: the next
	// stream finds the replica behind the new journal and copies.
	for _, f := range []string{"shipper.json", "bitmap.json", divergenceFile} {
		if err := os.Remove(filepath.Join(dir, f)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return r, err
		}
	}
	r.Steps = append(r.Steps, "images synced and taken as they are",
		"damaged journal set aside in "+kept+" (delete it once the VM is protected again); "+lost+" may be missing from the images",
		fmt.Sprintf("new journal starts at %d: the replica, behind it, is copied again by checksum compare", first))
	a.mu.Lock()
	delete(a.problems, "group/"+name)
	a.mu.Unlock()
	if err := a.openGroup(name, nil); err != nil {
		a.problem("group", name, err)
		return r, err
	}
	a.log.Warn("group reseeded after a damaged journal", "group", name, "kept", kept, "first_seq", first)
	return r, nil
}
