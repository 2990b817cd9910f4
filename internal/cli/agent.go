package cli

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/ferry-dr/ferry/internal/agent"
	"github.com/ferry-dr/ferry/internal/agentclient"
	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/bandwidth"
	"github.com/ferry-dr/ferry/internal/pki"
	"github.com/spf13/cobra"
)

// agentOpts are the flags of the commands that drive an agent directly,
// and the identity loaded from them.
type agentOpts struct {
	addr, site, pki, as string
	id                  *pki.Identity
}

func agentCommand(e *env, c *cobra.Command, o *agentOpts, f func(ctx context.Context, ac *agentclient.Client, args []string) error) *cobra.Command {
	c.RunE = runE(e, func(ctx context.Context, args []string) error {
		id, err := pki.Load(o.pki, o.as)
		if err != nil {
			return err
		}
		o.id = id
		return f(ctx, agentclient.New(id, o.addr, o.site), args)
	})
	return c
}

func agentCmd(e *env) *cobra.Command {
	var o agentOpts
	status := agentCommand(e, &cobra.Command{Use: "status", Short: "Groups, replication, replicas, views and VMs of a site", Args: cobra.NoArgs}, &o,
		func(ctx context.Context, ac *agentclient.Client, args []string) error {
			st, err := ac.Status(ctx)
			if err != nil {
				return err
			}
			return e.print(st, statusText(st))
		})
	var disks []string
	groupCreate := agentCommand(e, &cobra.Command{Use: "create NAME", Short: "Create a consistency group with its disks", Args: cobra.ExactArgs(1),
		Example: "  ferry agent group create $A --disk vda=10G --disk vdb=1G vm1"}, &o,
		func(ctx context.Context, ac *agentclient.Client, args []string) error {
			var specs []api.DiskSpec
			for _, d := range disks {
				n, s, ok := strings.Cut(d, "=")
				size, err := parseSize(s)
				if !ok || err != nil {
					return usagef("--disk wants NAME=SIZE, got %q", d)
				}
				specs = append(specs, api.DiskSpec{Name: n, Size: size})
			}
			if err := ac.CreateGroup(ctx, args[0], specs); err != nil {
				return err
			}
			return e.print(map[string]string{"created": args[0]}, fmt.Sprintf("created group %s; its disks are NBD exports %s/DISK on the agent's socket\n", args[0], args[0]))
		})
	groupCreate.Flags().StringArrayVar(&disks, "disk", nil, "disk NAME=SIZE (repeatable)")
	groupCreate.MarkFlagRequired("disk")
	groupDelete := agentCommand(e, &cobra.Command{Use: "delete NAME", Short: "Delete a group's disks and journal", Args: cobra.ExactArgs(1)}, &o,
		func(ctx context.Context, ac *agentclient.Client, args []string) error {
			if err := ac.DeleteGroup(ctx, args[0]); err != nil {
				return err
			}
			return e.print(map[string]string{"deleted": args[0]}, fmt.Sprintf("deleted group %s and its disks\n", args[0]))
		})
	var to, toSite string
	replicate := agentCommand(e, &cobra.Command{Use: "replicate GROUP", Short: "Replicate a group to another site's agent", Args: cobra.ExactArgs(1),
		Example: "  ferry agent replicate $A --to 127.0.0.1:7412 --to-site siteB vm1"}, &o,
		func(ctx context.Context, ac *agentclient.Client, args []string) error {
			// The recovery site takes the stream from this site only.
			if err := agentclient.New(o.id, to, toSite).ExpectReplica(ctx, args[0], o.site); err != nil {
				return fmt.Errorf("record %s as the source of %s at %s: %w", o.site, args[0], toSite, err)
			}
			if err := ac.Replicate(ctx, args[0], api.Replicate{PeerAddr: to, PeerName: toSite}); err != nil {
				return err
			}
			return e.print(map[string]string{"replicating": args[0], "to": toSite}, fmt.Sprintf("replicating %s to %s (%s); watch with 'ferry agent status'\n", args[0], toSite, to))
		})
	str(replicate.Flags(), &to, "to", "", "the recovery site's agent address (required)")
	str(replicate.Flags(), &toSite, "to-site", "", "the recovery site's name (required)")
	replicate.MarkFlagRequired("to")
	replicate.MarkFlagRequired("to-site")
	unreplicate := agentCommand(e, &cobra.Command{Use: "unreplicate GROUP", Short: "Stop a group's replication", Args: cobra.ExactArgs(1)}, &o,
		func(ctx context.Context, ac *agentclient.Client, args []string) error {
			if err := ac.Unreplicate(ctx, args[0]); err != nil {
				return err
			}
			return e.print(map[string]string{"stopped": args[0]}, fmt.Sprintf("%s no longer replicates\n", args[0]))
		})
	var label string
	var app bool
	mark := agentCommand(e, &cobra.Command{Use: "mark GROUP", Short: "Record a named (or application-consistent) recovery point", Args: cobra.ExactArgs(1),
		Example: "  ferry agent mark $A --label before-upgrade vm1\n  ferry agent mark $A --app vm1"}, &o,
		func(ctx context.Context, ac *agentclient.Client, args []string) error {
			if app {
				st, err := ac.AppPoint(ctx, args[0], label)
				if err != nil {
					return fmt.Errorf("%w (crash-consistent points continue)", err)
				}
				return e.print(st, fmt.Sprintf("application-consistent point at seq %d; guest frozen %.0f ms\n", st.Seq, st.FreezeMS))
			}
			seq, err := ac.Mark(ctx, args[0], api.Marker{Type: api.PointNamed, Label: label})
			if err != nil {
				return err
			}
			return e.print(api.MarkResult{Seq: seq}, fmt.Sprintf("point %q at seq %d\n", label, seq))
		})
	str(mark.Flags(), &label, "label", "", "point label")
	mark.Flags().BoolVar(&app, "app", false, "application-consistent: quiesce the guest through its guest agent")
	points := agentCommand(e, &cobra.Command{Use: "points REPLICA", Short: "List a replica's recovery points", Args: cobra.ExactArgs(1)}, &o,
		func(ctx context.Context, ac *agentclient.Client, args []string) error {
			pts, err := ac.Points(ctx, args[0])
			if err != nil {
				return err
			}
			return e.print(pts, table("SEQ\tTIME\tTYPE\tLABEL", func(tw io.Writer) {
				for _, p := range pts {
					fmt.Fprintf(tw, "%d\t%s\t%s\t%s\n", p.Seq, p.Time.Format(time.RFC3339Nano), p.Type, p.Label)
				}
			}))
		})
	var seq uint64
	var writable bool
	viewOpen := agentCommand(e, &cobra.Command{Use: "open REPLICA DISK", Short: "Open a view of a replica's disk at any point, over NBD", Args: cobra.ExactArgs(2),
		Example: "  ferry agent view open $B vm1 vda --seq 1234 --writable"}, &o,
		func(ctx context.Context, ac *agentclient.Client, args []string) error {
			vi, err := ac.OpenView(ctx, args[0], api.OpenView{Disk: args[1], Seq: seq, Writable: writable})
			if err != nil {
				return err
			}
			return e.print(vi, fmt.Sprintf("view %s of %s/%s at seq %d: nbd+unix:///%s?socket=%s\n", vi.ID, vi.Replica, vi.Disk, vi.Seq, vi.Export, vi.Socket))
		})
	viewOpen.Flags().Uint64Var(&seq, "seq", 0, "sequence number of the point (0: the newest point)")
	viewOpen.Flags().BoolVar(&writable, "writable", false, "writable view with a discardable overlay")
	viewClose := agentCommand(e, &cobra.Command{Use: "close ID", Short: "Close a view", Args: cobra.ExactArgs(1)}, &o,
		func(ctx context.Context, ac *agentclient.Client, args []string) error {
			if err := ac.CloseView(ctx, args[0]); err != nil {
				return err
			}
			return e.print(map[string]string{"closed": args[0]}, fmt.Sprintf("view %s closed\n", args[0]))
		})
	var vmGroup, vmKernel, vmInitrd, vmAppend, vmNet, vmFwd string
	var vmMem, vmCPUs int
	var vmQGA bool
	vmStart := agentCommand(e, &cobra.Command{Use: "start NAME", Short: "Start a VM on a group's disks", Args: cobra.ExactArgs(1),
		Example: "  ferry agent vm start $A --group vm1 --kernel vmlinuz --initrd initrd.img --forward 127.0.0.1:8080=80 web"}, &o,
		func(ctx context.Context, ac *agentclient.Client, args []string) error {
			req := api.VMRequest{Name: args[0], Group: vmGroup, VCPUs: vmCPUs, MemoryMiB: vmMem, Net: api.NetMode(vmNet), QGA: vmQGA,
				Boot: api.Boot{Kernel: vmKernel, Initrd: vmInitrd, Append: vmAppend}}
			if vmFwd != "" {
				for _, f := range strings.Split(vmFwd, ",") {
					hs, p, ok := strings.Cut(f, "=")
					port, err := strconv.Atoi(p)
					h, herr := netip.ParseAddrPort(hs)
					if !ok || err != nil || herr != nil {
						return usagef("--forward wants IP:PORT=GUESTPORT, got %q", f)
					}
					req.Forwards = append(req.Forwards, api.Forward{Host: h, GuestPort: port})
				}
			}
			st, err := ac.StartVM(ctx, req)
			if err != nil {
				return err
			}
			return e.print(st, fmt.Sprintf("VM %s %s (%s); console log %s\n", st.Name, st.State, st.Accel, st.Console))
		})
	fs := vmStart.Flags()
	str(fs, &vmGroup, "group", "", "group whose disks the VM uses (required)")
	fs.IntVar(&vmMem, "memory", 512, "memory in MiB")
	fs.IntVar(&vmCPUs, "vcpus", 1, "virtual CPUs")
	str(fs, &vmKernel, "kernel", "", "kernel to boot (default: boot from the first disk)")
	str(fs, &vmInitrd, "initrd", "", "initrd")
	str(fs, &vmAppend, "append", "", "kernel command line")
	str(fs, &vmNet, "net", "user", "network: user, isolated or none")
	str(fs, &vmFwd, "forward", "", "host forwards IP:PORT=GUESTPORT,...")
	fs.BoolVar(&vmQGA, "qga", true, "add the guest agent channel")
	vmStart.MarkFlagRequired("group")
	var force bool
	var stopTimeout time.Duration
	vmStop := agentCommand(e, &cobra.Command{Use: "stop NAME", Short: "Shut a VM down (the guest agent, the power button, then quit)", Args: cobra.ExactArgs(1)}, &o,
		func(ctx context.Context, ac *agentclient.Client, args []string) error {
			steps, err := ac.StopVM(ctx, args[0], api.StopOptions{Force: force, Timeout: stopTimeout})
			if err != nil {
				return err
			}
			return e.print(api.Steps{Steps: steps}, "  "+strings.Join(steps, "\n  ")+"\n")
		})
	vmStop.Flags().BoolVar(&force, "force", false, "at once, without a graceful shutdown")
	vmStop.Flags().DurationVar(&stopTimeout, "timeout", api.DefaultStopTimeout, "quit after this if the guest has not powered off")

	repairText := func(r api.Repair) string {
		var b strings.Builder
		for _, s := range r.Steps {
			fmt.Fprintf(&b, "%s\n", s)
		}
		return b.String()
	}
	resync := agentCommand(e, &cobra.Command{Use: "resync REPLICA", Short: "Copy a damaged replica again from its source by checksum compare (its journal is set aside, not deleted)", Args: cobra.ExactArgs(1),
		Example: "  ferry agent replica resync --site west --pki /etc/ferry/pki web"}, &o,
		func(ctx context.Context, ac *agentclient.Client, args []string) error {
			r, err := ac.ResyncReplica(ctx, args[0])
			if err != nil {
				return err
			}
			return e.print(r, repairText(r))
		})
	reseed := agentCommand(e, &cobra.Command{Use: "reseed GROUP", Short: "Serve a group whose journal is damaged from its images as they are, and copy its replica again", Args: cobra.ExactArgs(1),
		Example: "  ferry agent group reseed --site east --pki /etc/ferry/pki web"}, &o,
		func(ctx context.Context, ac *agentclient.Client, args []string) error {
			r, err := ac.ReseedGroup(ctx, args[0])
			if err != nil {
				return err
			}
			return e.print(r, repairText(r))
		})
	replicaDelete := agentCommand(e, &cobra.Command{Use: "delete REPLICA", Short: "Delete a replica with its journal and recovery points", Args: cobra.ExactArgs(1)}, &o,
		func(ctx context.Context, ac *agentclient.Client, args []string) error {
			if err := ac.DeleteReplica(ctx, args[0]); err != nil {
				return err
			}
			return e.print(map[string]string{"deleted": args[0]}, fmt.Sprintf("deleted replica %s with its journal and recovery points\n", args[0]))
		})
	c := group("agent", "Run a site agent, or drive one directly",
		agentRunCmd(e), status, group("group", "Create, delete or repair consistency groups", groupCreate, groupDelete, reseed),
		group("replica", "Repair or delete replicas", resync, replicaDelete), replicate, unreplicate, mark, points,
		group("view", "Open or close views of replicas", viewOpen, viewClose), group("vm", "Start or stop VMs on a site", vmStart, vmStop))
	// The flags of the client subcommands (not of 'agent run').
	for _, sub := range c.Commands() {
		if sub.Name() == "run" {
			continue
		}
		addAgentFlags(sub, &o)
	}
	return c
}

func addAgentFlags(c *cobra.Command, o *agentOpts) {
	if c.HasSubCommands() {
		for _, s := range c.Commands() {
			addAgentFlags(s, o)
		}
		return
	}
	fs := c.Flags()
	str(fs, &o.addr, "agent", "127.0.0.1:7410", "the agent's address")
	str(fs, &o.site, "site", "", "the agent's site name, as in its certificate (required)")
	str(fs, &o.pki, "pki", "", "PKI directory holding your certificate and the CA (required)")
	str(fs, &o.as, "as", "operator", "name of your certificate in --pki")
	c.MarkFlagRequired("site")
	c.MarkFlagRequired("pki")
}

func agentRunCmd(e *env) *cobra.Command {
	var dir, name, listen, pkiDir, vaultAddr, maxUnfolded, nbdGroup, nbdMode, runtimeName, libvirtURI string
	var points, retention, appEvery time.Duration
	var foldMiB, unshippedMiB int64
	var noCompress bool
	c := &cobra.Command{Use: "run", Short: "Run a site agent (the daemon)", Args: cobra.NoArgs,
		Example: "  ferry agent run --dir /var/lib/ferry --name east --listen 0.0.0.0:7410 --pki /etc/ferry/pki --vault vault.example:7400\n" +
			"  ferry agent run --config /etc/ferry/agent.toml",
		RunE: runE(e, func(ctx context.Context, args []string) error {
			if dir == "" || name == "" || pkiDir == "" {
				return usagef("--dir, --name and --pki are required (flags or the config file)")
			}
			dataPathProcs()
			mu, err := parseUnfolded(maxUnfolded)
			if err != nil {
				return err
			}
			var mode os.FileMode
			if nbdMode != "" {
				m, err := strconv.ParseUint(nbdMode, 8, 32)
				if err != nil || m > 0o777 {
					return usagef("--nbd-mode %q: want octal permission bits such as 0660", nbdMode)
				}
				mode = os.FileMode(m)
			}
			rt, closeRT, err := vmRuntime(ctx, e, runtimeName, libvirtURI)
			if err != nil {
				return err
			}
			defer closeRT()
			a, err := agent.New(agent.Config{Dir: dir, Name: name, Listen: listen, PKIDir: pkiDir, Logger: e.log, PointInterval: points, Retention: retention, AppInterval: appEvery, Vault: vaultAddr, FoldRate: foldMiB << 20, MaxUnshipped: unshippedMiB << 20, MaxUnfolded: mu,
				NBDGroup: nbdGroup, NBDMode: mode, Runtime: rt, NoCompress: noCompress})
			if err != nil {
				return err
			}
			if err := a.Start(ctx); err != nil {
				a.Close()
				return err
			}
			fmt.Fprintf(os.Stderr, "ferry agent %s listening on %s, NBD on %s\n", name, a.Addr(), a.NBDSocket())
			<-ctx.Done()
			return a.Close()
		})}
	fs := c.Flags()
	str(fs, &dir, "dir", "", "data directory (required)")
	str(fs, &name, "name", "", "site name; its certificate NAME.crt must be in --pki (required)")
	str(fs, &listen, "listen", "127.0.0.1:7410", "address for the API and the replication link (mutual TLS)")
	str(fs, &pkiDir, "pki", "", "PKI directory (required)")
	fs.DurationVar(&points, "point-interval", time.Second, "crash-consistent recovery point interval")
	fs.DurationVar(&retention, "retention", 24*time.Hour, "how long replicas keep every instant recoverable")
	fs.DurationVar(&appEvery, "app-interval", time.Hour, "application-consistent point interval for running VMs (min 1m)")
	str(fs, &vaultAddr, "vault", "", "vault address (host:port; several comma-separated, for a vault per site over etcd) to send heartbeats to over mutual TLS")
	fs.Int64Var(&unshippedMiB, "max-unshipped", 1024, "MiB of journal a group keeps for its recovery site while the link is down; past it, a dirty-block bitmap (resynchronized when the link is back)")
	fs.Int64Var(&foldMiB, "fold-rate", 128, "MiB/s the background folds may write while VMs write: a committed group's into plain images, and recent writes' into the images at checkpoints")
	str(fs, &maxUnfolded, "max-unfolded", "4G", maxUnfoldedHelp)
	str(fs, &nbdGroup, "nbd-group", "", "group that may connect to the NBD socket: the hypervisor's (libvirt-qemu for libvirt); without it the socket is the agent's user's only (0600)")
	str(fs, &nbdMode, "nbd-mode", "", "the NBD socket's mode with --nbd-group (default 0660; bits for others are refused)")
	str(fs, &runtimeName, "runtime", "qemu", "how VMs run: qemu (ferry starts QEMU itself) or libvirt (domains of the libvirt daemon at --libvirt-uri)")
	fs.BoolVar(&noCompress, "no-compress", false, "do not compress replication streams (by default zstd, wherever it pays)")
	str(fs, &libvirtURI, "libvirt-uri", "qemu:///system", "libvirt connection for --runtime libvirt: qemu:///system, or qemu+unix:///system?socket=PATH")
	return c
}

func statusText(st api.AgentStatus) string {
	var b strings.Builder
	fmt.Fprintf(&b, "site %s, NBD socket %s\n", st.Site, st.NBDSocket)
	for _, g := range st.Groups {
		fmt.Fprintf(&b, "group %s: %d disks, last seq %d\n", g.Name, len(g.Disks), g.LastSeq)
		if g.Fenced != 0 {
			fmt.Fprintf(&b, "  FENCED: generation %d runs at another site; reprotect it\n", g.Fenced)
		}
		if g.Failed != "" {
			fmt.Fprintf(&b, "  FAILED, refusing writes: %s\n", g.Failed)
		}
		if f := g.Fold; f != nil && f.Phase != api.FoldDone {
			fmt.Fprintf(&b, "  folding after commit (%s): %d journal entries, %d bytes of the VM's writes left\n", f.Phase, f.EntriesLeft, f.BytesLeft)
		}
		if r := g.Replication; r != nil {
			fmt.Fprintf(&b, "  -> %s: %s, acked %d, RPO %.3fs, pending %d B, %.1f MB/s", g.PeerName, r.State, r.AckedSeq, r.RPO, r.PendingBytes, r.ThroughputBps/1e6)
			if r.State == api.ReplInitialSync && r.CopyTotal > 0 {
				fmt.Fprintf(&b, ", copy %s%s", bar(r.CopyDone, r.CopyTotal), eta(r.CopyTotal-r.CopyDone, r.ThroughputBps))
			}
			if r.ResyncTotal > 0 && r.State == api.ReplResync {
				fmt.Fprintf(&b, ", resync %s%s", bar(r.ResyncDone, r.ResyncTotal), eta(r.ResyncTotal-r.ResyncDone, r.ThroughputBps))
			}
			if r.BitmapMode && r.State != api.ReplResync {
				b.WriteString(", tracking dirty blocks (journal bound reached)")
			}
			if r.WireBytes > 0 && r.WireBytes < r.PayloadBytes {
				fmt.Fprintf(&b, ", compressed %.2fx", float64(r.PayloadBytes)/float64(r.WireBytes))
			}
			if r.LinkBitsPerSecond > 0 {
				how := "sent plain: faster than compressing"
				if r.Compressing {
					how = "compressing"
				}
				fmt.Fprintf(&b, ", link ~%s (%s)", bandwidth.FormatRate(r.LinkBitsPerSecond), how)
			}
			if r.CapBitsPerSecond > 0 {
				fmt.Fprintf(&b, ", cap %s", bandwidth.FormatRate(r.CapBitsPerSecond))
			}
			if r.BacklogBytes > 1<<20 {
				switch {
				case r.ClearsInSeconds < 0:
					fmt.Fprintf(&b, ", backlog %d MiB and not shrinking (churn above the link or cap)", r.BacklogBytes>>20)
				case r.ClearsInSeconds > 0:
					fmt.Fprintf(&b, ", backlog %d MiB, clears in ~%s", r.BacklogBytes>>20, time.Duration(r.ClearsInSeconds*float64(time.Second)).Round(time.Second))
				}
			}
			if r.LastError != "" {
				fmt.Fprintf(&b, ", last error: %s", r.LastError)
			}
			b.WriteString("\n")
		}
		if ap := g.AppPoint; ap != nil {
			if ap.Succeeded {
				fmt.Fprintf(&b, "  last app-consistent point: seq %d at %s, frozen %.0f ms\n", ap.Seq, ap.Time.Format(time.RFC3339), ap.FreezeMS)
			} else {
				fmt.Fprintf(&b, "  last app-consistent point FAILED at %s: %s\n", ap.Time.Format(time.RFC3339), ap.Error)
			}
		}
	}
	for _, r := range st.Replicas {
		fmt.Fprintf(&b, "replica %s: seq %d..%d (consistent from %d), %d points, last write %s\n",
			r.Group, r.BaseSeq, r.LastSeq, r.ConsistentSeq, r.Points, r.LastTime.Format(time.RFC3339))
	}
	for _, v := range st.VMs {
		fmt.Fprintf(&b, "vm %s: %s (%s) %s\n", v.Name, v.State, v.Accel, v.Reason)
	}
	for _, v := range st.Views {
		fmt.Fprintf(&b, "view %s: %s/%s at %d, nbd+unix:///%s?socket=%s\n", v.ID, v.Replica, v.Disk, v.Seq, v.Export, v.Socket)
	}
	for _, p := range st.Problems {
		fmt.Fprintf(&b, "DAMAGED %s %s (since %s), left untouched: %s\n", p.Kind, p.Name, p.Since.Format(time.RFC3339), p.Reason)
	}
	return b.String()
}

// eta formats the time left for n bytes at rate bytes per second.
func eta(n int64, rate float64) string {
	if rate <= 0 || n <= 0 {
		return ""
	}
	return fmt.Sprintf(" ETA %s", (time.Duration(float64(n)/rate) * time.Second).Round(time.Second))
}
