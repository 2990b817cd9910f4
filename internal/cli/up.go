package cli

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/pki"
	"github.com/ferry-dr/ferry/internal/vaultclient"
	"github.com/spf13/cobra"
)

// runUp is "ferry up": a vault and two site agents (east and west) on this
// machine, each its own process and data directory, enrolled and ready.
func upCmd(e *env) *cobra.Command {
	var dir, vaultAddr, eastAddr, westAddr, westVaultAddr string
	var agentArgs []string
	var ha bool
	var etcdPort int
	c := &cobra.Command{Use: "up", Short: "All in one: a vault and two sites (east, west) on this machine", Args: cobra.NoArgs,
		Long: "Start a vault and two site agents, east and west, each its own process and data directory,\nenrolled and ready; prints the vault's URL, a token and the export line for the CLI.",
		Example: "  ferry up &\n  ferry up --dir /tmp/ferry-demo --vault-listen 127.0.0.1:17400\n" +
			"  ferry up --agent-flag=--runtime=libvirt --agent-flag=--nbd-group=libvirt-qemu   # both sites on libvirt",
		RunE: runE(e, func(ctx context.Context, args []string) error {
			o := upOpts{dir: dir, vault: vaultAddr, westVault: westVaultAddr, east: eastAddr, west: westAddr, agentArgs: agentArgs, ha: ha, etcdPort: etcdPort}
			return runUp(ctx, e, o)
		})}
	fs := c.Flags()
	str(fs, &dir, "dir", "ferry-up", "data directory for the vault and both sites")
	str(fs, &vaultAddr, "vault-listen", "127.0.0.1:7400", "vault API address")
	str(fs, &eastAddr, "east-listen", "127.0.0.1:7411", "east agent address")
	str(fs, &westAddr, "west-listen", "127.0.0.1:7412", "west agent address")
	fs.StringArrayVar(&agentArgs, "agent-flag", nil, "a flag for both agents, such as --agent-flag=--runtime=libvirt (repeatable)")
	fs.BoolVar(&ha, "ha", false, "a vault at each site over one etcd cluster of three members (east, west, a witness), as the sites would run them (docs/ha.md)")
	str(fs, &westVaultAddr, "west-vault-listen", "127.0.0.1:7401", "with --ha: west's vault API address")
	fs.IntVar(&etcdPort, "etcd-port", 12379, "with --ha: the first of the six ports of the etcd members (client and peer for each)")
	return c
}

// upOpts is what ferry up starts.
type upOpts struct {
	dir, vault, westVault, east, west string
	agentArgs                         []string
	ha                                bool
	etcdPort                          int
}

func runUp(ctx context.Context, e *env, o upOpts) error {
	abs, err := filepath.Abs(o.dir)
	if err != nil {
		return err
	}
	pkiDir := filepath.Join(abs, "pki")
	ids := []pki.Peer{{Role: pki.RoleSite, Name: "east"}, {Role: pki.RoleSite, Name: "west"},
		{Role: pki.RoleVault, Name: "vault"}, {Role: pki.RoleOperator, Name: "operator"}}
	if o.ha {
		// The etcd members serve their clients and peers over TLS with
		// certificates of the installation's CA, and take only clients
		// that present one (the vaults).
		for _, m := range []string{"etcd-east", "etcd-west", "etcd-witness"} {
			ids = append(ids, pki.Peer{Role: pki.RoleSite, Name: m})
		}
	}
	fresh := false
	if _, err := os.Stat(filepath.Join(pkiDir, pki.CACert)); err != nil {
		if err := pki.InitCA(pkiDir, "ferry up", time.Now()); err != nil {
			return err
		}
		fresh = true
	}
	for _, id := range ids {
		// Certificates from before identities existed are reissued.
		if _, err := pki.Load(pkiDir, id.Name); fresh || errors.Is(err, pki.ErrNoIdentity) || errors.Is(err, os.ErrNotExist) {
			if err := pki.Issue(pkiDir, pkiDir, id, []string{"127.0.0.1", "localhost"}, time.Now()); err != nil {
				return err
			}
		}
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	type proc struct {
		name string
		bin  string // default: ferry itself
		args []string
		cmd  *exec.Cmd
	}
	vaults := o.vault
	var procs []*proc
	if !o.ha {
		procs = append(procs, &proc{name: "vault", args: []string{"--config", os.DevNull, "vault", "run", "--dir", filepath.Join(abs, "vault"), "--pki", pkiDir, "--listen", o.vault}})
	} else {
		// Three etcd members, one per site and a witness, so that losing
		// any one site keeps a quorum; a vault at east and at west.
		etcdBin, err := exec.LookPath("etcd")
		if err != nil {
			return fmt.Errorf("--ha needs etcd: install etcd-server (make deps)")
		}
		members := []string{"east", "west", "witness"}
		var cluster, clients []string
		for i, m := range members {
			cluster = append(cluster, fmt.Sprintf("%s=https://127.0.0.1:%d", m, o.etcdPort+2*i+1))
			clients = append(clients, fmt.Sprintf("127.0.0.1:%d", o.etcdPort+2*i))
		}
		ca := filepath.Join(pkiDir, pki.CACert)
		for i, m := range members {
			client, peer := fmt.Sprintf("https://127.0.0.1:%d", o.etcdPort+2*i), fmt.Sprintf("https://127.0.0.1:%d", o.etcdPort+2*i+1)
			crt, key := filepath.Join(pkiDir, "etcd-"+m+".crt"), filepath.Join(pkiDir, "etcd-"+m+".key")
			procs = append(procs, &proc{name: "etcd-" + m, bin: etcdBin, args: []string{"--name", m, "--data-dir", filepath.Join(abs, "etcd-"+m),
				"--listen-client-urls", client, "--advertise-client-urls", client, "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
				"--initial-cluster", strings.Join(cluster, ","), "--initial-cluster-state", "new", "--log-level", "warn",
				"--cert-file", crt, "--key-file", key, "--trusted-ca-file", ca, "--client-cert-auth",
				"--peer-cert-file", crt, "--peer-key-file", key, "--peer-trusted-ca-file", ca, "--peer-client-cert-auth"}})
		}
		store := "etcds://" + strings.Join(clients, ",")
		for _, v := range []struct{ name, addr string }{{"vault", o.vault}, {"vault-west", o.westVault}} {
			procs = append(procs, &proc{name: v.name, args: []string{"--config", os.DevNull, "vault", "run", "--dir", filepath.Join(abs, v.name), "--pki", pkiDir,
				"--listen", v.addr, "--store", store, "--advertise", v.addr}})
		}
		vaults = o.vault + "," + o.westVault
	}
	procs = append(procs,
		&proc{name: "east", args: append([]string{"--config", os.DevNull, "agent", "run", "--dir", filepath.Join(abs, "east"), "--name", "east", "--listen", o.east, "--pki", pkiDir, "--vault", vaults}, o.agentArgs...)},
		&proc{name: "west", args: append([]string{"--config", os.DevNull, "agent", "run", "--dir", filepath.Join(abs, "west"), "--name", "west", "--listen", o.west, "--pki", pkiDir, "--vault", vaults}, o.agentArgs...)})
	stopAll := func() {
		for i := len(procs) - 1; i >= 0; i-- {
			if p := procs[i]; p.cmd != nil && p.cmd.Process != nil {
				p.cmd.Process.Signal(syscall.SIGTERM)
			}
		}
		for _, p := range procs {
			if p.cmd != nil {
				p.cmd.Wait()
			}
		}
	}
	defer stopAll()
	for _, p := range procs {
		logf, err := os.OpenFile(filepath.Join(abs, p.name+".log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			return err
		}
		defer logf.Close()
		bin := cmp.Or(p.bin, self)
		p.cmd = exec.Command(bin, p.args...)
		p.cmd.Stdout, p.cmd.Stderr = logf, logf
		if err := p.cmd.Start(); err != nil {
			return fmt.Errorf("start %s: %w", p.name, err)
		}
		os.WriteFile(filepath.Join(abs, p.name+".pid"), []byte(fmt.Sprint(p.cmd.Process.Pid)), 0o600)
		os.WriteFile(filepath.Join(abs, p.name+".cmd"), []byte(strings.Join(append([]string{bin}, p.args...), " ")), 0o600)
	}
	tokFile := filepath.Join(abs, "vault", "operator.token")
	var token string
	deadline := time.Now().Add(60 * time.Second)
	for {
		if b, err := os.ReadFile(tokFile); err == nil && len(strings.TrimSpace(string(b))) > 0 {
			token = strings.TrimSpace(string(b))
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the vault did not start; see %s", filepath.Join(abs, "vault.log"))
		}
		time.Sleep(50 * time.Millisecond)
	}
	url := "https://" + strings.ReplaceAll(vaults, ",", ",https://")
	ca := filepath.Join(pkiDir, pki.CACert)
	c, err := vaultclient.New(url, token, ca)
	if err != nil {
		return err
	}
	for {
		if _, err := c.Sites(ctx); err == nil {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the vault API does not answer; see %s", filepath.Join(abs, "vault.log"))
		}
		time.Sleep(50 * time.Millisecond)
	}
	// Enroll both sites with one-time tokens, as a real site would; a
	// site enrolled by an earlier run at another address is re-enrolled
	// with a token made for that.
	known, err := c.Sites(ctx)
	if err != nil {
		return err
	}
	for _, s := range []struct{ name, addr string }{{"east", o.east}, {"west", o.west}} {
		req := api.TokenRequest{Role: "enroll", Name: s.name, TTL: "1m"}
		if i := slices.IndexFunc(known, func(k api.Site) bool { return k.Name == s.name }); i >= 0 {
			if known[i].Addr == s.addr {
				continue
			}
			req.Reenroll = s.name
		}
		tok, err := c.CreateToken(ctx, req)
		for errors.Is(err, api.ErrNotLeader) && time.Now().Before(deadline) { // --ha: the vaults still elect
			time.Sleep(200 * time.Millisecond)
			tok, err = c.CreateToken(ctx, req)
		}
		if err != nil {
			return err
		}
		if err := c.Enroll(ctx, api.Enroll{Token: tok.Token, Name: s.name, Addr: s.addr}); err != nil {
			return fmt.Errorf("enroll %s: %w", s.name, err)
		}
	}
	for {
		sites, _ := c.Sites(ctx)
		if len(sites) == 2 && sites[0].Reachable && sites[1].Reachable {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the sites did not become reachable; see %s/{east,west}.log", abs)
		}
		time.Sleep(100 * time.Millisecond)
	}
	fmt.Fprintf(e.stdout, "vault: %s\ntoken: %s\n", url, token)
	fmt.Fprintf(e.stdout, "sites: east (%s, NBD %s) and west (%s, NBD %s), enrolled and reachable\n",
		o.east, filepath.Join(abs, "east", "nbd.sock"), o.west, filepath.Join(abs, "west", "nbd.sock"))
	fmt.Fprintf(e.stdout, "point the CLI at it:\n  export FERRY_VAULT=%s FERRY_TOKEN=%s FERRY_CA=%s\n", url, token, ca)
	fmt.Fprintf(e.stdout, "logs in %s/*.log; Ctrl-C stops everything\n", abs)
	<-ctx.Done()
	fmt.Fprintln(e.stdout, "stopping")
	return nil
}
