package cli

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	neturl "net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/ferry-dr/ferry/internal/agent"
	"github.com/ferry-dr/ferry/internal/atomicfile"
	"github.com/ferry-dr/ferry/internal/httpserver"
	"github.com/ferry-dr/ferry/internal/pki"
	"github.com/ferry-dr/ferry/internal/portal"
	"github.com/ferry-dr/ferry/internal/store"
	"github.com/ferry-dr/ferry/internal/vault"
	"github.com/schollz/progressbar/v3"
	"golang.org/x/sys/unix"
)

// runVault is "ferry vault run": the control plane daemon.
func runVault(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 || args[0] != "run" {
		return fmt.Errorf("%w: ferry vault run --dir DIR --pki PKI [--listen ADDR]", errUsage)
	}
	fs := newFlags("vault run", e)
	dir := fs.String("dir", "", "data directory (SQLite store, tokens) (required)")
	pkiDir := fs.String("pki", "", "PKI directory with the vault's certificate (NAME.crt) and the CA (required)")
	name := fs.String("name", "vault", "name of the vault's certificate in --pki")
	listen := fs.String("listen", "127.0.0.1:7400", "HTTPS address of the API")
	if err := parse(fs, args[1:]); err != nil {
		return err
	}
	if *dir == "" || *pkiDir == "" {
		return fmt.Errorf("%w: --dir and --pki are required", errUsage)
	}
	if err := os.MkdirAll(*dir, 0o700); err != nil {
		return err
	}
	id, err := pki.Load(*pkiDir, *name)
	if err != nil {
		return err
	}
	if err := id.Require(pki.RoleVault, ""); err != nil {
		return err
	}
	st, err := store.OpenSQLite(filepath.Join(*dir, "vault.db"))
	if err != nil {
		return err
	}
	defer st.Close()
	v := vault.New(vault.Config{Store: st, Logger: e.log, Agent: func(addr, site string) vault.AgentAPI {
		return agent.NewClient(id, addr, site)
	}})
	if err := v.Start(ctx); err != nil {
		return err
	}
	defer v.Close()
	tokFile := filepath.Join(*dir, "operator.token")
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
	ln, err := net.Listen("tcp", *listen)
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
	fmt.Fprintf(e.stderr, "vault: https://%s (API and portal; token in %s; CA %s)\n", ln.Addr(), tokFile, filepath.Join(*pkiDir, pki.CACert))
	if err := srv.ServeTLS(ln, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// vaultClient builds a client from --vault/--token/--ca or FERRY_VAULT,
// FERRY_TOKEN, FERRY_CA.
func vaultClient(url, token, ca string) (*vault.Client, error) {
	url, token, ca = orEnv(url, "FERRY_VAULT"), orEnv(token, "FERRY_TOKEN"), orEnv(ca, "FERRY_CA")
	if url == "" || token == "" {
		return nil, fmt.Errorf("%w: set --vault and --token (or FERRY_VAULT and FERRY_TOKEN); 'ferry up' prints them", errUsage)
	}
	return vault.NewClient(url, token, ca)
}

func orEnv(v, name string) string {
	if v != "" {
		return v
	}
	return os.Getenv(name)
}

// runVaultCmd handles the DR commands that talk to the vault.
func runVaultCmd(ctx context.Context, e *env, name string, args []string) error {
	subs := map[string][]string{"site": {"list", "add", "delete", "network"}, "vm": {"define", "start", "list", "console"}, "job": {"show"}, "token": {"create", "list", "revoke"}, "test-failover": {"cleanup"}}
	sub := ""
	if len(args) > 0 && slices.Contains(subs[name], args[0]) {
		sub, args = args[0], args[1:]
	}
	full := strings.TrimSpace(name + " " + sub)
	fs := newFlags(full, e)
	url := fs.String("vault", "", "vault URL (or FERRY_VAULT)")
	token := fs.String("token", "", "API token (or FERRY_TOKEN)")
	ca := fs.String("ca", "", "CA certificate to verify the vault (or FERRY_CA)")
	to := fs.String("to", "", "recovery site (protect)")
	policy := fs.String("policy", "", "policy (protect)")
	var netMap multiFlag
	fs.Var(&netMap, "network", "NIC=NETWORK at the recovery site for failovers (protect; repeatable; default: its first production network); NETWORK for the VM's NIC at its site (vm define)")
	tokenRole := fs.String("role", "reader", "reader, operator or enroll (token create)")
	tokenName := fs.String("name", "", "what the token is for, recorded with it (token create)")
	tokenTTL := fs.String("ttl", "", "how long the token lives, e.g. 720h (token create; default: until revoked)")
	reenroll := fs.String("reenroll", "", "an enroll token that may re-enroll this existing site at a new address (token create)")
	readdress := fs.Bool("readdress", false, "change the address of an existing site (site add)")
	testNet := fs.String("test-network", "", "isolated network at the recovery site for drills (protect; default: its first isolated network)")
	netKind := fs.String("kind", "production", "network kind: production (NAT, forwarded ports) or isolated (drills) (site network add)")
	netSubnet := fs.String("subnet", "", "IPv4 subnet in CIDR notation the guests get addresses from (site network add)")
	point := fs.String("point", "", "recovery point: latest, latest-processed, latest-app-consistent, a point id or an RFC 3339 time")
	noShutdown := fs.Bool("no-shutdown-source", false, "do not shut the source VM down first (failover)")
	notes := fs.String("notes", "", "notes recorded with the drill (test-failover cleanup)")
	wait := fs.Bool("wait", false, "wait for the job, showing its steps; exit non-zero if it fails")
	dryRun := fs.Bool("dry-run", false, "show the reprotect plan without doing it (reprotect)")
	vmSite := fs.String("site", "", "site where the VM runs (vm define)")
	var vmDisks multiFlag
	fs.Var(&vmDisks, "disk", "disk NAME=SIZE (vm define; repeatable)")
	vmMem := fs.Int("memory", 256, "memory in MiB (vm define)")
	vmKernel := fs.String("kernel", "", "kernel (vm define; default: boot from the first disk)")
	vmInitrd := fs.String("initrd", "", "initrd (vm define)")
	vmAppend := fs.String("append", "", "kernel command line (vm define)")
	vmFwd := fs.String("forward", "", "SITE=HOST:PORT,... host address per site that reaches the guest port on its production network; SITE/NETWORK=HOST:PORT for another network, e.g. a drill network (vm define)")
	vmPort := fs.Int("guest-port", 80, "guest port the forwards reach (vm define)")
	vmQGA := fs.Bool("qga", true, "guest agent channel (vm define)")
	follow := fs.Bool("follow", false, "keep printing the console as it grows (vm console)")
	if err := parse(fs, args); err != nil {
		return err
	}
	c, err := vaultClient(*url, *token, *ca)
	if err != nil {
		return err
	}
	arg := func(what string) (string, error) {
		if fs.NArg() < 1 {
			return "", fmt.Errorf("%w: ferry %s needs %s", errUsage, full, what)
		}
		return fs.Arg(0), nil
	}
	job := func(path string, body any) error {
		var j vault.Job
		if err := c.Do(ctx, "POST", path, body, &j); err != nil {
			return err
		}
		if !*wait {
			return e.print(j, fmt.Sprintf("job %s started (%s); follow it with 'ferry job show %s' or use --wait\n", j.ID, j.Action, j.ID))
		}
		return waitJob(ctx, e, c, j.ID)
	}
	switch full {
	case "site list", "sites":
		var sites []vault.Site
		if err := c.Do(ctx, "GET", "/v1/sites", nil, &sites); err != nil {
			return err
		}
		var b strings.Builder
		tw := tabwriter.NewWriter(&b, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "SITE\tADDRESS\tREACHABLE\tLAST SEEN\tNETWORKS")
		for _, s := range sites {
			var nets []string
			for _, n := range s.Networks {
				nets = append(nets, fmt.Sprintf("%s (%s %s)", n.Name, n.Kind, n.Subnet))
			}
			fmt.Fprintf(tw, "%s\t%s\t%v\t%s\t%s\n", s.Name, s.Addr, s.Reachable, s.LastSeen.Format(time.RFC3339), strings.Join(nets, ", "))
		}
		tw.Flush()
		return e.print(sites, b.String())
	case "site add":
		if fs.NArg() != 2 {
			return fmt.Errorf("%w: ferry site add NAME ADDR", errUsage)
		}
		var out map[string]string
		if err := c.Do(ctx, "POST", "/v1/sites", map[string]any{"name": fs.Arg(0), "addr": fs.Arg(1), "readdress": *readdress}, &out); err != nil {
			return err
		}
		return e.print(out, fmt.Sprintf("site %s at %s\n", fs.Arg(0), fs.Arg(1)))
	case "site delete":
		if fs.NArg() != 1 {
			return fmt.Errorf("%w: ferry site delete NAME", errUsage)
		}
		var out map[string]string
		if err := c.Do(ctx, "DELETE", "/v1/sites/"+neturl.PathEscape(fs.Arg(0)), nil, &out); err != nil {
			return err
		}
		return e.print(out, fmt.Sprintf("deleted site %s\n", fs.Arg(0)))
	case "token list":
		var ts []vault.TokenInfo
		if err := c.Do(ctx, "GET", "/v1/tokens", nil, &ts); err != nil {
			return err
		}
		var b strings.Builder
		tw := tabwriter.NewWriter(&b, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tROLE\tNAME\tCREATED\tEXPIRES")
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
		tw.Flush()
		return e.print(ts, b.String())
	case "token revoke":
		if fs.NArg() != 1 {
			return fmt.Errorf("%w: ferry token revoke ID (IDs: ferry token list)", errUsage)
		}
		var out map[string]string
		if err := c.Do(ctx, "DELETE", "/v1/tokens/"+neturl.PathEscape(fs.Arg(0)), nil, &out); err != nil {
			return err
		}
		return e.print(out, fmt.Sprintf("revoked token %s; it no longer works\n", fs.Arg(0)))
	case "token create":
		role := *tokenRole
		if role != vault.RoleReader && role != vault.RoleOperator && role != vault.RoleEnroll {
			return fmt.Errorf("%w: --role must be reader, operator or enroll", errUsage)
		}
		var out map[string]any
		if err := c.Do(ctx, "POST", "/v1/tokens", vault.TokenRequest{Role: role, Name: *tokenName, TTL: *tokenTTL, Reenroll: *reenroll}, &out); err != nil {
			return err
		}
		hint := map[string]string{
			vault.RoleReader:   "reads everything, acts on nothing: the portal without action buttons, Prometheus (authorization: credentials)",
			vault.RoleOperator: "runs every DR action",
			vault.RoleEnroll:   "enrolls one site, once: POST /v1/enroll {\"token\", \"name\", \"addr\"} without other credentials",
		}[role]
		return e.print(out, fmt.Sprintf("%s\n# a %s token (id %s): %s; it is shown only now\n", out["token"], role, out["id"], hint))
	case "site network":
		switch {
		case fs.NArg() == 3 && fs.Arg(0) == "add":
			var s vault.Site
			if err := c.Do(ctx, "PUT", "/v1/sites/"+neturl.PathEscape(fs.Arg(1))+"/networks/"+neturl.PathEscape(fs.Arg(2)), vault.Network{Kind: *netKind, Subnet: *netSubnet}, &s); err != nil {
				return err
			}
			return e.print(s, fmt.Sprintf("network %s (%s, %s) declared at %s\n", fs.Arg(2), *netKind, *netSubnet, fs.Arg(1)))
		case fs.NArg() == 3 && fs.Arg(0) == "delete":
			if err := c.Do(ctx, "DELETE", "/v1/sites/"+neturl.PathEscape(fs.Arg(1))+"/networks/"+neturl.PathEscape(fs.Arg(2)), nil, nil); err != nil {
				return err
			}
			return e.print(map[string]string{"deleted": fs.Arg(2)}, fmt.Sprintf("network %s deleted at %s\n", fs.Arg(2), fs.Arg(1)))
		}
		return fmt.Errorf("%w: ferry site network add SITE NAME --kind production|isolated --subnet CIDR | ferry site network delete SITE NAME", errUsage)
	case "vm define":
		name, err := arg("a VM name")
		if err != nil {
			return err
		}
		vm := vault.VM{Name: name, Site: *vmSite, MemoryMiB: *vmMem, Kernel: *vmKernel, Initrd: *vmInitrd, Append: *vmAppend,
			GuestPort: *vmPort, QGA: *vmQGA, Forwards: map[string]string{}}
		switch len(netMap) {
		case 0:
		case 1:
			vm.NICs = []vault.NIC{{Name: "nic0", Network: netMap[0]}}
		default:
			return fmt.Errorf("%w: vm define takes one --network (one NIC per VM)", errUsage)
		}
		for _, d := range vmDisks {
			n, sz, ok := strings.Cut(d, "=")
			size, err := parseSize(sz)
			if !ok || err != nil {
				return fmt.Errorf("%w: --disk wants NAME=SIZE, got %q", errUsage, d)
			}
			vm.Disks = append(vm.Disks, vault.DiskSpec{Name: n, Size: size})
		}
		if *vmFwd != "" {
			for _, f := range strings.Split(*vmFwd, ",") {
				site, addr, ok := strings.Cut(f, "=")
				if !ok {
					return fmt.Errorf("%w: --forward wants SITE=HOST:PORT, got %q", errUsage, f)
				}
				vm.Forwards[site] = addr // SITE or SITE/NETWORK
			}
		}
		if err := c.Do(ctx, "POST", "/v1/vms", vm, nil); err != nil {
			return err
		}
		return e.print(vm, fmt.Sprintf("VM %s defined at %s; its disks are NBD exports %s/DISK there; start it with 'ferry vm start %s'\n", name, vm.Site, name, name))
	case "vm start":
		name, err := arg("a VM name")
		if err != nil {
			return err
		}
		var st map[string]any
		if err := c.Do(ctx, "POST", "/v1/vms/"+neturl.PathEscape(name)+"/start", nil, &st); err != nil {
			return err
		}
		return e.print(st, fmt.Sprintf("VM %s %v (%v); console %v\n", name, st["state"], st["accel"], st["console"]))
	case "vm console":
		name, err := arg("a VM name")
		if err != nil {
			return err
		}
		var off int64
		for {
			var out struct {
				Data string `json:"data"`
				Next int64  `json:"next"`
			}
			if err := c.Do(ctx, "GET", fmt.Sprintf("/v1/vms/%s/console?offset=%d", neturl.PathEscape(name), off), nil, &out); err != nil {
				return err
			}
			fmt.Fprint(e.stdout, out.Data)
			off = out.Next
			if !*follow {
				return nil
			}
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(500 * time.Millisecond):
			}
		}
	case "vm list", "vms":
		var vms []vault.VM
		if err := c.Do(ctx, "GET", "/v1/vms", nil, &vms); err != nil {
			return err
		}
		var b strings.Builder
		for _, v := range vms {
			fmt.Fprintf(&b, "%s\tat %s\t%d MiB\t%d disks\n", v.Name, v.Site, v.MemoryMiB, len(v.Disks))
		}
		return e.print(vms, b.String())
	case "protections":
		var ps []vault.Protection
		if err := c.Do(ctx, "GET", "/v1/protections", nil, &ps); err != nil {
			return err
		}
		var b strings.Builder
		tw := tabwriter.NewWriter(&b, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "VM\tDIRECTION\tSTATE\tHEALTH\tRPO\tJOB")
		for _, p := range ps {
			st := p.State
			if p.TestPending {
				st += " (test-failover-cleanup-pending)"
			}
			fmt.Fprintf(tw, "%s\t%s -> %s\t%s\t%s\t%.2fs\t%s\n", p.VM, p.Source, p.Target, st, p.Health, p.RPOSeconds, p.Job)
		}
		tw.Flush()
		return e.print(ps, b.String())
	case "points":
		vm, err := arg("a VM")
		if err != nil {
			return err
		}
		var pts []map[string]any
		if err := c.Do(ctx, "GET", "/v1/protections/"+neturl.PathEscape(vm)+"/points", nil, &pts); err != nil {
			return err
		}
		var b strings.Builder
		for _, p := range pts {
			fmt.Fprintf(&b, "%v\t%v\t%v\t%v\n", p["seq"], p["time"], p["type"], p["label"])
		}
		return e.print(pts, b.String())
	case "protect":
		vm, err := arg("a VM")
		if err != nil {
			return err
		}
		req := vault.EnableRequest{VM: vm, Target: *to, Policy: *policy, TestNetwork: *testNet, Networks: map[string]string{}}
		for _, m := range netMap {
			nic, n, ok := strings.Cut(m, "=")
			if !ok {
				return fmt.Errorf("%w: --network wants NIC=NETWORK (like nic0=prod-west), got %q", errUsage, m)
			}
			req.Networks[nic] = n
		}
		return job("/v1/protections", req)
	case "test-failover":
		vm, err := arg("a VM")
		if err != nil {
			return err
		}
		return job("/v1/protections/"+neturl.PathEscape(vm)+"/test-failover", map[string]string{"point": *point})
	case "test-failover cleanup":
		vm, err := arg("a VM")
		if err != nil {
			return err
		}
		return job("/v1/protections/"+neturl.PathEscape(vm)+"/test-failover/cleanup", map[string]string{"notes": *notes})
	case "failover", "failback":
		vm, err := arg("a VM")
		if err != nil {
			return err
		}
		shutdown := !*noShutdown
		return job("/v1/protections/"+neturl.PathEscape(vm)+"/failover", map[string]any{"point": *point, "shutdown_source": shutdown})
	case "change-point":
		vm, err := arg("a VM")
		if err != nil {
			return err
		}
		return job("/v1/protections/"+neturl.PathEscape(vm)+"/change-point", map[string]string{"point": *point})
	case "commit":
		vm, err := arg("a VM")
		if err != nil {
			return err
		}
		return job("/v1/protections/"+neturl.PathEscape(vm)+"/commit", nil)
	case "reprotect":
		vm, err := arg("a VM")
		if err != nil {
			return err
		}
		if *dryRun {
			var plan vault.ReprotectPlan
			if err := c.Do(ctx, "GET", "/v1/protections/"+neturl.PathEscape(vm)+"/reprotect-plan", nil, &plan); err != nil {
				return err
			}
			var b strings.Builder
			fmt.Fprintf(&b, "reprotect %s: replicate %s -> %s\n  VM %s at %s: %s\n", vm, plan.From, plan.To, plan.VM.Name, plan.To, plan.VM.Action)
			for _, d := range plan.Disks {
				fmt.Fprintf(&b, "  disk %-10s %12d bytes: %s\n", d.Name, d.Size, d.Action)
			}
			switch plan.Method {
			case "changed-block tracking":
				fmt.Fprintf(&b, "  sends about %d of %d bytes: the blocks changed at either site since the failover point (changed-block tracking)\n", plan.ExpectedBytes, plan.MaxBytes)
			case "checksum compare":
				fmt.Fprintf(&b, "  sends at most %d bytes: only the chunks whose checksums differ (reads the disks at both sites)\n", plan.MaxBytes)
			default:
				fmt.Fprintf(&b, "  sends %d bytes: a full copy\n", plan.MaxBytes)
			}
			if plan.Why != "" {
				fmt.Fprintf(&b, "  no changed-block tracking: %s\n", plan.Why)
			}
			return e.print(plan, b.String())
		}
		return job("/v1/protections/"+neturl.PathEscape(vm)+"/reprotect", nil)
	case "jobs":
		var js []vault.Job
		if err := c.Do(ctx, "GET", "/v1/jobs", nil, &js); err != nil {
			return err
		}
		var b strings.Builder
		for _, j := range js {
			fmt.Fprintf(&b, "%s\t%s\t%s\t%s\t%s\n", j.ID, j.Action, j.Protection, j.State, j.Error)
		}
		return e.print(js, b.String())
	case "job show":
		id, err := arg("a job id")
		if err != nil {
			return err
		}
		var j vault.Job
		if err := c.Do(ctx, "GET", "/v1/jobs/"+neturl.PathEscape(id), nil, &j); err != nil {
			return err
		}
		return e.print(j, jobText(j))
	}
	return fmt.Errorf("%w: unknown command %q", errUsage, full)
}

func jobText(j vault.Job) string {
	var b strings.Builder
	fmt.Fprintf(&b, "job %s: %s of %s: %s %s\n", j.ID, j.Action, j.Protection, j.State, j.Error)
	for _, s := range j.Steps {
		fmt.Fprintf(&b, "  %-28s %-9s %3d%%\n", s.Name, s.State, s.Percent)
		for _, m := range s.Messages {
			fmt.Fprintf(&b, "      %s\n", m)
		}
	}
	return b.String()
}

// waitJob follows a job with a progress bar per step (on stderr) and
// returns an error if it fails.
func waitJob(ctx context.Context, e *env, c *vault.Client, id string) error {
	// One bar per step, drawn in order: a step's bar is closed (with its
	// own line) before the next one starts, and shows the step's latest
	// message while it runs. The full messages come in the summary.
	type stepBar struct {
		name string
		b    *progressbar.ProgressBar
		done bool
	}
	bars := map[string]*stepBar{}
	var open *stepBar
	// Bars redraw with carriage returns, which make a log file unreadable:
	// to a file or pipe, say each step's state once it changes.
	plain := !isTerminal(e.stderr)
	told := map[string]string{}
	end := func(sb *stepBar, state string) {
		if sb == nil || sb.done {
			return
		}
		sb.done = true
		sb.b.Describe(fmt.Sprintf("%-28s %s", sb.name, state))
		if state == vault.JobFailed {
			sb.b.Exit()
			fmt.Fprintln(e.stderr)
			return
		}
		sb.b.Finish()
	}
	for {
		var j vault.Job
		if err := c.Do(ctx, "GET", "/v1/jobs/"+neturl.PathEscape(id), nil, &j); err != nil {
			return err
		}
		for _, s := range j.Steps {
			if s.State == vault.StepPending || e.json {
				continue
			}
			if plain {
				if told[s.Name] != s.State {
					told[s.Name] = s.State
					fmt.Fprintf(e.stderr, "%-28s %s\n", s.Name, s.State)
				}
				continue
			}
			sb := bars[s.Name]
			if sb == nil {
				if open != nil && !open.done {
					open.b.Finish() // the vault moved on: the previous step ended
					open.done = true
				}
				sb = &stepBar{name: s.Name, b: progressbar.NewOptions(100, progressbar.OptionSetWriter(e.stderr), progressbar.OptionSetDescription(fmt.Sprintf("%-28s", s.Name)),
					progressbar.OptionSetWidth(20), progressbar.OptionShowCount(), progressbar.OptionOnCompletion(func() { fmt.Fprintln(e.stderr) }))}
				bars[s.Name], open = sb, sb
			}
			if sb.done {
				continue
			}
			switch s.State {
			case vault.JobSucceeded, "skipped", vault.JobFailed:
				end(sb, s.State)
				continue
			}
			if n := len(s.Messages); n > 0 {
				m := s.Messages[n-1]
				if len(m) > 70 {
					m = m[:67] + "..."
				}
				sb.b.Describe(fmt.Sprintf("%-28s %s", s.Name, m))
			}
			sb.b.Set(min(s.Percent, 99)) // 100 would close the bar before the step ends
		}
		if j.State != vault.JobRunning {
			end(open, j.State)
			if err := e.print(j, "\n"+jobText(j)); err != nil {
				return err
			}
			if j.State == vault.JobFailed {
				return fmt.Errorf("job %s failed: %s", j.ID, j.Error)
			}
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// isTerminal reports whether w is a terminal.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}
