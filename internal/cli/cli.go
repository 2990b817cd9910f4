// Package cli implements the ferry command line: argument parsing, output
// formatting (text or --output json) and the wiring of internal packages
// into commands.
package cli

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"
)

// Version is set at build time with -ldflags.
var Version = "dev"

type command struct {
	name    string
	summary string
	run     func(ctx context.Context, env *env, args []string) error
}

// env is what every command gets: its output streams and logger.
type env struct {
	stdout, stderr io.Writer
	log            *slog.Logger
	json           bool
}

func commands() []command {
	return []command{
		{"vault", "run the control plane (vault run)", runVault},
		{"protections", "list protections: direction, state, health, RPO", vcmd("protections")},
		{"protect", "enable replication of a VM to a site (--to SITE)", vcmd("protect")},
		{"points", "list a protected VM's recovery points", vcmd("points")},
		{"test-failover", "DR drill at the recovery site (test-failover VM | test-failover cleanup VM)", vcmd("test-failover")},
		{"failover", "fail a VM over to its recovery site (--point, --no-shutdown-source)", vcmd("failover")},
		{"change-point", "restart a failed-over VM on another point (--point)", vcmd("change-point")},
		{"commit", "make a failover final", vcmd("commit")},
		{"reprotect", "replicate back the other way after a commit (--dry-run shows the plan)", vcmd("reprotect")},
		{"failback", "fail over in the reverse direction (same options as failover)", vcmd("failback")},
		{"jobs", "list jobs", vcmd("jobs")},
		{"token", "API tokens (token create --role reader|operator|enroll --name WHAT [--ttl 24h] [--reenroll SITE] | token list | token revoke ID)", vcmd("token")},
		{"job", "show a job (job show ID)", vcmd("job")},
		{"site", "list, add or delete sites and their networks (site list | site add NAME ADDR [--readdress] | site delete NAME | site network add|delete SITE NET)", vcmd("site")},
		{"vm", "define, start and list VMs (vm define NAME --site S --disk vda=10G ... | vm start NAME | vm list)", vcmd("vm")},
		{"up", "all in one: a vault and two sites (east, west) on this machine", runUp},
		{"agent", "run a site agent, or drive one (agent run|status|group create|replicate|mark|points|view open|view close)", runAgent},
		{"ca", "create the CA and certificates for mutual TLS (ca init | ca issue --role site|vault|operator|monitor NAME)", runCA},
		{"serve", "serve a disk group's disks over NBD, journaling every write (no replication)", runServe},
		{"disk", "create and list disks of a group (disk create|list)", runDisk},
		{"journal", "inspect a journal (journal dump|verify)", runJournal},
		{"version", "print the version", func(_ context.Context, e *env, _ []string) error {
			return e.print(map[string]string{"version": Version}, "ferry "+Version+"\n")
		}},
	}
}

func vcmd(name string) func(context.Context, *env, []string) error {
	return func(ctx context.Context, e *env, args []string) error { return runVaultCmd(ctx, e, name, args) }
}

// errUsage marks errors caused by how ferry was invoked (exit code 2).
var errUsage = errors.New("usage")

// Run executes the command line args and returns the process exit code.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	e := &env{stdout: stdout, stderr: stderr, log: slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))}
	// --output json may come anywhere before the subcommand's own flags.
	var rest []string
	for i := 0; i < len(args); i++ {
		switch {
		case args[i] == "--output" && i+1 < len(args):
			e.json = args[i+1] == "json"
			i++
		case strings.HasPrefix(args[i], "--output="):
			e.json = strings.TrimPrefix(args[i], "--output=") == "json"
		default:
			rest = append(rest, args[i])
		}
	}
	if len(rest) == 0 || rest[0] == "help" || rest[0] == "-h" || rest[0] == "--help" {
		usage(stderr)
		if len(rest) == 0 {
			return 2
		}
		return 0
	}
	for _, c := range commands() {
		if c.name == rest[0] {
			err := c.run(ctx, e, rest[1:])
			if err == nil {
				return 0
			}
			if errors.Is(err, flag.ErrHelp) {
				return 0
			}
			fmt.Fprintf(stderr, "ferry %s: %v\n", c.name, err)
			if errors.Is(err, errUsage) {
				return 2
			}
			return 1
		}
	}
	fmt.Fprintf(stderr, "ferry: unknown command %q\n\n", rest[0])
	usage(stderr)
	return 2
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "ferry: disaster recovery for QEMU/KVM virtual machines")
	fmt.Fprintln(w, "\nUsage: ferry [--output json] <command> [flags]\n\nCommands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-10s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w, `
Examples:
  ferry up                                           # a vault and two sites (east, west) on this machine
  export FERRY_VAULT=https://127.0.0.1:7400 FERRY_TOKEN=fy_... FERRY_CA=ferry-up/pki/ca.crt
  ferry vm define web --site east --disk vda=10G --kernel vmlinuz --initrd initrd.img
  ferry vm start web
  ferry site network add west prod-west --kind production --subnet 10.20.0.0/24
  ferry protect web --to west --network nic0=prod-west --wait   # initial replication, then protected
  ferry test-failover web --point latest-app-consistent --wait
  ferry test-failover cleanup web --notes "drill ok" --wait
  ferry failover web --point latest --wait           # or latest-processed | <point id> | 2026-11-26T10:00:00Z
  ferry commit web --wait
  ferry reprotect web --dry-run                      # what is reused, what is created (new)
  ferry reprotect web --wait
  ferry failback web --wait
  ferry protections; ferry points web; ferry jobs --output json; ferry vm console web --follow

Run 'ferry <command> -h' for a command's flags.`)
}

// print writes v as JSON when --output json was given, else text.
func (e *env) print(v any, text string) error {
	if e.json {
		enc := json.NewEncoder(e.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	}
	_, err := io.WriteString(e.stdout, text)
	return err
}

// parseSize parses "512", "64K", "10M", "2G", "1T" (binary units).
func parseSize(s string) (int64, error) {
	s = strings.TrimSpace(strings.ToUpper(strings.TrimSuffix(strings.TrimSuffix(s, "iB"), "B")))
	mult := int64(1)
	if n := len(s); n > 0 {
		switch s[n-1] {
		case 'K':
			mult = 1 << 10
		case 'M':
			mult = 1 << 20
		case 'G':
			mult = 1 << 30
		case 'T':
			mult = 1 << 40
		}
		if mult > 1 {
			s = s[:n-1]
		}
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil || v <= 0 || v > (1<<62)/mult {
		return 0, fmt.Errorf("%w: bad size %q (want e.g. 512M or 10G)", errUsage, s)
	}
	return v * mult, nil
}

func newFlags(name string, e *env) *flag.FlagSet {
	fs := flag.NewFlagSet("ferry "+name, flag.ContinueOnError)
	fs.SetOutput(e.stderr)
	return fs
}

// parse parses flags anywhere among the arguments ("ferry vm define web
// --site east" as well as "ferry vm define --site east web"); the
// positional arguments are then fs.Args().
func parse(fs *flag.FlagSet, args []string) error {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return err
			}
			return fmt.Errorf("%w: %v", errUsage, err)
		}
		rest := fs.Args()
		if len(rest) == 0 {
			break
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
	return fs.Parse(append([]string{"--"}, pos...))
}
