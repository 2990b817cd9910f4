package agent

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/agentclient"
	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/disk"
	"github.com/ferry-dr/ferry/internal/httpjson"
	"github.com/ferry-dr/ferry/internal/nbd"
	"github.com/ferry-dr/ferry/internal/pki"
	"github.com/ferry-dr/ferry/internal/pki/pkitest"
	"github.com/ferry-dr/ferry/internal/replica"
	"github.com/ferry-dr/ferry/internal/replication"
	"github.com/ferry-dr/ferry/internal/vault"
	"github.com/ferry-dr/ferry/internal/vault/sitetest"
)

func pkiDir(t *testing.T, names ...string) string {
	t.Helper()
	for i, n := range names {
		if n == "operator" || n == "vault" {
			names[i] = n + "/" + n
		}
	}
	return pkitest.Dir(t, names...)
}

func startAgent(t testing.TB, pk, name string) *Agent {
	t.Helper()
	return startAgentWith(t, Config{Name: name, PKIDir: pk, PointInterval: 50 * time.Millisecond})
}

// startAgentWith starts an agent with cfg (in a new directory, on a free
// port) and closes it at the end of the test.
func startAgentWith(t testing.TB, cfg Config) *Agent {
	t.Helper()
	if cfg.Dir == "" {
		cfg.Dir = t.TempDir()
	}
	cfg.Listen = "127.0.0.1:0"
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	return a
}

// replicateVM1 replicates the group vm1 (created at a) to b and returns
// an NBD client of its disk vda at a, closed at the end of the test.
func replicateVM1(t *testing.T, a, b *Agent, ca, cb *agentclient.Client) *nbd.Client {
	t.Helper()
	ctx := context.Background()
	if err := cb.ExpectReplica(ctx, "vm1", a.cfg.Name); err != nil {
		t.Fatal(err)
	}
	if err := ca.Replicate(ctx, "vm1", api.Replicate{PeerAddr: b.Addr(), PeerName: b.cfg.Name}); err != nil {
		t.Fatal(err)
	}
	nc, err := nbd.Dial(ctx, "unix", a.NBDSocket(), "vm1/vda")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	return nc
}

// twoSites is two agents, siteA and siteB, under one PKI, with an
// operator's clients of each.
type twoSites struct {
	a, b   *Agent
	op     *pki.Identity
	ca, cb *agentclient.Client
}

func startTwoSites(t *testing.T) twoSites {
	t.Helper()
	pk := pkiDir(t, "siteA", "siteB", "operator")
	s := twoSites{a: startAgent(t, pk, "siteA"), b: startAgent(t, pk, "siteB")}
	op, err := pki.Load(pk, "operator")
	if err != nil {
		t.Fatal(err)
	}
	s.op, s.ca, s.cb = op, agentclient.New(op, s.a.Addr(), "siteA"), agentclient.New(op, s.b.Addr(), "siteB")
	return s
}

func TestTwoAgents(t *testing.T) {
	s := startTwoSites(t)
	a, b, op, ca, cb := s.a, s.b, s.op, s.ca, s.cb
	ctx := context.Background()

	if err := ca.CreateGroup(ctx, "vm1", []disk.Spec{{Name: "vda", Size: 8 << 20}}); err != nil {
		t.Fatal(err)
	}
	// Bad requests get clear errors, mapped back to the sentinels.
	rawA := newRaw(op, a.Addr(), "siteA")
	for _, tc := range []struct {
		path, body string
		want       error
	}{
		{"/v1/groups", `{"name":"vm1","disks":[{"name":"x","size":1}]}`, api.ErrConflict},
		{"/v1/groups", `{"name":"../x","disks":[{"name":"x","size":1}]}`, api.ErrInvalid},
		{"/v1/groups", `{"nme":"y"}`, api.ErrInvalid},
		{"/v1/groups/nope/replication", `{"peer_addr":"x","peer_name":"y"}`, api.ErrNotFound},
		{"/v1/replicas/nope/views", `{"disk":"vda"}`, api.ErrNotFound},
	} {
		var raw any
		err := rawA.call(ctx, "POST", tc.path, jsonRaw(tc.body), &raw)
		if !errors.Is(err, tc.want) {
			t.Errorf("POST %s %s: %v, want %v", tc.path, tc.body, err, tc.want)
		}
	}
	nc := replicateVM1(t, a, b, ca, cb)
	rng := rand.New(rand.NewPCG(5, 5))
	for i := 0; i < 200; i++ {
		p := make([]byte, 4096*(1+rng.IntN(8)))
		for k := range p {
			p[k] = byte(rng.Uint32())
		}
		if err := nc.WriteAt(ctx, p, rng.Int64N(8<<20-int64(len(p)))&^4095, i%10 == 0); err != nil {
			t.Fatal(err)
		}
	}
	nc.Flush(ctx)
	if _, err := a.Mark(ctx, "vm1", replica.Marker{Type: "named", Label: "before-upgrade"}); err != nil {
		t.Fatal(err)
	}
	// Drain: the recovery site has everything.
	deadline := time.Now().Add(20 * time.Second)
	for {
		st, err := ca.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		r := st.Groups[0].Replication
		if r != nil && r.State == "streaming" && r.AckedSeq == st.Groups[0].LastSeq {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not drained: %+v", r)
		}
		time.Sleep(20 * time.Millisecond)
	}
	pts, err := cb.Points(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	var named *replica.Point
	for i := range pts {
		if pts[i].Label == "before-upgrade" {
			named = &pts[i]
		}
	}
	if named == nil {
		t.Fatalf("named point missing from %d points", len(pts))
	}
	vi, err := cb.OpenView(ctx, "vm1", api.OpenView{Disk: "vda", Seq: named.Seq})
	if err != nil {
		t.Fatal(err)
	}
	vc, err := nbd.Dial(ctx, "unix", vi.Socket, vi.Export)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 8<<20)
	got := make([]byte, 8<<20)
	nc.ReadAt(ctx, want, 0)
	if err := vc.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("view at the named point differs from the source disk")
	}
	if err := vc.WriteAt(ctx, []byte("x"), 0, false); err == nil {
		t.Fatal("write to a read-only view succeeded")
	}
	vc.Close()
	if err := cb.CloseView(ctx, vi.ID); err != nil {
		t.Fatal(err)
	}
	// Deleting a replicating group is refused; after stopping it works,
	// and disconnects the disk's clients.
	if err := ca.DeleteGroup(ctx, "vm1"); !errors.Is(err, api.ErrConflict) {
		t.Fatalf("delete while replicating: %v", err)
	}
	if err := ca.Unreplicate(ctx, "vm1"); err != nil {
		t.Fatal(err)
	}
	if err := ca.DeleteGroup(ctx, "vm1"); err != nil {
		t.Fatal(err)
	}
	if err := nc.ReadAt(ctx, make([]byte, 512), 0); err == nil {
		t.Fatal("the deleted disk's NBD client still works")
	}
	st, _ := ca.Status(ctx)
	if len(st.Groups) != 0 {
		t.Fatalf("groups after delete: %+v", st.Groups)
	}
}

type jsonRaw string

func (j jsonRaw) MarshalJSON() ([]byte, error) { return []byte(j), nil }

// TestDivergenceCompaction: a committed group's changed-block tracking
// holds its journal only up to a bound; past it the journal's changes go
// into the record's chunk set and the journal is trimmed, and nothing
// written since the failover is forgotten.
func TestDivergenceCompaction(t *testing.T) {
	pk := pkiDir(t, "siteA")
	a := startAgent(t, pk, "siteA")
	ctx := context.Background()
	if err := a.CreateGroup("vm1", []disk.Spec{{Name: "vda", Size: 64 << 20}}); err != nil {
		t.Fatal(err)
	}
	gr, err := a.group("vm1")
	if err != nil {
		t.Fatal(err)
	}
	d, _ := gr.g.Disk("vda")
	// As a commit leaves it: the record, and the journal held after it.
	rec := divergence{Base: 10, Received: 12, After: gr.g.Journal().LastSeq(), Chunks: replication.NewChunks()}
	rec.Chunks.Add("vda", 0, 1) // written through the failover view
	if err := writeJSONFile(a.divergencePath("vm1"), rec); err != nil {
		t.Fatal(err)
	}
	gr.g.Hold(divergenceHolder, rec.After+1)
	want := replication.NewChunks()
	want.Add("vda", 0, 1)
	buf := bytes.Repeat([]byte{7}, 256<<10)
	for i := int64(1); i <= 320; i++ { // 80 MiB in 256 KiB writes: more than a journal segment
		off := (i * 2 << 20) % (62 << 20)
		if err := d.WriteAt(ctx, buf, off); err != nil {
			t.Fatal(err)
		}
		want.Add("vda", off, int64(len(buf)))
	}
	written := gr.g.Journal().LastSeq()
	if err := a.compactDivergence(gr, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := gr.g.Checkpoint(ctx); err != nil {
		t.Fatal(err)
	}
	got, _, ok := func() (divergence, bool, bool) { d, ok, _ := a.loadDivergence("vm1"); return d, ok, ok }()
	if !ok || got.After < written {
		t.Fatalf("record after compaction: after %d, the writes end at %d", got.After, written)
	}
	if first := gr.g.Journal().FirstSeq(); first <= rec.After+1 {
		t.Fatalf("journal not trimmed after compaction: starts at %d", first)
	}
	// A write after the compaction is in the journal again.
	if err := d.WriteAt(ctx, buf[:4096], 63<<20); err != nil {
		t.Fatal(err)
	}
	want.Add("vda", 63<<20, 4096)
	all, _, err := a.divergenceChunks(gr, gr.g.Journal().LastSeq())
	if err != nil {
		t.Fatal(err)
	}
	if all.Count() != want.Count() {
		t.Fatalf("tracked %d chunks, want %d", all.Count(), want.Count())
	}
	for c := int64(0); c < 1024; c++ {
		if all.Has("vda", c) != want.Has("vda", c) {
			t.Fatalf("chunk %d: tracked %v, want %v", c, all.Has("vda", c), want.Has("vda", c))
		}
	}
	// Under the bound nothing moves.
	before, _, _ := a.loadDivergence("vm1")
	if err := a.compactDivergence(gr, 1<<40); err != nil {
		t.Fatal(err)
	}
	if after, _, _ := a.loadDivergence("vm1"); after.After != before.After {
		t.Fatal("compaction under the bound")
	}
}

// rawAPI calls an agent's routes by path, for the tests of the wire
// itself (bad bodies, route roles); everything else uses agentclient.
type rawAPI struct {
	base string
	hc   *http.Client
}

func newRaw(id *pki.Identity, addr, site string) *rawAPI {
	tr := &http.Transport{TLSClientConfig: id.ClientConfig(pki.Peer{Role: pki.RoleSite, Name: site})}
	return &rawAPI{base: "https://" + addr, hc: &http.Client{Transport: tr, Timeout: 30 * time.Second}}
}

func (r *rawAPI) call(ctx context.Context, method, path string, in, out any) error {
	return httpjson.Call(ctx, r.hc, method, r.base+path, "", in, out)
}

// TestSiteConformance: the real agent, reached through agentclient over
// mutual TLS, keeps the contract the vault relies on (the vault's fake
// runs the same suite).
func TestSiteConformance(t *testing.T) {
	sitetest.Run(t, func(t *testing.T) vault.Site {
		pk := pkiDir(t, "siteA", "vault")
		a := startAgent(t, pk, "siteA")
		return agentclient.New(pkitest.Load(t, pk, "vault"), a.Addr(), "siteA")
	})
}

// TestDamagedGroupDoesNotStopAgent: a group that does not open (here, an
// unreadable manifest) is reported and left alone; the agent starts and
// serves its other groups (before, Start failed and took every disk of the
// site offline).
func TestDamagedGroupDoesNotStopAgent(t *testing.T) {
	pk := pkiDir(t, "siteA", "operator")
	dir := t.TempDir()
	a := startAgentWith(t, Config{Dir: dir, Name: "siteA", PKIDir: pk, PointInterval: -1})
	for _, g := range []string{"g1", "g2"} {
		if err := a.CreateGroup(g, []disk.Spec{{Name: "vda", Size: 1 << 20}}); err != nil {
			t.Fatal(err)
		}
	}
	a.Close()
	manifest := filepath.Join(dir, "groups", "g1", "group.json")
	if err := os.WriteFile(manifest, []byte("{torn"), 0o600); err != nil {
		t.Fatal(err)
	}
	b := startAgentWith(t, Config{Dir: dir, Name: "siteA", PKIDir: pk, PointInterval: -1})
	st := b.Status()
	if len(st.Problems) != 1 || st.Problems[0].Kind != "group" || st.Problems[0].Name != "g1" || !strings.Contains(st.Problems[0].Reason, "manifest") {
		t.Fatalf("problems: %+v", st.Problems)
	}
	if len(st.Groups) != 1 || st.Groups[0].Name != "g2" {
		t.Fatalf("groups served: %+v", st.Groups)
	}
	ctx := context.Background()
	c, err := nbd.Dial(ctx, "unix", b.NBDSocket(), "g2/vda")
	if err != nil {
		t.Fatalf("the healthy group is not served: %v", err)
	}
	c.Close()
	op := pkitest.Load(t, pk, "operator")
	ac := agentclient.New(op, b.Addr(), "siteA")
	if _, err := ac.Mark(ctx, "g1", api.Marker{Type: api.PointNamed}); !errors.Is(err, api.ErrConflict) || !strings.Contains(err.Error(), "did not open") {
		t.Fatalf("a call on the damaged group: %v", err)
	}
	if err := ac.DeleteGroup(ctx, "g1"); !errors.Is(err, api.ErrConflict) {
		t.Fatalf("deleting the damaged group: %v", err)
	}
	if b, _ := os.ReadFile(manifest); string(b) != "{torn" {
		t.Fatal("the damaged group was changed")
	}
}
