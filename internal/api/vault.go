package api

import (
	"fmt"
	"strings"
	"time"
)

// This file: what the vault's API takes and answers (docs/api.md).

// ProtectionState is where a protection is in the DR lifecycle.
type ProtectionState string

// Protection states.
const (
	StateEnabling     ProtectionState = "enabling"
	StateInitialSync  ProtectionState = "initial-sync"
	StateProtected    ProtectionState = "protected"
	StateFailingOver  ProtectionState = "failing-over"
	StateFailedOver   ProtectionState = "failed-over"
	StateCommitted    ProtectionState = "failover-committed"
	StateReprotecting ProtectionState = "reprotecting"
	StateDisabled     ProtectionState = "disabled"
)

// Health of a protection: from its RPO against the policy's thresholds
// and from its sites' reachability.
type Health string

// Health values.
const (
	Healthy  Health = "healthy"
	Warning  Health = "warning"
	Critical Health = "critical"
)

// JobState is where a job (or one of its steps) is.
type JobState string

// Job and step states.
const (
	JobPending   JobState = "pending"
	JobRunning   JobState = "running"
	JobSucceeded JobState = "succeeded"
	JobFailed    JobState = "failed"
	JobSkipped   JobState = "skipped" // steps only
	// JobWaiting: a plan job (and its step) waits for an operator to
	// confirm a manual action (POST /v1/jobs/{id}/resume).
	JobWaiting JobState = "waiting"
)

// NetworkKind is what a site's network is for.
type NetworkKind string

// Network kinds.
const (
	// NetworkProduction: NAT to the outside, the VMs' published ports
	// forwarded from the site's host addresses.
	NetworkProduction NetworkKind = "production"
	// NetworkIsolated: no route out of the network; DR drills run here so
	// a test VM cannot reach, or be mistaken for, the production VM.
	NetworkIsolated NetworkKind = "isolated"
)

// Network is a network a site offers to VMs.
type Network struct {
	Name string      `json:"name"`
	Kind NetworkKind `json:"kind"`
	// Subnet is the IPv4 network (CIDR) the guests get addresses from.
	Subnet string `json:"subnet"`
	// Libvirt, at a libvirt site, is what this network is on the host:
	// "network:NAME" (a libvirt network) or "bridge:NAME" (a host
	// bridge). VMs attached to it get their NICs there (a domain
	// imported from libvirt keeps its MACs) instead of ferry's user-mode
	// NIC. Empty: ferry's user-mode networking.
	Libvirt string `json:"libvirt,omitempty"`
}

// ErrAttachment: a libvirt attachment that is not network:NAME or
// bridge:NAME.
var ErrAttachment = fmt.Errorf("%w: libvirt attachment", ErrInvalid)

// CheckAttachment validates a Network.Libvirt value.
func CheckAttachment(s string) error {
	kind, name, ok := strings.Cut(s, ":")
	if !ok || (kind != "network" && kind != "bridge") || name == "" || len(name) > 64 ||
		strings.ContainsFunc(name, func(r rune) bool {
			return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.')
		}) {
		return fmt.Errorf("%w %q: want network:NAME or bridge:NAME (letters, digits, - _ .)", ErrAttachment, s)
	}
	return nil
}

// NIC is a VM's network interface, attached at the VM's site to Network.
type NIC struct {
	Name    string `json:"name"`
	Network string `json:"network"`
}

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

// AddSite registers a site (POST /v1/sites).
type AddSite struct {
	Name string `json:"name"`
	Addr string `json:"addr"`
	// Readdress allows changing the address of an existing site.
	Readdress bool `json:"readdress"`
}

// Enroll is a site agent's enrollment (POST /v1/enroll).
type Enroll struct {
	Token string `json:"token"`
	Name  string `json:"name"`
	Addr  string `json:"addr"`
}

// VMDisk is one disk of a VM.
type VMDisk struct {
	Name string `json:"name"`
	Size int64  `json:"size"`
}

// VM is a protected (or protectable) virtual machine.
type VM struct {
	Name      string   `json:"name"`
	Site      string   `json:"site"` // where it runs now
	VCPUs     int      `json:"vcpus"`
	MemoryMiB int      `json:"memory_mib"`
	Disks     []VMDisk `json:"disks"`
	Kernel    string   `json:"kernel,omitempty"`
	Initrd    string   `json:"initrd,omitempty"`
	Append    string   `json:"append,omitempty"`
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
	// ShutdownTimeout bounds a graceful shutdown of the VM (a planned
	// failover, a reprotect, vm stop): the guest agent's guest-shutdown,
	// then the ACPI button, then quit (0: 60 s).
	ShutdownTimeout time.Duration `json:"shutdown_timeout,omitempty"`
	// Running: started by an operator (ferry vm start) and not stopped
	// since. The vault starts such a VM again where it runs on its group
	// when it is missing there: its site's agent restarted, and a VM's
	// QEMU does not outlive its agent. Set by the vault only.
	Running bool `json:"running,omitempty"`
	// Firmware is "bios" (SeaBIOS, the default) or "uefi" (OVMF).
	Firmware string `json:"firmware,omitempty"`
	// Domain is the libvirt domain definition a VM imported from libvirt
	// runs with (ferry vm import --libvirt); empty for VMs ferry defines.
	Domain string `json:"domain,omitempty"`
	// Members makes this a multi-VM consistency group (ferry group
	// create): up to 16 VMs whose disks are one group at the site, named
	// MEMBER-DISK, with one journal and one sequence of points, so every
	// recovery point is crash-consistent across all of them and an
	// application-consistent point freezes them all. The group is
	// protected, drilled, failed over, committed and reprotected as one,
	// at one point; each member runs as its own VM (its name, its NICs
	// on its networks). Disks then lists the group's disks (set by the
	// vault).
	Members []VM `json:"members,omitempty"`
}

// VaultImport asks the vault to import a libvirt domain at a site
// (POST /v1/imports).
type VaultImport struct {
	Site   string `json:"site"`
	Domain string `json:"domain"`
	// Forwards and GuestPort, as for a VM ferry defines (VM.Forwards).
	Forwards  map[string]string `json:"forwards,omitempty"`
	GuestPort int               `json:"guest_port,omitempty"`
}

// Policy governs a protection.
type Policy struct {
	Name               string        `json:"name"`
	Retention          time.Duration `json:"retention"`
	CheckpointInterval time.Duration `json:"checkpoint_interval"`
	AppInterval        time.Duration `json:"app_interval"`
	RPOWarning         time.Duration `json:"rpo_warning"`
	RPOCritical        time.Duration `json:"rpo_critical"`
	// Ransomware tunes the detector at the recovery site (zero fields:
	// the defaults).
	Ransomware RansomwarePolicy `json:"ransomware,omitzero"`
}

// Protection is a VM replicated from Source to Target.
type Protection struct {
	VM          string          `json:"vm"`
	Source      string          `json:"source"`
	Target      string          `json:"target"`
	State       ProtectionState `json:"state"`
	Policy      string          `json:"policy"`
	Generation  int64           `json:"generation"`
	Job         string          `json:"job,omitempty"` // the running job
	TestPending bool            `json:"test_failover_pending"`
	// Failover: the point the VM runs on at the target.
	FailoverSeq uint64 `json:"failover_seq,omitempty"`
	Health      Health `json:"health"`
	// HealthReason says why health is not healthy.
	HealthReason string  `json:"health_reason,omitempty"`
	RPOSeconds   float64 `json:"rpo_seconds"`
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
	// Link is the replication stream as its source last reported it
	// (throughput, bytes before and after compression, backlog, cap).
	Link *ReplicationStatus `json:"link,omitempty"`
	// Ransomware is the recovery site's open incident: low-entropy data
	// overwritten with high-entropy data, fast. Its LastClean is the
	// point "last-clean" names.
	Ransomware *EntropyIncident `json:"ransomware,omitempty"`
}

// HistoryEntry records a finished drill or failover.
type HistoryEntry struct {
	Action   string    `json:"action"`
	Time     time.Time `json:"time"`
	Duration string    `json:"duration"`
	Notes    string    `json:"notes,omitempty"`
	Point    uint64    `json:"point,omitempty"`
}

// Step is one named step of a job as the user sees it.
type Step struct {
	Name     string    `json:"name"`
	State    JobState  `json:"state"`
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
	State      JobState          `json:"state"`
	Steps      []Step            `json:"steps"`
	Params     map[string]string `json:"params,omitempty"`
	Created    time.Time         `json:"created"`
	Ended      time.Time         `json:"ended,omitempty"`
	Error      string            `json:"error,omitempty"`
	// PrevState is the protection's state when the job began; a job that
	// cannot finish restores it, so no protection is left stuck.
	PrevState ProtectionState `json:"prev_state"`
	// Plan names the recovery plan of a plan job (Protection is empty).
	Plan string `json:"plan,omitempty"`
	// Vault is the address of the vault that ran the job, and Epoch the
	// fencing token of its leadership then (0: a lone vault): where
	// vaults share etcd, the job history shows which leader acted.
	Vault string `json:"vault,omitempty"`
	Epoch int64  `json:"epoch,omitempty"`
}

// EnableRequest asks to protect a VM (POST /v1/protections).
type EnableRequest struct {
	VM     string `json:"vm"`
	Target string `json:"target"` // the recovery site
	Policy string `json:"policy"` // default: "default"
	// Networks maps the VM's NICs to networks at the recovery site for a
	// failover (default: its first production network).
	Networks map[string]string `json:"networks,omitempty"`
	// TestNetwork is the recovery site's isolated network for drills
	// (default: its first isolated network).
	TestNetwork string `json:"test_network,omitempty"`
}

// PointRequest names a recovery point: latest, latest-processed,
// latest-app-consistent, a point's sequence number or an RFC 3339 time
// (test failover, change recovery point).
type PointRequest struct {
	Point string `json:"point"`
}

// FailoverRequest asks for a failover (POST
// /v1/protections/{vm}/failover).
type FailoverRequest struct {
	Point string `json:"point"`
	// ShutdownSource (default true) shuts the source VM down first and
	// waits until its last write reached the recovery site.
	ShutdownSource *bool `json:"shutdown_source"`
	// ShutdownTimeout bounds that shutdown (0: the VM's, else 60 s).
	ShutdownTimeout time.Duration `json:"shutdown_timeout,omitempty"`
}

// CleanupRequest ends a DR drill.
type CleanupRequest struct {
	Notes string `json:"notes"`
}

// ReprotectPlan says what a reprotect will reuse and create at the site
// that becomes the recovery site.
type ReprotectPlan struct {
	From  string     `json:"from"` // the new source (where the VM runs)
	To    string     `json:"to"`   // the new recovery site
	Disks []PlanItem `json:"disks"`
	VM    PlanItem   `json:"vm"`
	// MaxBytes is the most a reprotect sends (the disks' size); reused
	// disks send only the blocks that differ.
	MaxBytes int64 `json:"max_bytes"`
	// Method is how the differences are found: "changed-block tracking"
	// (the journals and bitmaps kept since the failover point), "checksum
	// compare" (every chunk is read at both sites), or "full copy".
	Method string `json:"method"`
	// ExpectedBytes is what the reprotect will send: exact for changed-block
	// tracking (plus what the VM writes until it starts), at most MaxBytes
	// otherwise.
	ExpectedBytes int64 `json:"expected_bytes"`
	// Why says why changed-block tracking cannot be used, if it cannot.
	Why string `json:"why,omitempty"`
}

// PlanItem is one thing reused or created.
type PlanItem struct {
	Name   string `json:"name"`
	Size   int64  `json:"size,omitempty"`
	Action string `json:"action"` // "reuse" or "create (new)"
}

// Alert is a condition that needs an operator now (GET /v1/alerts): a
// site that does not answer, a protection that is not healthy (RPO over
// its policy's thresholds, replication stopped, damaged disks).
type Alert struct {
	// Object is what it is about: "site/NAME" or "protection/VM".
	Object   string `json:"object"`
	Severity string `json:"severity"` // "warning" or "critical"
	// Since is when it was raised (as the vault's event log has it).
	Since   time.Time `json:"since"`
	Message string    `json:"message"`
	// Action says what to do about it.
	Action string `json:"action"`
}

// Event is something that happened (GET /v1/events): an alert raised or
// cleared, a job that ended.
type Event struct {
	ID       string    `json:"id"` // time-ordered
	Time     time.Time `json:"time"`
	Severity string    `json:"severity"` // "info", "warning" or "critical"
	Object   string    `json:"object"`   // "site/NAME", "protection/VM", "job/ID"
	// Kind: "raised" and "cleared" (an alert), "job-failed",
	// "job-succeeded".
	Kind    string `json:"kind"`
	Message string `json:"message"`
	Action  string `json:"action,omitempty"`
}

// RPOSample is one 10 s slot of a protection's replication: the worst
// RPO in it, and the last throughput, bytes pending and source journal
// size the vault saw.
type RPOSample struct {
	T          time.Time `json:"t"`
	RPO        float64   `json:"rpo"`
	Throughput float64   `json:"throughput_bytes_per_second,omitempty"`
	Pending    int64     `json:"pending_bytes,omitempty"`
	Journal    int64     `json:"journal_bytes,omitempty"`
	// LowToHigh is the recovery site's count, since the replica began,
	// of low-entropy bytes overwritten with high-entropy data (the
	// ransomware detector); its growth from slot to slot is the series.
	LowToHigh int64 `json:"low_to_high_bytes,omitempty"`
}

// Whoami answers GET /v1/whoami.
type Whoami struct {
	Role string `json:"role"`
}

// TokenRequest asks for a new token (POST /v1/tokens).
type TokenRequest struct {
	Role string `json:"role"`
	Name string `json:"name"`
	// TTL, if not empty, is how long the token lives (a Go duration such
	// as "24h").
	TTL string `json:"ttl,omitempty"`
	// Reenroll (enroll tokens only) names an existing site the token may
	// re-enroll at a new address.
	Reenroll string `json:"reenroll,omitempty"`
}

// TokenInfo describes a token without its secret: ID (the start of its
// hash) is what revoking takes.
type TokenInfo struct {
	ID       string    `json:"id"`
	Role     string    `json:"role"`
	Name     string    `json:"name"`
	Created  time.Time `json:"created"`
	Expires  time.Time `json:"expires,omitzero"`
	Reenroll string    `json:"reenroll,omitempty"`
}

// NewToken answers POST /v1/tokens: the token, shown only now.
type NewToken struct {
	Token string `json:"token"`
	TokenInfo
}

// DisableRequest stops protecting a VM (POST
// /v1/protections/{vm}/disable).
type DisableRequest struct {
	// KeepReplica keeps the replica and its points at the recovery site
	// (default: deleted).
	KeepReplica bool `json:"keep_replica"`
}

// BandwidthCaps are the installation's replication caps (GET
// /v1/bandwidth): per site pair (everything From streams to To) and per
// protected VM. A stream honours both. The vault hands each source site
// its part (PUT /v1/bandwidth on the agent).
type BandwidthCaps struct {
	Pairs []BandwidthPair           `json:"pairs,omitempty"`
	VMs   map[string]BandwidthLimit `json:"vms,omitempty"`
}

// BandwidthPair is the cap of one direction between two sites.
type BandwidthPair struct {
	From  string         `json:"from"`
	To    string         `json:"to"`
	Limit BandwidthLimit `json:"limit"`
}
