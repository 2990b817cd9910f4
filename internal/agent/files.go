package agent

import (
	"archive/tar"
	"context"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/guestfs"
)

// This file: files from a recovery point. A browsing session opens
// read-only views of every disk of a replica at one point, exports them
// over the agent's NBD socket and starts a libguestfs appliance on them
// (internal/guestfs). Sessions are kept while they are used, so that
// browsing costs the appliance's start once, and closed after
// fileIdle; their views hold retention at their point meanwhile.

const (
	// fileIdle: a session unused this long is closed.
	fileIdle = 5 * time.Minute
	// maxFileSessions: appliances at once (each is a small VM: ~500 MiB).
	maxFileSessions = 2
	// fileOpenTimeout bounds the appliance's start.
	fileOpenTimeout = 3 * time.Minute
)

type fileSession struct {
	replica string
	seq     uint64
	ready   chan struct{} // closed when opened (or failed: err)
	err     error
	s       *guestfs.Session
	views   []string
	// roots are the file systems, by their name at the listing's root.
	roots map[string]api.FileInfo
	users int
	used  time.Time
}

type fileSessions struct {
	mu sync.Mutex
	m  map[string]*fileSession
}

// fileSession returns the session on replica at seq, starting it (and
// waiting for its appliance) if needed; release it with a.releaseFiles.
func (a *Agent) fileSession(ctx context.Context, replica string, seq uint64) (*fileSession, error) {
	key := fmt.Sprintf("%s@%d", replica, seq)
	fs := &a.files
	fs.mu.Lock()
	if fs.m == nil {
		fs.m = map[string]*fileSession{}
	}
	s := fs.m[key]
	if s == nil {
		if err := a.evictFiles(); err != nil {
			fs.mu.Unlock()
			return nil, err
		}
		s = &fileSession{replica: replica, seq: seq, ready: make(chan struct{})}
		fs.m[key] = s
		go a.openFiles(s, key)
	}
	s.users++
	s.used = a.cfg.Now()
	fs.mu.Unlock()
	select {
	case <-s.ready:
	case <-ctx.Done():
		a.releaseFiles(s)
		return nil, ctx.Err()
	}
	if s.err != nil {
		a.releaseFiles(s)
		return nil, s.err
	}
	return s, nil
}

// evictFiles makes room for one more session: it closes the least
// recently used idle one, or refuses. The caller holds a.files.mu.
func (a *Agent) evictFiles() error {
	if len(a.files.m) < maxFileSessions {
		return nil
	}
	var oldest string
	for k, s := range a.files.m {
		if s.users == 0 && (oldest == "" || s.used.Before(a.files.m[oldest].used)) {
			oldest = k
		}
	}
	if oldest == "" {
		return fmt.Errorf("%w: %d file browsing sessions are in use; try again when one ends", api.ErrTooMany, maxFileSessions)
	}
	s := a.files.m[oldest]
	delete(a.files.m, oldest)
	go a.closeFiles(s)
	return nil
}

func (a *Agent) releaseFiles(s *fileSession) {
	a.files.mu.Lock()
	s.users--
	s.used = a.cfg.Now()
	a.files.mu.Unlock()
}

// openFiles opens the views and the appliance; on failure the session is
// forgotten, so that the next request tries again.
func (a *Agent) openFiles(s *fileSession, key string) {
	defer close(s.ready)
	fail := func(err error) {
		s.err = err
		a.files.mu.Lock()
		if a.files.m[key] == s {
			delete(a.files.m, key)
		}
		a.files.mu.Unlock()
		a.closeViews(s.views)
	}
	a.mu.Lock()
	r := a.replicas[s.replica]
	a.mu.Unlock()
	if r == nil {
		fail(fmt.Errorf("%w: replica %q", ErrNotFound, s.replica))
		return
	}
	var drives []guestfs.Drive
	disks := r.Disks()
	for _, d := range disks {
		ov, err := a.OpenView(s.replica, d.Name, s.seq, false)
		if err != nil {
			fail(err)
			return
		}
		s.views = append(s.views, ov.id)
		drives = append(drives, guestfs.Drive{Name: d.Name, Socket: a.nbdSock, Export: ov.export})
	}
	ctx, cancel := context.WithTimeout(a.ctx, fileOpenTimeout)
	defer cancel()
	start := a.cfg.Now()
	g, err := guestfs.Open(ctx, guestfs.Config{Drives: drives, ForceTCG: a.forceTCG(), TempDir: os.TempDir(), Logger: a.log})
	if err != nil {
		fail(err)
		return
	}
	s.s = g
	s.roots = fileRoots(g.Devices(), g.Filesystems(), disks)
	a.log.Info("file browsing session started", "replica", s.replica, "seq", s.seq, "file_systems", len(s.roots), "took", a.cfg.Now().Sub(start).Round(time.Millisecond))
}

// forceTCG: libguestfs's appliance runs without KVM unless this agent's
// VMs use it (KVM can be present and still hang: qemu.DetectAccel).
func (a *Agent) forceTCG() bool { return os.Getenv("FERRY_ACCEL") != "kvm" }

// fileRoots names the file systems as the VM would see its disks: the
// whole disk by the disk's name ("vdb"), a partition with its number
// ("vda1"), a logical volume as "VG-LV".
func fileRoots(devices []string, fss []guestfs.FS, disks []api.DiskSpec) map[string]api.FileInfo {
	byDev := map[string]string{}
	for i, d := range devices {
		if i < len(disks) {
			byDev[d] = disks[i].Name
		}
	}
	roots := map[string]api.FileInfo{}
	for _, f := range fss {
		name := ""
		for dev, disk := range byDev {
			if f.Device == dev {
				name = disk
			} else if n := strings.TrimPrefix(f.Device, dev); n != f.Device && n != "" && strings.Trim(n, "0123456789") == "" {
				name = disk + n
			}
		}
		if name == "" {
			name = strings.ReplaceAll(strings.TrimPrefix(f.Device, "/dev/"), "/", "-")
		}
		fi := api.FileInfo{Name: name, Type: api.FileFilesystem, FSType: f.Type, Device: f.Device}
		switch f.Type {
		case "ext2", "ext3", "ext4", "xfs", "btrfs", "vfat", "ntfs":
		default:
			fi.Unsupported = fmt.Sprintf("a %s file system, which ferry cannot read", cmpOr(f.Type, "unknown"))
		}
		roots[name] = fi
	}
	return roots
}

func cmpOr(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

func (a *Agent) closeFiles(s *fileSession) {
	<-s.ready
	if s.s != nil {
		s.s.Close()
	}
	a.closeViews(s.views)
}

// reapFiles closes the sessions idle for fileIdle (all of them with
// all=true).
func (a *Agent) reapFiles(all bool) {
	a.files.mu.Lock()
	var gone []*fileSession
	for k, s := range a.files.m {
		if all || s.users == 0 && a.cfg.Now().Sub(s.used) >= fileIdle {
			gone = append(gone, s)
			delete(a.files.m, k)
		}
	}
	a.files.mu.Unlock()
	for _, s := range gone {
		a.closeFiles(s)
	}
}

// closeIdleFiles closes replica's unused sessions (before a change that
// needs the replica without views). One in use stays, and the change is
// refused as for any open view.
func (a *Agent) closeIdleFiles(replica string) {
	a.files.mu.Lock()
	var gone []*fileSession
	for k, s := range a.files.m {
		if s.replica == replica && s.users == 0 {
			gone = append(gone, s)
			delete(a.files.m, k)
		}
	}
	a.files.mu.Unlock()
	for _, s := range gone {
		a.closeFiles(s)
	}
}

// splitFilePath checks a listing path ("/", "/vda1/etc") and splits it
// into the root's name and the path inside that file system.
func splitFilePath(p string) (root, rest string, err error) {
	if !strings.HasPrefix(p, "/") || strings.ContainsRune(p, 0) || len(p) > 4096 {
		return "", "", fmt.Errorf("%w: path %q: want an absolute path like /vda1/home", ErrInvalid, p)
	}
	p = path.Clean(p)
	if p == "/" {
		return "", "/", nil
	}
	root, rest, _ = strings.Cut(p[1:], "/")
	return root, "/" + rest, nil
}

func (s *fileSession) root(name string) (api.FileInfo, error) {
	fi, ok := s.roots[name]
	if !ok {
		var names []string
		for n := range s.roots {
			names = append(names, n)
		}
		sort.Strings(names)
		return fi, fmt.Errorf("%w: no file system %q at this point (there are: %s)", ErrNotFound, name, strings.Join(names, ", "))
	}
	if fi.Unsupported != "" {
		return fi, fmt.Errorf("%w: %s is %s", api.ErrUnsupported, name, fi.Unsupported)
	}
	return fi, nil
}

// ListFiles lists a directory of replica's disks at seq.
func (a *Agent) ListFiles(ctx context.Context, replica string, seq uint64, p string) (api.FileListing, error) {
	rootName, rest, err := splitFilePath(p)
	if err != nil {
		return api.FileListing{}, err
	}
	s, err := a.fileSession(ctx, replica, seq)
	if err != nil {
		return api.FileListing{}, err
	}
	defer a.releaseFiles(s)
	out := api.FileListing{Point: api.Point{Seq: seq}, Path: path.Clean(p), Entries: []api.FileInfo{}}
	if rootName == "" {
		for _, fi := range s.roots {
			out.Entries = append(out.Entries, fi)
		}
		sort.Slice(out.Entries, func(i, j int) bool { return out.Entries[i].Name < out.Entries[j].Name })
		return out, nil
	}
	fi, err := s.root(rootName)
	if err != nil {
		return out, err
	}
	es, err := s.s.List(ctx, fi.Device, rest)
	if err != nil {
		return out, fmt.Errorf("%s: %w", out.Path, err)
	}
	for _, e := range es {
		out.Entries = append(out.Entries, fileInfo(e))
	}
	sort.Slice(out.Entries, func(i, j int) bool { return out.Entries[i].Name < out.Entries[j].Name })
	return out, nil
}

func fileInfo(e guestfs.Entry) api.FileInfo {
	return api.FileInfo{Name: e.Name, Type: e.Type, Size: e.Size, Mode: e.Mode, MTime: time.Unix(e.MTime, 0).UTC(), Link: e.Link}
}

// FileContent is what GetFiles sends.
type FileContent struct {
	Size int64 // bytes (a file) or an estimate (a tree)
	Raw  bool  // the file's bytes, not a tar
	Name string
}

// GetFiles writes p of replica's disks at seq to w: a regular file's
// bytes (raw), or a tar holding p under its base name (a file, or a
// directory tree). start is called once what will be sent is known,
// before the first byte.
func (a *Agent) GetFiles(ctx context.Context, replica string, seq uint64, p string, raw bool, start func(FileContent), w io.Writer) error {
	rootName, rest, err := splitFilePath(p)
	if err != nil {
		return err
	}
	if rootName == "" {
		return fmt.Errorf("%w: name a file system or a path in one (ferry files ls lists them)", ErrInvalid)
	}
	s, err := a.fileSession(ctx, replica, seq)
	if err != nil {
		return err
	}
	defer a.releaseFiles(s)
	fi, err := s.root(rootName)
	if err != nil {
		return err
	}
	st, err := s.s.Stat(ctx, fi.Device, rest)
	if err != nil {
		return fmt.Errorf("%s: %w", p, err)
	}
	base := path.Base(path.Clean(p))
	switch {
	case raw && st.Type != api.FileRegular:
		return fmt.Errorf("%w: %s is a %s; download it as a tar", ErrInvalid, p, st.Type)
	case raw:
		start(FileContent{Size: st.Size, Raw: true, Name: base})
		return s.s.Download(ctx, fi.Device, rest, w)
	}
	tw := tar.NewWriter(w)
	switch st.Type {
	case api.FileDir:
		n, err := s.s.Usage(ctx, fi.Device, rest)
		if err != nil {
			return err
		}
		start(FileContent{Size: n, Name: base + ".tar"})
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: base + "/", Mode: int64(st.Mode), ModTime: time.Unix(st.MTime, 0)}); err != nil {
			return err
		}
		pr, pw := io.Pipe()
		done := make(chan error, 1)
		go func() {
			err := prefixTar(tar.NewReader(pr), tw, base)
			if err != nil {
				pr.CloseWithError(err) // the helper's writes fail: it stops
			} else {
				// The end marker is not the stream's end: tar pads to its
				// record size, and the copy from the helper waits for
				// every byte to be read.
				io.Copy(io.Discard, pr)
			}
			done <- err
		}()
		err = s.s.Tar(ctx, fi.Device, rest, pw)
		pw.CloseWithError(err)
		if perr := <-done; err == nil {
			err = perr
		}
		if err != nil {
			return err
		}
	case api.FileRegular:
		start(FileContent{Size: st.Size, Name: base + ".tar"})
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: base, Size: st.Size, Mode: int64(st.Mode), ModTime: time.Unix(st.MTime, 0)}); err != nil {
			return err
		}
		if err := s.s.Download(ctx, fi.Device, rest, tw); err != nil {
			return err
		}
	case api.FileSymlink:
		start(FileContent{Name: base + ".tar"})
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: base, Linkname: st.Link, Mode: int64(st.Mode), ModTime: time.Unix(st.MTime, 0)}); err != nil {
			return err
		}
	default:
		return fmt.Errorf("%w: %s is a special file", ErrInvalid, p)
	}
	return tw.Close()
}

// prefixTar copies a tar stream's entries into tw under dir/.
func prefixTar(tr *tar.Reader, tw *tar.Writer, dir string) error {
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		name := strings.TrimPrefix(h.Name, "./")
		if name == "" || name == "." {
			continue
		}
		h.Name = dir + "/" + name
		if h.Typeflag == tar.TypeLink {
			h.Linkname = dir + "/" + strings.TrimPrefix(h.Linkname, "./")
		}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if _, err := io.Copy(tw, tr); err != nil {
			return err
		}
	}
}
