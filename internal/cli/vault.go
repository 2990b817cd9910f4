package cli

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"

	"github.com/ferry-dr/ferry/internal/agentclient"
	"github.com/ferry-dr/ferry/internal/atomicfile"
	"github.com/ferry-dr/ferry/internal/httpserver"
	"github.com/ferry-dr/ferry/internal/pki"
	"github.com/ferry-dr/ferry/internal/portal"
	"github.com/ferry-dr/ferry/internal/store"
	"github.com/ferry-dr/ferry/internal/vault"
	"github.com/spf13/cobra"
)

func vaultCmd(e *env) *cobra.Command {
	var dir, pkiDir, name, listen, scripts string
	run := &cobra.Command{Use: "run", Short: "Run the vault: the control plane's API, jobs and web portal", Args: cobra.NoArgs,
		Example: "  ferry vault run --dir /var/lib/ferry-vault --pki /etc/ferry/pki --listen 0.0.0.0:7400\n  ferry vault run --config /etc/ferry/vault.toml",
		RunE: runE(e, func(ctx context.Context, args []string) error {
			if dir == "" || pkiDir == "" {
				return usagef("--dir and --pki are required (flags or the config file)")
			}
			if scripts == "" {
				scripts = filepath.Join(dir, "scripts")
			}
			return runVault(ctx, e, dir, pkiDir, name, listen, scripts)
		})}
	fs := run.Flags()
	str(fs, &dir, "dir", "", "data directory: the SQLite store and the first operator token (required)")
	str(fs, &pkiDir, "pki", "", "PKI directory with the vault's certificate (NAME.crt) and the CA (required)")
	str(fs, &name, "name", "vault", "name of the vault's certificate in --pki")
	str(fs, &listen, "listen", "127.0.0.1:7400", "HTTPS address of the API and the portal")
	str(fs, &scripts, "script-dir", "", "directory of the scripts recovery plans may run, by file name (default: DIR/scripts)")
	return group("vault", "Run the control plane", run)
}

// runVault serves the vault until ctx ends.
func runVault(ctx context.Context, e *env, dir, pkiDir, name, listen, scripts string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	if err := os.MkdirAll(scripts, 0o700); err != nil {
		return err
	}
	id, err := pki.Load(pkiDir, name)
	if err != nil {
		return err
	}
	if err := id.Require(pki.RoleVault, ""); err != nil {
		return err
	}
	st, err := store.OpenSQLite(filepath.Join(dir, "vault.db"))
	if err != nil {
		return err
	}
	defer st.Close()
	v := vault.New(vault.Config{Store: st, Logger: e.log, ScriptDir: scripts, Site: func(addr, site string) vault.Site {
		return agentclient.New(id, addr, site)
	}})
	if err := v.Start(ctx); err != nil {
		return err
	}
	defer v.Close()
	tokFile := filepath.Join(dir, "operator.token")
	if _, err := os.Stat(tokFile); errors.Is(err, os.ErrNotExist) {
		t, err := v.CreateToken(ctx, vault.RoleOperator, "initial")
		if err != nil {
			return err
		}
		if err := atomicfile.WriteFile(tokFile, []byte(t+"\n"), 0o600); err != nil {
			return err
		}
		fmt.Fprintf(e.stderr, "created the first operator token in %s\n", tokFile)
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	// One port: the REST API (and /metrics) and the portal that uses it.
	mux := http.NewServeMux()
	apiH := v.Handler()
	mux.Handle("/v1/", apiH)
	mux.Handle("/metrics", apiH)
	mux.Handle("/", portal.Handler())
	srv := httpserver.New(httpserver.Config{Handler: mux, Logger: e.log})
	// Tokens authenticate people; site agents also present their
	// certificates (heartbeats), which must chain to the CA.
	srv.TLSConfig = &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{id.Cert},
		ClientAuth: tls.VerifyClientCertIfGiven, ClientCAs: id.Pool}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	fmt.Fprintf(e.stderr, "vault: https://%s (API and portal; token in %s; CA %s)\n", ln.Addr(), tokFile, filepath.Join(pkiDir, pki.CACert))
	if err := srv.ServeTLS(ln, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
