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

func siteCmd(e *env) *cobra.Command {
	var ol, oa, od, ona, ond vaultOpts
	list := vaultCommand(e, &cobra.Command{Use: "list", Aliases: []string{"ls"}, Short: "List sites: address, reachability, networks", Args: cobra.NoArgs}, &ol,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			sites, err := vc.Sites(ctx)
			if err != nil {
				return err
			}
			return e.print(sites, table("SITE\tADDRESS\tREACHABLE\tLAST SEEN\tNETWORKS", func(tw io.Writer) {
				for _, s := range sites {
					var nets []string
					for _, n := range s.Networks {
						nets = append(nets, fmt.Sprintf("%s (%s %s)", n.Name, n.Kind, n.Subnet))
					}
					fmt.Fprintf(tw, "%s\t%s\t%v\t%s\t%s\n", s.Name, s.Addr, s.Reachable, s.LastSeen.Format(time.RFC3339), strings.Join(nets, ", "))
				}
			}))
		})
	var readdress bool
	add := vaultCommand(e, &cobra.Command{Use: "add NAME ADDR", Short: "Add a site by its agent's address (HOST:PORT)", Args: cobra.ExactArgs(2),
		Example: "  ferry site add west 10.0.0.2:7410\n  ferry site add west 10.0.0.9:7410 --readdress   # it moved"}, &oa,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			req := api.AddSite{Name: args[0], Addr: args[1], Readdress: readdress}
			if err := vc.AddSite(ctx, req); err != nil {
				return err
			}
			return e.print(req, fmt.Sprintf("site %s at %s\n", args[0], args[1]))
		})
	add.Flags().BoolVar(&readdress, "readdress", false, "change the address of an existing site")
	del := vaultCommand(e, &cobra.Command{Use: "delete NAME", Short: "Forget a site (refused while a VM or a protection uses it)", Args: cobra.ExactArgs(1)}, &od,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			if err := vc.DeleteSite(ctx, args[0]); err != nil {
				return err
			}
			return e.print(map[string]string{"deleted": args[0]}, fmt.Sprintf("deleted site %s\n", args[0]))
		})
	var kind, subnet, attach string
	netAdd := vaultCommand(e, &cobra.Command{Use: "add SITE NETWORK", Short: "Declare (or change) a network of a site", Args: cobra.ExactArgs(2),
		Example: "  ferry site network add west prod-west --kind production --subnet 10.20.0.0/24\n  ferry site network add west drill-west --kind isolated --subnet 10.99.0.0/24"}, &ona,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			s, err := vc.PutNetwork(ctx, args[0], api.Network{Name: args[1], Kind: api.NetworkKind(kind), Subnet: subnet, Libvirt: attach})
			if err != nil {
				return err
			}
			return e.print(s, fmt.Sprintf("network %s (%s, %s) declared at %s\n", args[1], kind, subnet, args[0]))
		})
	str(netAdd.Flags(), &kind, "kind", "production", "production (NAT, forwarded ports) or isolated (drills)")
	str(netAdd.Flags(), &subnet, "subnet", "", "IPv4 subnet in CIDR notation the guests get addresses from (required)")
	str(netAdd.Flags(), &attach, "libvirt", "", "at a libvirt site: the libvirt network (network:NAME) or host bridge (bridge:NAME) this network is; VMs attached to it get their NICs there")
	netAdd.MarkFlagRequired("subnet")
	netDel := vaultCommand(e, &cobra.Command{Use: "delete SITE NETWORK", Short: "Remove a network (refused while used)", Args: cobra.ExactArgs(2)}, &ond,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			if err := vc.DeleteNetwork(ctx, args[0], args[1]); err != nil {
				return err
			}
			return e.print(map[string]string{"deleted": args[1], "site": args[0]}, fmt.Sprintf("network %s deleted at %s\n", args[1], args[0]))
		})
	return group("site", "List, add or delete sites and their networks", list, add, del, group("network", "Declare or remove a site's networks", netAdd, netDel))
}
