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

func tokenCmd(e *env) *cobra.Command {
	var oc, ol, or vaultOpts
	var req api.TokenRequest
	create := vaultCommand(e, &cobra.Command{Use: "create", Short: "Create an API token (shown only now)", Args: cobra.NoArgs,
		Example: "  ferry token create --role reader --name grafana --ttl 720h\n  ferry token create --role enroll --name north\n  ferry token create --role enroll --reenroll east   # east moves to a new address"}, &oc,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			switch req.Role {
			case "reader", "operator", "enroll":
			default:
				return usagef("--role must be reader, operator or enroll")
			}
			out, err := vc.CreateToken(ctx, req)
			if err != nil {
				return err
			}
			hint := map[string]string{
				"reader":   "reads everything, acts on nothing: the portal without action buttons, Prometheus (authorization: credentials)",
				"operator": "runs every DR action",
				"enroll":   "enrolls one site, once: POST /v1/enroll {\"token\", \"name\", \"addr\"} without other credentials",
			}[req.Role]
			return e.print(out, fmt.Sprintf("%s\n# a %s token (id %s): %s; it is shown only now\n", out.Token, req.Role, out.ID, hint))
		})
	str(create.Flags(), &req.Role, "role", "reader", "reader, operator or enroll")
	str(create.Flags(), &req.Name, "name", "", "what the token is for, recorded with it")
	str(create.Flags(), &req.TTL, "ttl", "", "how long the token lives, e.g. 720h (default: until revoked)")
	str(create.Flags(), &req.Reenroll, "reenroll", "", "an enroll token that may re-enroll this existing site at a new address")
	list := vaultCommand(e, &cobra.Command{Use: "list", Aliases: []string{"ls"}, Short: "List tokens (never their secrets)", Args: cobra.NoArgs}, &ol,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			ts, err := vc.Tokens(ctx)
			if err != nil {
				return err
			}
			return e.print(ts, table("ID\tROLE\tNAME\tCREATED\tEXPIRES", func(tw io.Writer) {
				for _, t := range ts {
					exp := "never"
					if !t.Expires.IsZero() {
						exp = t.Expires.Format(time.RFC3339)
					}
					name := t.Name
					if t.Reenroll != "" {
						name += " (re-enrolls " + t.Reenroll + ")"
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", t.ID, t.Role, name, t.Created.Format(time.RFC3339), exp)
				}
			}))
		})
	revoke := vaultCommand(e, &cobra.Command{Use: "revoke ID", Short: "Revoke a token at once (IDs: ferry token list)", Args: cobra.ExactArgs(1)}, &or,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			if err := vc.RevokeToken(ctx, args[0]); err != nil {
				return err
			}
			return e.print(map[string]string{"revoked": args[0]}, fmt.Sprintf("revoked token %s; it no longer works\n", args[0]))
		})
	return group("token", "Create, list and revoke API tokens", create, list, revoke)
}
