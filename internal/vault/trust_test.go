package vault

import (
	"context"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/store"
)

// TestInjectionRefused: strings that once reached QEMU's option list
// (a guestfwd running a host command, restrict=off un-isolating a drill
// network) and a name that once came back as "409" are refused with 400,
// and no site agent is asked anything.
func TestInjectionRefused(t *testing.T) {
	f := newFixture(t, store.NewMem())
	f.setup(t)
	callsBefore := len(f.east.calls)
	vm := func(name string, fw map[string]string) VM {
		return VM{Name: name, Site: "east", MemoryMiB: 256, Disks: []DiskSpec{{Name: "vda", Size: 1 << 20}}, GuestPort: 80, Forwards: fw}
	}
	guestfwd := "127.0.0.1:8080,guestfwd=tcp:10.0.2.100:1234-cmd:touch /tmp/pwned,x=y"
	restrict := "127.0.0.1:8080,restrict=off"
	tests := []struct {
		name   string
		method string
		path   string
		body   any
	}{
		{"guestfwd in a forward", "POST", "/v1/vms", vm("web", map[string]string{"east": guestfwd})},
		{"restrict=off in a forward", "POST", "/v1/vms", vm("web", map[string]string{"west/isolated": restrict})},
		{"forward key with an option", "POST", "/v1/vms", vm("web", map[string]string{"east,x=y": "127.0.0.1:8080"})},
		{"IPv6 forward", "POST", "/v1/vms", vm("web", map[string]string{"east": "[::1]:8080"})},
		{"forward without a port", "POST", "/v1/vms", vm("web", map[string]string{"east": "127.0.0.1"})},
		{"name ../409", "POST", "/v1/vms", vm("../409", nil)},
		{"name with a comma", "POST", "/v1/vms", vm("web,x=y", nil)},
		{"disk name with a slash", "POST", "/v1/vms", VM{Name: "web", Site: "east", MemoryMiB: 256, Disks: []DiskSpec{{Name: "a/b", Size: 1 << 20}}}},
		{"append with a newline", "POST", "/v1/vms", VM{Name: "web", Site: "east", MemoryMiB: 256, Disks: []DiskSpec{{Name: "vda", Size: 1 << 20}}, Kernel: "k", Append: "a\nb"}},
		{"guestfwd in PUT forwards", "PUT", "/v1/vms/vm1/forwards", map[string]string{"east": guestfwd}},
		{"restrict=off in PUT forwards", "PUT", "/v1/vms/vm1/forwards", map[string]string{"east": restrict}},
		{"site ../../x", "POST", "/v1/sites", map[string]string{"name": "../../x", "addr": "127.0.0.1:1"}},
		{"site address with a path", "POST", "/v1/sites", map[string]string{"name": "north", "addr": "127.0.0.1:1/x"}},
		{"policy ../p", "PUT", "/v1/policies/..%2Fp", map[string]any{"retention": 3600e9, "rpo_warning": 1e9, "rpo_critical": 2e9}},
	}
	for _, tt := range tests {
		var out map[string]any
		if got := f.call(t, f.op, tt.method, tt.path, tt.body, &out); got != http.StatusBadRequest {
			t.Errorf("%s: %d %v, want 400", tt.name, got, out)
		}
	}
	if got := f.east.calls[callsBefore:]; len(got) != 0 {
		t.Errorf("refused requests reached the site: %v", got)
	}
	vms, _ := f.v.VMs(context.Background())
	if len(vms) != 1 || len(vms[0].Forwards) != 0 {
		t.Errorf("refused requests were stored: %+v", vms)
	}
	sites, _ := f.v.Sites(context.Background())
	if len(sites) != 2 {
		t.Errorf("sites: %+v", sites)
	}
	// A valid forward is stored, and reaches the agent typed.
	if got := f.call(t, f.op, "PUT", "/v1/vms/vm1/forwards", map[string]string{"east": "127.0.0.1:8080"}, nil); got != 200 {
		t.Fatalf("valid forward: %d", got)
	}
}

// TestEnrollOverExistingSite: a plain enroll token cannot re-address a
// site (before, it moved east to 127.0.0.1:9); a re-enrollment token an
// operator made for that site can, once.
func TestEnrollOverExistingSite(t *testing.T) {
	f := newFixture(t, store.NewMem())
	f.setup(t)
	ctx := context.Background()
	plain, _ := f.v.CreateToken(ctx, RoleEnroll, "new")
	if got := f.call(t, "", "POST", "/v1/enroll", map[string]string{"token": plain, "name": "east", "addr": "127.0.0.1:9"}, nil); got != http.StatusConflict {
		t.Fatalf("enroll over east: %d, want 409", got)
	}
	if s, _, _ := get[api.Site](ctx, f.st, kindSite, "east"); s.Addr != "e:1" {
		t.Fatalf("east moved to %s", s.Addr)
	}
	if got := f.call(t, f.op, "POST", "/v1/sites", map[string]string{"name": "east", "addr": "127.0.0.1:9"}, nil); got != http.StatusConflict {
		t.Fatalf("site add over east: %d, want 409", got)
	}
	var tok map[string]any
	if got := f.call(t, f.op, "POST", "/v1/tokens", map[string]string{"role": "enroll", "name": "move east", "reenroll": "east"}, &tok); got != 200 {
		t.Fatalf("re-enrollment token: %d", got)
	}
	if got := f.call(t, "", "POST", "/v1/enroll", map[string]any{"token": tok["token"], "name": "west", "addr": "127.0.0.1:9"}, nil); got != http.StatusConflict {
		t.Fatalf("a token for east re-enrolled west: %d", got)
	}
	if got := f.call(t, "", "POST", "/v1/enroll", map[string]any{"token": tok["token"], "name": "east", "addr": "e:2"}, nil); got != 200 {
		t.Fatalf("re-enroll east: %d", got)
	}
	if s, _, _ := get[api.Site](ctx, f.st, kindSite, "east"); s.Addr != "e:2" {
		t.Fatalf("east at %s after re-enrollment, want e:2", s.Addr)
	}
}

// TestTokens: list shows no secrets, a revoked or expired token gets 401
// at once, and only "Authorization: Bearer TOKEN" is accepted.
func TestTokens(t *testing.T) {
	f := newFixture(t, store.NewMem())
	var made map[string]any
	if got := f.call(t, f.op, "POST", "/v1/tokens", map[string]string{"role": "reader", "name": "grafana", "ttl": "1h"}, &made); got != 200 {
		t.Fatalf("create: %d", got)
	}
	tok, id := made["token"].(string), made["id"].(string)
	if got := f.call(t, tok, "GET", "/v1/sites", nil, nil); got != 200 {
		t.Fatalf("new token: %d", got)
	}
	var list []TokenInfo
	if got := f.call(t, f.op, "GET", "/v1/tokens", nil, &list); got != 200 || len(list) != 3 {
		t.Fatalf("list: %d %+v", got, list)
	}
	i := slices.IndexFunc(list, func(x TokenInfo) bool { return x.ID == id })
	if i < 0 || list[i].Name != "grafana" || list[i].Expires.IsZero() {
		t.Fatalf("token %s not listed right: %+v", id, list)
	}
	if got := f.call(t, f.reader, "GET", "/v1/tokens", nil, nil); got != http.StatusForbidden {
		t.Fatalf("a reader listed tokens: %d", got)
	}
	// Without "Bearer", the header is no token at all.
	req, _ := http.NewRequest("GET", f.srv.URL+"/v1/sites", nil)
	req.Header.Set("Authorization", f.op)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("Authorization without Bearer: %d, want 401", resp.StatusCode)
	}
	// Expiry.
	f.skew.Store(int64(2 * time.Hour))
	if got := f.call(t, tok, "GET", "/v1/sites", nil, nil); got != http.StatusUnauthorized {
		t.Fatalf("expired token: %d, want 401", got)
	}
	f.skew.Store(0)
	// Revocation.
	if got := f.call(t, f.op, "DELETE", "/v1/tokens/"+id, nil, nil); got != 200 {
		t.Fatalf("revoke: %d", got)
	}
	if got := f.call(t, tok, "GET", "/v1/sites", nil, nil); got != http.StatusUnauthorized {
		t.Fatalf("revoked token: %d, want 401", got)
	}
	if got := f.call(t, f.op, "DELETE", "/v1/tokens/"+id, nil, nil); got != http.StatusNotFound {
		t.Fatalf("revoke again: %d, want 404", got)
	}
	for _, bad := range []map[string]string{{"role": "reader", "ttl": "-1h"}, {"role": "reader", "ttl": "soon"}, {"role": "reader", "reenroll": "east"}, {"role": "enroll", "reenroll": "nowhere"}} {
		if got := f.call(t, f.op, "POST", "/v1/tokens", bad, nil); got != http.StatusBadRequest && got != http.StatusNotFound {
			t.Errorf("token %v: %d, want 400 or 404", bad, got)
		}
	}
}

// TestSiteDelete: refused while a VM or a protection uses the site.
func TestSiteDelete(t *testing.T) {
	f := newFixture(t, store.NewMem())
	f.setup(t)
	var out map[string]string
	if got := f.call(t, f.op, "DELETE", "/v1/sites/east", nil, &out); got != http.StatusConflict || !strings.Contains(out["error"], "VM vm1") {
		t.Fatalf("delete a site a VM runs at: %d %v", got, out)
	}
	if j := f.job(t, "/v1/protections", map[string]string{"vm": "vm1", "target": "west"}); j.State != JobSucceeded {
		t.Fatalf("enable: %+v", j)
	}
	if got := f.call(t, f.op, "DELETE", "/v1/sites/west", nil, &out); got != http.StatusConflict || !strings.Contains(out["error"], "protection of vm1") {
		t.Fatalf("delete a protection's target: %d %v", got, out)
	}
	if got := f.call(t, f.op, "POST", "/v1/sites", map[string]string{"name": "north", "addr": "n:1"}, nil); got != 200 {
		t.Fatal(got)
	}
	if got := f.call(t, f.reader, "DELETE", "/v1/sites/north", nil, nil); got != http.StatusForbidden {
		t.Fatalf("a reader deleted a site: %d", got)
	}
	if got := f.call(t, f.op, "DELETE", "/v1/sites/north", nil, nil); got != 200 {
		t.Fatalf("delete an unused site: %d", got)
	}
	if got := f.call(t, f.op, "DELETE", "/v1/sites/north", nil, nil); got != http.StatusNotFound {
		t.Fatalf("delete again: %d", got)
	}
}

// TestFenceSticks: the vault re-sends a fence until the old source
// reports the new generation (before, it was recorded once, and a site
// that lost it, or answered 404 for any reason, was never fenced again).
func TestFenceSticks(t *testing.T) {
	f := newFixture(t, store.NewMem())
	f.setup(t)
	ctx := context.Background()
	if j := f.job(t, "/v1/protections", map[string]string{"vm": "vm1", "target": "west"}); j.State != JobSucceeded {
		t.Fatalf("enable: %+v", j)
	}
	if j := f.job(t, "/v1/protections/vm1/failover", map[string]any{"point": "latest", "shutdown_source": false}); j.State != JobSucceeded {
		t.Fatalf("failover: %+v", j)
	}
	fences := func() int { f.east.mu.Lock(); defer f.east.mu.Unlock(); return f.east.fences }
	start := fences()
	for range 3 {
		f.v.Heartbeat(ctx)
	}
	if got := fences() - start; got != 3 {
		t.Fatalf("fences sent over 3 polls to a site that does not keep them: %d, want 3", got)
	}
	f.east.mu.Lock()
	f.east.keepFence = true
	f.east.mu.Unlock()
	f.v.Heartbeat(ctx)
	f.v.Heartbeat(ctx)
	if got := fences() - start; got != 4 {
		t.Fatalf("fences after the site kept one: %d, want 4 (no more once confirmed)", got)
	}
	if p, _ := f.v.Protection(ctx, "vm1"); !p.Fenced || f.east.fenced != p.Generation {
		t.Fatalf("protection %+v, site fenced at %d", p, f.east.fenced)
	}
	// The site loses its fence (a restored disk): the vault fences again.
	f.east.mu.Lock()
	f.east.fenced, f.east.keepFence = 0, true
	f.east.mu.Unlock()
	f.v.Heartbeat(ctx)
	if f.east.fenced == 0 {
		t.Fatal("a lost fence was not sent again")
	}
}

// TestDamagedReplicaIsCritical: a replica its recovery site could not
// open turns the protection critical, with the reason, in the API.
func TestDamagedReplicaIsCritical(t *testing.T) {
	f := newFixture(t, store.NewMem())
	f.setup(t)
	ctx := context.Background()
	f.job(t, "/v1/protections", map[string]string{"vm": "vm1", "target": "west"})
	f.west.mu.Lock()
	f.west.problems = []api.Problem{{Kind: "replica", Name: "vm1", Reason: "journal: damaged: segment 3 at offset 4096"}}
	f.west.mu.Unlock()
	for range 3 { // the source's polls must not turn it healthy again
		f.v.Heartbeat(ctx)
		var p Protection
		f.call(t, f.reader, "GET", "/v1/protections/vm1", nil, &p)
		if p.Health != api.Critical || !strings.Contains(p.HealthReason, "replica at west did not open: journal: damaged") {
			t.Fatalf("protection with a damaged replica: %s %q", p.Health, p.HealthReason)
		}
	}
}

// TestFenceWaitsForDamagedGroup: an old source whose group did not open is
// not counted as fenced (once repaired it would replicate as a source).
func TestFenceWaitsForDamagedGroup(t *testing.T) {
	f := newFixture(t, store.NewMem())
	f.setup(t)
	ctx := context.Background()
	f.job(t, "/v1/protections", map[string]string{"vm": "vm1", "target": "west"})
	if j := f.job(t, "/v1/protections/vm1/failover", map[string]any{"point": "latest", "shutdown_source": false}); j.State != JobSucceeded {
		t.Fatalf("failover: %+v", j)
	}
	f.east.mu.Lock()
	delete(f.east.groups, "vm1")
	f.east.problems = []api.Problem{{Kind: "group", Name: "vm1", Reason: "journal: damaged"}}
	f.east.mu.Unlock()
	f.v.Heartbeat(ctx)
	if p, _ := f.v.Protection(ctx, "vm1"); p.Fenced {
		t.Fatal("a group that did not open was counted as fenced")
	}
}

func TestCheckSiteAddress(t *testing.T) {
	for _, tt := range []struct {
		addr string
		ok   bool
	}{
		{"10.0.0.2:7410", true}, {"[::1]:7410", true}, {"east.example.com:7410", true}, {"e:1", true},
		{"a-very-long-but-fine-label-for-a-host.in.some.deeply.nested.zone.example.org:7410", true},
		{"east:0", false}, {"east:70000", false}, {":7410", false}, {"east", false}, {"-east:1", false},
		{"east..example:1", false}, {"ea st:1", false}, {"east,restrict=off:1", false}, {"127.0.0.1:1/x", false},
	} {
		if err := checkSite("east", tt.addr); (err == nil) != tt.ok {
			t.Errorf("checkSite(%q) = %v, want ok=%v", tt.addr, err, tt.ok)
		}
	}
}
