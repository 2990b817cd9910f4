package cli

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/vaultclient"
	"github.com/spf13/cobra"
)

const pointHelp = "recovery point: latest, latest-processed, latest-app-consistent, last-clean (before a ransomware incident), a point id or an RFC 3339 time"

func protectCmd(e *env) *cobra.Command {
	var o vaultOpts
	var to, policy, testNet string
	var nets []string
	var wait bool
	c := vaultCommand(e, &cobra.Command{Use: "protect VM", Short: "Enable replication of a VM to a recovery site", Args: cobra.ExactArgs(1),
		Long:    "Enable replication of a VM to a recovery site: an initial copy while the VM runs, then continuous\nreplication with a crash-consistent point every second.",
		Example: "  ferry protect web --to west --wait\n  ferry protect web --to west --network nic0=prod-west --test-network drill-west --policy gold"}, &o,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			req := api.EnableRequest{VM: args[0], Target: to, Policy: policy, TestNetwork: testNet, Networks: map[string]string{}}
			for _, m := range nets {
				nic, n, ok := strings.Cut(m, "=")
				if !ok {
					return usagef("--network wants NIC=NETWORK (like nic0=prod-west), got %q", m)
				}
				req.Networks[nic] = n
			}
			j, err := vc.Enable(ctx, req)
			if err != nil {
				return err
			}
			return startedJob(ctx, e, vc, j, wait)
		})
	fs := c.Flags()
	str(fs, &to, "to", "", "recovery site (required)")
	str(fs, &policy, "policy", "", "policy (default: default)")
	str(fs, &testNet, "test-network", "", "isolated network at the recovery site for drills (default: its first isolated network)")
	fs.StringArrayVar(&nets, "network", nil, "NIC=NETWORK at the recovery site for failovers (repeatable; default: its first production network)")
	fs.BoolVar(&wait, "wait", false, "wait for the job, showing its steps; exit non-zero if it fails")
	c.MarkFlagRequired("to")
	return c
}

func disableCmd(e *env) *cobra.Command {
	var o vaultOpts
	var keep, wait bool
	c := vaultCommand(e, &cobra.Command{Use: "disable VM", Short: "Disable a VM's protection: stop replication, delete (or keep) the replica", Args: cobra.ExactArgs(1),
		Example: "  ferry disable web --wait\n  ferry disable web --keep-replica --wait"}, &o,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			j, err := vc.Disable(ctx, args[0], keep)
			if err != nil {
				return err
			}
			return startedJob(ctx, e, vc, j, wait)
		})
	c.Flags().BoolVar(&keep, "keep-replica", false, "keep the replica and its recovery points at the recovery site")
	c.Flags().BoolVar(&wait, "wait", false, "wait for the job; exit non-zero if it fails")
	return c
}

func protectionsCmd(e *env) *cobra.Command {
	var o vaultOpts
	return vaultCommand(e, &cobra.Command{Use: "protections", Short: "List protections: direction, state, health, RPO", Args: cobra.NoArgs,
		Example: "  ferry protections\n  ferry protections -o json"}, &o,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			ps, err := vc.Protections(ctx)
			if err != nil {
				return err
			}
			return e.print(ps, table("VM\tDIRECTION\tSTATE\tHEALTH\tRPO\tJOB\tWHY", func(tw io.Writer) {
				for _, p := range ps {
					st := string(p.State)
					if p.TestPending {
						st += " (test-failover-cleanup-pending)"
					}
					fmt.Fprintf(tw, "%s\t%s -> %s\t%s\t%s\t%.2fs\t%s\t%s\n", p.VM, p.Source, p.Target, st, p.Health, p.RPOSeconds, p.Job, p.HealthReason)
				}
			}))
		})
}

func pointsCmd(e *env) *cobra.Command {
	var o vaultOpts
	return vaultCommand(e, &cobra.Command{Use: "points VM", Short: "List a protected VM's recovery points", Args: cobra.ExactArgs(1),
		Example: "  ferry points web"}, &o,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			pts, err := vc.Points(ctx, args[0])
			if err != nil {
				return err
			}
			return e.print(pts, table("ID\tTIME\tTYPE\tLABEL", func(tw io.Writer) {
				for _, p := range pts {
					fmt.Fprintf(tw, "%d\t%s\t%s\t%s\n", p.Seq, p.Time.Format(time.RFC3339Nano), p.Type, p.Label)
				}
			}))
		})
}

func testFailoverCmd(e *env) *cobra.Command {
	var o, oc vaultOpts
	var point, notes string
	var wait, waitC bool
	c := vaultCommand(e, &cobra.Command{Use: "test-failover VM", Short: "DR drill: boot a copy at the recovery site in an isolated network", Args: cobra.ExactArgs(1),
		Example: "  ferry test-failover web --point latest-app-consistent --wait\n  ferry test-failover cleanup web --notes \"drill ok\" --wait"}, &o,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			j, err := vc.TestFailover(ctx, args[0], point)
			if err != nil {
				return err
			}
			return startedJob(ctx, e, vc, j, wait)
		})
	str(c.Flags(), &point, "point", "", pointHelp+" (default: latest-processed)")
	c.Flags().BoolVar(&wait, "wait", false, "wait for the job; exit non-zero if it fails")
	cleanup := vaultCommand(e, &cobra.Command{Use: "cleanup VM", Short: "End a DR drill: delete the test VM and record notes", Args: cobra.ExactArgs(1),
		Example: "  ferry test-failover cleanup web --notes \"drill ok\" --wait"}, &oc,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			j, err := vc.CleanupTestFailover(ctx, args[0], notes)
			if err != nil {
				return err
			}
			return startedJob(ctx, e, vc, j, waitC)
		})
	str(cleanup.Flags(), &notes, "notes", "", "notes recorded with the drill")
	cleanup.Flags().BoolVar(&waitC, "wait", false, "wait for the job; exit non-zero if it fails")
	c.AddCommand(cleanup)
	return c
}

func failoverCmd(e *env, name string) *cobra.Command {
	var o vaultOpts
	var point string
	var noShutdown, wait bool
	var shutdownTimeout time.Duration
	short := "Fail a VM over to its recovery site"
	if name == "failback" {
		short = "Fail a VM back: a failover in the reverse direction, after a reprotect"
	}
	c := vaultCommand(e, &cobra.Command{Use: name + " VM", Short: short, Args: cobra.ExactArgs(1),
		Example: fmt.Sprintf("  ferry %s web --wait                       # shut the source down first: no data loss\n  ferry %s web --point latest-processed --wait\n  ferry %s web --point 2026-11-26T10:00:00Z --no-shutdown-source", name, name, name)}, &o,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			shutdown := !noShutdown
			j, err := vc.Failover(ctx, args[0], api.FailoverRequest{Point: point, ShutdownSource: &shutdown, ShutdownTimeout: shutdownTimeout})
			if err != nil {
				return err
			}
			return startedJob(ctx, e, vc, j, wait)
		})
	str(c.Flags(), &point, "point", "", pointHelp+" (default: latest)")
	c.Flags().BoolVar(&noShutdown, "no-shutdown-source", false, "do not shut the source VM down first")
	c.Flags().DurationVar(&shutdownTimeout, "shutdown-timeout", 0, "bound the source's shutdown (guest agent, ACPI, then quit); default: the VM's, else 60s")
	c.Flags().BoolVar(&wait, "wait", false, "wait for the job; exit non-zero if it fails")
	return c
}

func changePointCmd(e *env) *cobra.Command {
	var o vaultOpts
	var point string
	var wait bool
	c := vaultCommand(e, &cobra.Command{Use: "change-point VM", Short: "Restart a failed-over VM on another recovery point", Args: cobra.ExactArgs(1),
		Example: "  ferry change-point web --point 1234 --wait"}, &o,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			j, err := vc.ChangePoint(ctx, args[0], point)
			if err != nil {
				return err
			}
			return startedJob(ctx, e, vc, j, wait)
		})
	str(c.Flags(), &point, "point", "", pointHelp)
	c.MarkFlagRequired("point")
	c.Flags().BoolVar(&wait, "wait", false, "wait for the job; exit non-zero if it fails")
	return c
}

func commitCmd(e *env) *cobra.Command {
	var o vaultOpts
	var wait bool
	c := vaultCommand(e, &cobra.Command{Use: "commit VM", Short: "Make a failover final (its recovery points are deleted)", Args: cobra.ExactArgs(1),
		Example: "  ferry commit web --wait"}, &o,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			j, err := vc.Commit(ctx, args[0])
			if err != nil {
				return err
			}
			return startedJob(ctx, e, vc, j, wait)
		})
	c.Flags().BoolVar(&wait, "wait", false, "wait for the job; exit non-zero if it fails")
	return c
}

func reprotectCmd(e *env) *cobra.Command {
	var o vaultOpts
	var dryRun, wait bool
	c := vaultCommand(e, &cobra.Command{Use: "reprotect VM", Short: "Replicate back the other way after a commit (--dry-run shows the plan)", Args: cobra.ExactArgs(1),
		Example: "  ferry reprotect web --dry-run\n  ferry reprotect web --wait"}, &o,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			vm := args[0]
			if dryRun {
				plan, err := vc.PlanReprotect(ctx, vm)
				if err != nil {
					return err
				}
				return e.print(plan, planText(vm, plan))
			}
			j, err := vc.Reprotect(ctx, vm)
			if err != nil {
				return err
			}
			return startedJob(ctx, e, vc, j, wait)
		})
	c.Flags().BoolVar(&dryRun, "dry-run", false, "show what would be reused and created, and the bytes it would send")
	c.Flags().BoolVar(&wait, "wait", false, "wait for the job; exit non-zero if it fails")
	return c
}

func planText(vm string, plan api.ReprotectPlan) string {
	var b strings.Builder
	fmt.Fprintf(&b, "reprotect %s: replicate %s -> %s\n  VM %s at %s: %s\n", vm, plan.From, plan.To, plan.VM.Name, plan.To, plan.VM.Action)
	for _, d := range plan.Disks {
		fmt.Fprintf(&b, "  disk %-10s %12d bytes: %s\n", d.Name, d.Size, d.Action)
	}
	switch plan.Method {
	case "changed-block tracking":
		fmt.Fprintf(&b, "  sends about %d of %d bytes: the blocks changed at either site since the failover point (changed-block tracking)\n", plan.ExpectedBytes, plan.MaxBytes)
	case "checksum compare":
		fmt.Fprintf(&b, "  sends at most %d bytes: only the chunks whose checksums differ (reads the disks at both sites)\n", plan.MaxBytes)
	default:
		fmt.Fprintf(&b, "  sends %d bytes: a full copy\n", plan.MaxBytes)
	}
	if plan.Why != "" {
		fmt.Fprintf(&b, "  no changed-block tracking: %s\n", plan.Why)
	}
	return b.String()
}
