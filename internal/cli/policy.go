package cli

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/vaultclient"
	"github.com/spf13/cobra"
)

func policyCmd(e *env) *cobra.Command {
	var oc, ol, os_ vaultOpts
	var p api.Policy
	create := vaultCommand(e, &cobra.Command{Use: "create NAME", Short: "Create or replace a policy", Args: cobra.ExactArgs(1),
		Example: "  ferry policy create gold --retention 72h --rpo-warning 5s --rpo-critical 30s --app-interval 15m"}, &oc,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			p.Name = args[0]
			out, err := vc.PutPolicy(ctx, p)
			if err != nil {
				return err
			}
			return e.print(out, fmt.Sprintf("policy %s: retention %v, points every %v, app-consistent every %v, RPO warning %v, critical %v\n",
				out.Name, out.Retention, out.CheckpointInterval, out.AppInterval, out.RPOWarning, out.RPOCritical))
		})
	fs := create.Flags()
	d := api.Policy{Retention: 24 * time.Hour, CheckpointInterval: time.Second, AppInterval: time.Hour, RPOWarning: 30 * time.Second, RPOCritical: 5 * time.Minute}
	fs.DurationVar(&p.Retention, "retention", d.Retention, "how long every instant stays recoverable")
	fs.DurationVar(&p.CheckpointInterval, "checkpoint-interval", d.CheckpointInterval, "crash-consistent point interval")
	fs.DurationVar(&p.AppInterval, "app-interval", d.AppInterval, "application-consistent point interval (at least 1m)")
	fs.DurationVar(&p.RPOWarning, "rpo-warning", d.RPOWarning, "RPO at which health turns warning")
	fs.DurationVar(&p.RPOCritical, "rpo-critical", d.RPOCritical, "RPO at which health turns critical")
	fs.BoolVar(&p.Ransomware.Disabled, "no-ransomware-detection", false, "do not watch the write stream for encryption in place")
	fs.Int64Var(&p.Ransomware.MinBytes, "ransomware-min-bytes", 0, "low-entropy bytes overwritten with high-entropy data in one window below which no alert is raised (0: 4 MiB)")
	fs.Float64Var(&p.Ransomware.Factor, "ransomware-factor", 0, "how many times the protection's busiest earlier window it takes to alert (0: 4)")
	fs.DurationVar(&p.Ransomware.Window, "ransomware-window", 0, "the detector's window (0: 10s)")
	list := vaultCommand(e, &cobra.Command{Use: "list", Aliases: []string{"ls"}, Short: "List policies", Args: cobra.NoArgs}, &ol,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			ps, err := vc.Policies(ctx)
			if err != nil {
				return err
			}
			return e.print(ps, table("POLICY\tRETENTION\tPOINTS\tAPP-CONSISTENT\tRPO WARNING\tRPO CRITICAL", func(tw io.Writer) {
				for _, p := range ps {
					fmt.Fprintf(tw, "%s\t%v\t%v\t%v\t%v\t%v\n", p.Name, p.Retention, p.CheckpointInterval, p.AppInterval, p.RPOWarning, p.RPOCritical)
				}
			}))
		})
	show := vaultCommand(e, &cobra.Command{Use: "show NAME", Short: "Show a policy", Args: cobra.ExactArgs(1)}, &os_,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			p, err := vc.Policy(ctx, args[0])
			if err != nil {
				return err
			}
			return e.print(p, fmt.Sprintf("policy %s\n  retention           %v\n  checkpoint interval %v\n  app interval        %v\n  RPO warning         %v\n  RPO critical        %v\n",
				p.Name, p.Retention, p.CheckpointInterval, p.AppInterval, p.RPOWarning, p.RPOCritical))
		})
	return group("policy", "Create, list and show replication policies", create, list, show)
}
