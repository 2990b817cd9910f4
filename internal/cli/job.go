package cli

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/vaultclient"
	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"
)

// vaultOpts are the flags every command that talks to the vault takes.
type vaultOpts struct{ url, token, ca string }

func addVaultFlags(c *cobra.Command, o *vaultOpts) {
	fs := c.Flags()
	str(fs, &o.url, "vault", "", "vault URL, https://HOST:PORT (or FERRY_VAULT, or vault in the config file)")
	str(fs, &o.token, "token", "", "API token (or FERRY_TOKEN, or token in the config file)")
	str(fs, &o.ca, "ca", "", "CA certificate that signed the vault's (or FERRY_CA, or ca in the config file)")
}

func (o *vaultOpts) client() (*vaultclient.Client, error) {
	if o.url == "" || o.token == "" {
		return nil, usagef("set --vault and --token (or FERRY_VAULT and FERRY_TOKEN, or the config file); 'ferry up' prints them")
	}
	return vaultclient.New(o.url, o.token, o.ca)
}

// vaultCommand makes a command that talks to the vault: it gets the
// client and the positional arguments.
func vaultCommand(e *env, c *cobra.Command, o *vaultOpts, f func(ctx context.Context, vc *vaultclient.Client, args []string) error) *cobra.Command {
	addVaultFlags(c, o)
	c.RunE = runE(e, func(ctx context.Context, args []string) error {
		vc, err := o.client()
		if err != nil {
			return err
		}
		return f(ctx, vc, args)
	})
	return c
}

// startedJob reports a job the vault started, or follows it with --wait.
func startedJob(ctx context.Context, e *env, vc *vaultclient.Client, j api.Job, wait bool) error {
	if !wait {
		return e.print(j, fmt.Sprintf("job %s started (%s of %s); follow it with 'ferry job show %s' or use --wait\n", j.ID, j.Action, jobSubject(j), j.ID))
	}
	return waitJob(ctx, e, vc, j.ID)
}

func jobsCmd(e *env) *cobra.Command {
	var o vaultOpts
	var protection string
	c := vaultCommand(e, &cobra.Command{Use: "jobs", Short: "List jobs", Args: cobra.NoArgs,
		Example: "  ferry jobs\n  ferry jobs --protection web --output json"}, &o,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			js, err := vc.Jobs(ctx, protection)
			if err != nil {
				return err
			}
			return e.print(js, table("ID\tACTION\tVM\tSTATE\tCREATED\tERROR", func(tw io.Writer) {
				for _, j := range js {
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", j.ID, j.Action, jobSubject(j), j.State, j.Created.Format(time.RFC3339), j.Error)
				}
			}))
		})
	str(c.Flags(), &protection, "protection", "", "only the jobs of this VM's protection")
	return c
}

func jobCmd(e *env) *cobra.Command {
	var o vaultOpts
	var wait bool
	show := vaultCommand(e, &cobra.Command{Use: "show JOB", Short: "Show a job's steps, progress and messages", Args: cobra.ExactArgs(1),
		Example: "  ferry job show j1764620000-1a2b3c4d\n  ferry job show j1764620000-1a2b3c4d --wait"}, &o,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			if wait {
				return waitJob(ctx, e, vc, args[0])
			}
			j, err := vc.Job(ctx, args[0])
			if err != nil {
				return err
			}
			return e.print(j, jobText(j))
		})
	show.Flags().BoolVar(&wait, "wait", false, "follow the job until it ends; exit non-zero if it fails")
	var or, ot vaultOpts
	var waitR, waitT bool
	resume := vaultCommand(e, &cobra.Command{Use: "resume JOB", Short: "Confirm the manual action a plan job waits for; the plan goes on", Args: cobra.ExactArgs(1),
		Example: "  ferry job resume j1764620000-1a2b3c4d --wait"}, &or,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			j, err := vc.ResumeJob(ctx, args[0])
			if err != nil {
				return err
			}
			return startedJob(ctx, e, vc, j, waitR)
		})
	resume.Flags().BoolVar(&waitR, "wait", false, "follow the job; exit non-zero if it fails")
	retry := vaultCommand(e, &cobra.Command{Use: "retry JOB", Short: "Run a failed plan job again from the step that failed", Args: cobra.ExactArgs(1),
		Example: "  ferry job retry j1764620000-1a2b3c4d --wait"}, &ot,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			j, err := vc.RetryJob(ctx, args[0])
			if err != nil {
				return err
			}
			return startedJob(ctx, e, vc, j, waitT)
		})
	retry.Flags().BoolVar(&waitT, "wait", false, "follow the job; exit non-zero if it fails")
	return group("job", "Show a job; resume or retry a plan job", show, resume, retry)
}

// jobSubject is what a job acts on: a VM, or a plan.
func jobSubject(j api.Job) string {
	if j.Plan != "" {
		return "plan " + j.Plan
	}
	return j.Protection
}

func jobText(j api.Job) string {
	var b strings.Builder
	fmt.Fprintf(&b, "job %s: %s of %s: %s %s\n", j.ID, j.Action, jobSubject(j), j.State, j.Error)
	if j.State == api.JobWaiting {
		fmt.Fprintf(&b, "  waits for an operator: do what the waiting step says, then 'ferry job resume %s'\n", j.ID)
	}
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
func waitJob(ctx context.Context, e *env, vc *vaultclient.Client, id string) error {
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
	told := map[string]api.JobState{}
	end := func(sb *stepBar, state api.JobState) {
		if sb == nil || sb.done {
			return
		}
		sb.done = true
		sb.b.Describe(fmt.Sprintf("%-28s %s", sb.name, state))
		if state == api.JobFailed {
			sb.b.Exit()
			fmt.Fprintln(e.stderr)
			return
		}
		sb.b.Finish()
	}
	for {
		j, err := vc.Job(ctx, id)
		if err != nil {
			return err
		}
		for _, s := range j.Steps {
			if s.State == api.JobPending || e.json() {
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
			case api.JobSucceeded, api.JobSkipped, api.JobFailed:
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
		if j.State != api.JobRunning {
			end(open, j.State)
			if err := e.print(j, "\n"+jobText(j)); err != nil {
				return err
			}
			if j.State == api.JobFailed {
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
	return ok && term.IsTerminal(int(f.Fd()))
}

// bar renders a static progress bar for a status line, with the library
// the job bars use.
func bar(done, total int64) string {
	b := progressbar.NewOptions64(max(total, 1), progressbar.OptionSetWriter(io.Discard), progressbar.OptionSetWidth(20),
		progressbar.OptionSetRenderBlankState(false))
	b.Set64(min(done, max(total, 1)))
	return strings.TrimSpace(b.String())
}
