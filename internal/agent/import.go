package agent

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/atomicfile"
	"github.com/ferry-dr/ferry/internal/disk"
	"github.com/ferry-dr/ferry/internal/qemu"
)

// Importer adopts VMs defined outside ferry (libvirt domains). A runtime
// that can implements it.
type Importer interface {
	// Describe reads a domain without changing it: its definition,
	// vCPUs, memory, guest agent channel and disks (file or block device
	// and format); running says whether it runs now. ErrNotFound for no
	// such domain, ErrInvalid for one ferry cannot import.
	Describe(ctx context.Context, name string) (res api.ImportResult, running bool, err error)
	// Domains names every domain defined or running, ferry's own too.
	Domains(ctx context.Context) ([]string, error)
	// Definition is the definition spec (Domain set) runs with.
	Definition(ctx context.Context, spec qemu.Spec, console string) (string, error)
	// Redefine replaces a shut-off domain's definition and turns its
	// autostart off; ErrConflict if the domain runs.
	Redefine(ctx context.Context, name, def string) error
	// LiveCopy moves a running domain's disks (by target) onto the
	// exports while it runs, and pivots it onto them; on error the
	// domain keeps its own disks.
	LiveCopy(ctx context.Context, name string, targets []string, to []qemu.Disk, progress func(done int64)) error
	// DefinePersistent sets the definition a domain (running or not)
	// boots with next, autostart off.
	DefinePersistent(ctx context.Context, def string) error
}

// Domains lists the libvirt domains of this site that ferry does not run
// yet (no group of their name), each with what an import would take, or
// why it cannot. A site that runs QEMU directly has none.
func (a *Agent) Domains(ctx context.Context) ([]api.DomainInfo, error) {
	imp, ok := a.runtime.(Importer)
	if !ok {
		return []api.DomainInfo{}, nil
	}
	names, err := imp.Domains(ctx)
	if err != nil {
		return nil, err
	}
	out := []api.DomainInfo{}
	for _, n := range names {
		a.mu.Lock()
		_, ferrys := a.groups[n]
		a.mu.Unlock()
		if ferrys || strings.HasSuffix(n, "-drill") && a.hasGroupOrReplica(strings.TrimSuffix(n, "-drill")) {
			continue
		}
		d := api.DomainInfo{Name: n, Importable: true}
		res, running, err := imp.Describe(ctx, n)
		switch {
		case errors.Is(err, api.ErrNotFound):
			continue // undefined meanwhile
		case errors.Is(err, ErrInvalid):
			d.Importable, d.Reason = false, err.Error()
		case err != nil:
			return nil, err
		}
		d.Running, d.VCPUs, d.MemoryMiB, d.Disks, d.NICs, d.Firmware = running, res.VCPUs, res.MemoryMiB, res.Disks, len(res.NICs), res.Firmware
		if err := api.CheckName(api.KindGroup, n); d.Importable && err != nil {
			d.Importable, d.Reason = false, fmt.Sprintf("its name cannot name a group: %v", err)
		}
		out = append(out, d)
	}
	return out, nil
}

// hasGroupOrReplica: ferry has a group or a replica of that name here.
func (a *Agent) hasGroupOrReplica(name string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	_, g := a.groups[name]
	_, r := a.replicas[name]
	return g || r
}

// importState is an import in progress or done (kept in memory; the
// group directory's marker survives a restart: see Import).
type importState struct {
	mu  sync.Mutex
	st  api.ImportStatus
	res api.ImportResult
}

// importMarker in a group directory: the group is an import not finished
// (its copy may be partial); a new import of the domain replaces it.
const importMarker = "import-pending"

// originalFile keeps an imported domain's own definition for a release.
const originalFile = "libvirt-original.xml"

// Import starts copying a libvirt domain's disks into a new group of its
// name and returns at once; ImportStatus reports the progress. A shut-off
// domain is copied with qemu-img; a running one live, while it writes
// (LiveCopy), and it never stops. Once the copy is complete, the domain
// is redefined with its disks on the group's exports (autostart off; a
// live one is then ferry's running VM) and its original definition is
// kept for Release. The original disks are only read.
func (a *Agent) Import(ctx context.Context, req api.ImportRequest) (api.ImportStatus, error) {
	imp, ok := a.runtime.(Importer)
	if !ok {
		return api.ImportStatus{}, fmt.Errorf("%w: this site runs QEMU directly; run its agent with --runtime libvirt to import libvirt domains", ErrInvalid)
	}
	name := req.Domain
	if err := api.CheckName(api.KindGroup, name); err != nil {
		return api.ImportStatus{}, fmt.Errorf("%w: domain name %q cannot name a group: %v", ErrInvalid, name, err)
	}
	res, running, err := imp.Describe(ctx, name)
	if err != nil {
		return api.ImportStatus{}, err
	}
	res.Live = running
	a.mu.Lock()
	if cur := a.imports[name]; cur != nil {
		cur.mu.Lock()
		st := cur.st
		cur.mu.Unlock()
		if st.State == api.ImportCopying {
			a.mu.Unlock()
			return st, nil // already under way: idempotent
		}
	}
	a.mu.Unlock()
	// A partial import (the agent died during the copy) is redone.
	if _, err := os.Stat(filepath.Join(a.groupDir(name), importMarker)); err == nil {
		a.log.Warn("an earlier import did not finish: starting over", "domain", name)
		if err := a.DeleteGroup(ctx, name); err != nil {
			return api.ImportStatus{}, fmt.Errorf("remove the partial import of %s: %w", name, err)
		}
	}
	var specs []disk.Spec
	for i := range res.Disks {
		d := &res.Disks[i]
		if d.Size, err = virtualSize(ctx, d.Source, d.Format); err != nil {
			return api.ImportStatus{}, fmt.Errorf("%w: disk %s: %v", ErrInvalid, d.Name, err)
		}
		specs = append(specs, disk.Spec{Name: d.Name, Size: d.Size})
	}
	if err := a.CreateGroup(name, specs); err != nil {
		return api.ImportStatus{}, err
	}
	if err := atomicfile.WriteFile(filepath.Join(a.groupDir(name), importMarker), nil, 0o600); err != nil {
		return api.ImportStatus{}, err
	}
	is := &importState{st: api.ImportStatus{Domain: name, State: api.ImportCopying}}
	for _, d := range res.Disks {
		is.st.TotalBytes += d.Size
	}
	a.mu.Lock()
	a.imports[name] = is
	a.mu.Unlock()
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		start := time.Now()
		err := a.runImport(a.ctx, imp, is, res)
		is.mu.Lock()
		defer is.mu.Unlock()
		if err != nil {
			is.st.State, is.st.Error = api.ImportFailed, err.Error()
			a.log.Error("import failed", "domain", name, "err", err)
			return
		}
		is.res.Seconds = time.Since(start).Seconds()
		is.st.State, is.st.DoneBytes = api.ImportDone, is.st.TotalBytes
		r := is.res
		is.st.Result = &r
		a.log.Info("domain imported", "domain", name, "bytes", is.st.TotalBytes, "took", time.Since(start).Round(time.Millisecond))
	}()
	is.mu.Lock()
	defer is.mu.Unlock()
	return is.st, nil
}

func (a *Agent) runImport(ctx context.Context, imp Importer, is *importState, res api.ImportResult) error {
	name := res.Domain
	if res.Live {
		return a.runLiveImport(ctx, imp, is, res)
	}
	var base int64
	for i := range res.Disks {
		d := &res.Disks[i]
		err := copyIn(ctx, d.Source, d.Format, "nbd+unix:///"+exportName(name, d.Name)+"?socket="+a.nbdSock, func(done int64) {
			is.mu.Lock()
			is.st.DoneBytes = base + min(done, d.Size)
			is.mu.Unlock()
		}, d.Size)
		if err != nil {
			return fmt.Errorf("copy disk %s from %s: %w", d.Name, d.Source, err)
		}
		base += d.Size
	}
	return a.finishImport(ctx, imp, is, res)
}

// runLiveImport copies a running domain's disks while it writes, pivots
// it onto the group's exports and takes it as the group's VM.
func (a *Agent) runLiveImport(ctx context.Context, imp Importer, is *importState, res api.ImportResult) error {
	name := res.Domain
	var targets []string
	var to []qemu.Disk
	for _, d := range res.Disks {
		if d.Name == api.EFIVarsDisk {
			// The firmware's NVRAM is a file libvirt keeps, not a disk
			// of the domain: copied as it is now (the firmware writes it
			// only at boot and when the guest changes a variable).
			if err := copyIn(ctx, d.Source, d.Format, "nbd+unix:///"+exportName(name, d.Name)+"?socket="+a.nbdSock, func(int64) {}, d.Size); err != nil {
				return fmt.Errorf("copy the UEFI variables from %s: %w", d.Source, err)
			}
			continue
		}
		targets = append(targets, d.Name)
		to = append(to, qemu.Disk{Socket: a.nbdSock, Export: exportName(name, d.Name)})
	}
	if err := imp.LiveCopy(ctx, name, targets, to, func(done int64) {
		is.mu.Lock()
		is.st.DoneBytes = min(done, is.st.TotalBytes)
		is.mu.Unlock()
	}); err != nil {
		return err
	}
	// From the pivot on, the group is the domain's only up-to-date copy:
	// it must never again look like a partial import (one that a new
	// import deletes), whatever fails next.
	if err := os.Remove(filepath.Join(a.groupDir(name), importMarker)); err != nil {
		return err
	}
	if err := atomicfile.SyncDir(a.groupDir(name)); err != nil {
		return err
	}
	// It runs on the group: it is the group's VM (the runtime takes a
	// running imported domain as it is).
	if _, err := a.StartVM(ctx, VMRequest{Name: name, Group: name, VCPUs: res.VCPUs, MemoryMiB: res.MemoryMiB, QGA: res.QGA, Domain: res.Original, Firmware: res.Firmware}); err != nil {
		return fmt.Errorf("take the running domain as the group's VM: %w", err)
	}
	return a.finishImport(ctx, imp, is, res)
}

// finishImport measures what the group holds, keeps the original
// definition and gives the domain its definition on ferry's disks.
func (a *Agent) finishImport(ctx context.Context, imp Importer, is *importState, res api.ImportResult) error {
	name := res.Domain
	gr, err := a.group(name)
	if err != nil {
		return err
	}
	if err := gr.g.Flush(ctx); err != nil {
		return err
	}
	for i := range res.Disks {
		d := &res.Disks[i]
		gd, err := gr.g.Disk(d.Name)
		if err != nil {
			return err
		}
		if err := gd.DataRanges(func(_, n int64) error { d.Copied += n; return nil }); err != nil {
			return err
		}
	}
	spec := qemu.Spec{Name: name, VCPUs: res.VCPUs, MemoryMiB: res.MemoryMiB, QGA: res.QGA, Domain: res.Original, Firmware: res.Firmware}
	for _, d := range gr.g.Disks() {
		spec.AddDisk(d.Name, qemu.Disk{Socket: a.nbdSock, Export: exportName(name, d.Name)})
	}
	def, err := imp.Definition(ctx, spec, filepath.Join(a.cfg.Dir, "vms", name, "console.log"))
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(filepath.Join(a.groupDir(name), originalFile), []byte(res.Original), 0o600); err != nil {
		return err
	}
	if res.Live {
		err = imp.DefinePersistent(ctx, def)
	} else {
		err = imp.Redefine(ctx, name, def)
	}
	if err != nil {
		return err
	}
	if err := os.Remove(filepath.Join(a.groupDir(name), importMarker)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if err := atomicfile.SyncDir(a.groupDir(name)); err != nil {
		return err
	}
	res.Definition = def
	is.mu.Lock()
	is.res = res
	is.mu.Unlock()
	return nil
}

// ImportStatus reports an import started since the agent started.
func (a *Agent) ImportStatus(name string) (api.ImportStatus, error) {
	a.mu.Lock()
	is := a.imports[name]
	a.mu.Unlock()
	if is == nil {
		return api.ImportStatus{}, fmt.Errorf("%w: no import of %q since this agent started", ErrNotFound, name)
	}
	is.mu.Lock()
	defer is.mu.Unlock()
	return is.st, nil
}

// Release gives an imported domain its own definition back (its original
// disks, as they were at the import): the domain must be shut off and no
// VM may run on its group. The group and its data stay (delete them with
// the VM once sure).
func (a *Agent) Release(ctx context.Context, name string) error {
	imp, ok := a.runtime.(Importer)
	if !ok {
		return fmt.Errorf("%w: this site runs QEMU directly", ErrInvalid)
	}
	if err := api.CheckName(api.KindGroup, name); err != nil {
		return err
	}
	orig, err := os.ReadFile(filepath.Join(a.groupDir(name), originalFile))
	if errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("%w: %s was not imported at this site", ErrNotFound, name)
	}
	if err != nil {
		return err
	}
	if v := a.runningOn(ctx, name); v != nil {
		return fmt.Errorf("%w: VM %s runs on group %s; stop it first", ErrConflict, v.name, name)
	}
	if err := imp.Redefine(ctx, name, string(orig)); err != nil {
		return err
	}
	a.log.Info("imported domain released: its own disks again", "domain", name)
	return nil
}

// virtualSize asks qemu-img for an image's virtual size.
func virtualSize(ctx context.Context, src, format string) (int64, error) {
	// -U: a running domain's QEMU holds the image's lock; info only reads
	// its header.
	out, err := exec.CommandContext(ctx, "qemu-img", "info", "-U", "--output=json", "-f", format, src).Output()
	if err != nil {
		return 0, fmt.Errorf("qemu-img info %s: %w%s", src, err, stderrOf(err))
	}
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal(out, &info); err != nil || info.VirtualSize <= 0 {
		return 0, fmt.Errorf("qemu-img info %s: no virtual size (%v)", src, err)
	}
	return info.VirtualSize, nil
}

// copyIn copies an image (any format qemu-img reads, with its backing
// chain) into an NBD export that reads as zeros, writing only its data:
// unallocated ranges are not read and zero blocks not written
// (--target-is-zero). progress gets the bytes done so far.
func copyIn(ctx context.Context, src, format, dst string, progress func(int64), size int64) error {
	cmd := exec.CommandContext(ctx, "qemu-img", "convert", "-p", "-n", "--target-is-zero", "-f", format, "-O", "raw", src, dst)
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	// "    (12.34/100%)\r": one line per percent step, ended by \r.
	sc := bufio.NewScanner(out)
	sc.Split(func(b []byte, eof bool) (int, []byte, error) {
		if i := bytes.IndexAny(b, "\r\n"); i >= 0 {
			return i + 1, b[:i], nil
		}
		if eof && len(b) > 0 {
			return len(b), b, nil
		}
		return 0, nil, nil
	})
	for sc.Scan() {
		t := strings.TrimSpace(sc.Text())
		if p, ok := strings.CutPrefix(t, "("); ok {
			if pct, _, ok := strings.Cut(p, "/"); ok {
				if f, err := strconv.ParseFloat(pct, 64); err == nil {
					progress(int64(f / 100 * float64(size)))
				}
			}
		}
	}
	if err := cmd.Wait(); err != nil {
		return fmt.Errorf("qemu-img convert: %w: %s", err, strings.TrimSpace(stderr.String()))
	}
	return nil
}

func stderrOf(err error) string {
	var ee *exec.ExitError
	if errors.As(err, &ee) && len(ee.Stderr) > 0 {
		return ": " + strings.TrimSpace(string(ee.Stderr))
	}
	return ""
}
