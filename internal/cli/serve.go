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
)

func runServe(ctx context.Context, e *env, args []string) error {
	fs := newFlags("serve", e)
	dir := fs.String("dir", "", "disk group directory (required)")
	socket := fs.String("socket", "", "unix socket to serve NBD on (mode 0600)")
	listen := fs.String("listen", "", "TCP address to serve NBD on, for tests only (e.g. 127.0.0.1:10809)")
	create := fs.String("create", "", "create missing disks first: name=size[,name=size...]")
	ckpt := fs.Duration("checkpoint-interval", 30*time.Second, "how often images are made durable and the journal trimmed (0: only by --checkpoint-bytes)")
	segSize := fs.String("segment-size", "64M", "journal segment size")
	ckptBytes := fs.String("checkpoint-bytes", "256M", "also checkpoint when the journal has grown this much")
	cpuProfile := fs.String("cpuprofile", "", "write a CPU profile to this file while serving (for tuning)")
	if err := parse(fs, args); err != nil {
		return err
	}
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
		return fmt.Errorf("%w: --dir is required", errUsage)
	}
	if *socket == "" && *listen == "" {
		return fmt.Errorf("%w: give --socket PATH (or --listen ADDR for tests)", errUsage)
	}
	seg, err := parseSize(*segSize)
	if err != nil {
		return err
	}
	cb, err := parseSize(*ckptBytes)
	if err != nil {
		return err
	}
	g, err := disk.Open(disk.Config{Dir: *dir, SegmentSize: seg, CheckpointInterval: *ckpt, CheckpointBytes: cb, Logger: e.log})
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
			return fmt.Errorf("%w: --create wants name=size, got %q", errUsage, part)
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

func runDisk(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("%w: disk create|list", errUsage)
	}
	fs := newFlags("disk "+args[0], e)
	dir := fs.String("dir", "", "disk group directory (required)")
	if err := parse(fs, args[1:]); err != nil {
		return err
	}
	if *dir == "" {
		return fmt.Errorf("%w: --dir is required", errUsage)
	}
	g, err := disk.Open(disk.Config{Dir: *dir, Logger: e.log})
	if err != nil {
		return err
	}
	defer g.Close()
	switch args[0] {
	case "create":
		if fs.NArg() != 2 {
			return fmt.Errorf("%w: ferry disk create --dir DIR NAME SIZE", errUsage)
		}
		size, err := parseSize(fs.Arg(1))
		if err != nil {
			return err
		}
		d, err := g.CreateDisk(fs.Arg(0), size)
		if err != nil {
			return err
		}
		s := d.Spec()
		return e.print(s, fmt.Sprintf("created disk %q (id %d, %d bytes) in %s\n", s.Name, s.ID, s.Size, filepath.Clean(*dir)))
	case "list":
		specs := g.Disks()
		var b strings.Builder
		fmt.Fprintf(&b, "%-4s %-20s %s\n", "ID", "NAME", "SIZE")
		for _, s := range specs {
			fmt.Fprintf(&b, "%-4d %-20s %d\n", s.ID, s.Name, s.Size)
		}
		return e.print(specs, b.String())
	}
	return fmt.Errorf("%w: unknown disk subcommand %q", errUsage, args[0])
}
