package disk

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/atomicfile"
	"github.com/ferry-dr/ferry/internal/journal"
)

// FoldStatus is the progress of a layered group's background fold.
type FoldStatus = api.FoldStatus

// CrashPoint, if set (tests only), is called at each named step of a
// multi-file change; a test makes the process die there and reopens.
var CrashPoint func(name string)

func crash(name string) {
	if CrashPoint != nil {
		CrashPoint(name)
	}
}

func (g *Group) topPath(name string) string { return filepath.Join(g.cfg.Dir, "images", name+".top") }
func (g *Group) mapPath(name string) string {
	return filepath.Join(g.cfg.Dir, "images", name+".top.map")
}

// CreateLayered writes, in dir (which must not hold a group), a group
// whose disks are layered over base: each disk's top layer is the file
// layers[id].Path, moved in, holding the blocks layers[id].Present.
// Nothing is opened: Open with a Config whose OpenBase returns the base
// named ref opens it. A commit builds the group aside with this and then
// renames the directory into place, so the switch is one rename.
func CreateLayered(dir string, disks []Spec, layers map[uint16]Layer, ref BaseRef) error {
	if _, err := os.Stat(filepath.Join(dir, "group.json")); err == nil {
		return fmt.Errorf("%w: a group in %s", ErrExists, dir)
	}
	if err := os.MkdirAll(filepath.Join(dir, "images"), 0o700); err != nil {
		return fmt.Errorf("create group dir: %w", err)
	}
	g := &Group{cfg: Config{Dir: dir}}
	for _, s := range disks {
		l, ok := layers[s.ID]
		if !ok {
			return fmt.Errorf("%w: no top layer for disk %q", ErrUnknownDisk, s.Name)
		}
		if err := os.Rename(l.Path, g.topPath(s.Name)); err != nil {
			return fmt.Errorf("move top layer of %q: %w", s.Name, err)
		}
		if err := saveMap(g.mapPath(s.Name), l.Present); err != nil {
			return err
		}
	}
	if err := atomicfile.SyncDir(filepath.Join(dir, "images")); err != nil {
		return err
	}
	r := ref
	return g.saveManifest(manifest{Version: 2, Disks: disks, Base: &r})
}

// openBase opens a layered group's base and, if a previous run stopped in
// the middle of taking its images, finishes that.
func (g *Group) openBase() error {
	if g.man.Base == nil {
		g.removeLeftovers()
		return nil
	}
	if g.cfg.OpenBase == nil {
		return fmt.Errorf("group %s is layered over %s but nothing can open its base", g.cfg.Dir, g.man.Base.Name)
	}
	b, err := g.cfg.OpenBase(*g.man.Base)
	if err != nil {
		return fmt.Errorf("open base %s of layered group: %w", g.man.Base.Name, err)
	}
	g.base = b
	if g.man.Base.Finishing {
		return g.takeImages()
	}
	return nil
}

// removeLeftovers deletes top layers that a finished fold did not get to.
func (g *Group) removeLeftovers() {
	ents, _ := os.ReadDir(filepath.Join(g.cfg.Dir, "images"))
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".top") || strings.HasSuffix(e.Name(), ".top.map") {
			os.Remove(filepath.Join(g.cfg.Dir, "images", e.Name()))
		}
	}
}

func (g *Group) openLayered(s Spec) error {
	top, err := os.OpenFile(g.topPath(s.Name), os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("open top layer of disk %q: %w", s.Name, err)
	}
	set, err := loadMap(g.mapPath(s.Name))
	if err != nil {
		top.Close()
		return err
	}
	l := &layered{id: s.ID, size: s.Size, top: top, present: set, base: g.base}
	if g.base.Flat() {
		if err := l.becomeFlat(); err != nil {
			top.Close()
			return err
		}
	}
	g.disks[s.ID] = newDisk(g, s, l)
	return nil
}

// Layered reports whether the group's disks are still layered over a base.
func (g *Group) Layered() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.base != nil
}

// Fold returns the background fold's progress (Done once the images are
// plain).
func (g *Group) Fold() FoldStatus {
	g.mu.Lock()
	layered := g.base != nil
	g.mu.Unlock()
	if !layered {
		return FoldStatus{Phase: api.FoldDone}
	}
	if f := g.foldLeft.Load(); f != nil {
		return *f
	}
	return FoldStatus{Phase: api.FoldJournal} // before the first step
}

// Fold step sizes: one step holds a layer's lock for at most this much
// work, so the VM's writes wait for milliseconds at most. (Variables:
// tests make the steps small to interleave more.)
var (
	foldEntries = 2048
	foldBlocks  = 256
)

// FoldStep does one bounded step of a layered group's fold: flatten the
// base by some journal entries; or, once it is flat, move some blocks of
// the top layers into it; or, when nothing is left in them, take the
// base's image files as the group's plain images. It returns the bytes it
// wrote and done once the images are plain. Safe to call concurrently
// with I/O; a crash at any moment loses nothing (see layered).
func (g *Group) FoldStep(ctx context.Context) (wrote int64, done bool, err error) {
	g.foldMu.Lock()
	defer g.foldMu.Unlock()
	g.mu.Lock()
	base := g.base
	var ls []*layered
	for _, d := range g.disks {
		if l, ok := d.image().(*layered); ok {
			ls = append(ls, l)
		}
	}
	g.mu.Unlock()
	if base == nil {
		g.foldLeft.Store(&FoldStatus{Phase: api.FoldDone})
		return 0, true, nil
	}
	if !base.Flat() {
		left, n, err := base.FlattenStep(ctx, foldEntries)
		g.foldLeft.Store(&FoldStatus{Phase: api.FoldJournal, EntriesLeft: left, BytesLeft: g.topBytes(ls)})
		if err != nil || left > 0 {
			return n, false, err
		}
	}
	var moved, left int64
	for _, l := range ls {
		if err := l.becomeFlat(); err != nil {
			return moved, false, err
		}
		m, k, err := l.moveSome(foldBlocks)
		moved += m
		left += k
		if err != nil {
			return moved, false, err
		}
		if m > 0 {
			break // one disk per step
		}
	}
	g.foldLeft.Store(&FoldStatus{Phase: api.FoldOverlay, BytesLeft: g.topBytes(ls)})
	if moved > 0 || left > 0 {
		return moved, false, nil
	}
	if err := g.finishFold(ctx); err != nil {
		return 0, false, err
	}
	g.foldLeft.Store(&FoldStatus{Phase: api.FoldDone})
	return 0, true, nil
}

func (g *Group) topBytes(ls []*layered) int64 {
	var n int64
	for _, l := range ls {
		n += l.left() * BlockSize
	}
	return n
}

// FinishFold runs the fold to its end at full speed (a reprotect that
// turns the group into a replica needs plain images).
func (g *Group) FinishFold(ctx context.Context) error {
	for {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		_, done, err := g.FoldStep(ctx)
		if err != nil || done {
			return err
		}
	}
}

// finishFold takes the flat base's images as the group's own: with no
// write or checkpoint running, it makes them durable, records the intent
// (Finishing), moves the files, records the plain manifest, and then
// deletes the top layers and the base. Caller holds foldMu.
func (g *Group) finishFold(ctx context.Context) error {
	g.ckptMu.Lock()
	defer g.ckptMu.Unlock()
	g.manMu.Lock()
	defer g.manMu.Unlock()
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.failed != nil {
		return g.failed
	}
	for _, d := range g.disks {
		l := d.image().(*layered)
		if l.flat == nil || l.present.Len() != 0 {
			return fmt.Errorf("finish fold of %q: not flat or blocks left in the top layer", d.spec.Name)
		}
		if err := l.Sync(); err != nil {
			g.failed = fmt.Errorf("%w: fsync image %q: %w", ErrFailed, d.spec.Name, err)
			return g.failed
		}
	}
	m := g.man
	ref := *m.Base
	ref.Finishing = true
	m.Base = &ref
	if err := g.saveManifest(m); err != nil {
		return err
	}
	g.man = m
	crash("finish-intent-saved")
	g.imgMu.Lock() // the index's fold writes through d.image()
	defer g.imgMu.Unlock()
	for _, d := range g.disks {
		l := d.image().(*layered)
		l.mu.Lock()
		l.top.Close()
		d.img.Store(&imageBox{plainImage{l.flat}})
		l.mu.Unlock()
	}
	return g.takeImages()
}

// takeImages moves the base's image files into the group (those not moved
// yet), saves the plain manifest and deletes the top layers and the base.
// Idempotent: Open calls it for a group whose manifest says Finishing.
// Caller holds mu (or has the group to itself).
func (g *Group) takeImages() error {
	for _, s := range g.man.Disks {
		src := g.base.ImagePath(s.ID)
		if _, err := os.Stat(src); errors.Is(err, os.ErrNotExist) {
			continue // moved before a crash
		}
		if err := os.Rename(src, g.imagePath(s.Name)); err != nil {
			return fmt.Errorf("take image of %q from the base: %w", s.Name, err)
		}
		crash("finish-image-moved")
	}
	if err := atomicfile.SyncDir(filepath.Join(g.cfg.Dir, "images")); err != nil {
		return err
	}
	m := g.man
	m.Base, m.Version = nil, 1
	if err := g.saveManifest(m); err != nil {
		return err
	}
	g.man = m
	crash("finish-plain-saved")
	g.removeLeftovers()
	base := g.base
	g.base = nil
	if err := base.Release(); err != nil {
		g.log.Warn("delete the committed replica after the fold", "err", err)
	}
	g.log.Info("fold done: the disks are plain images")
	return nil
}

// foldLoop runs the fold in the background at FoldRate until it is done.
func (g *Group) foldLoop(ctx context.Context) {
	rate := g.cfg.FoldRate
	if rate == 0 {
		rate = 128 << 20
	}
	start := time.Now()
	var total int64
	for {
		wrote, done, err := g.FoldStep(ctx)
		if done {
			g.log.Info("background fold finished", "bytes", total, "took", time.Since(start).Round(time.Millisecond))
			return
		}
		total += wrote
		wait := time.Duration(0)
		if err != nil {
			g.log.Error("background fold; retrying in 5 s", "err", err)
			wait = 5 * time.Second
		} else if rate > 0 {
			wait = time.Duration(float64(wrote) / float64(rate) * float64(time.Second))
		}
		if wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-g.stop:
				t.Stop()
				return
			case <-t.C:
			}
		} else {
			select {
			case <-ctx.Done():
				return
			case <-g.stop:
				return
			default:
			}
		}
	}
}

// Remove closes the group and deletes it with its base.
func (g *Group) Remove() error {
	g.mu.Lock()
	base := g.base
	g.base = nil
	g.mu.Unlock()
	err := g.Close()
	if base != nil {
		if rerr := base.Release(); rerr != nil && err == nil {
			err = rerr
		}
	}
	if rerr := atomicfile.RemoveDir(g.cfg.Dir); rerr != nil && err == nil {
		err = rerr
	}
	return err
}

// Reseed makes the group in dir, whose journal is damaged, usable again
// with its images as they are: the images are synced, the journal is moved
// aside (returned: nothing is deleted) and the manifest records that the
// images hold everything up to a sequence number past any the old journal
// can have held, so a new journal starts after it. A replica of the group
// is then behind the new journal's start, and its next stream copies the
// disks again by checksum compare. Writes that were only in the damaged
// journal's entries past the last checkpoint and never reached the images
// are lost: the caller reports lost, the number of entries past the last
// checkpoint the old journal named. The group must not be open.
func Reseed(dir string, now time.Time) (kept string, firstSeq uint64, lost string, err error) {
	g := &Group{cfg: Config{Dir: dir}}
	if err := g.loadManifest(); err != nil {
		return "", 0, "", err
	}
	if g.man.Base != nil {
		return "", 0, "", fmt.Errorf("group %s is still folding a commit: reseeding it is not supported", dir)
	}
	for _, s := range g.man.Disks {
		f, err := os.OpenFile(g.imagePath(s.Name), os.O_RDWR, 0)
		if err != nil {
			return "", 0, "", fmt.Errorf("open image of %q: %w", s.Name, err)
		}
		err = f.Sync()
		f.Close()
		if err != nil {
			return "", 0, "", fmt.Errorf("sync image of %q: %w", s.Name, err)
		}
	}
	// Past any sequence number the old journal can hold: its newest
	// segment starts at its name, and holds at most one entry per header.
	jdir := filepath.Join(dir, "journal")
	last := g.man.AppliedSeq
	ents, _ := os.ReadDir(jdir)
	for _, e := range ents {
		name, ok := strings.CutSuffix(e.Name(), ".seg")
		if !ok {
			continue
		}
		first, perr := strconv.ParseUint(name, 10, 64)
		info, ierr := e.Info()
		if perr != nil || ierr != nil {
			continue
		}
		last = max(last, first+uint64(info.Size()/journal.EntryHeaderSize))
	}
	firstSeq = last + 2
	lost = fmt.Sprintf("entries after %d (the last checkpoint) that the damaged journal held", g.man.AppliedSeq)
	kept = filepath.Join(dir, fmt.Sprintf("journal.damaged-%d", now.Unix()))
	if err := os.Rename(jdir, kept); err != nil && !errors.Is(err, os.ErrNotExist) {
		return "", 0, "", fmt.Errorf("set the journal aside: %w", err)
	}
	m := g.man
	m.AppliedSeq = firstSeq - 1
	if err := g.saveManifest(m); err != nil {
		return kept, 0, "", err
	}
	return kept, firstSeq, lost, nil
}
