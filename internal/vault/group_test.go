package vault

import (
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/ferry-dr/ferry/internal/store"
)

// TestConsistencyGroup: a group of two VMs is defined as one set of
// disks, and every DR action starts, stops and commits both members at
// one point.
func TestConsistencyGroup(t *testing.T) {
	f := newFixture(t, store.NewMem())
	f.setup(t)
	member := func(name string, disks ...string) VM {
		m := VM{Name: name, MemoryMiB: 128}
		for _, d := range disks {
			m.Disks = append(m.Disks, DiskSpec{Name: d, Size: 1 << 20})
		}
		return m
	}
	bad := []struct {
		name string
		g    VM
		code int
	}{
		{"one member", VM{Name: "g1", Site: "east", Members: []VM{member("a", "vda")}}, 400},
		{"member without disks", VM{Name: "g1", Site: "east", Members: []VM{member("a", "vda"), member("b")}}, 400},
		{"member named as a VM", VM{Name: "g1", Site: "east", Members: []VM{member("vm1", "vda"), member("b", "vda")}}, 409},
		{"twice the same member", VM{Name: "g1", Site: "east", Members: []VM{member("a", "vda"), member("a", "vda")}}, 409},
		{"own disks", VM{Name: "g1", Site: "east", Disks: []DiskSpec{{Name: "x", Size: 1}}, Members: []VM{member("a", "vda"), member("b", "vda")}}, 400},
	}
	for _, tt := range bad {
		if code := f.call(t, f.op, "POST", "/v1/vms", tt.g, nil); code != tt.code {
			t.Errorf("%s: %d, want %d", tt.name, code, tt.code)
		}
	}
	g := VM{Name: "shop", Site: "east", Members: []VM{member("db", "vda", "vdb"), member("web", "vda")}}
	if code := f.call(t, f.op, "POST", "/v1/vms", g, nil); code != 200 {
		t.Fatalf("define group: %d", code)
	}
	if code := f.call(t, f.op, "POST", "/v1/vms", VM{Name: "db", Site: "east", MemoryMiB: 64, Disks: []DiskSpec{{Name: "vda", Size: 1}}}, nil); code != 409 {
		t.Errorf("a VM named as a member: %d, want 409", code)
	}
	f.east.mu.Lock()
	hasGroup := f.east.groups["shop"]
	f.east.mu.Unlock()
	if !hasGroup {
		t.Fatal("east has no group shop")
	}
	ctx := context.Background()
	if _, err := f.v.StartVM(ctx, "shop"); err != nil {
		t.Fatal(err)
	}
	for _, m := range []struct {
		name  string
		disks []string
	}{{"db", []string{"db-vda", "db-vdb"}}, {"web", []string{"web-vda"}}} {
		req, ok := f.east.vm(m.name)
		if !ok || req.Group != "shop" || !slices.Equal(req.Disks, m.disks) {
			t.Fatalf("member %s at east: %+v", m.name, req)
		}
	}
	if j := f.job(t, "/v1/protections", map[string]string{"vm": "shop", "target": "west"}); j.State != JobSucceeded {
		t.Fatalf("protect: %s %s", j.State, j.Error)
	}
	onePoint := func(suffix string) uint64 {
		t.Helper()
		db, okDB := f.west.vm("db" + suffix)
		web, okWeb := f.west.vm("web" + suffix)
		if !okDB || !okWeb || db.Replica != "shop" || web.Replica != "shop" || db.Seq == 0 || db.Seq != web.Seq {
			t.Fatalf("members%s at west: %+v, %+v", suffix, db, web)
		}
		return db.Seq
	}
	stepsOf := func(j Job) string {
		var names []string
		for _, s := range j.Steps {
			names = append(names, s.Name+"="+string(s.State))
		}
		return strings.Join(names, ", ")
	}
	j := f.job(t, "/v1/protections/shop/test-failover", map[string]string{"point": "latest-processed"})
	if j.State != JobSucceeded {
		t.Fatalf("drill: %s %s", j.State, j.Error)
	}
	if got, want := stepsOf(j), "prerequisites check=succeeded, create test VM=succeeded, start test VM db-drill=succeeded, start test VM web-drill=succeeded"; got != want {
		t.Errorf("drill steps: %s, want %s", got, want)
	}
	onePoint("-drill")
	if j := f.job(t, "/v1/protections/shop/test-failover/cleanup", map[string]string{"notes": "ok"}); j.State != JobSucceeded {
		t.Fatalf("cleanup: %s %s", j.State, j.Error)
	}
	if _, ok := f.west.vm("db-drill"); ok {
		t.Fatal("cleanup left db-drill running")
	}
	j = f.job(t, "/v1/protections/shop/failover", map[string]any{"point": "latest", "shutdown_source": true})
	if j.State != JobSucceeded {
		t.Fatalf("failover: %s %s", j.State, j.Error)
	}
	if got := stepsOf(j); !strings.HasSuffix(got, "start db at recovery site=succeeded, start web at recovery site=succeeded") {
		t.Errorf("failover steps: %s, want a start step per VM", got)
	}
	seq := onePoint("")
	if _, ok := f.east.vm("db"); ok {
		t.Error("the planned failover left db running at east")
	}
	if j := f.job(t, "/v1/protections/shop/change-point", map[string]string{"point": "5"}); j.State != JobSucceeded {
		t.Fatalf("change point: %s %s", j.State, j.Error)
	}
	if s := onePoint(""); s == seq || s != 5 {
		t.Errorf("after change point: members on %d, want 5", s)
	}
	if j := f.job(t, "/v1/protections/shop/commit", map[string]any{}); j.State != JobSucceeded {
		t.Fatalf("commit: %s %s", j.State, j.Error)
	}
	for _, n := range []string{"db", "web"} {
		if req, _ := f.west.vm(n); req.Group != "shop" || req.Replica != "" {
			t.Errorf("after commit %s runs on %+v", n, req)
		}
	}
	if txt := strings.Join(f.west.callsNamed("commit VM"), ","); txt != "commit VM db" {
		t.Errorf("commit calls at west: %q, want one for the group", txt)
	}
	if j := f.job(t, "/v1/protections/shop/reprotect", map[string]any{}); j.State != JobSucceeded {
		t.Fatalf("reprotect: %s %s", j.State, j.Error)
	}
	if p, _ := f.v.Protection(context.Background(), "shop"); p.State != StateProtected || p.Source != "west" {
		t.Fatalf("after reprotect: %+v", p)
	}
}
