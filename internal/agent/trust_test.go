package agent

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/agentclient"
	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/disk"
	"github.com/ferry-dr/ferry/internal/journal"
	"github.com/ferry-dr/ferry/internal/link"
	"github.com/ferry-dr/ferry/internal/nbd"
	"github.com/ferry-dr/ferry/internal/pki"
	"github.com/ferry-dr/ferry/internal/pki/pkitest"
	"github.com/ferry-dr/ferry/internal/replica"
)

// trustEnv: siteA replicates group vm1 to siteB; siteC, an operator and
// a monitor hold certificates of the same CA.
type trustEnv struct {
	pk       string
	a, b     *Agent
	ca, cb   *agentclient.Client // as the operator
	disk     *nbd.Client
	diskSize int64
}

func newTrustEnv(t *testing.T) *trustEnv {
	t.Helper()
	pk := pkitest.Dir(t, "siteA", "siteB", "siteC", "operator/operator", "monitor/prometheus", "vault/vault")
	e := &trustEnv{pk: pk, a: startAgent(t, pk, "siteA"), b: startAgent(t, pk, "siteB"), diskSize: 4 << 20}
	op := pkitest.Load(t, pk, "operator")
	e.ca, e.cb = agentclient.New(op, e.a.Addr(), "siteA"), agentclient.New(op, e.b.Addr(), "siteB")
	ctx := context.Background()
	if err := e.ca.CreateGroup(ctx, "vm1", []disk.Spec{{Name: "vda", Size: e.diskSize}}); err != nil {
		t.Fatal(err)
	}
	if err := e.cb.ExpectReplica(ctx, "vm1", "siteA"); err != nil {
		t.Fatal(err)
	}
	if err := e.ca.Replicate(ctx, "vm1", api.Replicate{PeerAddr: e.b.Addr(), PeerName: "siteB"}); err != nil {
		t.Fatal(err)
	}
	var err error
	e.disk, err = nbd.Dial(ctx, "unix", e.a.NBDSocket(), "vm1/vda")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.disk.Close() })
	return e
}

// write fills block i of the source disk with b and drains replication.
func (e *trustEnv) write(t *testing.T, i int64, b byte) {
	t.Helper()
	ctx := context.Background()
	if err := e.disk.WriteAt(ctx, bytes.Repeat([]byte{b}, 4096), i*4096, true); err != nil {
		t.Fatal(err)
	}
	e.drain(t)
}

func (e *trustEnv) drain(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		st := e.a.Status()
		if r := st.Groups[0].Replication; r != nil && r.State == "streaming" && r.AckedSeq == st.Groups[0].LastSeq {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("replication did not drain: %+v", st.Groups[0].Replication)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (e *trustEnv) reconnects() int { return e.a.Status().Groups[0].Replication.Reconnects }

// replicaBytes reads the whole disk at the replica's newest state.
func (e *trustEnv) replicaBytes(t *testing.T) []byte {
	t.Helper()
	if _, err := e.a.Mark(context.Background(), "vm1", replica.Marker{Type: "named", Label: "check"}); err != nil {
		t.Fatal(err)
	}
	e.drain(t)
	ov, err := e.b.OpenView("vm1", "vda", 0, false)
	if err != nil {
		t.Fatal(err)
	}
	defer e.b.CloseView(ov.id)
	got := make([]byte, e.diskSize)
	if err := ov.v.ReadAt(context.Background(), got, 0); err != nil {
		t.Fatal(err)
	}
	return got
}

// forge opens B's link with identity who, claims to be source, and sends
// a 4 KiB write of 0xEE at offset 0 and a named point. It returns what B
// answered to the Hello.
func forge(t *testing.T, e *trustEnv, who, source string) (byte, string) {
	t.Helper()
	id := pkitest.Load(t, e.pk, who)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := dialLink(ctx, id, e.b.Addr(), "siteB", nil)
	if err != nil {
		// Refused at the HTTP layer (a non-site identity).
		return 0, err.Error()
	}
	defer conn.Close()
	c := link.New(conn)
	specs := e.a.Status().Groups[0].Disks
	if err := c.WriteJSON(link.TypeHello, link.Hello{Group: "vm1", Source: source, Disks: specs}); err != nil {
		t.Fatal(err)
	}
	// Whatever B says, push the forged write and point behind the Hello.
	next := e.b.Status().Replicas[0].LastSeq + 1
	w := journal.Entry{Seq: next, Time: time.Now().UnixNano(), Kind: journal.KindWrite, Disk: specs[0].ID, Offset: 0, Length: 4096, Data: bytes.Repeat([]byte{0xEE}, 4096)}
	m := journal.Entry{Seq: next + 1, Time: time.Now().UnixNano(), Kind: journal.KindMarker, Data: replica.Marker{Type: "named", Label: "forged"}.Encode()}
	m.Length = uint32(len(m.Data))
	c.Write(link.TypeEntries, journal.AppendEntry(journal.AppendEntry(nil, &w), &m))
	typ, body, err := c.Read()
	if err != nil && !errors.Is(err, io.EOF) {
		return 0, err.Error()
	}
	return typ, string(body)
}

// TestForgedLinkRefused: neither the operator's certificate nor another
// site's can feed a replica. Before identities, the operator's
// certificate wrote 4 KiB into west's replica of web and evicted east's
// live stream, which then skipped two real entries.
func TestForgedLinkRefused(t *testing.T) {
	e := newTrustEnv(t)
	for i := range int64(16) {
		e.write(t, i, byte(i+1))
	}
	before := e.replicaBytes(t)
	reconnects := e.reconnects()
	tests := []struct {
		name, who, source string
	}{
		{"operator certificate", "operator", "siteA"},
		{"vault certificate", "vault", "siteA"},
		{"monitor certificate", "prometheus", "siteA"},
		{"another site claiming the source", "siteC", "siteA"},
		{"another site as itself", "siteC", "siteC"},
		{"the recovery site itself", "siteB", "siteA"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			typ, msg := forge(t, e, tt.who, tt.source)
			if typ == link.TypeWelcome {
				t.Fatalf("B welcomed a stream from %s claiming %s", tt.who, tt.source)
			}
			t.Logf("refused: type %d: %s", typ, msg)
		})
	}
	// The live stream was never interrupted, and goes on.
	e.write(t, 3, 0x33)
	if got := e.reconnects(); got != reconnects {
		t.Errorf("the live stream reconnected %d times during the forgeries", got-reconnects)
	}
	after := e.replicaBytes(t)
	copy(before[3*4096:4*4096], bytes.Repeat([]byte{0x33}, 4096))
	if !bytes.Equal(after, before) {
		t.Fatal("the replica changed beyond the one real write")
	}
	src := make([]byte, e.diskSize)
	e.disk.ReadAt(context.Background(), src, 0)
	if !bytes.Equal(after, src) {
		t.Fatal("the replica differs from the source disk")
	}
	pts, _ := e.b.Points("vm1")
	for _, p := range pts {
		if p.Label == "forged" {
			t.Fatal("a forged point is in the catalog")
		}
	}
}

// TestRouteRoles: each route takes the identities it names, and no other.
func TestRouteRoles(t *testing.T) {
	e := newTrustEnv(t)
	ctx := context.Background()
	as := func(who, site string, addr string) *rawAPI {
		return newRaw(pkitest.Load(t, e.pk, who), addr, site)
	}
	tests := []struct {
		who, method, path string
		body              any
		want              error // nil: allowed
	}{
		{"siteC", "POST", "/v1/groups", map[string]any{"name": "x", "disks": []disk.Spec{{Name: "vda", Size: 4096}}}, api.ErrForbidden},
		{"siteC", "DELETE", "/v1/groups/vm1", nil, api.ErrForbidden},
		{"siteA", "POST", "/v1/groups/vm1/fence", map[string]int64{"generation": 9}, api.ErrForbidden},
		{"siteC", "POST", "/v1/vms", VMRequest{Name: "x", Group: "vm1", MemoryMiB: 64}, api.ErrForbidden},
		{"siteC", "POST", "/v1/replicas/vm1/views", map[string]any{"disk": "vda"}, api.ErrForbidden},
		{"siteC", "PUT", "/v1/replicas/vm1/source", map[string]string{"source": "siteC"}, api.ErrForbidden},
		{"siteC", "GET", "/v1/status", nil, api.ErrForbidden},
		{"prometheus", "GET", "/v1/status", nil, nil},
		{"prometheus", "DELETE", "/v1/groups/vm1", nil, api.ErrForbidden},
		{"vault", "GET", "/v1/status", nil, nil},
		{"operator", "GET", "/v1/replicas/vm1/points", nil, nil},
	}
	for _, tt := range tests {
		err := as(tt.who, "siteB", e.b.Addr()).call(ctx, tt.method, tt.path, tt.body, nil)
		if tt.want == nil && err != nil || tt.want != nil && !errors.Is(err, tt.want) {
			t.Errorf("%s %s as %s: %v, want %v", tt.method, tt.path, tt.who, err, tt.want)
		}
	}
	// Nothing the refused calls asked for happened.
	if st := e.b.Status(); len(st.Groups) != 0 || len(st.Views) != 0 {
		t.Errorf("refused calls changed siteB: groups %v, views %v", st.Groups, st.Views)
	}
	if src, _ := e.b.ReplicaSource("vm1"); src != "siteA" {
		t.Errorf("replica source is %q, want siteA", src)
	}
	if st := e.a.Status(); len(st.Groups) != 1 || st.Groups[0].Fenced != 0 {
		t.Errorf("a site fenced siteA's group: %+v", st.Groups)
	}
	// A client that expects siteB's certificate refuses siteA's server.
	_, err := agentclient.New(pkitest.Load(t, e.pk, "operator"), e.a.Addr(), "siteB").Status(ctx)
	if !errors.Is(err, pki.ErrWrongPeer) && (err == nil || !isTLSRefusal(err)) {
		t.Errorf("siteA's server accepted as siteB: %v", err)
	}
}

// isTLSRefusal: the handshake failed on the server's certificate.
func isTLSRefusal(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) || errors.Is(err, pki.ErrWrongPeer)
}

// TestSlowBodyClosed: a client that trickles a request body is cut off at
// the read timeout (before, 50 such connections all stayed open).
func TestSlowBodyClosed(t *testing.T) {
	pk := pkitest.Dir(t, "siteA", "operator/operator")
	a := startAgentWith(t, Config{Name: "siteA", PKIDir: pk, PointInterval: -1, ReadTimeout: time.Second})
	op := pkitest.Load(t, pk, "operator")
	const n = 50
	closed := make(chan time.Duration, n)
	start := time.Now()
	for range n {
		go func() {
			c, err := tlsDial(op, a.Addr(), "siteA")
			if err != nil {
				closed <- -1
				return
			}
			defer c.Close()
			io.WriteString(c, "POST /v1/groups HTTP/1.1\r\nHost: siteA\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{")
			c.SetReadDeadline(time.Now().Add(30 * time.Second))
			io.Copy(io.Discard, c) // returns when the server closes
			closed <- time.Since(start)
		}()
	}
	for range n {
		d := <-closed
		if d < 0 {
			t.Fatal("dial failed")
		}
		if d > 5*time.Second {
			t.Fatalf("a slow-body connection stayed open %v with a 1 s read timeout", d)
		}
	}
}

// TestConnectionCap: one identity cannot hold more than the cap of
// connections; others still get in.
func TestConnectionCap(t *testing.T) {
	pk := pkitest.Dir(t, "siteA", "operator/operator", "vault/vault")
	a := startAgentWith(t, Config{Name: "siteA", PKIDir: pk, PointInterval: -1, MaxConnsPerClient: 4})
	op := pkitest.Load(t, pk, "operator")
	// Each connection asks to create a group: under the cap it is done,
	// over the cap it is answered 429 and never reaches the agent.
	create := func(c net.Conn, name string) (int, error) {
		body := `{"name":"` + name + `","disks":[{"name":"vda","size":4096}]}`
		fmt.Fprintf(c, "POST /v1/groups HTTP/1.1\r\nHost: siteA\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		resp, err := http.ReadResponse(bufioReader(c), nil)
		if err != nil {
			return 0, err
		}
		resp.Body.Close()
		return resp.StatusCode, nil
	}
	var open []net.Conn
	t.Cleanup(func() {
		for _, c := range open {
			c.Close()
		}
	})
	for i := range 6 {
		c, err := tlsDial(op, a.Addr(), "siteA")
		if err != nil {
			t.Fatal(err)
		}
		open = append(open, c)
		code, err := create(c, fmt.Sprintf("cap%d", i))
		if i < 4 && (err != nil || code != http.StatusOK) {
			t.Fatalf("connection %d under the cap: %d %v", i+1, code, err)
		}
		if i >= 4 && (err != nil || code != http.StatusTooManyRequests) {
			t.Fatalf("connection %d over the cap of 4: %d %v, want 429", i+1, code, err)
		}
	}
	if n := len(a.Status().Groups); n != 4 {
		t.Fatalf("%d groups created, want the 4 under the cap", n)
	}
	// Another identity is not held back by the operator's connections.
	if _, err := agentclient.New(pkitest.Load(t, pk, "vault"), a.Addr(), "siteA").Status(context.Background()); err != nil {
		t.Fatalf("the vault was refused: %v", err)
	}
	// A connection closed frees its place.
	open[0].Close()
	until := time.Now().Add(5 * time.Second)
	for {
		c, err := tlsDial(op, a.Addr(), "siteA")
		if err != nil {
			t.Fatal(err)
		}
		open = append(open, c)
		if code, err := create(c, "after"); err == nil && code == http.StatusOK {
			break
		}
		if time.Now().After(until) {
			t.Fatal("a closed connection's place was not freed")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func tlsDial(id *pki.Identity, addr, site string) (net.Conn, error) {
	return tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, id.ClientConfig(pki.Peer{Role: pki.RoleSite, Name: site}))
}

func bufioReader(c net.Conn) *bufio.Reader { return bufio.NewReader(c) }
