package cli

import (
	"context"
	"fmt"
	"time"

	"github.com/ferry-dr/ferry/internal/vaultclient"
	"github.com/spf13/cobra"
)

// ransomwareCmd shows and dismisses the detector's incidents.
func ransomwareCmd(e *env) *cobra.Command {
	var os_, od vaultOpts
	show := vaultCommand(e, &cobra.Command{Use: "show VM", Short: "Show a protection's open ransomware incident and its last clean point", Args: cobra.ExactArgs(1),
		Example: "  ferry ransomware show web\n  ferry test-failover web --point last-clean --wait"}, &os_,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			p, err := vc.Protection(ctx, args[0])
			if err != nil {
				return err
			}
			inc := p.Ransomware
			if inc == nil {
				if e.output == "json" {
					return e.print(struct{}{}, "")
				}
				fmt.Fprintf(e.stdout, "%s: no ransomware incident is open\n", p.VM)
				return nil
			}
			clean := "none left before it"
			if inc.LastClean != nil {
				clean = fmt.Sprintf("%d (%s, %s)", inc.LastClean.Seq, inc.LastClean.Type, inc.LastClean.Time.UTC().Format(time.RFC3339Nano))
			}
			return e.print(inc, fmt.Sprintf("%s: ransomware suspected\n  first suspicious write  %s (entry %d)\n  detected                %s\n  overwritten, one window %.1f MiB low-entropy -> high (the most before: %.1f MiB)\n  last clean point        %s\n"+
				"Use it: ferry files ls %[1]s --point last-clean, ferry test-failover %[1]s --point last-clean, ferry failover %[1]s --point last-clean; then ferry ransomware dismiss %[1]s\n",
				p.VM, inc.Start.UTC().Format(time.RFC3339), inc.FirstSeq, inc.Detected.UTC().Format(time.RFC3339), float64(inc.PeakBytes)/(1<<20), float64(inc.BaselineBytes)/(1<<20), clean))
		})
	dismiss := vaultCommand(e, &cobra.Command{Use: "dismiss VM", Short: "Close a protection's ransomware incident (the alert clears; retention no longer keeps its last clean point)", Args: cobra.ExactArgs(1)}, &od,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			if err := vc.DismissIncident(ctx, args[0]); err != nil {
				return err
			}
			return e.print(map[string]string{"dismissed": args[0]}, fmt.Sprintf("%s: ransomware incident dismissed\n", args[0]))
		})
	return group("ransomware", "Show and dismiss ransomware incidents (low-entropy data overwritten with high-entropy data)", show, dismiss)
}
