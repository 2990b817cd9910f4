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
	StateEnabling     = "enabling"
	StateInitialSync  = "initial-sync"
	StateProtected    = "protected"
	StateFailingOver  = "failing-over"
	StateFailedOver   = "failed-over"
	StateCommitted    = "failover-committed"
	StateReprotecting = "reprotecting"
	StateDisabled     = "disabled"
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

// Site is an enrolled site agent.
type Site struct {
	Name      string    `json:"name"`
	Addr      string    `json:"addr"` // the agent's API address
	Enrolled  time.Time `json:"enrolled"`
	LastSeen  time.Time `json:"last_seen"`
	Reachable bool      `json:"reachable"`
	// Networks the site offers (at least one production network with
	// forwarded ports, and an isolated one for drills).
	Networks []Network `json:"networks"`
}

// DiskSpec is one disk of a VM.
type DiskSpec struct {
	Name string `json:"name"`
	Size int64  `json:"size"`
}

// VM is a protected (or protectable) virtual machine.
type VM struct {
	Name      string     `json:"name"`
	Site      string     `json:"site"` // where it runs now
	VCPUs     int        `json:"vcpus"`
	MemoryMiB int        `json:"memory_mib"`
	Disks     []DiskSpec `json:"disks"`
	Kernel    string     `json:"kernel,omitempty"`
	Initrd    string     `json:"initrd,omitempty"`
	Append    string     `json:"append,omitempty"`
	// NICs: the VM's network interfaces and the networks they attach to
	// at its site (default: one, nic0, on the site's first production
	// network).
	NICs []NIC `json:"nics,omitempty"`
	// Forwards maps a host address at each site to GuestPort: keyed
	// "site" (its production network) or "site/network" (any network,
	// e.g. to reach a drill VM): {"east": "127.0.0.1:8080", ...}.
	Forwards  map[string]string `json:"forwards,omitempty"`
	GuestPort int               `json:"guest_port,omitempty"`
	QGA       bool              `json:"qga"`
}

// Policy governs a protection.
type Policy struct {
	Name               string        `json:"name"`
	Retention          time.Duration `json:"retention"`
	CheckpointInterval time.Duration `json:"checkpoint_interval"`
	AppInterval        time.Duration `json:"app_interval"`
	RPOWarning         time.Duration `json:"rpo_warning"`
	RPOCritical        time.Duration `json:"rpo_critical"`
}

// DefaultPolicy is used when a protection names none.
var DefaultPolicy = Policy{Name: "default", Retention: 24 * time.Hour, CheckpointInterval: time.Second,
	AppInterval: time.Hour, RPOWarning: 30 * time.Second, RPOCritical: 5 * time.Minute}

// Protection is a VM replicated from Source to Target.
type Protection struct {
	VM          string `json:"vm"`
	Source      string `json:"source"`
	Target      string `json:"target"`
	State       string `json:"state"`
	Policy      string `json:"policy"`
	Generation  int64  `json:"generation"`
	Job         string `json:"job,omitempty"` // the running job
	TestPending bool   `json:"test_failover_pending"`
	// Failover: the point the VM runs on at the target.
	FailoverSeq uint64  `json:"failover_seq,omitempty"`
	Health      string  `json:"health"`
	RPOSeconds  float64 `json:"rpo_seconds"`
	// The newest recovery points at the recovery site.
	LastPoint    time.Time `json:"last_point,omitzero"`
	LastAppPoint time.Time `json:"last_app_point,omitzero"`
	// Networks maps "site/nic" to the network the NIC attaches to at that
	// site: the source's as the VM has them, the target's as mapped when
	// protection was enabled. Failover and failback attach accordingly.
	Networks map[string]string `json:"networks,omitempty"`
	// TestNetworks is each site's isolated network for drills.
	TestNetworks map[string]string `json:"test_networks,omitempty"`
	// Fenced: the old source site acknowledged the new generation (set
	// once it is reachable again after a failover).
	Fenced bool `json:"fenced,omitempty"`
	// History of drills and failovers.
	History []HistoryEntry `json:"history,omitempty"`
}

// HistoryEntry records a finished drill or failover.
type HistoryEntry struct {
	Action   string    `json:"action"`
	Time     time.Time `json:"time"`
	Duration string    `json:"duration"`
	Notes    string    `json:"notes,omitempty"`
	Point    uint64    `json:"point,omitempty"`
}

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
	JobRunning   = "running"
	JobSucceeded = "succeeded"
	JobFailed    = "failed"
	StepPending  = "pending"
)

// Step is one named step of a job as the user sees it.
type Step struct {
	Name     string    `json:"name"`
	State    string    `json:"state"` // pending, running, succeeded, failed, skipped
	Start    time.Time `json:"start,omitempty"`
	End      time.Time `json:"end,omitempty"`
	Percent  int       `json:"percent"`
	Messages []string  `json:"messages,omitempty"`
}

// Job is a DR action in progress or done.
type Job struct {
	ID         string            `json:"id"`
	Action     string            `json:"action"`
	Protection string            `json:"protection"`
	State      string            `json:"state"`
	Steps      []Step            `json:"steps"`
	Params     map[string]string `json:"params,omitempty"`
	Created    time.Time         `json:"created"`
	Ended      time.Time         `json:"ended,omitempty"`
	Error      string            `json:"error,omitempty"`
	// PrevState is the protection's state when the job began; a job that
	// cannot finish restores it, so no protection is left stuck.
	PrevState string `json:"prev_state"`
}
