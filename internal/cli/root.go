// Package cli implements the ferry command line on cobra: one file per
// command group, each command with its own flags, help and examples;
// output as text or JSON (--output json, errors included); an optional
// config file for what would otherwise take flags or environment
// variables (flags win); and the wiring of internal packages into
// commands. It talks to the vault and the agents only through their typed
// clients (vaultclient, agentclient).
package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/BurntSushi/toml"
	"github.com/ferry-dr/ferry/internal/api"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// Version is stamped at build time (make build: -ldflags "-X ...").
var Version = "dev"

// env is what every command gets: its output streams, logger and output
// format.
type env struct {
	stdout, stderr io.Writer
	log            *slog.Logger
	output         string // text or json
	logLevel       string
	logFormat      string
	config         string // --config
}

func (e *env) json() bool { return e.output == "json" }

// print writes v as JSON with --output json, else text.
func (e *env) print(v any, text string) error {
	if e.json() {
		enc := json.NewEncoder(e.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	}
	_, err := io.WriteString(e.stdout, text)
	return err
}

// errUsage marks errors in how ferry was invoked (exit code 2).
var errUsage = errors.New("usage")

// usagef is a usage error with a message.
func usagef(format string, a ...any) error {
	return fmt.Errorf("%w: %s", errUsage, fmt.Sprintf(format, a...))
}

// ranErr marks an error returned by a command's own code, so that Run can
// tell it from cobra's parsing errors (which are usage errors).
type ranErr struct{ error }

func (r ranErr) Unwrap() error { return r.error }

// runE adapts a command body: it gets the context and the env, and its
// errors are marked as the command's own.
func runE(e *env, f func(ctx context.Context, args []string) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		if err := f(cmd.Context(), args); err != nil {
			return ranErr{err}
		}
		return nil
	}
}

// Run executes the command line and returns the process exit code: 0, 1
// for a failure, 2 for a usage error.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	e := &env{stdout: stdout, stderr: stderr, output: "text", log: slog.New(slog.NewTextHandler(stderr, nil))}
	root := newRoot(e)
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	cmd, err := root.ExecuteContextC(ctx)
	if err == nil {
		return 0
	}
	var re ranErr
	usage := !errors.As(err, &re) || errors.Is(err, errUsage)
	if re.error != nil {
		err = re.error
	}
	code := 1
	if usage {
		code = 2
	}
	name := "ferry"
	if cmd != nil {
		name = cmd.CommandPath()
	}
	if e.json() {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		enc.Encode(errorJSON(err, usage))
		return code
	}
	fmt.Fprintf(stderr, "%s: %v\n", name, strings.TrimPrefix(err.Error(), "usage: "))
	if usage && cmd != nil {
		fmt.Fprintf(stderr, "Run '%s --help' for usage.\n", cmd.CommandPath())
	}
	return code
}

// jsonError is how an error reads with --output json.
type jsonError struct {
	Error struct {
		Message string `json:"message"`
		// Kind is the error's class: usage, invalid, unauthorized,
		// forbidden, not-found, conflict, site, or error.
		Kind string `json:"kind"`
		// Status is the HTTP status the vault or agent answered, if any.
		Status int `json:"status,omitempty"`
	} `json:"error"`
}

func errorJSON(err error, usage bool) jsonError {
	var j jsonError
	j.Error.Message = strings.TrimPrefix(err.Error(), "usage: ")
	var se *api.StatusError
	if errors.As(err, &se) {
		j.Error.Status = se.Code
	}
	kinds := []struct {
		err  error
		kind string
	}{{api.ErrInvalid, "invalid"}, {api.ErrUnauthorized, "unauthorized"}, {api.ErrForbidden, "forbidden"},
		{api.ErrNotFound, "not-found"}, {api.ErrConflict, "conflict"}, {api.ErrSite, "site"}}
	j.Error.Kind = "error"
	if usage {
		j.Error.Kind = "usage"
	}
	for _, k := range kinds {
		if errors.Is(err, k.err) {
			j.Error.Kind = k.kind
			break
		}
	}
	return j
}

func newRoot(e *env) *cobra.Command {
	root := &cobra.Command{
		Use:   "ferry",
		Short: "Disaster recovery for QEMU/KVM virtual machines",
		Long: `ferry replicates a VM's disks continuously to a second site, keeps recovery
points at any instant, and runs the DR lifecycle: drill, failover, change
recovery point, commit, reprotect with delta sync, failback.`,
		Example: `  ferry up                                           # a vault and two sites (east, west) on this machine
  export FERRY_VAULT=https://127.0.0.1:7400 FERRY_TOKEN=fy_... FERRY_CA=ferry-up/pki/ca.crt
  ferry vm define web --site east --disk vda=10G --kernel vmlinuz --initrd initrd.img
  ferry vm start web
  ferry protect web --to west --wait
  ferry test-failover web --point latest-app-consistent --wait
  ferry test-failover cleanup web --notes "drill ok" --wait
  ferry failover web --point latest --wait
  ferry commit web --wait
  ferry reprotect web --dry-run && ferry reprotect web --wait
  ferry failback web --wait`,
		Version:       Version,
		SilenceErrors: true,
		SilenceUsage:  true,
		// An unknown command is an error, not help.
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error { return cmd.Help() },
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			return e.setup(cmd)
		},
	}
	root.SetVersionTemplate("ferry {{.Version}}\n")
	pf := root.PersistentFlags()
	pf.StringVarP(&e.output, "output", "o", "text", "output format: text or json")
	pf.StringVar(&e.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	pf.StringVar(&e.logFormat, "log-format", "text", "log format: text or json")
	pf.StringVar(&e.config, "config", "", "config file (TOML; default /etc/ferry/agent.toml or vault.toml for daemons, ~/.config/ferry/config.toml otherwise)")
	root.SetFlagErrorFunc(func(cmd *cobra.Command, err error) error { return usagef("%v", err) })
	root.AddGroup(&cobra.Group{ID: "dr", Title: "DR lifecycle (talk to the vault):"},
		&cobra.Group{ID: "inv", Title: "Inventory and access (talk to the vault):"},
		&cobra.Group{ID: "daemon", Title: "Daemons and local tools:"})
	for _, c := range []*cobra.Command{
		protectCmd(e), disableCmd(e), protectionsCmd(e), pointsCmd(e), testFailoverCmd(e), failoverCmd(e, "failover"), failoverCmd(e, "failback"),
		changePointCmd(e), commitCmd(e), reprotectCmd(e), jobsCmd(e), jobCmd(e), planCmd(e), alertsCmd(e), eventsCmd(e), ransomwareCmd(e), filesCmd(e),
	} {
		c.GroupID = "dr"
		root.AddCommand(c)
	}
	for _, c := range []*cobra.Command{siteCmd(e), vmCmd(e), groupCmd(e), policyCmd(e), bandwidthCmd(e), tokenCmd(e)} {
		c.GroupID = "inv"
		root.AddCommand(c)
	}
	for _, c := range []*cobra.Command{upCmd(e), vaultCmd(e), agentCmd(e), caCmd(e), serveCmd(e), diskCmd(e), journalCmd(e), versionCmd(e), manCmd(root)} {
		c.GroupID = "daemon"
		root.AddCommand(c)
	}
	root.SetHelpCommandGroupID("daemon")
	root.SetCompletionCommandGroupID("daemon")
	return root
}

// group makes a command that only holds subcommands: run bare, it shows
// its help; with an unknown subcommand, it is a usage error.
func group(use, short string, subs ...*cobra.Command) *cobra.Command {
	c := &cobra.Command{Use: use, Short: short, Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error { return cmd.Help() }}
	c.AddCommand(subs...)
	return c
}

// setup runs before every command: it validates the global flags, builds
// the logger and applies the config file and environment variables to the
// flags left unset.
func (e *env) setup(cmd *cobra.Command) error {
	if err := applyConfig(cmd, e.config); err != nil {
		return err
	}
	switch e.output {
	case "text", "json":
	default:
		o := e.output
		e.output = "text"
		return usagef("--output %q: want text or json", o)
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(e.logLevel)); err != nil {
		return usagef("--log-level %q: want debug, info, warn or error", e.logLevel)
	}
	opts := &slog.HandlerOptions{Level: level}
	switch e.logFormat {
	case "text":
		e.log = slog.New(slog.NewTextHandler(e.stderr, opts))
	case "json":
		e.log = slog.New(slog.NewJSONHandler(e.stderr, opts))
	default:
		return usagef("--log-format %q: want text or json", e.logFormat)
	}
	return nil
}

// envVars are flags that environment variables may set (after a flag,
// before the config file).
var envVars = map[string]string{"vault": "FERRY_VAULT", "token": "FERRY_TOKEN", "ca": "FERRY_CA"}

// daemonConfigs are the default config files of the daemons; their keys
// must all be flags of the daemon (a typo is an error there).
var daemonConfigs = map[string]string{"ferry agent run": "/etc/ferry/agent.toml", "ferry vault run": "/etc/ferry/vault.toml"}

// applyConfig sets the flags of cmd that the command line did not set:
// from the environment (FERRY_VAULT, FERRY_TOKEN, FERRY_CA), then from the
// config file, whose keys are flag names ("vault = 'https://...'",
// "listen = '0.0.0.0:7410'"). An explicit --config must exist; a default
// one may be missing.
func applyConfig(cmd *cobra.Command, explicit string) error {
	path, strict := explicit, false
	if d, ok := daemonConfigs[cmd.CommandPath()]; ok {
		strict = true
		if path == "" {
			path = d
		}
	}
	if path == "" {
		if dir, err := os.UserConfigDir(); err == nil {
			path = filepath.Join(dir, "ferry", "config.toml")
		}
	}
	conf := map[string]any{}
	if path != "" {
		if _, err := toml.DecodeFile(path, &conf); err != nil {
			if !errors.Is(err, os.ErrNotExist) || explicit != "" {
				return fmt.Errorf("config %s: %w", path, err)
			}
		}
	}
	var errs []string
	set := func(f *pflag.Flag, v string, from string) {
		if err := cmd.Flags().Set(f.Name, v); err != nil {
			errs = append(errs, fmt.Sprintf("%s: %s: %v", from, f.Name, err))
		}
	}
	cmd.Flags().VisitAll(func(f *pflag.Flag) {
		if f.Changed {
			return
		}
		if ev, ok := envVars[f.Name]; ok && os.Getenv(ev) != "" {
			set(f, os.Getenv(ev), ev)
			return
		}
		if v, ok := conf[f.Name]; ok {
			set(f, configString(v), "config "+path)
		}
	})
	if strict {
		for k := range conf {
			if cmd.Flags().Lookup(k) == nil {
				errs = append(errs, fmt.Sprintf("config %s: %q is not a flag of %s", path, k, cmd.CommandPath()))
			}
		}
	}
	if len(errs) > 0 {
		return usagef("%s", strings.Join(errs, "; "))
	}
	return nil
}

func configString(v any) string {
	switch x := v.(type) {
	case string:
		return x
	case []any:
		var parts []string
		for _, p := range x {
			parts = append(parts, configString(p))
		}
		return strings.Join(parts, ",")
	case int64:
		return strconv.FormatInt(x, 10)
	}
	return fmt.Sprint(v)
}

// noDash is a string flag value that refuses a long flag as its value,
// so "--point --wait" is an error, not the point "--wait". (A value that
// starts with a single dash, like a kernel option, is fine.)
type noDash struct{ p *string }

func (n noDash) String() string { return *n.p }
func (n noDash) Type() string   { return "string" }
func (n noDash) Set(v string) error {
	if strings.HasPrefix(v, "--") {
		return fmt.Errorf("needs a value, got the flag %q", v)
	}
	*n.p = v
	return nil
}

// str registers a string flag that refuses a flag as its value.
func str(fs *pflag.FlagSet, p *string, name, def, usage string) {
	*p = def
	fs.Var(noDash{p}, name, usage)
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
		return 0, usagef("bad size %q (want e.g. 512M or 10G)", s)
	}
	return v * mult, nil
}

func versionCmd(e *env) *cobra.Command {
	return &cobra.Command{Use: "version", Short: "Print the version", Args: cobra.NoArgs,
		RunE: runE(e, func(ctx context.Context, args []string) error {
			return e.print(map[string]string{"version": Version}, "ferry "+Version+"\n")
		})}
}

// table renders rows under a header, aligned in columns (tab-separated).
func table(header string, rows func(tw io.Writer)) string {
	var b strings.Builder
	tw := tabwriter.NewWriter(&b, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, header)
	rows(tw)
	tw.Flush()
	return b.String()
}
