// Package sitetest is the conformance suite of vault.Site: what the vault
// may rely on from any site, real (agentclient over mutual TLS to an
// agent) or fake (the vault's tests). Each implementation runs it.
package sitetest

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/vault"
)

// Run checks the contract on a site that newSite returns fresh: no groups,
// replicas or VMs of the names used here ("st1", "st-r1", "nope"), and
// "peer" a valid name of another site.
func Run(t *testing.T, newSite func(t *testing.T) vault.Site) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s := newSite(t)
	is := func(t *testing.T, what string, err, want error) {
		t.Helper()
		if want == nil && err != nil || want != nil && !errors.Is(err, want) {
			t.Errorf("%s: %v, want %v", what, err, want)
		}
	}
	t.Run("status", func(t *testing.T) {
		if _, err := s.Status(ctx); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("domains", func(t *testing.T) {
		// Both implementations run QEMU directly (or hold no domain):
		// an empty list, not an error, so the inventory can ask any site.
		ds, err := s.Domains(ctx)
		if err != nil || len(ds) != 0 {
			t.Fatalf("domains: %+v, %v; want none", ds, err)
		}
	})
	t.Run("groups", func(t *testing.T) {
		disks := []api.DiskSpec{{Name: "vda", Size: 1 << 20}}
		is(t, "create", s.CreateGroup(ctx, "st1", disks), nil)
		is(t, "create again", s.CreateGroup(ctx, "st1", disks), api.ErrConflict)
		is(t, "create ../x", s.CreateGroup(ctx, "../x", disks), api.ErrInvalid)
		seq, err := s.Mark(ctx, "st1", api.Marker{Type: api.PointNamed, Label: "conformance"})
		is(t, "mark", err, nil)
		if err == nil && seq == 0 {
			t.Error("mark returned sequence 0")
		}
		_, err = s.Mark(ctx, "nope", api.Marker{Type: api.PointNamed})
		is(t, "mark unknown", err, api.ErrNotFound)
		is(t, "fence unknown", s.Fence(ctx, "nope", 2), api.ErrNotFound)
		is(t, "fence", s.Fence(ctx, "st1", 3), nil)
		is(t, "fence lower (idempotent)", s.Fence(ctx, "st1", 2), nil)
		st, err := s.Status(ctx)
		is(t, "status", err, nil)
		found := false
		for _, g := range st.Groups {
			if g.Name == "st1" {
				found = true
				if g.Fenced != 3 {
					t.Errorf("status reports st1 fenced at %d, want 3 (a fence never lowers it)", g.Fenced)
				}
			}
		}
		if !found {
			t.Error("status lists no group st1")
		}
		is(t, "replicate unknown", s.Replicate(ctx, "nope", api.Replicate{PeerAddr: "127.0.0.1:1", PeerName: "peer"}), api.ErrNotFound)
		is(t, "unreplicate unknown", s.Unreplicate(ctx, "nope"), api.ErrNotFound)
		is(t, "unreplicate a group that does not replicate", s.Unreplicate(ctx, "st1"), nil)
		is(t, "unreplicate it again", s.Unreplicate(ctx, "st1"), nil)
		_, err = s.Divergence(ctx, "st1")
		is(t, "divergence without a commit", err, api.ErrNotFound)
		_, err = s.Changes(ctx, "nope", 1)
		is(t, "changes unknown", err, api.ErrNotFound)
		_, err = s.ToReplica(ctx, "nope", api.ToReplica{Source: "peer"})
		is(t, "to-replica unknown", err, api.ErrNotFound)
		is(t, "expect a replica over a source group", s.ExpectReplica(ctx, "st1", "peer"), api.ErrConflict)
		is(t, "delete", s.DeleteGroup(ctx, "st1"), nil)
		is(t, "delete again", s.DeleteGroup(ctx, "st1"), api.ErrNotFound)
	})
	t.Run("replicas", func(t *testing.T) {
		is(t, "expect", s.ExpectReplica(ctx, "st-r1", "peer"), nil)
		is(t, "expect again", s.ExpectReplica(ctx, "st-r1", "peer"), nil)
		is(t, "expect ../x", s.ExpectReplica(ctx, "../x", "peer"), api.ErrInvalid)
		is(t, "expect from ../x", s.ExpectReplica(ctx, "st-r2", "../x"), api.ErrInvalid)
		_, err := s.Points(ctx, "nope")
		is(t, "points unknown", err, api.ErrNotFound)
		is(t, "delete unknown", s.DeleteReplica(ctx, "nope"), api.ErrNotFound)
		is(t, "delete an expected replica", s.DeleteReplica(ctx, "st-r1"), nil)
	})
	t.Run("bandwidth", func(t *testing.T) {
		bw := api.Bandwidth{Peers: map[string]api.BandwidthLimit{"peer": {BitsPerSecond: 50e6}}}
		is(t, "set caps", s.SetBandwidth(ctx, bw), nil)
		is(t, "set again", s.SetBandwidth(ctx, bw), nil)
		is(t, "negative rate", s.SetBandwidth(ctx, api.Bandwidth{Groups: map[string]api.BandwidthLimit{"g": {BitsPerSecond: -1}}}), api.ErrInvalid)
		is(t, "lift caps", s.SetBandwidth(ctx, api.Bandwidth{}), nil)
	})
	t.Run("vms", func(t *testing.T) {
		_, err := s.StartVM(ctx, api.VMRequest{Name: "st-vm", Group: "nope", MemoryMiB: 64})
		is(t, "start on an unknown group", err, api.ErrNotFound)
		_, err = s.StopVM(ctx, "nope", api.StopOptions{Force: true})
		is(t, "stop unknown", err, api.ErrNotFound)
		_, err = s.CommitVM(ctx, "nope")
		is(t, "commit unknown", err, api.ErrNotFound)
		_, err = s.Console(ctx, "nope", 0)
		is(t, "console unknown", err, api.ErrNotFound)
	})
}
