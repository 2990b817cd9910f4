package cli

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/ferry-dr/ferry/internal/pki"
	"github.com/spf13/cobra"
)

func caCmd(e *env) *cobra.Command {
	var dir, name, hosts, role string
	init := &cobra.Command{Use: "init", Short: "Create the installation's CA", Args: cobra.NoArgs,
		Example: "  ferry ca init --pki /etc/ferry/pki",
		RunE: runE(e, func(ctx context.Context, args []string) error {
			if err := pki.InitCA(dir, name, time.Now()); err != nil {
				return err
			}
			return e.print(map[string]string{"ca": dir}, fmt.Sprintf("created CA in %s; issue certificates with 'ferry ca issue --pki %s --role site NAME'\n", dir, dir))
		})}
	str(init.Flags(), &name, "name", "ferry CA", "CA name")
	issue := &cobra.Command{Use: "issue NAME", Short: "Issue a certificate naming a role and a name (ferry://ROLE/NAME)", Args: cobra.ExactArgs(1),
		Long: `Issue a certificate naming a role and a name. Roles:
  site      a site agent: serves its API, streams its replicas (NAME: the site)
  vault     the control plane: drives every agent
  operator  a person or tool driving agents directly (ferry agent ...)
  monitor   reads agents' status and metrics (Prometheus)`,
		Example: "  ferry ca issue --pki pki --role site east --host 10.0.0.1,east.example\n  ferry ca issue --pki pki --role vault vault\n  ferry ca issue --pki pki --role monitor prometheus",
		RunE: runE(e, func(ctx context.Context, args []string) error {
			if err := pki.CheckRole(role); err != nil {
				return usagef("--role: %v", err)
			}
			peer := pki.Peer{Role: role, Name: args[0]}
			if err := pki.Issue(dir, dir, peer, strings.Split(hosts, ","), time.Now()); err != nil {
				return err
			}
			return e.print(map[string]string{"issued": args[0], "identity": peer.URI().String()},
				fmt.Sprintf("issued %s.crt and %s.key in %s for %s\n", args[0], args[0], dir, peer.URI()))
		})}
	str(issue.Flags(), &role, "role", "", "site, vault, operator or monitor (required)")
	str(issue.Flags(), &hosts, "host", "127.0.0.1,localhost", "comma-separated DNS names and IPs the certificate is valid for")
	issue.MarkFlagRequired("role")
	c := group("ca", "Create the CA and the certificates for mutual TLS", init, issue)
	str(c.PersistentFlags(), &dir, "pki", "", "PKI directory (required)")
	c.MarkPersistentFlagRequired("pki")
	return c
}
