package vault

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/pki"
	"github.com/ferry-dr/ferry/internal/promtest"
	"github.com/ferry-dr/ferry/internal/qemu"
	"github.com/ferry-dr/ferry/internal/store"
	"github.com/ferry-dr/ferry/internal/vaultclient"
)

type fixture struct {
	skew atomic.Int64 // added to the vault's clock
	// clientsMade counts the site clients the vault asked for.
	clientsMade atomic.Int64
	v           *Vault
	st          store.Store
	east, west  *fakeAgent
	srv         *httptest.Server
	op, reader  string
}

func newFixture(t testing.TB, st store.Store, opts ...func(*Config)) *fixture {
	t.Helper()
	f := &fixture{st: st,
		east: newFakeAgent("east", "vm1"),
		west: newFakeAgent("west")}
	f.west.points = []api.Point{{Seq: 5, Type: "crash", Time: time.Now()}, {Seq: 7, Type: "app", Time: time.Now()}, {Seq: 9, Type: "crash", Time: time.Now()}}
	f.east.peer = f.west
	cfg := Config{Store: st, NoHeartbeats: true, Now: func() time.Time { return time.Now().Add(time.Duration(f.skew.Load())) }, Site: func(addr, site string) Site {
		f.clientsMade.Add(1)
		if site == "east" {
			return f.east
		}
		return f.west
	}}
	for _, o := range opts {
		o(&cfg)
	}
	f.v = New(cfg)
	if err := f.v.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.v.Close() })
	f.srv = httptest.NewServer(f.v.Handler())
	t.Cleanup(f.srv.Close)
	ctx := context.Background()
	f.op, _ = f.v.CreateToken(ctx, RoleOperator, "test")
	f.reader, _ = f.v.CreateToken(ctx, RoleReader, "test")
	return f
}

func (f *fixture) call(t testing.TB, token, method, path string, body any, out any) int {
	t.Helper()
	var rd *bytes.Reader
	switch b := body.(type) {
	case nil:
		rd = bytes.NewReader(nil)
	case string:
		rd = bytes.NewReader([]byte(b))
	default:
		j, _ := json.Marshal(b)
		rd = bytes.NewReader(j)
	}
	req, _ := http.NewRequest(method, f.srv.URL+path, rd)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if out != nil {
		json.NewDecoder(resp.Body).Decode(out)
	}
	return resp.StatusCode
}

// setup enrolls east and west and defines vm1 at east.
func (f *fixture) setup(t testing.TB) {
	t.Helper()
	ctx := context.Background()
	enroll, _ := f.v.CreateToken(ctx, RoleEnroll, "east")
	if code := f.call(t, "", "POST", "/v1/enroll", map[string]string{"token": enroll, "name": "east", "addr": "e:1"}, nil); code != 200 {
		t.Fatalf("enroll: %d", code)
	}
	if code := f.call(t, "", "POST", "/v1/enroll", map[string]string{"token": enroll, "name": "x", "addr": "x:1"}, nil); code != 401 {
		t.Fatalf("enroll token reused: %d, want 401", code)
	}
	if code := f.call(t, f.op, "POST", "/v1/sites", map[string]string{"name": "west", "addr": "w:1"}, nil); code != 200 {
		t.Fatalf("add site: %d", code)
	}
	f.v.Heartbeat(ctx)
	vm := VM{Name: "vm1", Site: "east", MemoryMiB: 256, Disks: []DiskSpec{{Name: "vda", Size: 1 << 20}}}
	if code := f.call(t, f.op, "POST", "/v1/vms", vm, nil); code != 200 {
		t.Fatalf("define vm: %d", code)
	}
}

func (f *fixture) job(t *testing.T, path string, body any) Job {
	t.Helper()
	var raw json.RawMessage
	if code := f.call(t, f.op, "POST", path, body, &raw); code != 200 {
		t.Fatalf("POST %s: %d %s", path, code, raw)
	}
	var j Job
	json.Unmarshal(raw, &j)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	j, err := f.v.WaitJob(ctx, j.ID)
	if err != nil {
		t.Fatal(err)
	}
	return j
}

func (f *fixture) refused(t *testing.T, path string, body any, wantCode int, wantText string) {
	t.Helper()
	var e map[string]string
	code := f.call(t, f.op, "POST", path, body, &e)
	if code != wantCode || !strings.Contains(e["error"], wantText) {
		t.Fatalf("POST %s: %d %q, want %d with %q", path, code, e["error"], wantCode, wantText)
	}
}

func TestAuth(t *testing.T) {
	f := newFixture(t, store.NewMem())
	tests := []struct {
		token, method, path string
		body                any
		want                int
	}{
		{"", "GET", "/v1/sites", nil, 401},
		{"fy_bogus", "GET", "/v1/sites", nil, 401},
		{f.reader, "GET", "/v1/sites", nil, 200},
		{f.reader, "POST", "/v1/sites", map[string]string{"name": "a", "addr": "b"}, 403},
		{f.op, "POST", "/v1/sites", `{"name": "a", "addr": `, 400},
		{f.op, "POST", "/v1/sites", `{"nam": "a"}`, 400},
		{f.op, "POST", "/v1/tokens", map[string]string{"role": "admin"}, 400},
		{f.op, "GET", "/v1/protections/nope", nil, 404},
	}
	for _, tc := range tests {
		if got := f.call(t, tc.token, tc.method, tc.path, tc.body, nil); got != tc.want {
			t.Errorf("%s %s with %q: %d, want %d", tc.method, tc.path, tc.token, got, tc.want)
		}
	}
}

func TestLifecycleAndGuards(t *testing.T) {
	f := newFixture(t, store.NewMem())
	f.setup(t)
	if j := f.job(t, "/v1/protections", map[string]string{"vm": "vm1", "target": "west"}); j.State != JobSucceeded {
		t.Fatalf("enable: %+v", j)
	}
	f.refused(t, "/v1/protections", map[string]string{"vm": "vm1", "target": "west"}, 409, "already protected")
	f.refused(t, "/v1/protections/vm1/commit", nil, 409, "fail over first")
	f.refused(t, "/v1/protections/vm1/reprotect", nil, 409, "commit the failover first")
	f.refused(t, "/v1/protections/vm1/test-failover/cleanup", map[string]string{"notes": "x"}, 409, "no test failover")

	if j := f.job(t, "/v1/protections/vm1/test-failover", map[string]string{"point": "latest-app-consistent"}); j.State != JobSucceeded {
		t.Fatalf("test failover: %+v", j)
	}
	if req, _ := f.west.vm("vm1-drill"); req.Seq != 7 || req.Net != qemu.NetIsolated {
		t.Fatalf("drill VM: %+v", req)
	}
	f.refused(t, "/v1/protections/vm1/test-failover", map[string]string{}, 409, "clean up the pending test failover")
	f.refused(t, "/v1/protections/vm1/failover", map[string]string{"point": "latest"}, 409, "clean up the test failover first")
	if j := f.job(t, "/v1/protections/vm1/test-failover/cleanup", map[string]string{"notes": "drill ok"}); j.State != JobSucceeded {
		t.Fatalf("cleanup: %+v", j)
	}
	if _, ok := f.west.vm("vm1-drill"); ok {
		t.Fatal("drill VM not removed")
	}

	j := f.job(t, "/v1/protections/vm1/failover", map[string]string{"point": "latest"})
	if j.State != JobSucceeded {
		t.Fatalf("failover: %+v", j)
	}
	var names []string
	for _, s := range j.Steps {
		names = append(names, s.Name+"="+string(s.State))
	}
	want := "prerequisites check=succeeded shut down source VM=succeeded synchronize latest data=succeeded create recovery point=succeeded start VM at recovery site=succeeded"
	if strings.Join(names, " ") != want {
		t.Fatalf("failover steps: %v", names)
	}
	if msgs := strings.Join(j.Steps[4].Messages, " "); !strings.Contains(msgs, "console: Linux version 6.1 | ferry-guest: up | ready") {
		t.Fatalf("the last step does not show the first console lines: %s", msgs)
	}
	if _, ok := f.east.vm("vm1"); ok {
		t.Fatal("source VM not shut down")
	}
	var p Protection
	f.call(t, f.reader, "GET", "/v1/protections/vm1", nil, &p)
	if p.State != StateFailedOver || p.Generation != 2 || p.FailoverSeq != 103 {
		t.Fatalf("after failover: %+v", p)
	}
	vms, _ := f.v.VMs(context.Background())
	if vms[0].Site != "west" {
		t.Fatalf("VM site %s after failover", vms[0].Site)
	}
	f.refused(t, "/v1/protections/vm1/failover", map[string]string{}, 409, "only a protected VM can fail over")
	if j := f.job(t, "/v1/protections/vm1/change-point", map[string]string{"point": "5"}); j.State != JobSucceeded {
		t.Fatalf("change point: %+v", j)
	}
	if v, _ := f.west.vm("vm1"); v.Seq != 5 {
		t.Fatalf("VM not on point 5: %+v", v)
	}
	j = f.job(t, "/v1/protections/vm1/change-point", map[string]string{"point": "4242"})
	if j.State != JobFailed || !strings.Contains(j.Error, "no recovery point 4242") {
		t.Fatalf("change to a missing point: %+v", j)
	}
	f.call(t, f.reader, "GET", "/v1/protections/vm1", nil, &p)
	if p.State != StateFailedOver || p.Job != "" {
		t.Fatalf("failed job left the protection %+v", p)
	}
}

func TestOneJobAtATime(t *testing.T) {
	f := newFixture(t, store.NewMem())
	f.setup(t)
	f.job(t, "/v1/protections", map[string]string{"vm": "vm1", "target": "west"})
	f.west.mu.Lock()
	f.west.block = make(chan struct{})
	f.west.mu.Unlock()
	var j Job
	if code := f.call(t, f.op, "POST", "/v1/protections/vm1/test-failover", map[string]string{}, &j); code != 200 {
		t.Fatal(code)
	}
	f.refused(t, "/v1/protections/vm1/failover", map[string]string{}, 409, "job "+j.ID+" is running")
	close(f.west.block)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if j, _ = f.v.WaitJob(ctx, j.ID); j.State != JobSucceeded {
		t.Fatalf("%+v", j)
	}
}

// TestVaultStopsMidJob stops the vault while a failover is in its "start VM
// at recovery site" step (as kill -9 would leave the store) and starts a
// new vault on the same store: the job fails with the step named and the
// protection is released in its previous state.
func TestVaultStopsMidJob(t *testing.T) {
	st := store.NewMem()
	f := newFixture(t, st)
	f.setup(t)
	f.job(t, "/v1/protections", map[string]string{"vm": "vm1", "target": "west"})
	f.west.mu.Lock()
	f.west.block = make(chan struct{})
	f.west.mu.Unlock()
	var j Job
	f.call(t, f.op, "POST", "/v1/protections/vm1/failover", map[string]string{"point": "latest-processed"}, &j)
	deadline := time.Now().Add(5 * time.Second)
	for {
		cur, _ := f.v.Job(context.Background(), j.ID)
		if cur.Steps[4].State == JobRunning {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("job never reached its last step: %+v", cur)
		}
		time.Sleep(10 * time.Millisecond)
	}
	f.v.Close() // the job's goroutine stops; its state stays "running" in the store
	close(f.west.block)
	f2 := newFixture(t, st)
	j2, err := f2.v.Job(context.Background(), j.ID)
	if err != nil {
		t.Fatal(err)
	}
	if j2.State != JobFailed || !strings.Contains(j2.Error, `step "start VM at recovery site"`) {
		t.Fatalf("job after restart: %+v", j2)
	}
	p, _ := f2.v.Protection(context.Background(), "vm1")
	if p.State != StateProtected || p.Job != "" {
		t.Fatalf("protection after restart: %+v", p)
	}
}

func TestPrerequisitesNameWhatIsMissing(t *testing.T) {
	f := newFixture(t, store.NewMem())
	f.setup(t)
	f.job(t, "/v1/protections", map[string]string{"vm": "vm1", "target": "west"})
	f.west.mu.Lock()
	f.west.mem = 100 << 20 // the VM needs 256 MiB
	f.west.mu.Unlock()
	j := f.job(t, "/v1/protections/vm1/test-failover", map[string]string{})
	if j.State != JobFailed || !strings.Contains(j.Error, "west has 100 MiB of memory available; vm1 needs 256 MiB") {
		t.Fatalf("drill without memory: %s %q", j.State, j.Error)
	}
	j = f.job(t, "/v1/protections/vm1/failover", map[string]string{"point": "latest-processed"})
	if j.State != JobFailed || !strings.Contains(j.Error, "memory") {
		t.Fatalf("failover without memory: %s %q", j.State, j.Error)
	}
	var p Protection
	f.call(t, f.reader, "GET", "/v1/protections/vm1", nil, &p)
	if p.State != StateProtected || p.Job != "" || p.TestPending {
		t.Fatalf("after failed prerequisites: %+v", p)
	}
}

// TestHeartbeatOverMutualTLS: a site agent's heartbeat, authenticated by its
// certificate, keeps the site reachable; without a certificate it is refused.
func TestHeartbeatOverMutualTLS(t *testing.T) {
	pk := t.TempDir()
	now := time.Now()
	if err := pki.InitCA(pk, "ca", now); err != nil {
		t.Fatal(err)
	}
	pki.Issue(pk, pk, pki.Peer{Role: pki.RoleVault, Name: "vault"}, []string{"127.0.0.1"}, now)
	pki.Issue(pk, pk, pki.Peer{Role: pki.RoleSite, Name: "east"}, []string{"127.0.0.1"}, now)
	vid, _ := pki.Load(pk, "vault")
	eid, _ := pki.Load(pk, "east")
	f := newFixture(t, store.NewMem())
	f.v.AddSite(context.Background(), "east", "e:1", false)
	srv := httptest.NewUnstartedServer(f.v.Handler())
	srv.TLS = &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{vid.Cert},
		ClientAuth: tls.VerifyClientCertIfGiven, ClientCAs: vid.Pool}
	srv.StartTLS()
	defer srv.Close()
	addr := strings.TrimPrefix(srv.URL, "https://")
	c, err := vaultclient.NewSite(eid, addr)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Heartbeat(context.Background()); err != nil {
		t.Fatal(err)
	}
	// The vault's certificate is checked: a site's own certificate (as a
	// server) is not the vault.
	if other, _ := vaultclient.NewSite(vid, addr); other.Heartbeat(context.Background()) == nil {
		t.Fatal("a vault certificate heartbeated as a site")
	}
	sites, _ := f.v.Sites(context.Background())
	if !sites[0].Reachable || time.Since(sites[0].LastSeen) > 5*time.Second {
		t.Fatalf("after a heartbeat: %+v", sites[0])
	}
	anon := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: vid.Pool}}}
	resp, err := anon.Post(srv.URL+"/v1/heartbeat", "application/json", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 401 {
		t.Fatalf("heartbeat without a certificate: %d", resp.StatusCode)
	}
}

// TestNetworkMapping: sites declare networks; a protection maps the VM's
// NIC to the recovery site's networks, and drills and failovers attach the
// VM accordingly. Bad declarations and mappings are refused with a reason.
func TestNetworkMapping(t *testing.T) {
	f := newFixture(t, store.NewMem())
	f.setup(t)
	put := func(site, name string, n Network) (int, string) {
		var e map[string]any
		code := f.call(t, f.op, "PUT", "/v1/sites/"+site+"/networks/"+name, n, &e)
		msg, _ := e["error"].(string)
		return code, msg
	}
	bad := []struct {
		name string
		n    Network
		want string
	}{
		{"bad name", Network{Kind: KindProduction, Subnet: "10.1.0.0/24"}, "network name"},
		{"x", Network{Kind: "bridged", Subnet: "10.1.0.0/24"}, "network kind"},
		{"x", Network{Kind: KindProduction, Subnet: "10.1.0.0"}, "CIDR"},
		{"x", Network{Kind: KindProduction, Subnet: "10.1.0.9/24"}, "host bits"},
	}
	for _, b := range bad {
		if code, msg := put("west", b.name, b.n); code != 400 || !strings.Contains(msg, b.want) {
			t.Errorf("PUT network %s %+v: %d %q, want 400 with %q", b.name, b.n, code, msg, b.want)
		}
	}
	if code, _ := put("nowhere", "x", Network{Kind: KindIsolated, Subnet: "10.1.0.0/24"}); code != 404 {
		t.Errorf("network at an unknown site: %d, want 404", code)
	}
	for name, n := range map[string]Network{
		"prod-west": {Kind: KindProduction, Subnet: "10.20.0.0/24"},
		"drill":     {Kind: KindIsolated, Subnet: "10.99.0.0/24"},
	} {
		if code, msg := put("west", name, n); code != 200 {
			t.Fatalf("declare %s: %d %s", name, code, msg)
		}
	}
	f.refused(t, "/v1/protections", map[string]any{"vm": "vm1", "target": "west", "networks": map[string]string{"nic0": "nope"}}, 400, "has no network \"nope\"")
	f.refused(t, "/v1/protections", map[string]any{"vm": "vm1", "target": "west", "networks": map[string]string{"nic0": "drill"}}, 400, "a failover attaches the VM to a production network")
	f.refused(t, "/v1/protections", map[string]any{"vm": "vm1", "target": "west", "networks": map[string]string{"eth7": "prod-west"}}, 400, "no NIC \"eth7\"")
	f.refused(t, "/v1/protections", map[string]any{"vm": "vm1", "target": "west", "test_network": "prod-west"}, 400, "no isolated network \"prod-west\"")
	if j := f.job(t, "/v1/protections", map[string]any{"vm": "vm1", "target": "west", "networks": map[string]string{"nic0": "prod-west"}, "test_network": "drill"}); j.State != JobSucceeded {
		t.Fatalf("enable: %+v", j)
	}
	var p Protection
	f.call(t, f.reader, "GET", "/v1/protections/vm1", nil, &p)
	if p.Networks["east/nic0"] != "production" || p.Networks["west/nic0"] != "prod-west" || p.TestNetworks["west"] != "drill" || p.TestNetworks["east"] != "isolated" {
		t.Fatalf("mapping: %+v %+v", p.Networks, p.TestNetworks)
	}
	var e map[string]string
	if code := f.call(t, f.op, "DELETE", "/v1/sites/west/networks/prod-west", nil, &e); code != 409 || !strings.Contains(e["error"], "protection vm1") {
		t.Fatalf("delete a mapped network: %d %v", code, e)
	}
	if code, msg := put("west", "drill", Network{Kind: KindProduction, Subnet: "10.99.0.0/24"}); code != 409 {
		t.Fatalf("changing the kind of a used network: %d %s", code, msg)
	}
	f.job(t, "/v1/protections/vm1/test-failover", map[string]string{"point": "latest-processed"})
	if req, _ := f.west.vm("vm1-drill"); req.Net != qemu.NetIsolated || req.Subnet != "10.99.0.0/24" {
		t.Fatalf("drill VM attached to %s %s, want isolated 10.99.0.0/24", req.Net, req.Subnet)
	}
	f.job(t, "/v1/protections/vm1/test-failover/cleanup", map[string]string{"notes": "ok"})
	f.job(t, "/v1/protections/vm1/failover", map[string]string{"point": "latest"})
	if req, _ := f.west.vm("vm1"); req.Net != qemu.NetUser || req.Subnet != "10.20.0.0/24" {
		t.Fatalf("failed-over VM attached to %s %s, want production 10.20.0.0/24", req.Net, req.Subnet)
	}
}

// TestMetrics scrapes the vault's /metrics: a reader token is needed, and
// the protection's gauges and the job histogram are there.
func TestMetrics(t *testing.T) {
	f := newFixture(t, store.NewMem())
	f.setup(t)
	f.job(t, "/v1/protections", map[string]string{"vm": "vm1", "target": "west"})
	f.job(t, "/v1/protections/vm1/test-failover", map[string]string{"point": "5"})
	f.v.Heartbeat(context.Background())
	scrape := func(token string) (int, promtest.Scrape) {
		req, _ := http.NewRequest("GET", f.srv.URL+"/metrics", nil)
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != 200 {
			return resp.StatusCode, nil
		}
		s, err := promtest.Parse(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return 200, s
	}
	if code, _ := scrape(""); code != 401 {
		t.Fatalf("metrics without a token: %d, want 401", code)
	}
	_, s := scrape(f.reader)
	tests := []struct {
		name   string
		labels []string
		want   float64
	}{
		{"ferry_protection_rpo_seconds", []string{"vm", "vm1", "source", "east", "target", "west"}, 0},
		{"ferry_protection_health", []string{"vm", "vm1", "health", "healthy"}, 1},
		{"ferry_protection_health", []string{"vm", "vm1", "health", "critical"}, 0},
		{"ferry_protection_state", []string{"vm", "vm1", "state", string(StateProtected)}, 1},
		{"ferry_protection_rpo_threshold_seconds", []string{"vm", "vm1", "level", "critical"}, DefaultPolicy.RPOCritical.Seconds()},
		{"ferry_site_up", []string{"site", "west"}, 1},
		{"ferry_job_duration_seconds", []string{"action", ActEnable, "outcome", string(JobSucceeded)}, 1},
		{"ferry_job_duration_seconds", []string{"action", ActTestFailover, "outcome", string(JobSucceeded)}, 1},
	}
	for _, tt := range tests {
		got, ok := s.Value(tt.name, tt.labels...)
		if !ok || got != tt.want {
			t.Errorf("%s%v = %v (found %v), want %v", tt.name, tt.labels, got, ok, tt.want)
		}
	}
	var hist []RPOSample
	if code := f.call(t, f.reader, "GET", "/v1/protections/vm1/rpo-history", nil, &hist); code != 200 || len(hist) == 0 {
		t.Fatalf("rpo history: %d %v", code, hist)
	}
}

// TestHistory: a sample per 10 s, the worst RPO of the slot and the last
// of the other figures; samples older than the window go.
func TestHistory(t *testing.T) {
	h := newHistory()
	t0 := time.Date(2026, 11, 26, 10, 0, 0, 0, time.UTC)
	for _, s := range []struct {
		at time.Duration
		in RPOSample
	}{
		{0, RPOSample{RPO: 1, Pending: 10}},
		{3 * time.Second, RPOSample{RPO: 5, Pending: 20}},
		{4 * time.Second, RPOSample{RPO: 2, Pending: 30, Journal: 7}},
		{10 * time.Second, RPOSample{RPO: 0.5, Throughput: 9}},
	} {
		h.add("vm", t0.Add(s.at), s.in)
	}
	got := h.get("vm")
	if len(got) != 2 || got[0].RPO != 5 || got[0].Pending != 30 || got[0].Journal != 7 || got[1].RPO != 0.5 || got[1].Throughput != 9 {
		t.Fatalf("samples %+v, want the worst RPO and the last figures per 10 s", got)
	}
	h.add("vm", t0.Add(7*time.Hour), RPOSample{RPO: 1})
	if got := h.get("vm"); len(got) != 1 {
		t.Fatalf("samples older than the window kept: %+v", got)
	}
}

// TestHistorySurvivesRestart: the leader saves the history to the store
// (at most a minute apart, and when it stops);
// a vault started on the same store (a restart, a new leader) serves it,
// and a follower reads it from the store.
func TestHistorySurvivesRestart(t *testing.T) {
	st := store.NewMem()
	f := newFixture(t, st)
	f.setup(t)
	f.job(t, "/v1/protections", map[string]string{"vm": "vm1", "target": "west"})
	ctx := context.Background()
	f.v.Heartbeat(ctx)
	// A second sample, 20 s on: not saved yet (a save a minute), saved
	// when the vault stops.
	f.skew.Store(int64(20 * time.Second))
	f.v.Heartbeat(ctx)
	before, err := f.v.RPOHistory(ctx, "vm1")
	if err != nil || len(before) != 2 {
		t.Fatalf("history after two heartbeats 20 s apart: %v %v", before, err)
	}
	f.v.Close()

	g := newFixture(t, st)
	after, err := g.v.RPOHistory(ctx, "vm1")
	if err != nil || len(after) != len(before) || !after[0].T.Equal(before[0].T) || after[0].RPO != before[0].RPO {
		t.Fatalf("history after a restart: %+v %v, want %+v", after, err, before)
	}
	follower := New(Config{Store: st, NoHeartbeats: true, Leadership: &fakeLeadership{elect: make(chan struct{}), lost: make(chan struct{}), leader: func() string { return "other" }}})
	if err := follower.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer follower.Close()
	if got, err := follower.RPOHistory(ctx, "vm1"); err != nil || len(got) != len(before) {
		t.Fatalf("history read by a follower: %+v %v, want %d samples", got, err, len(before))
	}
}

// TestSourceDownIsCritical: once the source site stops answering, its
// protections turn critical (in the API and the metrics) instead of
// showing their last healthy figures; when it answers again, health comes
// from its RPO again.
func TestSourceDownIsCritical(t *testing.T) {
	f := newFixture(t, store.NewMem())
	f.setup(t)
	f.job(t, "/v1/protections", map[string]string{"vm": "vm1", "target": "west"})
	ctx := context.Background()
	f.v.Heartbeat(ctx)
	health := func() api.Health {
		p, err := f.v.Protection(ctx, "vm1")
		if err != nil {
			t.Fatal(err)
		}
		return p.Health
	}
	if h := health(); h != "healthy" {
		t.Fatalf("health %s with the source up", h)
	}
	f.east.mu.Lock()
	f.east.down = true
	f.east.mu.Unlock()
	f.v.Heartbeat(ctx) // one missed poll: not yet unreachable
	if h := health(); h != "healthy" {
		t.Fatalf("health %s after one missed poll", h)
	}
	f.skew.Store(int64(5 * time.Second))
	f.v.Heartbeat(ctx)
	if h := health(); h != "critical" {
		t.Fatalf("health %s with the source unreachable, want critical", h)
	}
	f.east.mu.Lock()
	f.east.down = false
	f.east.mu.Unlock()
	f.v.Heartbeat(ctx)
	if h := health(); h != "healthy" {
		t.Fatalf("health %s with the source back, want healthy", h)
	}
}

// TestVaultStopsBetweenProtectionAndJob: a vault that dies after a job's
// outcome reached the protection but before it reached the job's record
// records, at restart, the outcome the protection shows, and leaves the
// protection alone.
func TestVaultStopsBetweenProtectionAndJob(t *testing.T) {
	st := store.NewMem()
	f := newFixture(t, st)
	f.setup(t)
	j := f.job(t, "/v1/protections", map[string]string{"vm": "vm1", "target": "west"})
	ctx := context.Background()
	// Rewind the job's record to "running", as if the vault had died
	// right after releasing the protection.
	doc, err := st.Get(ctx, kindJob, j.ID)
	if err != nil {
		t.Fatal(err)
	}
	j.State, j.Ended = JobRunning, time.Time{}
	j.Steps[len(j.Steps)-1].State = JobRunning
	b, _ := json.Marshal(j)
	if _, err := st.Put(ctx, kindJob, j.ID, b, doc.Version); err != nil {
		t.Fatal(err)
	}
	f.v.Close()
	f2 := newFixture(t, st)
	j2, err := f2.v.Job(ctx, j.ID)
	if err != nil {
		t.Fatal(err)
	}
	if j2.State != JobSucceeded {
		t.Fatalf("job after restart: %+v", j2)
	}
	p, _ := f2.v.Protection(ctx, "vm1")
	if p.State != StateProtected || p.Job != "" {
		t.Fatalf("protection after restart: %+v", p)
	}
}

// TestSiteClientsReused: the vault makes one client per site and keeps it
// (a client per call left idle connections behind until the agents' cap
// on connections per identity refused the vault).
func TestSiteClientsReused(t *testing.T) {
	f := newFixture(t, store.NewMem())
	f.setup(t)
	ctx := context.Background()
	for range 10 {
		f.v.Heartbeat(ctx)
	}
	f.job(t, "/v1/protections", map[string]string{"vm": "vm1", "target": "west"})
	f.job(t, "/v1/protections/vm1/test-failover", map[string]string{})
	if got := f.clientsMade.Load(); got != 2 {
		t.Fatalf("%d site clients made for 2 sites", got)
	}
}

// TestVMStartedAgainAfterAgentRestart: a VM an operator started that is
// missing from its site's status (the agent restarted: its QEMU died with
// it) is started again at the next heartbeat; one never started, one the
// operator stopped, and one on a fenced group are not.
func TestVMStartedAgainAfterAgentRestart(t *testing.T) {
	f := newFixture(t, store.NewMem())
	f.setup(t)
	ctx := context.Background()
	starts := func() int {
		f.east.mu.Lock()
		defer f.east.mu.Unlock()
		n := 0
		for _, c := range f.east.calls {
			if c == "start VM vm1" {
				n++
			}
		}
		return n
	}
	restart := func() { // the agent restarts: its VMs are gone
		f.east.mu.Lock()
		delete(f.east.vms, "vm1")
		f.east.mu.Unlock()
	}
	restart()
	f.v.Heartbeat(ctx)
	if got := starts(); got != 0 {
		t.Fatalf("a VM never started was started %d times", got)
	}
	if _, err := f.v.StartVM(ctx, "vm1"); err != nil {
		t.Fatal(err)
	}
	restart()
	f.v.Heartbeat(ctx)
	if got := starts(); got != 2 {
		t.Fatalf("starts after the agent restarted: %d, want 2 (the operator's and the vault's)", got)
	}
	if _, ok := f.east.vm("vm1"); !ok {
		t.Fatal("the VM is not running again")
	}
	f.v.Heartbeat(ctx)
	if got := starts(); got != 2 {
		t.Fatalf("a running VM was started again: %d starts", got)
	}
	if _, err := f.v.StopVM(ctx, "vm1"); err != nil {
		t.Fatal(err)
	}
	restart()
	f.v.Heartbeat(ctx)
	if got := starts(); got != 2 {
		t.Fatalf("a VM the operator stopped was started again: %d starts", got)
	}
	if _, err := f.v.StartVM(ctx, "vm1"); err != nil {
		t.Fatal(err)
	}
	f.east.mu.Lock()
	f.east.fenced = 1
	f.east.mu.Unlock()
	restart()
	f.v.Heartbeat(ctx)
	if got := starts(); got != 3 {
		t.Fatalf("a VM on a fenced group was started again: %d starts", got)
	}
}

// TestFailoverRetryKeepsStartedVM: a failover whose vault stopped after
// the VM started at the recovery site is retried: the retry keeps that VM
// (and what it wrote) instead of failing on it or starting another.
func TestFailoverRetryKeepsStartedVM(t *testing.T) {
	f := newFixture(t, store.NewMem())
	f.setup(t)
	if j := f.job(t, "/v1/protections", map[string]string{"vm": "vm1", "target": "west"}); j.State != JobSucceeded {
		t.Fatalf("enable: %+v", j)
	}
	// What the interrupted attempt left: the VM runs at west on point 7.
	f.west.mu.Lock()
	f.west.vms["vm1"] = api.VMRequest{Name: "vm1", Replica: "vm1", Seq: 7}
	f.west.mu.Unlock()
	j := f.job(t, "/v1/protections/vm1/failover", map[string]string{"point": "latest"})
	if j.State != JobSucceeded {
		t.Fatalf("failover retry: %+v", j)
	}
	f.west.mu.Lock()
	for _, c := range f.west.calls {
		if c == "start VM vm1" {
			t.Errorf("the retry started the VM again")
		}
	}
	f.west.mu.Unlock()
	p, _ := f.v.Protection(context.Background(), "vm1")
	if p.State != StateFailedOver || p.FailoverSeq != 7 {
		t.Fatalf("after the retry: %+v, want failed over at point 7", p)
	}
	if msgs := strings.Join(j.Steps[4].Messages, " "); !strings.Contains(msgs, "kept") {
		t.Fatalf("the step does not say the VM was kept: %s", msgs)
	}
}

// TestFailedOverVMStartedAgain: the recovery site's agent restarts while
// the failed-over VM runs on views (not committed): the vault starts it
// again on its replica at the failover point.
func TestFailedOverVMStartedAgain(t *testing.T) {
	f := newFixture(t, store.NewMem())
	f.setup(t)
	ctx := context.Background()
	if _, err := f.v.StartVM(ctx, "vm1"); err == nil {
		t.Fatal("vm1 already runs at east: a second start must fail")
	}
	f.v.setRunning(ctx, "vm1", true) // as if an operator started it
	if j := f.job(t, "/v1/protections", map[string]string{"vm": "vm1", "target": "west"}); j.State != JobSucceeded {
		t.Fatalf("enable: %+v", j)
	}
	if j := f.job(t, "/v1/protections/vm1/failover", map[string]string{"point": "latest"}); j.State != JobSucceeded {
		t.Fatalf("failover: %+v", j)
	}
	p, _ := f.v.Protection(ctx, "vm1")
	f.west.mu.Lock()
	delete(f.west.vms, "vm1") // the recovery agent restarted
	f.west.mu.Unlock()
	f.v.Heartbeat(ctx)
	req, ok := f.west.vm("vm1")
	if !ok || req.Replica != "vm1" || req.Seq != p.FailoverSeq {
		t.Fatalf("after the recovery agent's restart: %+v (running %v), want on replica vm1 at point %d", req, ok, p.FailoverSeq)
	}
}

// TestSeveralNICs: a VM with two NICs keeps both through a drill (both on
// the drill network) and a failover (each on the network it maps to),
// the forwards on the first; bad NIC lists are refused at define.
func TestSeveralNICs(t *testing.T) {
	f := newFixture(t, store.NewMem())
	f.setup(t)
	for _, n := range []struct {
		site, name string
		n          Network
	}{
		{"east", "backend", Network{Kind: KindProduction, Subnet: "10.30.0.0/24"}},
		{"west", "prod-west", Network{Kind: KindProduction, Subnet: "10.20.0.0/24"}},
		{"west", "backend-west", Network{Kind: KindProduction, Subnet: "10.31.0.0/24"}},
		{"west", "drill", Network{Kind: KindIsolated, Subnet: "10.99.0.0/24"}},
	} {
		if code := f.call(t, f.op, "PUT", "/v1/sites/"+n.site+"/networks/"+n.name, n.n, nil); code != 200 {
			t.Fatalf("declare %s/%s: %d", n.site, n.name, code)
		}
	}
	vm := VM{Name: "db", Site: "east", MemoryMiB: 256, Disks: []DiskSpec{{Name: "vda", Size: 1 << 20}}, GuestPort: 80,
		Forwards: map[string]string{"west": "127.0.0.1:9000"},
		NICs:     []NIC{{Name: "nic0", Network: "production"}, {Name: "nic1", Network: "backend"}}}
	for name, nics := range map[string][]NIC{
		"duplicate": {{Name: "nic0", Network: "production"}, {Name: "nic0", Network: "backend"}},
		"unknown":   {{Name: "nic0", Network: "production"}, {Name: "nic1", Network: "nope"}},
		"nine NICs": slices.Repeat([]NIC{{Network: "production"}}, 9),
		"bad name":  {{Name: "nic/0", Network: "production"}},
	} {
		bad := vm
		bad.Name, bad.NICs = "bad", slices.Clone(nics)
		if name == "nine NICs" {
			for i := range bad.NICs {
				bad.NICs[i].Name = fmt.Sprintf("nic%d", i)
			}
		}
		if code := f.call(t, f.op, "POST", "/v1/vms", bad, nil); code != 400 {
			t.Errorf("define with %s NICs: %d, want 400", name, code)
		}
	}
	if code := f.call(t, f.op, "POST", "/v1/vms", vm, nil); code != 200 {
		t.Fatalf("define db: %d", code)
	}
	if j := f.job(t, "/v1/protections", map[string]any{"vm": "db", "target": "west",
		"networks": map[string]string{"nic0": "prod-west", "nic1": "backend-west"}, "test_network": "drill"}); j.State != JobSucceeded {
		t.Fatalf("enable: %+v", j)
	}
	f.job(t, "/v1/protections/db/test-failover", map[string]string{"point": "latest-processed"})
	req, _ := f.west.vm("db-drill")
	if len(req.NICs) != 2 || req.NICs[0].Net != qemu.NetIsolated || req.NICs[1].Net != qemu.NetIsolated ||
		req.NICs[0].Subnet != "10.99.0.0/24" || req.NICs[1].Subnet != "10.99.0.0/24" || req.NICs[1].Name != "nic1" {
		t.Fatalf("drill NICs %+v, want both isolated on 10.99.0.0/24", req.NICs)
	}
	f.job(t, "/v1/protections/db/test-failover/cleanup", map[string]string{"notes": "ok"})
	f.job(t, "/v1/protections/db/failover", map[string]string{"point": "latest"})
	req, _ = f.west.vm("db")
	if len(req.NICs) != 2 || req.NICs[0].Subnet != "10.20.0.0/24" || req.NICs[1].Subnet != "10.31.0.0/24" ||
		req.NICs[0].Net != qemu.NetUser || req.NICs[1].Net != qemu.NetUser {
		t.Fatalf("failed-over NICs %+v, want nic0 on 10.20.0.0/24 and nic1 on 10.31.0.0/24", req.NICs)
	}
	if len(req.NICs[0].Forwards) != 1 || req.NICs[0].Forwards[0].Host.String() != "127.0.0.1:9000" || len(req.NICs[1].Forwards) != 0 {
		t.Errorf("forwards: nic0 %+v nic1 %+v, want 127.0.0.1:9000 on nic0 only", req.NICs[0].Forwards, req.NICs[1].Forwards)
	}
	if req.Net != req.NICs[0].Net || req.Subnet != req.NICs[0].Subnet || len(req.Forwards) != 1 {
		t.Errorf("the single-NIC fields (for older agents) %s %s %+v do not mirror nic0", req.Net, req.Subnet, req.Forwards)
	}
}

// TestUEFIVarsDisk: a UEFI VM gets a disk for its UEFI variables,
// replicated with its disks; a BIOS VM may not name a disk so.
func TestUEFIVarsDisk(t *testing.T) {
	f := newFixture(t, store.NewMem())
	f.setup(t)
	vm := VM{Name: "efi", Site: "east", MemoryMiB: 256, Firmware: "uefi", Disks: []DiskSpec{{Name: "vda", Size: 1 << 20}}}
	if code := f.call(t, f.op, "POST", "/v1/vms", vm, nil); code != 200 {
		t.Fatalf("define a UEFI VM: %d", code)
	}
	var vms []VM
	f.call(t, f.reader, "GET", "/v1/vms", nil, &vms)
	i := slices.IndexFunc(vms, func(v VM) bool { return v.Name == "efi" })
	if i < 0 || len(vms[i].Disks) != 2 || vms[i].Disks[1] != (DiskSpec{Name: api.EFIVarsDisk, Size: api.EFIVarsSize}) {
		t.Fatalf("UEFI VM defined as %+v, want its disks and %s of %d bytes", vms, api.EFIVarsDisk, api.EFIVarsSize)
	}
	bios := VM{Name: "bios", Site: "east", MemoryMiB: 256, Disks: []DiskSpec{{Name: "vda", Size: 1 << 20}, {Name: api.EFIVarsDisk, Size: 1 << 20}}}
	var e map[string]string
	if code := f.call(t, f.op, "POST", "/v1/vms", bios, &e); code != 400 || !strings.Contains(e["error"], "UEFI") {
		t.Fatalf("a BIOS VM with a disk %s: %d %v, want 400", api.EFIVarsDisk, code, e)
	}
}
