package vault

import (
	"context"
	"net/http"

	"github.com/ferry-dr/ferry/internal/api"
)

// Site is what the vault asks of a site agent: one method per request.
// agentclient.Client implements it over mutual TLS; tests use a fake that
// passes the same conformance suite (sitetest). Every method may fail
// with a transport error when the site is unreachable; errors the site
// answers wrap the api sentinels (errors.Is(err, api.ErrNotFound)). All
// methods are safe for concurrent use.
type Site interface {
	// Status reports the site's groups, replicas, views, VMs and capacity.
	Status(ctx context.Context) (api.AgentStatus, error)
	// CreateGroup creates a VM's disks. ErrConflict if the group exists.
	CreateGroup(ctx context.Context, name string, disks []api.DiskSpec) error
	// Replicate starts replicating group to a peer. Idempotent for the
	// same peer; ErrConflict if it replicates elsewhere; ErrNotFound
	// without the group.
	Replicate(ctx context.Context, group string, r api.Replicate) error
	// ExpectReplica records source as the only site whose streams the
	// replica takes. Idempotent.
	ExpectReplica(ctx context.Context, replica, source string) error
	// Mark records a point in group's journal; durable when it returns.
	// ErrNotFound without the group.
	Mark(ctx context.Context, group string, m api.Marker) (uint64, error)
	// Points lists a replica's recovery points, oldest first.
	// ErrNotFound without the replica.
	Points(ctx context.Context, replica string) ([]api.Point, error)
	// StartVM starts a VM on a group or on views of a replica at a point.
	// ErrConflict if it runs already or the group is fenced; ErrNotFound
	// without the group or replica.
	StartVM(ctx context.Context, req api.VMRequest) (api.VMStatus, error)
	// StopVM shuts a VM down (gracefully within opts.Timeout: the guest
	// agent, then ACPI, then quit; or at once with opts.Force) and returns
	// the steps. ErrNotFound if it does not run.
	StopVM(ctx context.Context, name string, opts api.StopOptions) ([]string, error)
	// PingGuest asks a running VM's guest agent whether it answers: nil
	// if it does; ErrNotFound if the VM does not run; another error
	// while it does not answer (no guest agent, or not up yet).
	PingGuest(ctx context.Context, name string) error
	// CommitVM makes a VM on views standalone. ErrNotFound if it does not
	// run on views.
	CommitVM(ctx context.Context, name string) ([]string, error)
	// Console returns the VM's serial console from byte off. ErrNotFound
	// for a VM the site never ran.
	Console(ctx context.Context, name string, off int64) (api.Console, error)
	// Fence fences group at generation gen. Idempotent, never lowers the
	// generation. ErrNotFound without the group.
	Fence(ctx context.Context, group string, gen int64) error
	// ToReplica turns group into a replica streamed by req.Source.
	// Idempotent. ErrNotFound with neither the group nor the replica;
	// ErrConflict while a VM runs on it.
	ToReplica(ctx context.Context, group string, req api.ToReplica) (api.ToReplicaResult, error)
	// SetBandwidth replaces the site's replication caps. Idempotent;
	// ErrInvalid for a malformed cap.
	SetBandwidth(ctx context.Context, bw api.Bandwidth) error
	// Changes reports what group changed after since. ErrNotFound if it
	// cannot tell (no group, or the tracking is gone).
	Changes(ctx context.Context, group string, since uint64) (api.PeerChanges, error)
	// Unreplicate stops group's replication. Idempotent (a group that
	// does not replicate is fine); ErrNotFound without the group.
	Unreplicate(ctx context.Context, group string) error
	// DeleteGroup deletes a group's disks. ErrConflict while a VM runs on
	// it or it replicates; ErrNotFound without it.
	DeleteGroup(ctx context.Context, name string) error
	// DeleteReplica deletes a replica with its journal and points.
	// ErrConflict while a VM or a view uses it; ErrNotFound without it.
	DeleteReplica(ctx context.Context, name string) error
	// Divergence reports a committed group's divergence record.
	// ErrNotFound if it has none.
	Divergence(ctx context.Context, group string) (api.Divergence, error)
	// Import starts importing a shut-off libvirt domain into a group of
	// its name and returns at once. ErrInvalid at a site that does not
	// run libvirt or for a domain it cannot import; ErrNotFound without
	// the domain; ErrConflict if it runs or the group exists. Idempotent
	// while the copy runs.
	Import(ctx context.Context, domain string) (api.ImportStatus, error)
	// ImportStatus reports an import's progress. ErrNotFound if none
	// started since the site's agent did.
	ImportStatus(ctx context.Context, domain string) (api.ImportStatus, error)
	// Release gives an imported domain its own definition back.
	// ErrNotFound if it was not imported there; ErrConflict while it runs.
	Release(ctx context.Context, domain string) error
	// Domains lists the site's libvirt domains ferry does not run yet,
	// with what an import takes or why it cannot (none at a site that
	// runs QEMU directly). Read-only.
	Domains(ctx context.Context) ([]api.DomainInfo, error)
	// SetRansomwarePolicy sets a replica's detector thresholds.
	// Idempotent; ErrNotFound without the replica.
	SetRansomwarePolicy(ctx context.Context, replica string, p api.RansomwarePolicy) error
	// Files lists a directory of a replica's disks at point seq ("/":
	// the file systems). ErrNotFound, ErrUnsupported (a file system the
	// site cannot read), ErrTooMany (its browsing sessions are in use).
	Files(ctx context.Context, replica string, seq uint64, path string) (api.FileListing, error)
	// FileContent opens a download of path at seq: a file's bytes (raw)
	// or a tar. The caller closes the body. Errors as Files.
	FileContent(ctx context.Context, replica string, seq uint64, path string, raw bool) (*http.Response, error)
	// DismissIncident closes a replica's open ransomware incident.
	// ErrNotFound without the replica or without an open incident.
	DismissIncident(ctx context.Context, replica string) error
}
