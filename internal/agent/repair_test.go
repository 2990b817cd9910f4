package agent

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/agentclient"
	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/nbd"
	"github.com/ferry-dr/ferry/internal/pki"
	"github.com/ferry-dr/ferry/internal/replica"
)

// damageJournal flips a byte of an early entry of the first segment in
// dir: valid entries follow, so it is damage, not a torn tail.
func damageJournal(t *testing.T, dir string) {
	t.Helper()
	segs, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
	if len(segs) == 0 {
		t.Fatalf("no segment in %s", dir)
	}
	f, err := os.OpenFile(segs[0], os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	f.ReadAt(b, 300)
	b[0] ^= 0xFF
	if _, err := f.WriteAt(b, 300); err != nil {
		t.Fatal(err)
	}
}

// inSync waits until siteA's group vm1 streams and siteB acknowledged all
// of it, then compares siteA's disk with a view of siteB's replica at a
// fresh point.
func inSync(t *testing.T, a, b *Agent) {
	t.Helper()
	ctx := context.Background()
	deadline := time.Now().Add(60 * time.Second)
	for {
		st := a.Status()
		if len(st.Groups) == 1 && st.Groups[0].Replication != nil && st.Groups[0].Replication.State == api.ReplStreaming &&
			st.Groups[0].Replication.AckedSeq == st.Groups[0].LastSeq {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not in sync: %+v", st.Groups)
		}
		time.Sleep(50 * time.Millisecond)
	}
	seq, err := a.Mark(ctx, "vm1", replica.Marker{Type: "named", Label: "check"})
	if err != nil {
		t.Fatal(err)
	}
	a.groups["vm1"].g.Flush(ctx)
	waitReplicaSeq(t, b, seq)
	src, _ := nbd.Dial(ctx, "unix", a.NBDSocket(), "vm1/vda")
	defer src.Close()
	want := make([]byte, commitDiskSize)
	if err := src.ReadAt(ctx, want, 0); err != nil {
		t.Fatal(err)
	}
	ov, err := b.OpenView("vm1", "vda", seq, false)
	if err != nil {
		t.Fatal(err)
	}
	defer b.CloseView(ov.id)
	checkExport(t, b.NBDSocket(), ov.export, want)
}

// TestRepairDamagedJournals: a replica whose journal is damaged is
// reported, then resynchronized from the source by checksum compare with
// one command; a source group whose journal is damaged is reported, then
// reseeded from its images with one command, and its replica copied
// again. Nothing is deleted: the damaged journals are set aside.
func TestRepairDamagedJournals(t *testing.T) {
	ctx := context.Background()
	pk := pkiDir(t, "siteA", "siteB", "operator")
	dirB := t.TempDir()
	a, b, _, _ := replicatedPair(t, pk, dirB, Config{PointInterval: -1})
	aAddr := a.Addr()
	op, _ := pki.Load(pk, "operator")
	// replicatedPair stopped the stream; start it again, then damage B.
	ca := agentclient.New(op, aAddr, "siteA")
	if err := ca.Replicate(ctx, "vm1", api.Replicate{PeerAddr: b.Addr(), PeerName: "siteB"}); err != nil {
		t.Fatal(err)
	}
	inSync(t, a, b)
	b.Close()
	damageJournal(t, filepath.Join(dirB, "replicas", "vm1", "journal"))
	b2 := startAgentWith(t, Config{Name: "siteB", PKIDir: pk, Dir: dirB, PointInterval: -1})
	if p := b2.Status().Problems; len(p) != 1 || p[0].Name != "vm1" || !strings.Contains(p[0].Reason, "damaged") {
		t.Fatalf("problems after damaging the replica: %+v", p)
	}
	// The source's stream now goes to b2 (a new address).
	ca.Unreplicate(ctx, "vm1")
	if err := ca.Replicate(ctx, "vm1", api.Replicate{PeerAddr: b2.Addr(), PeerName: "siteB"}); err != nil {
		t.Fatal(err)
	}
	cb := agentclient.New(op, b2.Addr(), "siteB")
	rp, err := cb.ResyncReplica(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("resync: %v", rp.Steps)
	if _, err := os.Stat(rp.Kept); err != nil {
		t.Fatalf("the damaged journal was not kept: %v", err)
	}
	if p := b2.Status().Problems; len(p) != 0 {
		t.Fatalf("problems after the resync: %+v", p)
	}
	inSync(t, a, b2)

	// Now the source's journal.
	srcDir := a.cfg.Dir
	a.Close()
	damageJournal(t, filepath.Join(srcDir, "groups", "vm1", "journal"))
	a2 := startAgentWith(t, Config{Name: "siteA", PKIDir: pk, Dir: srcDir, PointInterval: -1})
	if p := a2.Status().Problems; len(p) != 1 || p[0].Kind != "group" {
		t.Fatalf("problems after damaging the group: %+v", p)
	}
	ca2 := agentclient.New(op, a2.Addr(), "siteA")
	rs, err := ca2.ReseedGroup(ctx, "vm1")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("reseed: %v", rs.Steps)
	if _, err := os.Stat(rs.Kept); err != nil {
		t.Fatalf("the damaged journal was not kept: %v", err)
	}
	if _, err := ca2.ReseedGroup(ctx, "vm1"); err == nil {
		t.Fatal("reseeding a healthy group succeeded")
	}
	// Writes go on, and the replica is copied again.
	c, err := nbd.Dial(ctx, "unix", a2.NBDSocket(), "vm1/vda")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.WriteAt(ctx, []byte("after the reseed"), 4096, true); err != nil {
		t.Fatal(err)
	}
	c.Close()
	inSync(t, a2, b2)
}
