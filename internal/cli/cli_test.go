package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/journal"
	"github.com/ferry-dr/ferry/internal/pki"
	"github.com/ferry-dr/ferry/internal/store"
	"github.com/ferry-dr/ferry/internal/store/etcdtest"
)

func TestParseSize(t *testing.T) {
	tests := []struct {
		in   string
		want int64
		ok   bool
	}{
		{"512", 512, true}, {"64K", 64 << 10, true}, {"10M", 10 << 20, true}, {"2G", 2 << 30, true},
		{"1T", 1 << 40, true}, {"1GiB", 1 << 30, true}, {"1g", 1 << 30, true},
		{"", 0, false}, {"0", 0, false}, {"-1G", 0, false}, {"G", 0, false}, {"1X", 0, false}, {"99999999999T", 0, false},
	}
	for _, tc := range tests {
		got, err := parseSize(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("parseSize(%q) = %d, %v; want %d ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}

func TestParseUnfolded(t *testing.T) {
	tests := []struct {
		in   string
		want int64
		ok   bool
	}{
		{"0", -1, true}, {" 0 ", -1, true}, {"4G", 4 << 30, true}, {"256M", 256 << 20, true},
		{"", 0, false}, {"-1", 0, false}, {"lots", 0, false},
	}
	for _, tc := range tests {
		got, err := parseUnfolded(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("parseUnfolded(%q) = %d, %v; want %d ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}

func run(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := Run(context.Background(), args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestRunErrorsAndJSON(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		args    []string
		code    int
		errWant string
	}{
		{[]string{"nope"}, 2, `unknown command "nope"`},
		{[]string{"vm", "bogus"}, 2, `unknown command "bogus"`},
		{[]string{"serve"}, 2, "--dir is required"},
		{[]string{"serve", "--dir", dir}, 2, "--socket"},
		{[]string{"disk", "create", "--dir", dir, "vda"}, 2, "accepts 2 arg(s)"},
		{[]string{"disk", "create", "--dir", dir, "vda", "lots"}, 2, "bad size"},
	}
	for _, tc := range tests {
		code, _, stderr := run(t, tc.args...)
		if code != tc.code || !strings.Contains(stderr, tc.errWant) {
			t.Errorf("ferry %v: exit %d, stderr %q; want %d and %q", tc.args, code, stderr, tc.code, tc.errWant)
		}
	}
	if code, _, stderr := run(t, "disk", "create", "--dir", dir, "vda", "8M"); code != 0 {
		t.Fatalf("disk create: %d %s", code, stderr)
	}
	code, out, stderr := run(t, "--output", "json", "disk", "list", "--dir", dir)
	if code != 0 {
		t.Fatalf("disk list: %d %s", code, stderr)
	}
	var specs []struct {
		Name string `json:"name"`
		Size int64  `json:"size"`
	}
	if err := json.Unmarshal([]byte(out), &specs); err != nil || len(specs) != 1 || specs[0].Name != "vda" || specs[0].Size != 8<<20 {
		t.Fatalf("disk list json %q: %v", out, err)
	}
	if code, _, stderr := run(t, "disk", "create", "--dir", dir, "vda", "8M"); code != 1 || !strings.Contains(stderr, "already exists") {
		t.Fatalf("duplicate disk: %d %q", code, stderr)
	}
}

// TestCommandsOwnTheirFlags: each command has its own flags and help; a
// flag of another command, a flag taken as a value, or an unknown output
// format is a usage error (exit 2), in text and in JSON.
func TestCommandsOwnTheirFlags(t *testing.T) {
	code, out, _ := run(t, "failover", "-h")
	if code != 0 || !strings.Contains(out, "--point") || !strings.Contains(out, "--no-shutdown-source") {
		t.Fatalf("failover -h: %d %q", code, out)
	}
	for _, other := range []string{"--kernel", "--role", "--dry-run", "--disk", "--memory"} {
		if strings.Contains(out, other) {
			t.Errorf("failover -h lists %s", other)
		}
	}
	tests := []struct {
		args []string
		code int
		want string
	}{
		{[]string{"failover", "web", "--kernel", "foo"}, 2, "unknown flag: --kernel"},
		{[]string{"failover", "web", "--point", "--wait"}, 2, `got the flag "--wait"`},
		{[]string{"--output", "yaml", "protections"}, 2, `--output "yaml"`},
		{[]string{"vm", "stop", "web"}, 2, "set --vault and --token"},
		{[]string{"ca", "issue", "--pki", t.TempDir(), "east"}, 2, `"role" not set`},
		{[]string{"ca", "issue", "--pki", t.TempDir(), "--role", "admin", "east"}, 2, "role \"admin\""},
		{[]string{"--log-level", "loud", "version"}, 2, "--log-level"},
	}
	for _, tc := range tests {
		code, _, stderr := run(t, tc.args...)
		if code != tc.code || !strings.Contains(stderr, tc.want) {
			t.Errorf("ferry %v: exit %d, stderr %q; want %d and %q", tc.args, code, stderr, tc.code, tc.want)
		}
	}
	// The same errors as JSON on stdout with --output json.
	code, out, _ = run(t, "-o", "json", "failover", "web", "--kernel", "foo")
	var je jsonError
	if err := json.Unmarshal([]byte(out), &je); err != nil || code != 2 || je.Error.Kind != "usage" || !strings.Contains(je.Error.Message, "--kernel") {
		t.Fatalf("JSON error: %d %q %v", code, out, err)
	}
	for _, group := range []string{"vault", "agent", "ca", "site", "vm", "token", "policy", "job"} {
		code, out, stderr := run(t, group, "-h")
		if code != 0 || !strings.Contains(out, "Usage:") {
			t.Errorf("ferry %s -h: %d %q %q", group, code, out, stderr)
		}
	}
	if code, out, _ := run(t, "--version"); code != 0 || strings.TrimSpace(out) != "ferry "+Version {
		t.Errorf("--version: %d %q", code, out)
	}
	if code, out, _ := run(t, "completion", "bash"); code != 0 || !strings.Contains(out, "__start_ferry") {
		t.Errorf("completion bash: %d, %d bytes", code, len(out))
	}
}

// TestConfigFile: a config file fills the flags the command line left
// unset; flags and environment variables win; a daemon's config refuses
// keys that are not its flags.
func TestConfigFile(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "config.toml")
	os.WriteFile(conf, []byte("vault = 'https://127.0.0.1:1'\ntoken = 'fy_from_config'\n"), 0o600)
	t.Setenv("FERRY_VAULT", "")
	t.Setenv("FERRY_TOKEN", "")
	code, _, stderr := run(t, "--config", conf, "protections")
	if code != 1 || !strings.Contains(stderr, "https://127.0.0.1:1") {
		t.Fatalf("config's vault not used: %d %q", code, stderr)
	}
	code, _, stderr = run(t, "--config", conf, "protections", "--vault", "https://127.0.0.1:2")
	if code != 1 || !strings.Contains(stderr, "https://127.0.0.1:2") {
		t.Fatalf("a flag did not win over the config: %d %q", code, stderr)
	}
	t.Setenv("FERRY_VAULT", "https://127.0.0.1:3")
	code, _, stderr = run(t, "--config", conf, "protections")
	if code != 1 || !strings.Contains(stderr, "https://127.0.0.1:3") {
		t.Fatalf("the environment did not win over the config: %d %q", code, stderr)
	}
	daemon := filepath.Join(dir, "agent.toml")
	os.WriteFile(daemon, []byte("name = 'east'\nlisten = '127.0.0.1:0'\nlistn = 'typo'\n"), 0o600)
	code, _, stderr = run(t, "--config", daemon, "agent", "run")
	if code != 2 || !strings.Contains(stderr, `"listn" is not a flag`) {
		t.Fatalf("daemon config with a typo: %d %q", code, stderr)
	}
	if code, _, stderr := run(t, "--config", filepath.Join(dir, "missing.toml"), "version"); code != 2 || !strings.Contains(stderr, "missing.toml") {
		t.Fatalf("a missing --config: %d %q", code, stderr)
	}
}

// TestManPages: one page per command, generated from the same tree.
func TestManPages(t *testing.T) {
	dir := t.TempDir()
	if code, _, stderr := run(t, "man", dir); code != 0 {
		t.Fatalf("man: %d %s", code, stderr)
	}
	for _, page := range []string{"ferry.1", "ferry-failover.1", "ferry-agent-run.1", "ferry-token-revoke.1"} {
		b, err := os.ReadFile(filepath.Join(dir, page))
		if err != nil || !bytes.Contains(b, []byte(".TH")) {
			t.Errorf("%s: %v", page, err)
		}
	}
}

// TestInspectorsReadOnly: 'journal verify', 'journal dump' and 'disk list'
// never create or change anything; verify exits 1 on damage and says where.
func TestInspectorsReadOnly(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "nope")
	for _, args := range [][]string{{"journal", "verify", "--dir", missing}, {"journal", "dump", "--dir", missing}, {"disk", "list", "--dir", missing}} {
		if code, _, stderr := run(t, args...); code != 1 {
			t.Errorf("ferry %v: exit %d (%s), want 1", args, code, stderr)
		}
		if _, err := os.Stat(missing); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("ferry %v created %s", args, missing)
		}
	}
	dir := t.TempDir()
	j, _, err := journal.Open(journal.Options{Dir: dir, SegmentSize: 4 << 10})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 40 {
		if _, err := j.Append(&journal.Entry{Kind: journal.KindWrite, Offset: uint64(i) * 512, Length: 512, Data: bytes.Repeat([]byte{byte(i)}, 512)}); err != nil {
			t.Fatal(err)
		}
	}
	j.Close()
	if code, out, stderr := run(t, "journal", "verify", "--dir", dir); code != 0 || !strings.Contains(out, "clean") {
		t.Fatalf("verify a clean journal: %d %q %q", code, out, stderr)
	}
	segs, _ := filepath.Glob(filepath.Join(dir, "*.seg"))
	b, _ := os.ReadFile(segs[0])
	b[200] ^= 0xff // inside an entry of the oldest segment
	os.WriteFile(segs[0], b, 0o600)
	code, _, stderr := run(t, "journal", "verify", "--dir", dir)
	if code != 1 || !strings.Contains(stderr, "damaged") || !strings.Contains(stderr, filepath.Base(segs[0])) {
		t.Fatalf("verify a damaged journal: %d %q", code, stderr)
	}
	after, _ := os.ReadFile(segs[0])
	if !bytes.Equal(after, b) {
		t.Fatal("verify changed a segment")
	}
}

// TestVaultMigrate copies a vault's SQLite state into a real etcd with
// `ferry vault migrate`; a second run into the same store is refused.
func TestVaultMigrate(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	st, err := store.OpenSQLite(filepath.Join(dir, "vault.db"))
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []store.Doc{{Kind: "site", ID: "east", Data: []byte(`{"name":"east"}`)}, {Kind: "vm", ID: "web", Data: []byte(`{"name":"web"}`)}} {
		if _, err := st.Put(ctx, d.Kind, d.ID, d.Data, 0); err != nil {
			t.Fatal(err)
		}
	}
	st.Close()
	url := "etcd://" + strings.TrimPrefix(etcdtest.Start(t), "http://") + "/migrated"
	var code int
	var stdout, stderr string
	deadline := time.Now().Add(20 * time.Second)
	for code, stdout, stderr = run(t, "--output", "json", "vault", "migrate", "--dir", dir, "--to", url); code != 0 && time.Now().Before(deadline); code, stdout, stderr = run(t, "--output", "json", "vault", "migrate", "--dir", dir, "--to", url) {
		time.Sleep(200 * time.Millisecond) // etcd starting
	}
	if code != 0 || !strings.Contains(stdout, `"documents": 2`) {
		t.Fatalf("migrate: exit %d, %s %s", code, stdout, stderr)
	}
	if code, _, stderr := run(t, "vault", "migrate", "--dir", dir, "--to", url); code == 0 || !strings.Contains(stderr, "already holds") {
		t.Fatalf("a second migrate into the same store: exit %d, %s", code, stderr)
	}
}

func TestParseWindowFlag(t *testing.T) {
	tests := []struct {
		in   string
		want api.BandwidthWindow
		err  bool
	}{
		{"mon-fri 08:00-18:00 20Mbit", api.BandwidthWindow{Days: "mon-fri", From: "08:00", To: "18:00", BitsPerSecond: 20e6}, false},
		{"* 22:00-06:00 off", api.BandwidthWindow{Days: "*", From: "22:00", To: "06:00"}, false},
		{"mon-fri 08:00 20Mbit", api.BandwidthWindow{}, true},
		{"someday 08:00-09:00 1Mbit", api.BandwidthWindow{}, true},
		{"mon 08:00-09:00 fast", api.BandwidthWindow{}, true},
	}
	for _, tt := range tests {
		got, err := parseWindowFlag(tt.in)
		if (err != nil) != tt.err || got != tt.want {
			t.Errorf("parseWindowFlag(%q) = %+v, %v; want %+v, error %v", tt.in, got, err, tt.want, tt.err)
		}
	}
}

// TestForceNewCluster: a two-member etcd (two sites, no witness) loses
// one member and with it the quorum; `ferry vault force-new-cluster`
// refuses while the other member or this one answers, then makes the
// survivor a one-member cluster that serves every document again.
func TestForceNewCluster(t *testing.T) {
	ms := etcdtest.StartCluster(t, 2)
	a, b := ms[0], ms[1]
	ctx := context.Background()
	open := func(ep string) *store.Etcd {
		t.Helper()
		// A member just started answers once the cluster has elected a
		// leader: seconds on a loaded machine (CI failed at OpenEtcd's
		// own 5 s).
		deadline := time.Now().Add(30 * time.Second)
		for {
			st, err := store.OpenEtcd(ctx, store.EtcdConfig{Endpoints: []string{ep}, Prefix: "/fnc"})
			if err == nil {
				t.Cleanup(func() { st.Close() })
				return st
			}
			if !errors.Is(err, store.ErrUnavailable) || time.Now().After(deadline) {
				t.Fatal(err)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	st := open(a.Client)
	deadline := time.Now().Add(30 * time.Second)
	for {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		_, err := st.Put(cctx, "site", "east", []byte(`{"name":"east"}`), 0)
		cancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the two-member cluster never took a write: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	args := []string{"vault", "force-new-cluster", "--name", a.Name, "--data-dir", a.Dir, "--client-url", a.Client, "--peer-url", a.Peer, "--others", b.Client}
	if code, _, stderr := run(t, args...); code == 0 || !strings.Contains(stderr, "answers") {
		t.Fatalf("with both members up: exit %d, %s", code, stderr)
	}
	b.Kill() // the other site burns
	cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	_, err := st.Put(cctx, "site", "west", []byte(`{}`), 0)
	cancel()
	if err == nil {
		t.Fatal("one member of two took a write: etcd needs a majority")
	}
	if code, _, stderr := run(t, args...); code == 0 || !strings.Contains(stderr, "stop it first") {
		t.Fatalf("with this site's member running: exit %d, %s", code, stderr)
	}
	a.Kill()
	rctx, stop := context.WithCancel(ctx)
	var out, errb bytes.Buffer
	exited := make(chan int, 1)
	go func() { exited <- Run(rctx, args, &out, &errb) }()
	defer func() {
		stop()
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			t.Error("force-new-cluster did not stop its etcd")
		}
	}()
	st2 := open(a.Client)
	deadline = time.Now().Add(30 * time.Second)
	for {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		_, err := st2.Put(cctx, "site", "west", []byte(`{"name":"west"}`), 0)
		cancel()
		if err == nil {
			break
		}
		select {
		case code := <-exited:
			t.Fatalf("force-new-cluster exited %d: %s", code, errb.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("the forced cluster never took a write: %v; %s", err, errb.String())
		}
		time.Sleep(200 * time.Millisecond)
	}
	d, err := st2.Get(ctx, "site", "east")
	if err != nil || string(d.Data) != `{"name":"east"}` {
		t.Fatalf("the document written before the loss: %+v, %v", d, err)
	}
}

// TestEtcdTLS: an etcds:// store talks to an etcd that serves TLS with a
// certificate of the installation's CA and requires client certificates:
// the vault's certificate gets in; a plain connection does not.
func TestEtcdTLS(t *testing.T) {
	pk := t.TempDir()
	for _, args := range [][]string{{"ca", "init", "--pki", pk}, {"ca", "issue", "--pki", pk, "--role", "vault", "vault"},
		{"ca", "issue", "--pki", pk, "--role", "site", "--host", "127.0.0.1", "etcd1"}} {
		if code, _, stderr := run(t, args...); code != 0 {
			t.Fatalf("ferry %v: %s", args, stderr)
		}
	}
	client := etcdtest.StartTLS(t, filepath.Join(pk, "etcd1.crt"), filepath.Join(pk, "etcd1.key"), filepath.Join(pk, "ca.crt"))
	id, err := pki.Load(pk, "vault")
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	url := "etcds://" + strings.TrimPrefix(client, "https://") + "/tls"
	var st *store.Etcd
	deadline := time.Now().Add(30 * time.Second)
	for {
		st, _, err = openEtcdURL(ctx, url, id)
		if err == nil {
			cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			_, err = st.Put(cctx, "site", "east", []byte(`{}`), 0)
			cancel()
			if err == nil {
				break
			}
			st.Close()
		}
		if time.Now().After(deadline) {
			t.Fatalf("etcds:// store: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	defer st.Close()
	if d, err := st.Get(ctx, "site", "east"); err != nil || string(d.Data) != `{}` {
		t.Fatalf("read back over TLS: %+v, %v", d, err)
	}
	if _, _, err := openEtcdURL(ctx, url, nil); err == nil {
		t.Fatal("an etcds:// store opened without a certificate")
	}
	plain, _, err := openEtcdURL(ctx, "etcd://"+strings.TrimPrefix(client, "https://")+"/tls", nil)
	if err == nil {
		cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		_, err = plain.Get(cctx, "site", "east")
		cancel()
		plain.Close()
	}
	if err == nil {
		t.Fatal("a plain connection read from the TLS etcd")
	}
}
