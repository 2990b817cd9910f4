package agent

import (
	"bytes"
	"context"
	"crypto/rand"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/disk"
)

// TestIncidentHoldsLastClean: text written through a replicated group,
// then overwritten with random data: the recovery site's detector raises
// an incident whose last clean point precedes the first random write;
// retention does not fold past that point while the incident is open,
// and does once it is dismissed.
func TestIncidentHoldsLastClean(t *testing.T) {
	s := startTwoSites(t)
	a, b, ca, cb := s.a, s.b, s.ca, s.cb
	ctx := context.Background()
	if err := ca.CreateGroup(ctx, "vm1", []disk.Spec{{Name: "vda", Size: 16 << 20}}); err != nil {
		t.Fatal(err)
	}
	nc := replicateVM1(t, a, b, ca, cb)
	line := []byte("2026-12-02 INFO order 42 shipped to the customer\n")
	text := bytes.Repeat(line, 64<<10/len(line)+1)[:64<<10]
	for off := int64(0); off < 8<<20; off += int64(len(text)) {
		if err := nc.WriteAt(ctx, text, off, false); err != nil {
			t.Fatal(err)
		}
	}
	nc.Flush(ctx)
	clean, err := a.Mark(ctx, "vm1", api.Marker{Type: api.PointNamed, Label: "clean"})
	if err != nil {
		t.Fatal(err)
	}
	// The points pass a second boundary, so the overwrites fall in new
	// seconds of their own.
	time.Sleep(1100 * time.Millisecond)
	junk := make([]byte, 64<<10)
	for off := int64(0); off < 8<<20; off += int64(len(junk)) {
		rand.Read(junk)
		if err := nc.WriteAt(ctx, junk, off, false); err != nil {
			t.Fatal(err)
		}
	}
	nc.Flush(ctx)
	var inc *api.EntropyIncident
	deadline := time.Now().Add(20 * time.Second)
	for inc == nil {
		st, err := cb.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(st.Replicas) == 1 && st.Replicas[0].Entropy != nil {
			inc = st.Replicas[0].Entropy.Incident
		}
		if time.Now().After(deadline) {
			t.Fatalf("no incident: %+v", st.Replicas)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if inc.LastClean == nil || inc.LastClean.Seq < clean || inc.LastClean.Seq >= inc.FirstSeq {
		t.Fatalf("incident %+v: want a last clean point from %d on, before the first overwrite", inc, clean)
	}
	b.mu.Lock()
	rep := b.replicas["vm1"]
	b.mu.Unlock()
	// Retention would fold everything up to now; the incident holds it.
	cutoff := b.foldCutoff("vm1", rep, time.Now())
	if _, err := rep.FoldBefore(ctx, cutoff); err != nil {
		t.Fatal(err)
	}
	v, err := rep.OpenView("vda", inc.LastClean.Seq, "")
	if err != nil {
		t.Fatalf("the last clean point after retention: %v", err)
	}
	got := make([]byte, len(text))
	if err := v.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, text) {
		t.Errorf("the last clean point's data: %q (%v), want the text", got[:32], err)
	}
	v.Close()
	if err := b.DismissIncident("vm1"); err != nil {
		t.Fatal(err)
	}
	if c := b.foldCutoff("vm1", rep, time.Now()); c.Before(time.Now().Add(-time.Second)) {
		t.Errorf("after dismissing, the cutoff is still held at %v", c)
	}
}
