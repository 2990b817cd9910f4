package cli

import (
	"context"
	"fmt"
	"net/netip"
	"net/url"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/ferry-dr/ferry/internal/agent"
	"github.com/ferry-dr/ferry/internal/disk"
	"github.com/ferry-dr/ferry/internal/pki"
	"github.com/ferry-dr/ferry/internal/qemu"
	"github.com/ferry-dr/ferry/internal/replica"
)

func runCA(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("%w: ca init|issue", errUsage)
	}
	fs := newFlags("ca "+args[0], e)
	dir := fs.String("pki", "", "PKI directory (required)")
	name := fs.String("name", "ferry CA", "CA name (init)")
	hosts := fs.String("host", "127.0.0.1,localhost", "comma-separated DNS names and IPs the certificate is valid for (issue)")
	role := fs.String("role", "", "what the holder is: site (an agent), vault, operator (calls agents directly) or monitor (reads status and metrics) (issue; required)")
	if err := parse(fs, args[1:]); err != nil {
		return err
	}
	if *dir == "" {
		return fmt.Errorf("%w: --pki is required", errUsage)
	}
	switch args[0] {
	case "init":
		if err := pki.InitCA(*dir, *name, time.Now()); err != nil {
			return err
		}
		return e.print(map[string]string{"ca": *dir}, fmt.Sprintf("created CA in %s; issue certificates with 'ferry ca issue --pki %s --role site NAME'\n", *dir, *dir))
	case "issue":
		if fs.NArg() != 1 || *role == "" {
			return fmt.Errorf("%w: ferry ca issue --pki DIR --role site|vault|operator|monitor NAME", errUsage)
		}
		if err := pki.CheckRole(*role); err != nil {
			return fmt.Errorf("%w: %v", errUsage, err)
		}
		peer := pki.Peer{Role: *role, Name: fs.Arg(0)}
		if err := pki.Issue(*dir, *dir, peer, strings.Split(*hosts, ","), time.Now()); err != nil {
			return err
		}
		return e.print(map[string]string{"issued": fs.Arg(0), "identity": peer.URI().String()},
			fmt.Sprintf("issued %s.crt and %s.key in %s for %s\n", fs.Arg(0), fs.Arg(0), *dir, peer.URI()))
	}
	return fmt.Errorf("%w: unknown ca subcommand %q", errUsage, args[0])
}

func runAgent(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("%w: agent run|status|group|replicate|unreplicate|mark|points|view", errUsage)
	}
	if args[0] == "run" {
		return agentRun(ctx, e, args[1:])
	}
	sub := args[0]
	args = args[1:]
	if (sub == "group" || sub == "view" || sub == "vm") && len(args) > 0 {
		sub, args = sub+" "+args[0], args[1:]
	}
	fs := newFlags("agent "+sub, e)
	addr := fs.String("agent", "127.0.0.1:7410", "agent address")
	site := fs.String("site", "", "the agent's site name, as in its certificate (required)")
	pkiDir := fs.String("pki", "", "PKI directory holding your certificate and the CA (required)")
	as := fs.String("as", "operator", "name of your certificate in --pki")
	var disks multiFlag
	fs.Var(&disks, "disk", "disk NAME=SIZE (group create; repeatable)")
	to := fs.String("to", "", "peer agent address (replicate)")
	toName := fs.String("to-site", "", "peer site name (replicate)")
	label := fs.String("label", "", "point label (mark)")
	app := fs.Bool("app", false, "application-consistent point: quiesce the guest through its guest agent (mark)")
	vmGroup := fs.String("group", "", "group whose disks the VM uses (vm start)")
	vmMem := fs.Int("memory", 512, "memory in MiB (vm start)")
	vmCPUs := fs.Int("vcpus", 1, "vCPUs (vm start)")
	vmKernel := fs.String("kernel", "", "kernel to boot (vm start; default: boot from the first disk)")
	vmInitrd := fs.String("initrd", "", "initrd (vm start)")
	vmAppend := fs.String("append", "", "kernel command line (vm start)")
	vmNet := fs.String("net", "user", "network: user, isolated or none (vm start)")
	vmFwd := fs.String("forward", "", "host forwards HOST:PORT=GUESTPORT,... (vm start)")
	vmQGA := fs.Bool("qga", true, "add the guest agent channel (vm start)")
	seq := fs.Uint64("seq", 0, "sequence number of the point (view open; 0: newest point)")
	writable := fs.Bool("writable", false, "writable view with a discardable overlay (view open)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *site == "" || *pkiDir == "" {
		return fmt.Errorf("%w: --site and --pki are required", errUsage)
	}
	id, err := pki.Load(*pkiDir, *as)
	if err != nil {
		return err
	}
	c := agent.NewClient(id, *addr, *site)
	arg := func(i int, what string) (string, error) {
		if fs.NArg() <= i {
			return "", fmt.Errorf("%w: ferry agent %s needs %s", errUsage, sub, what)
		}
		return fs.Arg(i), nil
	}
	switch sub {
	case "status":
		var st agent.Status
		if err := c.Do(ctx, "GET", "/v1/status", nil, &st); err != nil {
			return err
		}
		return e.print(st, statusText(st))
	case "group create":
		name, err := arg(0, "a group name")
		if err != nil {
			return err
		}
		var specs []disk.Spec
		for _, d := range disks {
			n, s, ok := strings.Cut(d, "=")
			size, err := parseSize(s)
			if !ok || err != nil {
				return fmt.Errorf("%w: --disk wants NAME=SIZE, got %q", errUsage, d)
			}
			specs = append(specs, disk.Spec{Name: n, Size: size})
		}
		if err := c.Do(ctx, "POST", "/v1/groups", map[string]any{"name": name, "disks": specs}, nil); err != nil {
			return err
		}
		return e.print(map[string]string{"created": name}, fmt.Sprintf("created group %s; its disks are NBD exports %s/DISK on the agent's socket\n", name, name))
	case "group delete":
		name, err := arg(0, "a group name")
		if err != nil {
			return err
		}
		if err := c.Do(ctx, "DELETE", "/v1/groups/"+url.PathEscape(name), nil, nil); err != nil {
			return err
		}
		return e.print(map[string]string{"deleted": name}, fmt.Sprintf("deleted group %s and its disks\n", name))
	case "replicate":
		name, err := arg(0, "a group name")
		if err != nil {
			return err
		}
		if *to == "" || *toName == "" {
			return fmt.Errorf("%w: --to ADDR and --to-site NAME are required", errUsage)
		}
		// The recovery site takes the stream from this site only.
		tc := agent.NewClient(id, *to, *toName)
		if err := tc.Do(ctx, "PUT", "/v1/replicas/"+url.PathEscape(name)+"/source", map[string]string{"source": *site}, nil); err != nil {
			return fmt.Errorf("record %s as the source of %s at %s: %w", *site, name, *toName, err)
		}
		if err := c.Do(ctx, "POST", "/v1/groups/"+url.PathEscape(name)+"/replication", map[string]string{"peer_addr": *to, "peer_name": *toName}, nil); err != nil {
			return err
		}
		return e.print(map[string]string{"replicating": name}, fmt.Sprintf("replicating %s to %s (%s); watch with 'ferry agent status'\n", name, *toName, *to))
	case "unreplicate":
		name, err := arg(0, "a group name")
		if err != nil {
			return err
		}
		return c.Do(ctx, "DELETE", "/v1/groups/"+url.PathEscape(name)+"/replication", nil, nil)
	case "vm start":
		name, err := arg(0, "a VM name")
		if err != nil {
			return err
		}
		req := agent.VMRequest{Name: name, Group: *vmGroup, VCPUs: *vmCPUs, MemoryMiB: *vmMem, Net: *vmNet, QGA: *vmQGA,
			Boot: qemu.Boot{Kernel: *vmKernel, Initrd: *vmInitrd, Append: *vmAppend}}
		if *vmFwd != "" {
			for _, f := range strings.Split(*vmFwd, ",") {
				hs, p, ok := strings.Cut(f, "=")
				port, err := strconv.Atoi(p)
				h, herr := netip.ParseAddrPort(hs)
				if !ok || err != nil || herr != nil {
					return fmt.Errorf("%w: --forward wants IP:PORT=GUESTPORT, got %q", errUsage, f)
				}
				req.Forwards = append(req.Forwards, qemu.Forward{Host: h, GuestPort: port})
			}
		}
		var st qemu.Status
		if err := c.Do(ctx, "POST", "/v1/vms", req, &st); err != nil {
			return err
		}
		return e.print(st, fmt.Sprintf("VM %s %s (%s); console log %s\n", st.Name, st.State, st.Accel, st.Console))
	case "vm stop":
		name, err := arg(0, "a VM name")
		if err != nil {
			return err
		}
		var out struct {
			Steps []string `json:"steps"`
		}
		if err := c.Do(ctx, "DELETE", "/v1/vms/"+url.PathEscape(name), nil, &out); err != nil {
			return err
		}
		return e.print(out, "  "+strings.Join(out.Steps, "\n  ")+"\n")
	case "mark":
		name, err := arg(0, "a group name")
		if err != nil {
			return err
		}
		if *app {
			var st agent.AppPointStatus
			if err := c.Do(ctx, "POST", "/v1/groups/"+url.PathEscape(name)+"/points", replica.Marker{Type: "app", Label: *label}, &st); err != nil {
				return fmt.Errorf("%w (crash-consistent points continue)", err)
			}
			return e.print(st, fmt.Sprintf("application-consistent point at seq %d; guest frozen %.0f ms\n", st.Seq, st.FreezeMS))
		}
		var out map[string]uint64
		if err := c.Do(ctx, "POST", "/v1/groups/"+url.PathEscape(name)+"/points", replica.Marker{Type: "named", Label: *label}, &out); err != nil {
			return err
		}
		return e.print(out, fmt.Sprintf("point %q at seq %d\n", *label, out["seq"]))
	case "points":
		name, err := arg(0, "a replica name")
		if err != nil {
			return err
		}
		var pts []replica.Point
		if err := c.Do(ctx, "GET", "/v1/replicas/"+url.PathEscape(name)+"/points", nil, &pts); err != nil {
			return err
		}
		var b strings.Builder
		tw := tabwriter.NewWriter(&b, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "SEQ\tTIME\tTYPE\tLABEL")
		for _, p := range pts {
			fmt.Fprintf(tw, "%d\t%s\t%s\t%s\n", p.Seq, p.Time.Format(time.RFC3339Nano), p.Type, p.Label)
		}
		tw.Flush()
		return e.print(pts, b.String())
	case "view open":
		name, err := arg(0, "a replica name and a disk")
		if err != nil {
			return err
		}
		d, err := arg(1, "a replica name and a disk")
		if err != nil {
			return err
		}
		var vi agent.ViewInfo
		if err := c.Do(ctx, "POST", "/v1/replicas/"+url.PathEscape(name)+"/views", map[string]any{"disk": d, "seq": *seq, "writable": *writable}, &vi); err != nil {
			return err
		}
		return e.print(vi, fmt.Sprintf("view %s of %s/%s at seq %d: nbd+unix:///%s?socket=%s\n", vi.ID, vi.Replica, vi.Disk, vi.Seq, vi.Export, vi.Socket))
	case "view close":
		id, err := arg(0, "a view id")
		if err != nil {
			return err
		}
		return c.Do(ctx, "DELETE", "/v1/views/"+url.PathEscape(id), nil, nil)
	}
	return fmt.Errorf("%w: unknown agent subcommand %q", errUsage, sub)
}

func statusText(st agent.Status) string {
	var b strings.Builder
	fmt.Fprintf(&b, "site %s, NBD socket %s\n", st.Site, st.NBDSocket)
	for _, g := range st.Groups {
		fmt.Fprintf(&b, "group %s: %d disks, last seq %d\n", g.Name, len(g.Disks), g.LastSeq)
		if r := g.Replication; r != nil {
			fmt.Fprintf(&b, "  -> %s: %s, acked %d, RPO %.3fs, pending %d B, %.1f MB/s", g.PeerName, r.State, r.AckedSeq, r.RPO, r.PendingBytes, r.ThroughputBps/1e6)
			if r.State == "initial-sync" && r.CopyTotal > 0 {
				fmt.Fprintf(&b, ", copy %s%s", progressBar(r.CopyDone, r.CopyTotal), eta(r.CopyTotal-r.CopyDone, r.ThroughputBps))
			}
			if r.ResyncTotal > 0 && r.State == "resynchronizing" {
				fmt.Fprintf(&b, ", resync %s%s", progressBar(r.ResyncDone, r.ResyncTotal), eta(r.ResyncTotal-r.ResyncDone, r.ThroughputBps))
			}
			if r.BitmapMode && r.State != "resynchronizing" {
				b.WriteString(", tracking dirty blocks (journal bound reached)")
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
	return b.String()
}

// eta formats the time left for n bytes at rate bytes per second.
func eta(n int64, rate float64) string {
	if rate <= 0 || n <= 0 {
		return ""
	}
	return fmt.Sprintf(" ETA %s", (time.Duration(float64(n)/rate) * time.Second).Round(time.Second))
}

func progressBar(done, total int64) string {
	const w = 20
	n := int(done * w / max(total, 1))
	return fmt.Sprintf("[%s%s] %3d%%", strings.Repeat("#", n), strings.Repeat(".", w-n), done*100/max(total, 1))
}

func agentRun(ctx context.Context, e *env, args []string) error {
	fs := newFlags("agent run", e)
	dir := fs.String("dir", "", "data directory (required)")
	name := fs.String("name", "", "site name; its certificate NAME.crt must be in --pki (required)")
	listen := fs.String("listen", "127.0.0.1:7410", "address for the API and the replication link (mutual TLS)")
	pkiDir := fs.String("pki", "", "PKI directory (required)")
	points := fs.Duration("point-interval", time.Second, "crash-consistent recovery point interval")
	retention := fs.Duration("retention", 24*time.Hour, "how long replicas keep every instant recoverable")
	appEvery := fs.Duration("app-interval", time.Hour, "application-consistent point interval for running VMs (min 1m)")
	vaultAddr := fs.String("vault", "", "vault address (host:port) to send heartbeats to over mutual TLS")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *dir == "" || *name == "" || *pkiDir == "" {
		return fmt.Errorf("%w: --dir, --name and --pki are required", errUsage)
	}
	a, err := agent.New(agent.Config{Dir: *dir, Name: *name, Listen: *listen, PKIDir: *pkiDir, Logger: e.log, PointInterval: *points, Retention: *retention, AppInterval: *appEvery, Vault: *vaultAddr})
	if err != nil {
		return err
	}
	if err := a.Start(ctx); err != nil {
		a.Close()
		return err
	}
	fmt.Fprintf(os.Stderr, "ferry agent %s listening on %s, NBD on %s\n", *name, a.Addr(), a.NBDSocket())
	<-ctx.Done()
	return a.Close()
}

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }
