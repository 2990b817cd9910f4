package api

import (
	"fmt"
	"slices"
	"strings"
	"time"
)

// Plan is a recovery plan: VMs in ordered boot groups, with actions
// before and after each group. A plan's failover, drill, cleanup, commit
// and reprotect each run as one job, group after group in order, every
// VM of a group at once; each VM keeps its own protection, which the
// plan's job drives through the same steps as a single VM's.
type Plan struct {
	Name   string      `json:"name"`
	Groups []BootGroup `json:"groups"`
	// Job is the plan job running or waiting for an operator.
	Job string `json:"job,omitempty"`
	// History of the plan's jobs that ended.
	History []HistoryEntry `json:"history,omitempty"`
}

// BootGroup is one step of a plan's boot order.
type BootGroup struct {
	Name string   `json:"name,omitempty"` // default "group N"
	VMs  []string `json:"vms"`
	// Wait says how the plan knows the group's VMs are up after they
	// start (failover, test failover), before it goes on.
	Wait Wait `json:"wait,omitzero"`
	// Pre and Post run before the group's VMs and after they are up.
	Pre  []PlanAction `json:"pre,omitempty"`
	Post []PlanAction `json:"post,omitempty"`
}

// Wait kinds: how a plan knows a VM is up.
const (
	WaitNone       = "none"        // go on once the VMs started
	WaitGuestAgent = "guest-agent" // the VM's guest agent answers a ping
	WaitService    = "service"     // the VM's published service answers HTTP
)

// Wait bounds the wait for a group's VMs (default: their guest agent,
// for up to 5 minutes).
type Wait struct {
	For     string        `json:"for,omitempty"`
	Timeout time.Duration `json:"timeout,omitempty"`
}

// PlanAction is a script or a manual action of a plan.
type PlanAction struct {
	Name string `json:"name,omitempty"`
	// Script names an executable in the vault's script directory
	// (`ferry vault run --script-dir`); it runs on the vault host with
	// the plan's context in its environment (FERRY_PLAN, FERRY_ACTION,
	// FERRY_GROUP, FERRY_VMS, FERRY_JOB), and a non-zero exit fails the
	// step.
	Script string `json:"script,omitempty"`
	// Manual is an instruction for an operator: the job waits until one
	// confirms it (ferry job resume, or the portal's button).
	Manual string `json:"manual,omitempty"`
	// Timeout bounds a script (default 10 minutes).
	Timeout time.Duration `json:"timeout,omitempty"`
	// On lists the plan actions it runs in (default: failover and
	// test-failover).
	On []string `json:"on,omitempty"`
}

// Plan actions (PlanRun.Action): the single-VM actions, for every VM of
// the plan in its boot order.
const (
	PlanTestFailover = "test-failover"
	PlanCleanupTest  = "cleanup-test-failover"
	PlanFailover     = "failover"
	PlanCommit       = "commit"
	PlanReprotect    = "reprotect"
)

// PlanActions are the actions a plan runs.
var PlanActions = []string{PlanTestFailover, PlanCleanupTest, PlanFailover, PlanCommit, PlanReprotect}

// PlanRun starts a plan job (POST /v1/plans/{name}/run).
type PlanRun struct {
	Action string `json:"action"`
	// Point for failover and test-failover (default: latest for a
	// failover, latest-processed for a drill).
	Point string `json:"point,omitempty"`
	// ShutdownSource, for a failover (default true): each VM's source is
	// shut down first and its last write reaches the recovery site.
	ShutdownSource *bool `json:"shutdown_source,omitempty"`
	// Notes for a cleanup.
	Notes string `json:"notes,omitempty"`
}

// Limits of a plan.
const (
	MaxBootGroups   = 7
	MaxPlanVMs      = 64
	MaxGroupActions = 8
)

// CheckPlan validates a plan's shape (the vault checks that its VMs
// exist): a name, 1 to MaxBootGroups groups, each VM once, known wait
// kinds, and each action exactly one of a script (a bare file name) or
// a manual instruction, running in known plan actions.
func CheckPlan(p Plan) error {
	if err := CheckName(KindPlan, p.Name); err != nil {
		return err
	}
	if len(p.Groups) == 0 || len(p.Groups) > MaxBootGroups {
		return fmt.Errorf("%w: plan %s has %d boot groups: want 1 to %d", ErrInvalid, p.Name, len(p.Groups), MaxBootGroups)
	}
	seen := map[string]bool{}
	for i, g := range p.Groups {
		where := fmt.Sprintf("boot group %d", i+1)
		if len(g.VMs) == 0 {
			return fmt.Errorf("%w: %s has no VM", ErrInvalid, where)
		}
		for _, vm := range g.VMs {
			if err := CheckName(KindVM, vm); err != nil {
				return fmt.Errorf("%s: %w", where, err)
			}
			if seen[vm] {
				return fmt.Errorf("%w: VM %s is in the plan twice", ErrInvalid, vm)
			}
			seen[vm] = true
		}
		switch g.Wait.For {
		case "", WaitNone, WaitGuestAgent, WaitService:
		default:
			return fmt.Errorf("%w: %s waits for %q: want %s, %s or %s", ErrInvalid, where, g.Wait.For, WaitGuestAgent, WaitService, WaitNone)
		}
		if g.Wait.Timeout < 0 || g.Wait.Timeout > 24*time.Hour {
			return fmt.Errorf("%w: %s: wait timeout %v out of range (up to 24h)", ErrInvalid, where, g.Wait.Timeout)
		}
		if len(g.Pre) > MaxGroupActions || len(g.Post) > MaxGroupActions {
			return fmt.Errorf("%w: %s has more than %d actions before or after it", ErrInvalid, where, MaxGroupActions)
		}
		for _, a := range slices.Concat(g.Pre, g.Post) {
			if err := checkPlanAction(a); err != nil {
				return fmt.Errorf("%s: %w", where, err)
			}
		}
	}
	if len(seen) > MaxPlanVMs {
		return fmt.Errorf("%w: plan %s has %d VMs: at most %d", ErrInvalid, p.Name, len(seen), MaxPlanVMs)
	}
	return nil
}

func checkPlanAction(a PlanAction) error {
	if (a.Script == "") == (a.Manual == "") {
		return fmt.Errorf("%w: action %q: give either a script or a manual instruction", ErrInvalid, a.Name)
	}
	if a.Script != "" && (strings.ContainsAny(a.Script, "/\\\x00") || a.Script == "." || a.Script == ".." || strings.HasPrefix(a.Script, "-")) {
		return fmt.Errorf("%w: script %q: name a file of the vault's script directory, without a path", ErrInvalid, a.Script)
	}
	if len(a.Manual) > 2000 || len(a.Name) > 200 {
		return fmt.Errorf("%w: action %q: name or instruction too long", ErrInvalid, a.Name)
	}
	if a.Timeout < 0 || a.Timeout > 24*time.Hour {
		return fmt.Errorf("%w: action %q: timeout %v out of range (up to 24h)", ErrInvalid, a.Name, a.Timeout)
	}
	for _, on := range a.On {
		if !slices.Contains(PlanActions, on) {
			return fmt.Errorf("%w: action %q runs on %q: want one of %s", ErrInvalid, a.Name, on, strings.Join(PlanActions, ", "))
		}
	}
	return nil
}

// RunsOn says whether a plan action runs in the plan action act.
func (a PlanAction) RunsOn(act string) bool {
	if len(a.On) == 0 {
		return act == PlanFailover || act == PlanTestFailover
	}
	return slices.Contains(a.On, act)
}
