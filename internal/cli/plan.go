package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/vaultclient"
	"github.com/spf13/cobra"
)

func planCmd(e *env) *cobra.Command {
	var oc, os_, ol, od vaultOpts
	var groups []string
	var file, waitFor string
	var waitTimeout time.Duration
	create := vaultCommand(e, &cobra.Command{Use: "create NAME", Short: "Create or replace a recovery plan: VMs in ordered boot groups", Args: cobra.ExactArgs(1),
		Long: "A plan's boot groups start in order, every VM of a group at once; the plan waits for a group's VMs to be up before the next.\n" +
			"Scripts and manual actions before and after groups come from a JSON file (--file, the API's Plan: docs/api.md).",
		Example: "  ferry plan create shop --group db --group app1,app2 --group web\n  ferry plan create shop --file shop.json"}, &oc,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			p := api.Plan{Name: args[0]}
			if file != "" {
				if len(groups) > 0 {
					return usagef("give the boot groups with --group or in --file, not both")
				}
				b, err := os.ReadFile(file)
				if err != nil {
					return err
				}
				dec := json.NewDecoder(strings.NewReader(string(b)))
				dec.DisallowUnknownFields()
				if err := dec.Decode(&p); err != nil {
					return usagef("%s: %v", file, err)
				}
				if p.Name == "" {
					p.Name = args[0]
				} else if p.Name != args[0] {
					return usagef("%s names plan %q, not %q", file, p.Name, args[0])
				}
			}
			for _, g := range groups {
				p.Groups = append(p.Groups, api.BootGroup{VMs: strings.Split(g, ","), Wait: api.Wait{For: waitFor, Timeout: waitTimeout}})
			}
			if len(p.Groups) == 0 {
				return usagef("a plan needs boot groups: --group VM[,VM...] (repeatable, in boot order) or --file")
			}
			out, err := vc.PutPlan(ctx, p)
			if err != nil {
				return err
			}
			return e.print(out, recoveryPlanText(out))
		})
	fs := create.Flags()
	fs.StringArrayVar(&groups, "group", nil, "a boot group: VM[,VM...] (repeatable, in boot order)")
	str(fs, &file, "file", "", "the plan as JSON (boot groups with waits, scripts and manual actions)")
	str(fs, &waitFor, "wait-for", "", "with --group: how to know a group is up: guest-agent (default), service or none")
	fs.DurationVar(&waitTimeout, "wait-timeout", 0, "with --group: how long to wait for a group (default 5m)")

	show := vaultCommand(e, &cobra.Command{Use: "show NAME", Short: "Show a plan's boot groups, actions and history", Args: cobra.ExactArgs(1)}, &os_,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			p, err := vc.Plan(ctx, args[0])
			if err != nil {
				return err
			}
			return e.print(p, recoveryPlanText(p))
		})
	ls := vaultCommand(e, &cobra.Command{Use: "list", Short: "List the recovery plans", Args: cobra.NoArgs}, &ol,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			ps, err := vc.Plans(ctx)
			if err != nil {
				return err
			}
			var b strings.Builder
			for _, p := range ps {
				var gs []string
				for _, g := range p.Groups {
					gs = append(gs, strings.Join(g.VMs, ","))
				}
				job := ""
				if p.Job != "" {
					job = "  job " + p.Job
				}
				fmt.Fprintf(&b, "%-20s %s%s\n", p.Name, strings.Join(gs, " → "), job)
			}
			if len(ps) == 0 {
				b.WriteString("no plans: ferry plan create NAME --group VM...\n")
			}
			return e.print(ps, b.String())
		})
	del := vaultCommand(e, &cobra.Command{Use: "delete NAME", Short: "Delete a plan (not its VMs or their protection)", Args: cobra.ExactArgs(1)}, &od,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			if err := vc.DeletePlan(ctx, args[0]); err != nil {
				return err
			}
			return e.print(struct{}{}, "plan "+args[0]+" deleted\n")
		})
	c := group("plan", "Recovery plans: several VMs failed over in boot order", create, show, ls, del)
	for _, act := range []struct{ action, use, short string }{
		{api.PlanTestFailover, "test-failover", "DR drill of every VM of the plan, in boot order"},
		{api.PlanCleanupTest, "cleanup", "End the plan's drill"},
		{api.PlanFailover, "failover", "Fail every VM of the plan over, in boot order"},
		{api.PlanCommit, "commit", "Commit the failover of every VM of the plan"},
		{api.PlanReprotect, "reprotect", "Reprotect every VM of the plan (back to where it came from)"},
	} {
		c.AddCommand(planActionCmd(e, act.action, act.use, act.short))
	}
	return c
}

func planActionCmd(e *env, action, use, short string) *cobra.Command {
	var o vaultOpts
	var point, notes string
	var wait, noShutdown bool
	c := vaultCommand(e, &cobra.Command{Use: use + " PLAN", Short: short, Args: cobra.ExactArgs(1),
		Example: "  ferry plan " + use + " shop --wait"}, &o,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			req := api.PlanRun{Action: action, Point: point, Notes: notes}
			if noShutdown {
				f := false
				req.ShutdownSource = &f
			}
			j, err := vc.RunPlan(ctx, args[0], req)
			if err != nil {
				return err
			}
			return startedJob(ctx, e, vc, j, wait)
		})
	fs := c.Flags()
	switch action {
	case api.PlanTestFailover, api.PlanFailover:
		str(fs, &point, "point", "", pointHelp+" (each VM's own)")
	}
	if action == api.PlanFailover {
		fs.BoolVar(&noShutdown, "no-shutdown", false, "do not shut the sources down first (their site is down)")
	}
	if action == api.PlanCleanupTest {
		str(fs, &notes, "notes", "", "notes recorded with each VM's drill")
	}
	fs.BoolVar(&wait, "wait", false, "follow the job; return when it ends or waits for an operator; exit non-zero if it fails")
	return c
}

func recoveryPlanText(p api.Plan) string {
	var b strings.Builder
	fmt.Fprintf(&b, "plan %s", p.Name)
	if p.Job != "" {
		fmt.Fprintf(&b, " (job %s)", p.Job)
	}
	b.WriteString("\n")
	for i, g := range p.Groups {
		name := g.Name
		if name == "" {
			name = fmt.Sprintf("group %d", i+1)
		}
		wait := g.Wait.For
		if wait == "" {
			wait = api.WaitGuestAgent
		}
		for _, a := range g.Pre {
			fmt.Fprintf(&b, "  before %s: %s\n", name, actionText(a))
		}
		fmt.Fprintf(&b, "  %d. %-12s %s (wait: %s)\n", i+1, name, strings.Join(g.VMs, ", "), wait)
		for _, a := range g.Post {
			fmt.Fprintf(&b, "  after %s: %s\n", name, actionText(a))
		}
	}
	for _, h := range p.History {
		fmt.Fprintf(&b, "  %s %s %s (%s)\n", h.Time.Format(time.RFC3339), h.Action, h.Notes, h.Duration)
	}
	return b.String()
}

func actionText(a api.PlanAction) string {
	s := "script " + a.Script
	if a.Manual != "" {
		s = "manual: " + a.Manual
	}
	if a.Name != "" {
		s = a.Name + ": " + s
	}
	if len(a.On) > 0 {
		s += " (on " + strings.Join(a.On, ", ") + ")"
	}
	return s
}
