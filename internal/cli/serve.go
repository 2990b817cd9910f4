package cli

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime/pprof"
	"strings"
	"sync"
	"time"

	"github.com/ferry-dr/ferry/internal/disk"
	"github.com/ferry-dr/ferry/internal/nbd"
	"github.com/spf13/cobra"
)

func serveCmd(e *env) *cobra.Command {
	var o serveOpts
	c := &cobra.Command{Use: "serve", Short: "Serve a disk group's disks over NBD, journaling every write (no replication)", Args: cobra.NoArgs,
		Example: "  ferry serve --dir vm1 --socket vm1.sock --create vda=10G\n  qemu-system-x86_64 ... -drive file=nbd+unix:///vda?socket=vm1.sock,format=raw,if=virtio,cache=none",
		RunE:    runE(e, func(ctx context.Context, args []string) error { return runServe(ctx, e, &o) })}
	fs := c.Flags()
	str(fs, &o.dir, "dir", "", "disk group directory (required)")
	str(fs, &o.socket, "socket", "", "unix socket to serve NBD on (mode 0600)")
	str(fs, &o.listen, "listen", "", "TCP address to serve NBD on, for tests only (e.g. 127.0.0.1:10809)")
	str(fs, &o.create, "create", "", "create missing disks first: name=size[,name=size...]")
	fs.DurationVar(&o.ckpt, "checkpoint-interval", 30*time.Second, "how often images are made durable and the journal trimmed (0: only by --checkpoint-bytes)")
	str(fs, &o.segSize, "segment-size", "64M", "journal segment size")
	str(fs, &o.ckptBytes, "checkpoint-bytes", "64M", "also checkpoint when the journal has grown this much")
	str(fs, &o.maxUnfolded, "max-unfolded", "4G", maxUnfoldedHelp)
	str(fs, &o.cpuProfile, "cpuprofile", "", "write a CPU profile to this file while serving (for tuning)")
	return c
}

const maxUnfoldedHelp = "recent writes kept only in the journal, folded into the images at checkpoints and, without FLUSHes, by the write-behind folder (at most 64M then); past this, writes go to the images at once (0: always, and no write-behind)"

// parseUnfolded reads --max-unfolded as disk.Config.MaxUnfolded wants it:
// "0" (every write to the images at once) is negative there.
func parseUnfolded(s string) (int64, error) {
	if strings.TrimSpace(s) == "0" {
		return -1, nil
	}
	n, err := parseSize(s)
	if err != nil {
		return 0, fmt.Errorf("--max-unfolded: %w", err)
	}
	return n, nil
}

type serveOpts struct {
	dir, socket, listen, create, segSize, ckptBytes, cpuProfile string
	maxUnfolded                                                 string
	ckpt                                                        time.Duration
}

func runServe(ctx context.Context, e *env, o *serveOpts) error {
	dataPathProcs()
	dir, socket, listen, create, ckpt, segSize, ckptBytes, cpuProfile := &o.dir, &o.socket, &o.listen, &o.create, &o.ckpt, &o.segSize, &o.ckptBytes, &o.cpuProfile
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			return err
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer func() { pprof.StopCPUProfile(); f.Close() }()
	}
	if *dir == "" {
		return usagef("--dir is required")
	}
	if *socket == "" && *listen == "" {
		return usagef("give --socket PATH (or --listen ADDR for tests)")
	}
	seg, err := parseSize(*segSize)
	if err != nil {
		return err
	}
	cb, err := parseSize(*ckptBytes)
	if err != nil {
		return err
	}
	mu, err := parseUnfolded(o.maxUnfolded)
	if err != nil {
		return err
	}
	g, err := disk.Open(disk.Config{Dir: *dir, SegmentSize: seg, CheckpointInterval: *ckpt, CheckpointBytes: cb, MaxUnfolded: mu, Logger: e.log})
	if err != nil {
		return err
	}
	defer func() {
		if err := g.Close(); err != nil {
			e.log.Error("close group", "err", err)
		}
	}()
	if *create != "" {
		if err := createDisks(g, *create); err != nil {
			return err
		}
	}
	specs := g.Disks()
	if len(specs) == 0 {
		return fmt.Errorf("group %s has no disks: add one with --create NAME=SIZE or 'ferry disk create'", *dir)
	}
	srv := nbd.New(nbd.Config{Logger: e.log})
	for _, s := range specs {
		d, err := g.Disk(s.Name)
		if err != nil {
			return err
		}
		if err := srv.AddExport(nbd.Export{Name: s.Name, Description: "ferry disk " + s.Name, Size: s.Size, MultiConn: true, Device: d}); err != nil {
			return err
		}
	}
	var lns []net.Listener
	if *socket != "" {
		ln, err := nbd.ListenUnix(*socket)
		if err != nil {
			return err
		}
		lns = append(lns, ln)
	}
	if *listen != "" {
		ln, err := net.Listen("tcp", *listen)
		if err != nil {
			return fmt.Errorf("listen: %w", err)
		}
		lns = append(lns, ln)
	}
	g.Start(ctx)
	if *socket != "" {
		abs, _ := filepath.Abs(*socket)
		for _, s := range specs {
			e.log.Info("export ready", "disk", s.Name, "size", s.Size,
				"qemu", fmt.Sprintf("-drive file=nbd+unix:///%s?socket=%s,format=raw,if=virtio,cache=none", s.Name, abs))
		}
	}
	var wg sync.WaitGroup
	errc := make(chan error, len(lns))
	for _, ln := range lns {
		e.log.Info("serving NBD", "addr", ln.Addr().String(), "exports", len(specs))
		wg.Add(1)
		go func(ln net.Listener) {
			defer wg.Done()
			errc <- srv.Serve(ctx, ln)
		}(ln)
	}
	var serr error
	select {
	case <-ctx.Done():
	case serr = <-errc:
	}
	srv.Close()
	wg.Wait()
	if *socket != "" {
		os.Remove(*socket)
	}
	return serr
}

func createDisks(g *disk.Group, spec string) error {
	for _, part := range strings.Split(spec, ",") {
		name, size, ok := strings.Cut(part, "=")
		if !ok {
			return usagef("--create wants name=size, got %q", part)
		}
		n, err := parseSize(size)
		if err != nil {
			return err
		}
		if _, err := g.CreateDisk(name, n); err != nil && !errors.Is(err, disk.ErrExists) {
			return err
		}
	}
	return nil
}

func diskCmd(e *env) *cobra.Command {
	var dir string
	open := func() (*disk.Group, error) {
		if dir == "" {
			return nil, usagef("--dir is required")
		}
		return disk.Open(disk.Config{Dir: dir, Logger: e.log})
	}
	create := &cobra.Command{Use: "create NAME SIZE", Short: "Create a disk in a group", Args: cobra.ExactArgs(2),
		Example: "  ferry disk create --dir vm1 vda 10G",
		RunE: runE(e, func(ctx context.Context, args []string) error {
			size, err := parseSize(args[1])
			if err != nil {
				return err
			}
			g, err := open()
			if err != nil {
				return err
			}
			defer g.Close()
			d, err := g.CreateDisk(args[0], size)
			if err != nil {
				return err
			}
			s := d.Spec()
			return e.print(s, fmt.Sprintf("created disk %q (id %d, %d bytes) in %s\n", s.Name, s.ID, s.Size, filepath.Clean(dir)))
		})}
	list := &cobra.Command{Use: "list", Short: "List a group's disks (reads only)", Args: cobra.NoArgs,
		RunE: runE(e, func(ctx context.Context, args []string) error {
			if dir == "" {
				return usagef("--dir is required")
			}
			specs, err := disk.ReadSpecs(dir)
			if err != nil {
				return err
			}
			var b strings.Builder
			fmt.Fprintf(&b, "%-4s %-20s %s\n", "ID", "NAME", "SIZE")
			for _, s := range specs {
				fmt.Fprintf(&b, "%-4d %-20s %d\n", s.ID, s.Name, s.Size)
			}
			return e.print(specs, b.String())
		})}
	c := group("disk", "Create and list the disks of a group (no agent)", create, list)
	str(c.PersistentFlags(), &dir, "dir", "", "disk group directory (required)")
	return c
}
