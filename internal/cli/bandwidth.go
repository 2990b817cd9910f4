package cli

import (
	"context"
	"fmt"
	"io"
	"sort"
	"strings"

	"github.com/spf13/cobra"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/bandwidth"
	"github.com/ferry-dr/ferry/internal/vaultclient"
)

func bandwidthCmd(e *env) *cobra.Command {
	var os_, oset vaultOpts
	var from, to, vm, tz string
	var windows []string
	set := vaultCommand(e, &cobra.Command{Use: "set RATE", Short: "Cap replication between two sites or of one VM (RATE off lifts it)", Args: cobra.ExactArgs(1),
		Example: "  ferry bandwidth set --from east --to west 50Mbit\n" +
			"  ferry bandwidth set --from east --to west 100Mbit --window 'mon-fri 08:00-18:00 20Mbit' --tz Europe/Paris\n" +
			"  ferry bandwidth set --vm db 10Mbit\n" +
			"  ferry bandwidth set --from east --to west off"}, &oset,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			rate, err := bandwidth.ParseRate(args[0])
			if err != nil {
				return usagef("%v", err)
			}
			lim := api.BandwidthLimit{BitsPerSecond: rate, TimeZone: tz}
			for _, w := range windows {
				win, err := parseWindowFlag(w)
				if err != nil {
					return err
				}
				lim.Schedule = append(lim.Schedule, win)
			}
			switch {
			case vm != "" && (from != "" || to != ""):
				return usagef("give either --vm or --from and --to")
			case vm != "":
				err = vc.SetVMCap(ctx, vm, lim)
			case from != "" && to != "":
				err = vc.SetPairCap(ctx, from, to, lim)
			default:
				return usagef("say what to cap: --from SITE --to SITE, or --vm NAME")
			}
			if err != nil {
				return err
			}
			what := "VM " + vm
			if vm == "" {
				what = from + " -> " + to
			}
			return e.print(lim, fmt.Sprintf("%s: %s\n", what, limitText(lim)))
		})
	fs := set.Flags()
	str(fs, &from, "from", "", "the site that sends (with --to)")
	str(fs, &to, "to", "", "the site that receives (with --from)")
	str(fs, &vm, "vm", "", "cap one protected VM's stream instead")
	fs.StringArrayVar(&windows, "window", nil, "a different cap for some hours: 'DAYS HH:MM-HH:MM RATE' (DAYS like mon-fri, sat,sun or *); repeatable, the first that matches wins")
	str(fs, &tz, "tz", "", "time zone of the windows (IANA name, default UTC)")
	show := vaultCommand(e, &cobra.Command{Use: "show", Aliases: []string{"list", "ls"}, Short: "Show the replication caps", Args: cobra.NoArgs}, &os_,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			caps, err := vc.BandwidthCaps(ctx)
			if err != nil {
				return err
			}
			return e.print(caps, table("CAPPED\tCAP", func(tw io.Writer) {
				for _, p := range caps.Pairs {
					fmt.Fprintf(tw, "%s -> %s\t%s\n", p.From, p.To, limitText(p.Limit))
				}
				vms := make([]string, 0, len(caps.VMs))
				for n := range caps.VMs {
					vms = append(vms, n)
				}
				sort.Strings(vms)
				for _, n := range vms {
					fmt.Fprintf(tw, "VM %s\t%s\n", n, limitText(caps.VMs[n]))
				}
			}))
		})
	return group("bandwidth", "Cap what replication sends between sites (per site pair, per VM, with schedules)", set, show)
}

// parseWindowFlag reads "mon-fri 08:00-18:00 20Mbit".
func parseWindowFlag(s string) (api.BandwidthWindow, error) {
	f := strings.Fields(s)
	if len(f) != 3 {
		return api.BandwidthWindow{}, usagef("--window %q: want 'DAYS HH:MM-HH:MM RATE', like 'mon-fri 08:00-18:00 20Mbit'", s)
	}
	fromT, toT, ok := strings.Cut(f[1], "-")
	rate, err := bandwidth.ParseRate(f[2])
	if !ok || err != nil {
		return api.BandwidthWindow{}, usagef("--window %q: want 'DAYS HH:MM-HH:MM RATE', like 'mon-fri 08:00-18:00 20Mbit'", s)
	}
	w := api.BandwidthWindow{Days: f[0], From: fromT, To: toT, BitsPerSecond: rate}
	if err := bandwidth.Check(api.BandwidthLimit{Schedule: []api.BandwidthWindow{w}}); err != nil {
		return api.BandwidthWindow{}, usagef("--window %q: %v", s, err)
	}
	return w, nil
}

func limitText(l api.BandwidthLimit) string {
	s := bandwidth.FormatRate(l.BitsPerSecond)
	for _, w := range l.Schedule {
		days := w.Days
		if days == "" {
			days = "every day"
		}
		s += fmt.Sprintf("; %s %s-%s: %s", days, w.From, w.To, bandwidth.FormatRate(w.BitsPerSecond))
	}
	if l.TimeZone != "" && len(l.Schedule) > 0 {
		s += " (" + l.TimeZone + ")"
	}
	return s
}
