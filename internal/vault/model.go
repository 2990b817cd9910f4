// Package vault is ferry's control plane: sites, VMs, policies,
// protections and jobs, kept in a store.Store and exposed as a JSON API.
// Every DR action (enable replication, test failover, failover, change
// recovery point, commit) is a job with named steps persisted as they run;
// a protection moves through a state machine whose forbidden moves get an
// error that says what state it is in and what to do.
package vault

import (
	"fmt"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
)

// Protection states.
const (
	StateEnabling     = api.StateEnabling
	StateInitialSync  = api.StateInitialSync
	StateProtected    = api.StateProtected
	StateFailingOver  = api.StateFailingOver
	StateFailedOver   = api.StateFailedOver
	StateCommitted    = api.StateCommitted
	StateReprotecting = api.StateReprotecting
	StateDisabled     = api.StateDisabled
)

// Actions on a protection.
const (
	ActEnable       = "enable-replication"
	ActTestFailover = "test-failover"
	ActCleanupTest  = "cleanup-test-failover"
	ActFailover     = "failover"
	ActChangePoint  = "change-recovery-point"
	ActCommit       = "commit"
	ActReprotect    = "reprotect"
	ActDisable      = "disable-replication"
)

// Errors. Each is, or wraps, the api sentinel that gives its status code.
var (
	ErrNotFound  = api.ErrNotFound
	ErrForbidden = api.Kind("forbidden move", api.ErrConflict)
	ErrBusy      = api.Kind("a job is running", api.ErrConflict)
	ErrInvalid   = api.ErrInvalid
	ErrAuth      = api.ErrUnauthorized
	ErrRole      = api.Kind("not allowed for this role", api.ErrForbidden)
)

// DiskSpec is one disk of a VM.
type DiskSpec = api.VMDisk

// VM is a protected (or protectable) virtual machine.
type VM = api.VM

// Policy governs a protection.
type Policy = api.Policy

// DefaultPolicy is used when a protection names none.
var DefaultPolicy = Policy{Name: "default", Retention: 24 * time.Hour, CheckpointInterval: time.Second,
	AppInterval: time.Hour, RPOWarning: 30 * time.Second, RPOCritical: 5 * time.Minute}

// Protection is a VM replicated from Source to Target.
type Protection = api.Protection

// HistoryEntry records a finished drill or failover.
type HistoryEntry = api.HistoryEntry

// guard says whether action may start on p, and if not, why and what to do.
func guard(p *Protection, action string) error {
	if p.Job != "" {
		return fmt.Errorf("%w: job %s is running on %s; wait for it (ferry job show %s)", ErrBusy, p.Job, p.VM, p.Job)
	}
	bad := func(what string) error {
		return fmt.Errorf("%w: %s is %s%s; %s", ErrForbidden, p.VM, p.State, pending(p), what)
	}
	switch action {
	case ActEnable:
		if p.State != StateEnabling {
			return bad("it is already protected")
		}
	case ActTestFailover:
		if p.State != StateProtected {
			return bad("a test failover needs a protected VM")
		}
		if p.TestPending {
			return bad("clean up the pending test failover first (ferry test-failover cleanup)")
		}
	case ActCleanupTest:
		if !p.TestPending {
			return bad("there is no test failover to clean up")
		}
	case ActFailover:
		if p.State != StateProtected {
			if p.State == StateInitialSync || p.State == StateEnabling {
				return bad("wait for the initial replication to finish")
			}
			return bad("only a protected VM can fail over")
		}
		if p.TestPending {
			return bad("clean up the test failover first")
		}
	case ActChangePoint, ActCommit:
		if p.State != StateFailedOver {
			if p.State == StateCommitted {
				return bad("the failover is committed: its recovery points are gone")
			}
			return bad("fail over first")
		}
	case ActReprotect:
		if p.State != StateCommitted {
			return bad("commit the failover first (ferry commit)")
		}
	case ActDisable:
		switch {
		case p.TestPending:
			return bad("clean up the test failover first")
		case p.State == StateDisabled:
			return bad("it is not protected")
		case p.State != StateProtected && p.State != StateInitialSync && p.State != StateEnabling:
			return bad("finish the failover first (commit, then reprotect or fail back)")
		}
	default:
		return fmt.Errorf("%w: unknown action %q", ErrInvalid, action)
	}
	return nil
}

func pending(p *Protection) string {
	if p.TestPending {
		return " (test failover pending cleanup)"
	}
	return ""
}

// Job states and step states.
const (
	JobRunning   = api.JobRunning
	JobWaiting   = api.JobWaiting
	JobSkipped   = api.JobSkipped
	JobSucceeded = api.JobSucceeded
	JobFailed    = api.JobFailed
	StepPending  = api.JobPending
	StepSkipped  = api.JobSkipped
)

// Step is one named step of a job as the user sees it.
type Step = api.Step

// Job is a DR action in progress or done.
type Job = api.Job
