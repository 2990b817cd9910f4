package cli

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/vaultclient"
)

// filesCmd restores files from a recovery point without booting the VM.
func filesCmd(e *env) *cobra.Command {
	var ol, og vaultOpts
	var point, to string
	var overwrite bool
	ls := vaultCommand(e, &cobra.Command{Use: "ls VM [PATH]", Short: "List a VM's files at a recovery point (the root lists its file systems)", Args: cobra.RangeArgs(1, 2),
		Long: "Lists a directory of the VM's disks as they were at a recovery point, read at the recovery site through libguestfs: " +
			"the VM is not booted, the point is never written. The root lists the file systems, named as the VM sees its disks " +
			"(vdb: a whole disk, vda1: a partition). The first listing of a point starts a small appliance at the recovery site (10-30 s); later ones are quick.",
		Example: "  ferry files ls web\n  ferry files ls web /vdb/docs --point last-clean\n  ferry files ls web /vda1/etc --point 2026-12-02T10:41:00Z"}, &ol,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			p := "/"
			if len(args) == 2 {
				p = args[1]
			}
			done := e.waiting("reading " + args[0] + "'s disks at its recovery site (the first look at a point starts an appliance there: 10-30 s)")
			l, err := vc.Files(ctx, args[0], point, p)
			done()
			if err != nil {
				return err
			}
			return e.print(l, fmt.Sprintf("%s at point %d (%s, %s), %s\n", args[0], l.Point.Seq, l.Point.Type, l.Point.Time.UTC().Format(time.RFC3339), l.Path)+
				table("TYPE\tSIZE\tMODIFIED\tNAME", func(tw io.Writer) {
					for _, f := range l.Entries {
						switch f.Type {
						case api.FileFilesystem:
							note := f.FSType
							if f.Unsupported != "" {
								note += " (cannot be read: " + f.Unsupported + ")"
							}
							fmt.Fprintf(tw, "fs\t-\t-\t%s/  %s\n", f.Name, note)
						case api.FileDir:
							fmt.Fprintf(tw, "dir\t-\t%s\t%s/\n", f.MTime.Format("2006-01-02 15:04"), f.Name)
						case api.FileSymlink:
							fmt.Fprintf(tw, "link\t-\t%s\t%s -> %s\n", f.MTime.Format("2006-01-02 15:04"), f.Name, f.Link)
						default:
							fmt.Fprintf(tw, "%s\t%d\t%s\t%s\n", f.Type, f.Size, f.MTime.Format("2006-01-02 15:04"), f.Name)
						}
					}
				}))
		})
	str(ls.Flags(), &point, "point", "", pointHelp+" (default: latest-processed)")
	get := vaultCommand(e, &cobra.Command{Use: "get VM PATH", Short: "Copy a file or a directory tree out of a recovery point", Args: cobra.ExactArgs(2),
		Long: "Copies PATH (a file, or a directory with everything under it) as it was at a recovery point into --to, under its own name, " +
			"with a progress bar. Nothing is overwritten unless --overwrite; entries that would land outside --to are refused.",
		Example: "  ferry files get web /vdb/docs --point last-clean --to /srv/restore\n  ferry files get web /vdb/docs/report.txt --point 1234"}, &og,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			done := e.waiting("opening " + args[1] + " at " + args[0] + "'s recovery site (the first look at a point starts an appliance there: 10-30 s)")
			resp, err := vc.FileContent(ctx, args[0], point, args[1], false)
			done()
			if err != nil {
				return err
			}
			defer resp.Body.Close()
			size, _ := strconv.ParseInt(resp.Header.Get(api.FileSizeHeader), 10, 64)
			seq := resp.Header.Get(api.FilePointHeader)
			var body io.Reader = resp.Body
			var pb *progressbar.ProgressBar
			if !e.json() && isTerminal(e.stderr) {
				pb = progressbar.NewOptions64(max(size, 1), progressbar.OptionSetWriter(e.stderr), progressbar.OptionShowBytes(true),
					progressbar.OptionSetDescription("restore "+path.Base(args[1])), progressbar.OptionSetWidth(30), progressbar.OptionClearOnFinish())
				body = io.TeeReader(resp.Body, pb)
			}
			if err := os.MkdirAll(to, 0o755); err != nil {
				return err
			}
			st, err := extract(tar.NewReader(body), to, overwrite)
			if pb != nil {
				pb.Finish()
			}
			if err != nil {
				return fmt.Errorf("restore %s into %s (what was written so far stays): %w", args[1], to, err)
			}
			st.Point, st.Path = seq, args[1]
			return e.print(st, fmt.Sprintf("restored %s from point %s into %s: %d files, %d directories, %d links, %d bytes\n",
				args[1], seq, filepath.Join(to, path.Base(path.Clean(args[1]))), st.Files, st.Dirs, st.Links, st.Bytes))
		})
	str(get.Flags(), &point, "point", "", pointHelp+" (default: latest-processed)")
	str(get.Flags(), &to, "to", ".", "directory to restore into")
	get.Flags().BoolVar(&overwrite, "overwrite", false, "replace files that exist in --to")
	return group("files", "Restore files from any recovery point without booting the VM", ls, get)
}

// waiting shows what a long wait is for on a terminal (and nothing in
// JSON mode or in a pipe); the returned function clears it.
func (e *env) waiting(what string) func() {
	if e.json() || !isTerminal(e.stderr) {
		return func() {}
	}
	fmt.Fprintf(e.stderr, "%s…", what)
	return func() { fmt.Fprint(e.stderr, "\r\033[K") }
}

// restoreStats is what a restore wrote.
type restoreStats struct {
	Point   string `json:"point"`
	Path    string `json:"path"`
	Files   int    `json:"files"`
	Dirs    int    `json:"dirs"`
	Links   int    `json:"links"`
	Skipped int    `json:"skipped"` // devices, FIFOs: not restored
	Bytes   int64  `json:"bytes"`
}

// errOutside: a tar entry would land outside the target directory.
var errOutside = errors.New("entry outside the target directory")

// extract writes a tar stream into dir. Entries are confined to dir: a
// name that is absolute or climbs out, or a path through a symlink the
// stream made, is refused; existing files are kept unless overwrite.
func extract(tr *tar.Reader, dir string, overwrite bool) (restoreStats, error) {
	var st restoreStats
	links := map[string]bool{} // symlinks written, by cleaned name
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return st, nil
		}
		if err != nil {
			return st, fmt.Errorf("the stream ended early: %w", err)
		}
		name := path.Clean(strings.TrimPrefix(h.Name, "./"))
		if path.IsAbs(h.Name) || name == ".." || strings.HasPrefix(name, "../") || name == "." {
			return st, fmt.Errorf("%w: %q", errOutside, h.Name)
		}
		for p := path.Dir(name); p != "."; p = path.Dir(p) {
			if links[p] {
				return st, fmt.Errorf("%w: %q goes through the symlink %q", errOutside, h.Name, p)
			}
		}
		dst := filepath.Join(dir, filepath.FromSlash(name))
		mode := fs.FileMode(h.Mode).Perm()
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(dst, 0o755); err != nil {
				return st, err
			}
			os.Chmod(dst, mode|0o700)
			st.Dirs++
		case tar.TypeReg:
			flags := os.O_WRONLY | os.O_CREATE | os.O_EXCL
			if overwrite {
				os.Remove(dst) // never write through an existing symlink
			}
			f, err := os.OpenFile(dst, flags, mode)
			if errors.Is(err, fs.ErrExist) {
				return st, fmt.Errorf("%s exists; restore into another --to or use --overwrite", dst)
			}
			if err != nil {
				return st, err
			}
			n, err := io.Copy(f, tr)
			st.Bytes += n
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return st, fmt.Errorf("%s: %w", dst, err)
			}
			os.Chtimes(dst, h.ModTime, h.ModTime)
			st.Files++
		case tar.TypeSymlink:
			if overwrite {
				os.Remove(dst)
			}
			if err := os.Symlink(h.Linkname, dst); err != nil {
				return st, err
			}
			links[name] = true
			st.Links++
		case tar.TypeLink:
			target := path.Clean(strings.TrimPrefix(h.Linkname, "./"))
			if path.IsAbs(target) || target == ".." || strings.HasPrefix(target, "../") || links[target] {
				return st, fmt.Errorf("%w: hard link %q to %q", errOutside, h.Name, h.Linkname)
			}
			if err := os.Link(filepath.Join(dir, filepath.FromSlash(target)), dst); err != nil {
				return st, err
			}
			st.Files++
		default:
			st.Skipped++
		}
	}
}
