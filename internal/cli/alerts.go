package cli

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/ferry-dr/ferry/internal/vaultclient"
	"github.com/spf13/cobra"
)

func alertsCmd(e *env) *cobra.Command {
	var o vaultOpts
	return vaultCommand(e, &cobra.Command{Use: "alerts", Short: "List what needs an operator now, and what to do", Args: cobra.NoArgs,
		Long:    "Alerts are the conditions in force: a site that does not answer, a protection that is not healthy (RPO over its policy's thresholds, replication stopped, damaged disks). Each says what to do. 'ferry events' shows when they were raised and cleared.",
		Example: "  ferry alerts\n  ferry alerts --output json"}, &o,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			as, err := vc.Alerts(ctx)
			if err != nil {
				return err
			}
			if len(as) == 0 && e.output != "json" {
				fmt.Fprintln(e.stdout, "no alerts: every site answers and every protection is healthy")
				return nil
			}
			return e.print(as, table("SEVERITY\tOBJECT\tSINCE\tMESSAGE\tWHAT TO DO", func(tw io.Writer) {
				for _, a := range as {
					since := "-"
					if !a.Since.IsZero() {
						since = a.Since.UTC().Format(time.RFC3339)
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", a.Severity, a.Object, since, a.Message, a.Action)
				}
			}))
		})
}

func eventsCmd(e *env) *cobra.Command {
	var o vaultOpts
	var limit int
	c := vaultCommand(e, &cobra.Command{Use: "events", Short: "Show the event log: alerts raised and cleared, jobs ended", Args: cobra.NoArgs,
		Example: "  ferry events\n  ferry events --limit 200 --output json"}, &o,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			evs, err := vc.Events(ctx, limit)
			if err != nil {
				return err
			}
			return e.print(evs, table("TIME\tSEVERITY\tKIND\tOBJECT\tMESSAGE", func(tw io.Writer) {
				for _, ev := range evs {
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", ev.Time.UTC().Format(time.RFC3339), ev.Severity, ev.Kind, ev.Object, ev.Message)
				}
			}))
		})
	c.Flags().IntVar(&limit, "limit", 50, "newest events to show (0: all the vault keeps, 1,000)")
	return c
}
