package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/vaultclient"
)

// groupCmd: multi-VM consistency groups. A group is protected, drilled,
// failed over, committed and reprotected by its name with the commands
// for a VM (ferry protect shop, ferry failover shop, ...).
func groupCmd(e *env) *cobra.Command {
	var oc, ol, os_ vaultOpts
	var site, file string
	create := vaultCommand(e, &cobra.Command{Use: "create NAME", Short: "Define a multi-VM consistency group: its VMs share one journal and one sequence of recovery points", Args: cobra.ExactArgs(1),
		Long: "The group's VMs (2 to 16) are given as JSON, each as for 'ferry vm define' (the API's VM:\n" +
			"name, vcpus, memory_mib, disks, nics, kernel, initrd, append, forwards, guest_port, qga). Their\n" +
			"disks become one consistency group at the site, named MEMBER-DISK: every recovery point is\n" +
			"crash-consistent across all of them, and an application-consistent point freezes them all.\n" +
			"Protect and recover the group by its name: ferry protect NAME --to SITE, ferry test-failover NAME,\n" +
			"ferry failover NAME, ferry commit NAME, ferry reprotect NAME; each runs its VMs at one point.",
		Example: "  ferry group create shop --site east --file shop.json   # {\"members\": [{\"name\": \"db\", ...}, {\"name\": \"web\", ...}]}"}, &oc,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			if site == "" || file == "" {
				return usagef("--site and --file (the group's VMs as JSON) are required")
			}
			b, err := os.ReadFile(file)
			if err != nil {
				return usagef("--file: %v", err)
			}
			var g api.VM
			dec := json.NewDecoder(strings.NewReader(string(b)))
			dec.DisallowUnknownFields()
			if err := dec.Decode(&g); err != nil {
				return usagef("%s: %v", file, err)
			}
			if g.Name != "" && g.Name != args[0] {
				return usagef("%s names group %q, not %q", file, g.Name, args[0])
			}
			g.Name, g.Site = args[0], site
			out, err := vc.DefineVM(ctx, g)
			if err != nil {
				return err
			}
			return e.print(out, groupText(out))
		})
	str(create.Flags(), &site, "site", "", "the site the group's VMs run at (required)")
	str(create.Flags(), &file, "file", "", "the group's VMs as JSON: {\"members\": [VM, ...]} (required)")
	list := vaultCommand(e, &cobra.Command{Use: "list", Aliases: []string{"ls"}, Short: "List the consistency groups", Args: cobra.NoArgs}, &ol,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			vms, err := vc.VMs(ctx)
			if err != nil {
				return err
			}
			var gs []api.VM
			for _, v := range vms {
				if len(v.Members) > 0 {
					gs = append(gs, v)
				}
			}
			return e.print(gs, table("GROUP\tSITE\tVMS\tDISKS", func(tw io.Writer) {
				for _, g := range gs {
					var names []string
					for _, m := range g.Members {
						names = append(names, m.Name)
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%d\n", g.Name, g.Site, strings.Join(names, ","), len(g.Disks))
				}
			}))
		})
	show := vaultCommand(e, &cobra.Command{Use: "show NAME", Short: "Show a consistency group", Args: cobra.ExactArgs(1)}, &os_,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			vms, err := vc.VMs(ctx)
			if err != nil {
				return err
			}
			for _, v := range vms {
				if v.Name == args[0] && len(v.Members) > 0 {
					return e.print(v, groupText(v))
				}
			}
			return fmt.Errorf("%w: no consistency group %q (ferry group list)", api.ErrNotFound, args[0])
		})
	return group("group", "Multi-VM consistency groups: several VMs recovered together at one point", create, list, show)
}

func groupText(g api.VM) string {
	var b strings.Builder
	fmt.Fprintf(&b, "consistency group %s at %s: %d VMs, one journal and one sequence of points\n", g.Name, g.Site, len(g.Members))
	for _, m := range g.Members {
		var disks []string
		for _, d := range m.Disks {
			disks = append(disks, fmt.Sprintf("%s (%d MiB)", d.Name, d.Size>>20))
		}
		fmt.Fprintf(&b, "  %s: %d MiB, disks %s\n", m.Name, m.MemoryMiB, strings.Join(disks, ", "))
	}
	fmt.Fprintf(&b, "protect it with: ferry protect %s --to SITE\n", g.Name)
	return b.String()
}
