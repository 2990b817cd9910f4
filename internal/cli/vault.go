package cli

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/ferry-dr/ferry/internal/agentclient"
	"github.com/ferry-dr/ferry/internal/atomicfile"
	"github.com/ferry-dr/ferry/internal/httpserver"
	"github.com/ferry-dr/ferry/internal/leader"
	"github.com/ferry-dr/ferry/internal/pki"
	"github.com/ferry-dr/ferry/internal/portal"
	"github.com/ferry-dr/ferry/internal/store"
	"github.com/ferry-dr/ferry/internal/vault"
	"github.com/spf13/cobra"
)

func vaultCmd(e *env) *cobra.Command {
	var dir, pkiDir, name, listen, scripts, storeURL, advertise string
	run := &cobra.Command{Use: "run", Short: "Run the vault: the control plane's API, jobs and web portal", Args: cobra.NoArgs,
		Example: "  ferry vault run --dir /var/lib/ferry-vault --pki /etc/ferry/pki --listen 0.0.0.0:7400\n  ferry vault run --config /etc/ferry/vault.toml",
		RunE: runE(e, func(ctx context.Context, args []string) error {
			if dir == "" || pkiDir == "" {
				return usagef("--dir and --pki are required (flags or the config file)")
			}
			if scripts == "" {
				scripts = filepath.Join(dir, "scripts")
			}
			return runVault(ctx, e, vaultRun{dir: dir, pki: pkiDir, name: name, listen: listen, scripts: scripts, store: storeURL, advertise: advertise})
		})}
	fs := run.Flags()
	str(fs, &dir, "dir", "", "data directory: the SQLite store and the first operator token (required)")
	str(fs, &pkiDir, "pki", "", "PKI directory with the vault's certificate (NAME.crt) and the CA (required)")
	str(fs, &name, "name", "vault", "name of the vault's certificate in --pki")
	str(fs, &listen, "listen", "127.0.0.1:7400", "HTTPS address of the API and the portal")
	str(fs, &scripts, "script-dir", "", "directory of the scripts recovery plans may run, by file name (default: DIR/scripts)")
	str(fs, &storeURL, "store", "", "where the state lives: empty for DIR/vault.db (SQLite, one vault), or etcd://HOST:PORT[,HOST:PORT...][/PREFIX] shared by a vault at each site, of which one, elected, acts; etcds:// for TLS with the vault's certificate and the installation's CA")
	str(fs, &advertise, "advertise", "", "with an etcd store: this vault's address as other vaults name it to clients (default: --listen)")
	var mdir, mto, mpki, mname string
	migrate := &cobra.Command{Use: "migrate", Short: "Copy a stopped vault's state from its SQLite file into an empty etcd store", Args: cobra.NoArgs,
		Example: "  ferry vault migrate --dir /var/lib/ferry-vault --to etcd://east:2379,west:2379,witness:2379",
		RunE: runE(e, func(ctx context.Context, args []string) error {
			if mdir == "" || !isEtcdURL(mto) {
				return usagef("--dir (the vault's data directory) and --to etcd://HOST:PORT[,...][/PREFIX] (or etcds://, with --pki) are required")
			}
			var id *pki.Identity
			if mpki != "" {
				var err error
				if id, err = pki.Load(mpki, mname); err != nil {
					return err
				}
			}
			from, err := store.OpenSQLite(filepath.Join(mdir, "vault.db"))
			if err != nil {
				return err
			}
			defer from.Close()
			to, _, err := openEtcdURL(ctx, mto, id)
			if err != nil {
				return err
			}
			defer to.Close()
			n, err := vault.Migrate(ctx, from, to)
			if err != nil {
				return err
			}
			return e.print(map[string]int{"documents": n}, fmt.Sprintf("copied %d documents into %s; run the vaults with --store %s\n", n, mto, mto))
		})}
	str(migrate.Flags(), &mdir, "dir", "", "the stopped vault's data directory (its vault.db)")
	str(migrate.Flags(), &mto, "to", "", "the etcd store: etcd://HOST:PORT[,HOST:PORT...][/PREFIX], or etcds:// over TLS")
	str(migrate.Flags(), &mpki, "pki", "", "with etcds://: the PKI directory holding the vault's certificate and the CA")
	str(migrate.Flags(), &mname, "name", "vault", "with etcds://: the vault's certificate name in --pki")
	return group("vault", "Run the control plane", run, migrate, forceNewClusterCmd(e))
}

// openEtcdURL opens etcd://HOST:PORT[,...][/PREFIX] (or etcds://, over
// TLS with id's certificate, trusting only the installation's CA: the
// etcd members' certificates come from `ferry ca issue`) and returns the
// store and the prefix of its keys.
func openEtcdURL(ctx context.Context, u string, id *pki.Identity) (*store.Etcd, string, error) {
	rest, secure := strings.CutPrefix(u, "etcds://")
	if !secure {
		rest = strings.TrimPrefix(u, "etcd://")
	}
	hosts, prefix, _ := strings.Cut(rest, "/")
	cfg := store.EtcdConfig{Prefix: "/" + cmp.Or(prefix, "ferry")}
	scheme := "http://"
	if secure {
		if id == nil {
			return nil, "", usagef("%s: an etcds:// store needs the vault's certificate: give --pki", u)
		}
		scheme = "https://"
		cfg.TLS = &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{id.Cert}, RootCAs: id.Pool}
	}
	for _, h := range strings.Split(hosts, ",") {
		cfg.Endpoints = append(cfg.Endpoints, scheme+h)
	}
	st, err := store.OpenEtcd(ctx, cfg)
	return st, cfg.Prefix, err
}

// isEtcdURL: the store is etcd, plain or over TLS.
func isEtcdURL(u string) bool {
	return strings.HasPrefix(u, "etcd://") || strings.HasPrefix(u, "etcds://")
}

// vaultRun is what `ferry vault run` serves.
type vaultRun struct {
	dir, pki, name, listen, scripts, store, advertise string
}

// runVault serves the vault until ctx ends (or, sharing an etcd store
// with other vaults, until it loses the leadership it had).
func runVault(ctx context.Context, e *env, o vaultRun) error {
	dir, pkiDir, name, listen := o.dir, o.pki, o.name, o.listen
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	if err := os.MkdirAll(o.scripts, 0o700); err != nil {
		return err
	}
	id, err := pki.Load(pkiDir, name)
	if err != nil {
		return err
	}
	if err := id.Require(pki.RoleVault, ""); err != nil {
		return err
	}
	var lead *leader.Etcd
	var v *vault.Vault
	cfg := vault.Config{Logger: e.log, ScriptDir: o.scripts, Advertise: cmp.Or(o.advertise, listen), Site: func(addr, site string) vault.Site {
		c := agentclient.New(id, addr, site)
		if lead != nil {
			// Sites refuse the calls of an older leader.
			c.SetLeaderEpoch(lead.Epoch, func() { v.Deposed() })
		}
		return c
	}}
	switch {
	case o.store == "":
		st, err := store.OpenSQLite(filepath.Join(dir, "vault.db"))
		if err != nil {
			return err
		}
		defer st.Close()
		cfg.Store = st
	case isEtcdURL(o.store):
		st, prefix, err := openEtcdURL(ctx, o.store, id)
		if err != nil {
			return err
		}
		defer st.Close()
		cfg.Store = st
		adv := cmp.Or(o.advertise, listen)
		lead = leader.New(st.Client(), prefix+"/leader", adv, 5*time.Second)
		cfg.Leadership = lead
		fmt.Fprintf(e.stderr, "vault %s: state in etcd %s; campaigning to lead (the others serve reads and name the leader)\n", adv, o.store)
	default:
		return usagef("--store %q: want etcd://HOST:PORT[,HOST:PORT...][/PREFIX] (etcds:// over TLS with the vault's certificate), or nothing for SQLite in --dir", o.store)
	}
	v = vault.New(cfg)
	if err := v.Start(ctx); err != nil {
		return err
	}
	defer v.Close()
	lostCtx, stop := context.WithCancel(ctx)
	defer stop()
	go func() {
		select {
		case <-v.Lost():
			stop()
		case <-lostCtx.Done():
		}
	}()
	ctx = lostCtx
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
	select {
	case <-v.Lost():
		return fmt.Errorf("this vault lost the leadership (etcd unreachable for longer than its lease?): it stopped so that the new leader acts alone; start it again to follow")
	default:
	}
	return nil
}
