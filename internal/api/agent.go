package api

import (
	"encoding/json"
	"net/netip"
	"time"
)

// This file: what a site agent's API takes and answers
// (docs/agent-api.md). The data-plane packages alias these types
// (disk.Spec = api.DiskSpec, ...), so one definition serves both ends.

// DiskSpec is one disk of a consistency group: its id inside the group's
// journal, its name and its size in bytes.
type DiskSpec struct {
	ID   uint16 `json:"id"`
	Name string `json:"name"`
	Size int64  `json:"size"`
}

// PointType says what a recovery point is.
type PointType string

// Point types.
const (
	PointCrash PointType = "crash" // a periodic crash-consistent checkpoint
	PointApp   PointType = "app"   // application-consistent: the guest was quiesced
	PointNamed PointType = "named" // asked for by name (a failover, an operator)
	// PointResyncDone marks the end of a resynchronization: the replica
	// is consistent again from here.
	PointResyncDone PointType = "resync-done"
)

// Point is a recovery point in a replica's catalog.
type Point struct {
	Seq   uint64    `json:"seq"`
	Time  time.Time `json:"time"`
	Type  PointType `json:"type"`
	Label string    `json:"label,omitempty"`
}

// Marker is the payload of a recovery-point marker entry, written by the
// source agent into its journal so that every disk of the group shares it;
// POST /v1/groups/{name}/points takes one.
type Marker struct {
	Type  PointType `json:"type"`
	Label string    `json:"label,omitempty"`
}

// Encode returns the marker's journal payload.
func (m Marker) Encode() []byte {
	b, _ := json.Marshal(m)
	return b
}

// ReplicaStatus is a replica's state at the recovery site.
type ReplicaStatus struct {
	Group         string     `json:"group"`
	Disks         []DiskSpec `json:"disks"`
	BaseSeq       uint64     `json:"base_seq"`
	ConsistentSeq uint64     `json:"consistent_seq"`
	LastSeq       uint64     `json:"last_seq"`
	LastTime      time.Time  `json:"last_time"`
	FoldedSeq     uint64     `json:"folded_seq"`
	Points        int        `json:"points"`
	JournalBytes  int64      `json:"journal_bytes"`
	// The newest crash-consistent and application-consistent points.
	LastPoint    time.Time `json:"last_point,omitzero"`
	LastAppPoint time.Time `json:"last_app_point,omitzero"`
	// Entropy is the ransomware detector's view of the write stream.
	Entropy *EntropyStatus `json:"entropy,omitempty"`
}

// RansomwarePolicy tunes a protection's ransomware detector (part of its
// policy; zero fields take the defaults). An incident is raised when, in
// one Window, at least MinBytes of low-entropy blocks were overwritten
// with high-entropy data, and that is more than Factor times the most any
// earlier window of the protection's history (7 days) saw.
type RansomwarePolicy struct {
	Disabled bool          `json:"disabled,omitempty"`
	MinBytes int64         `json:"min_bytes,omitempty"`
	Factor   float64       `json:"factor,omitempty"`
	Window   time.Duration `json:"window,omitempty"`
}

// Ransomware detector defaults.
const (
	DefaultRansomwareMinBytes = 4 << 20
	DefaultRansomwareFactor   = 4
	DefaultRansomwareWindow   = 10 * time.Second
)

// WithDefaults fills the zero fields.
func (p RansomwarePolicy) WithDefaults() RansomwarePolicy {
	if p.MinBytes <= 0 {
		p.MinBytes = DefaultRansomwareMinBytes
	}
	if p.Factor <= 0 {
		p.Factor = DefaultRansomwareFactor
	}
	if p.Window <= 0 {
		p.Window = DefaultRansomwareWindow
	}
	return p
}

// EntropyStatus is what a recovery site's detector reports for a replica.
type EntropyStatus struct {
	Policy RansomwarePolicy `json:"policy"`
	// WindowBytes: low-to-high overwrites in the newest window;
	// BaselineBytes: the most in any window of the history.
	WindowBytes   int64 `json:"window_bytes"`
	BaselineBytes int64 `json:"baseline_bytes"`
	// HistorySeconds: how much history the baseline has learnt from.
	HistorySeconds int64 `json:"history_seconds"`
	// Totals since the replica was created: bytes classified, written
	// high-entropy, and low-entropy blocks overwritten with high.
	ClassifiedBytes int64 `json:"classified_bytes"`
	HighBytes       int64 `json:"high_bytes"`
	LowToHighBytes  int64 `json:"low_to_high_bytes"`
	// Incident is the open incident, until dismissed.
	Incident *EntropyIncident `json:"incident,omitempty"`
}

// EntropyIncident is a suspected encryption in place.
type EntropyIncident struct {
	Detected time.Time `json:"detected"`
	// Start and FirstSeq: the first write of the jump (the source's
	// time of it).
	Start    time.Time `json:"start"`
	FirstSeq uint64    `json:"first_seq"`
	// PeakBytes: the most low-to-high overwrites in one window since;
	// BaselineBytes: the history's most when it was raised.
	PeakBytes     int64 `json:"peak_bytes"`
	BaselineBytes int64 `json:"baseline_bytes"`
	// LastClean is the newest recovery point before FirstSeq, if the
	// replica still has one.
	LastClean *Point `json:"last_clean,omitempty"`
}

// ReplicationState is where a group's shipper is.
type ReplicationState string

// Replication states.
const (
	ReplConnecting   ReplicationState = "connecting"
	ReplInitialSync  ReplicationState = "initial-sync"
	ReplStreaming    ReplicationState = "streaming"
	ReplDisconnected ReplicationState = "disconnected"
	// ReplResync: resending the blocks that changed while the journal
	// could not hold the writes (the dirty-block bitmap), then streaming.
	ReplResync  ReplicationState = "resynchronizing"
	ReplStopped ReplicationState = "stopped"
)

// ReplicationStatus is a source group's replication.
type ReplicationStatus struct {
	State         ReplicationState `json:"state"`
	LastSeq       uint64           `json:"last_seq"`  // newest entry at the source
	AckedSeq      uint64           `json:"acked_seq"` // newest entry durable at the recovery site
	PendingBytes  int64            `json:"pending_bytes"`
	RPO           float64          `json:"rpo_seconds"`
	SentBytes     int64            `json:"sent_bytes"`
	ThroughputBps float64          `json:"throughput_bytes_per_second"`
	// PayloadBytes and WireBytes count what the link carried, framed:
	// before and after compression.
	PayloadBytes int64 `json:"payload_bytes"`
	WireBytes    int64 `json:"wire_bytes"`
	// BacklogBytes is what the recovery site does not hold yet (journal
	// not acknowledged, initial copy and resync left); ClearsInSeconds
	// estimates when it is gone at the current pace: 0 none, -1 it does
	// not shrink (churn above what the link carries).
	BacklogBytes    int64   `json:"backlog_bytes"`
	ClearsInSeconds float64 `json:"clears_in_seconds"`
	// CapBitsPerSecond is the bandwidth cap in force for this stream now
	// (the lower of its site pair's and its own; 0: none).
	CapBitsPerSecond int64 `json:"cap_bits_per_second,omitempty"`
	// LinkBitsPerSecond is the estimated rate of the link (TCP's delivery
	// rate, bounded by the cap; 0: unknown), and Compressing whether the
	// stream now compresses: it does while the link is slower than the
	// compressor gains (docs/architecture.md, "Compression").
	LinkBitsPerSecond int64 `json:"link_bits_per_second,omitempty"`
	Compressing       bool  `json:"compressing,omitempty"`
	// Initial copy progress.
	CopyDone   int64  `json:"copy_done_bytes,omitempty"`
	CopyTotal  int64  `json:"copy_total_bytes,omitempty"`
	LastError  string `json:"last_error,omitempty"`
	Reconnects int    `json:"reconnects"`
	// Dirty-block tracking and resynchronization.
	BitmapMode  bool  `json:"bitmap_mode,omitempty"`
	ResyncDone  int64 `json:"resync_done_bytes,omitempty"`
	ResyncTotal int64 `json:"resync_total_bytes,omitempty"`
}

// VMState is where a VM is.
type VMState string

// VM states.
const (
	VMStarting VMState = "starting"
	VMRunning  VMState = "running"
	VMPaused   VMState = "paused"
	VMStopping VMState = "stopping"
	VMStopped  VMState = "stopped" // powered off or stopped on request
	VMCrashed  VMState = "crashed" // QEMU exited on its own without a guest power-off
)

// VMStatus is a VM's state as its site reports it.
type VMStatus struct {
	Name    string  `json:"name"`
	State   VMState `json:"state"`
	Accel   string  `json:"accel"`
	PID     int     `json:"pid"`
	Reason  string  `json:"reason,omitempty"` // why it crashed
	Console string  `json:"console"`
	// Replica and Point: a VM on writable views of a replica (a drill, a
	// failover not yet committed) runs from this recovery point.
	Replica string `json:"replica,omitempty"`
	Point   uint64 `json:"point,omitempty"`
}

// Boot says how a VM boots: from a kernel and initrd, or from its first
// disk (Kernel empty).
type Boot struct {
	Kernel string `json:"kernel,omitempty"`
	Initrd string `json:"initrd,omitempty"`
	Append string `json:"append,omitempty"`
}

// Forward forwards a host TCP address to a guest port. The host address
// is typed: in JSON it is "127.0.0.1:8080", and anything that does not
// parse as an address and a port is refused when decoded.
type Forward struct {
	Host      netip.AddrPort `json:"host"`
	GuestPort int            `json:"guest_port"`
}

// NetMode is how a VM's NIC is attached.
type NetMode string

// Network modes.
const (
	NetNone     NetMode = "none"
	NetUser     NetMode = "user"     // user-mode NAT with forwards
	NetIsolated NetMode = "isolated" // no route out; only the forwards reach it
)

// VMRequest starts a VM at a site (POST /v1/vms).
type VMRequest struct {
	Name  string `json:"name"`
	Group string `json:"group,omitempty"`
	// Replica and Seq run the VM at the recovery site instead, on writable
	// views of every disk of the replica at sequence Seq (0: the newest
	// point): a test failover or a failover. The VM's writes stay in the
	// views' overlays until committed.
	Replica string `json:"replica,omitempty"`
	Seq     uint64 `json:"seq,omitempty"`
	// Disks are the group's (or replica's) disks this VM attaches, in
	// order; empty: all of them. Several VMs share one consistency group
	// by each attaching its own disks; they all run at one point.
	Disks     []string  `json:"disks,omitempty"`
	VCPUs     int       `json:"vcpus"`
	MemoryMiB int       `json:"memory_mib"`
	Boot      Boot      `json:"boot"`
	Net       NetMode   `json:"net"`
	Subnet    string    `json:"subnet,omitempty"` // the attached network's IPv4 CIDR
	Forwards  []Forward `json:"forwards,omitempty"`
	QGA       bool      `json:"qga"`
	Accel     string    `json:"accel,omitempty"`
	// Domain, for a VM imported from libvirt, is its libvirt domain
	// definition (XML): a libvirt site runs it as defined, with its disks
	// on the request's and, on an isolated network, its NICs replaced.
	Domain string `json:"domain,omitempty"`
	// Firmware: "bios" (default) or "uefi".
	Firmware string `json:"firmware,omitempty"`
	// Attach, at a libvirt site, is where the VM's NICs go
	// (Network.Libvirt: network:NAME or bridge:NAME) instead of ferry's
	// user-mode networking.
	Attach string `json:"attach,omitempty"`
	// NICs are the VM's NICs in the order the guest sees them, each on
	// its own network. Empty: one NIC, as Net, Subnet, Forwards and
	// Attach say (a request from a vault before several NICs; the vault
	// still fills those from the first NIC for an agent before them).
	NICs []NICRequest `json:"nics,omitempty"`
}

// NICRequest is one NIC of a VM a site starts (VMRequest.NICs).
type NICRequest struct {
	Name   string  `json:"name"`
	Net    NetMode `json:"net"`
	Subnet string  `json:"subnet,omitempty"` // the network's IPv4 CIDR
	// Attach: a libvirt network or bridge (Network.Libvirt), at a
	// libvirt site, instead of ferry's user-mode networking.
	Attach   string    `json:"attach,omitempty"`
	Forwards []Forward `json:"forwards,omitempty"`
}

// Interfaces returns the request's NICs: NICs, or the one NIC its
// single-NIC fields describe (none if Net is none and nothing attaches).
func (r VMRequest) Interfaces() []NICRequest {
	if len(r.NICs) > 0 {
		return r.NICs
	}
	if r.Attach == "" && (r.Net == "" || r.Net == NetNone) {
		return nil
	}
	return []NICRequest{{Name: "nic0", Net: r.Net, Subnet: r.Subnet, Attach: r.Attach, Forwards: r.Forwards}}
}

// ImportRequest asks a libvirt site's agent to import a domain offline
// (POST /v1/imports): its disks are copied into a new group of the same
// name, and the domain's disks switched to the group's exports.
type ImportRequest struct {
	Domain string `json:"domain"`
}

// DomainInfo is a libvirt domain a site has that ferry does not run yet
// (GET /v1/domains): what importing it would take, or why it cannot.
type DomainInfo struct {
	Name       string         `json:"name"`
	Running    bool           `json:"running"`
	VCPUs      int            `json:"vcpus,omitempty"`
	MemoryMiB  int            `json:"memory_mib,omitempty"`
	Firmware   string         `json:"firmware,omitempty"`
	Disks      []ImportedDisk `json:"disks,omitempty"`
	NICs       int            `json:"nics"`
	Importable bool           `json:"importable"`
	Reason     string         `json:"reason,omitempty"` // why it cannot be imported
}

// ImportedDisk is one disk of an imported domain.
type ImportedDisk struct {
	Name   string `json:"name"`   // the group's disk: the domain's target (vda, sdb)
	Source string `json:"source"` // the file or block device it was copied from
	Format string `json:"format"` // raw, qcow2, ...
	Size   int64  `json:"size"`   // virtual size in bytes
	// Copied is the bytes of data the group holds after the copy: holes
	// and zero blocks of the source are not written (Size - Copied).
	Copied int64 `json:"copied"`
}

// ImportResult describes an imported domain.
type ImportResult struct {
	Domain    string         `json:"domain"`
	VCPUs     int            `json:"vcpus"`
	MemoryMiB int            `json:"memory_mib"`
	Disks     []ImportedDisk `json:"disks"`
	// QGA: the domain has a guest agent channel.
	QGA bool `json:"qga"`
	// Firmware is "uefi" for a domain that boots with UEFI (its NVRAM,
	// if it has one yet, is copied as the disk EFIVarsDisk), else "bios".
	Firmware string `json:"firmware,omitempty"`
	// NICs: the domain's NICs that ferry keeps, in order (on a libvirt
	// network, a bridge or user-mode networking).
	NICs []ImportedNIC `json:"nics,omitempty"`
	// Live: the domain ran through the import (a block copy and a
	// pivot); it runs on ferry's disks now.
	Live bool `json:"live,omitempty"`
	// Original is the domain's definition before the import, restored by
	// a release; Definition is the one it runs with, disks on ferry.
	Original   string  `json:"original"`
	Definition string  `json:"definition"`
	Seconds    float64 `json:"seconds"`
}

// EFIVarsDisk names the disk of a UEFI VM that holds its UEFI variable
// store (boot entries, Secure Boot keys) instead of a block device of the
// guest: the firmware's NVRAM, replicated with the VM's disks, so that a
// failed-over VM boots as it did. EFIVarsSize is its size for the OVMF
// that ferry runs (Debian's 4 MiB build).
const (
	EFIVarsDisk = "efivars"
	EFIVarsSize = 540672
)

// ImportedNIC is one NIC of an imported domain.
type ImportedNIC struct {
	MAC string `json:"mac,omitempty"`
	// Attach is where it is on the host: "network:NAME", "bridge:NAME"
	// (as Network.Libvirt), or empty for user-mode networking.
	Attach string `json:"attach,omitempty"`
}

// ImportState is where an import is.
type ImportState string

// Import states.
const (
	ImportCopying ImportState = "copying"
	ImportDone    ImportState = "done"
	ImportFailed  ImportState = "failed"
)

// ImportStatus is an import's progress (GET /v1/imports/{domain}).
type ImportStatus struct {
	Domain     string        `json:"domain"`
	State      ImportState   `json:"state"`
	DoneBytes  int64         `json:"done_bytes"`
	TotalBytes int64         `json:"total_bytes"`
	Error      string        `json:"error,omitempty"`
	Result     *ImportResult `json:"result,omitempty"`
}

// StopOptions says how a VM is stopped (DELETE /v1/vms/{name}?force=1&timeout=30s).
type StopOptions struct {
	// Force stops it at once (quit), for a VM whose writes are discarded.
	Force bool
	// Timeout bounds a graceful stop: the guest agent's guest-shutdown,
	// then the ACPI button, then quit once it has passed (0: 60 s).
	Timeout time.Duration
}

// DefaultStopTimeout bounds a graceful stop when none is given.
const DefaultStopTimeout = 60 * time.Second

// Steps are what a long agent operation did, for the job's messages
// (DELETE /v1/vms/{name}, POST /v1/vms/{name}/commit).
type Steps struct {
	Steps []string `json:"steps"`
}

// Console is a piece of a VM's serial console (GET
// /v1/vms/{name}/console?offset=N): Data from the offset asked, and the
// offset to ask next.
type Console struct {
	Data string `json:"data"`
	Next int64  `json:"next"`
	Site string `json:"site,omitempty"` // set by the vault
}

// AppPointStatus is the outcome of an application-consistent point.
type AppPointStatus struct {
	Seq       uint64    `json:"seq,omitempty"`
	Time      time.Time `json:"time"`
	FreezeMS  float64   `json:"freeze_ms,omitempty"`
	Error     string    `json:"error,omitempty"`
	Succeeded bool      `json:"succeeded"`
}

// MarkResult answers a named point (POST /v1/groups/{name}/points).
type MarkResult struct {
	Seq uint64 `json:"seq"`
}

// GroupStatus is a consistency group at its site.
type GroupStatus struct {
	Name    string     `json:"name"`
	Disks   []DiskSpec `json:"disks"`
	Exports []string   `json:"exports"`
	LastSeq uint64     `json:"last_seq"`
	// JournalBytes is the journal's size on disk.
	JournalBytes int64 `json:"journal_bytes"`
	// UnfoldedBytes: recent writes held only in the journal, not yet
	// folded into the images (the write path's backlog).
	UnfoldedBytes int64              `json:"unfolded_bytes"`
	PeerName      string             `json:"peer,omitempty"`
	Replication   *ReplicationStatus `json:"replication,omitempty"`
	AppPoint      *AppPointStatus    `json:"last_app_point,omitempty"`
	// Fenced is the generation this group was fenced at (0: not fenced):
	// the vault re-sends a fence until it reads its generation here.
	Fenced int64 `json:"fenced,omitempty"`
	// Failed, if not empty, is why the group refuses writes (a disk
	// full when applying a write, a failed fsync): it serves again once
	// reopened.
	Failed string `json:"failed,omitempty"`
	// Fold is the background fold of a group a commit created, while its
	// disks are layered over the replica they were failed over from.
	Fold *FoldStatus `json:"fold,omitempty"`
}

// FoldPhase is how far a committed group's background fold got.
type FoldPhase string

// Fold phases.
const (
	// FoldJournal: the replica's journal up to the failover point is
	// being folded into its images.
	FoldJournal FoldPhase = "journal"
	// FoldOverlay: the VM's writes since the failover are being moved
	// into those images.
	FoldOverlay FoldPhase = "overlay"
	// FoldDone: the group's disks are plain images.
	FoldDone FoldPhase = "done"
)

// FoldStatus is the progress of a committed group's background fold. The
// VM runs on the group throughout; nothing waits for the fold but a
// reprotect back to this site (which finishes it first).
type FoldStatus struct {
	Phase       FoldPhase `json:"phase"`
	EntriesLeft uint64    `json:"entries_left,omitempty"`
	BytesLeft   int64     `json:"bytes_left,omitempty"`
}

// Repair is what a repair of a damaged group or replica did: nothing is
// deleted; what was set aside stays in Kept until the operator removes it.
type Repair struct {
	Name  string   `json:"name"`
	Kept  string   `json:"kept"` // the damaged journal, moved aside
	Steps []string `json:"steps"`
}

// Problem is a group or replica a site could not open (a damaged journal,
// an unreadable manifest): the site serves the rest, and this one waits
// for an operator. Nothing of it was deleted.
type Problem struct {
	Kind   string    `json:"kind"` // "group" or "replica"
	Name   string    `json:"name"`
	Reason string    `json:"reason"`
	Since  time.Time `json:"since"`
}

// ViewInfo describes an open view and how to attach it.
type ViewInfo struct {
	ID       string `json:"id"`
	Replica  string `json:"replica"`
	Disk     string `json:"disk"`
	Seq      uint64 `json:"seq"`
	Writable bool   `json:"writable"`
	Export   string `json:"export"`
	Socket   string `json:"socket"`
}

// AgentStatus is a site agent's report (GET /v1/status).
type AgentStatus struct {
	Site      string          `json:"site"`
	NBDSocket string          `json:"nbd_socket"`
	Groups    []GroupStatus   `json:"groups"`
	Replicas  []ReplicaStatus `json:"replicas"`
	Views     []ViewInfo      `json:"views"`
	VMs       []VMStatus      `json:"vms"`
	// Capacity for new VMs: memory available and disk free where the
	// agent keeps its data.
	MemAvailable int64 `json:"mem_available_bytes"`
	DiskFree     int64 `json:"disk_free_bytes"`
	// Problems are the groups and replicas the site could not open.
	Problems []Problem `json:"problems,omitempty"`
	// LeaderEpoch is the highest vault leadership epoch the site obeyed
	// (0: no vault sent one), and StaleLeaderRefused the calls it refused
	// since it started because they came from an older leader.
	LeaderEpoch        int64 `json:"leader_epoch,omitempty"`
	StaleLeaderRefused int64 `json:"stale_leader_refused,omitempty"`
}

// CreateGroup creates a consistency group (POST /v1/groups).
type CreateGroup struct {
	Name  string     `json:"name"`
	Disks []DiskSpec `json:"disks"`
}

// Replicate starts replicating a group (POST
// /v1/groups/{name}/replication).
type Replicate struct {
	PeerAddr string `json:"peer_addr"`
	PeerName string `json:"peer_name"`
	// Delta, on a reprotect, is what the peer changed after the failover
	// point: with this group's divergence it makes the delta copy send
	// only those blocks. Dropped once the copy is sent.
	Delta *PeerChanges `json:"delta,omitempty"`
}

// Fence fences a group at a generation (POST /v1/groups/{name}/fence).
type Fence struct {
	Generation int64 `json:"generation"`
}

// ToReplica turns a group into a replica (POST
// /v1/groups/{name}/to-replica).
type ToReplica struct {
	// Since is the failover point: report the changes after it.
	Since uint64 `json:"since"`
	// Source is the site that will stream to the new replica.
	Source string `json:"source"`
}

// ToReplicaResult answers ToReplica.
type ToReplicaResult struct {
	Replica string       `json:"replica"`
	Reused  []DiskSpec   `json:"reused"`
	Changes *PeerChanges `json:"changes"`
}

// ReplicaSource records the one site that streams a replica (PUT
// /v1/replicas/{name}/source).
type ReplicaSource struct {
	Source string `json:"source"`
}

// OpenView opens a view (POST /v1/replicas/{name}/views).
type OpenView struct {
	Disk     string `json:"disk"`
	Seq      uint64 `json:"seq"`
	Writable bool   `json:"writable"`
}

// PeerChanges is what a site changed in a group after a point: every
// block changed from sequence From on is in Chunks.
type PeerChanges struct {
	After  uint64 `json:"after"` // the failover point they are relative to
	From   uint64 `json:"from"`  // every change from this sequence on is in Chunks
	Chunks Chunks `json:"chunks"`
}

// Divergence is a committed group's record of what diverged from the
// replica at Base.
type Divergence struct {
	Base     uint64 `json:"base"`
	Received uint64 `json:"received"`
	// Chunks is what diverged here from the replica at Base, so far: the
	// VM's writes since the failover and what the replica had after Base.
	Chunks Chunks `json:"chunks"`
}

// BandwidthLimit caps what replication sends from a site: to a peer site
// (every protection streaming there) or for one protection.
type BandwidthLimit struct {
	// BitsPerSecond is the cap outside the schedule's windows; 0: none.
	BitsPerSecond int64 `json:"bits_per_second"`
	// Schedule: the first window that covers the time sets the cap.
	Schedule []BandwidthWindow `json:"schedule,omitempty"`
	// TimeZone of the windows (an IANA name; default UTC).
	TimeZone string `json:"time_zone,omitempty"`
}

// BandwidthWindow is a cap for some hours of some days.
type BandwidthWindow struct {
	Days          string `json:"days,omitempty"` // "mon-fri", "sat,sun"; empty: every day
	From          string `json:"from"`           // "08:00"
	To            string `json:"to"`             // "18:00"; before From: across midnight
	BitsPerSecond int64  `json:"bits_per_second"`
}

// Bandwidth is a site's replication caps (PUT /v1/bandwidth), set by the
// vault: per peer site and per group. Both apply to a group's stream.
type Bandwidth struct {
	Peers  map[string]BandwidthLimit `json:"peers,omitempty"`
	Groups map[string]BandwidthLimit `json:"groups,omitempty"`
}
