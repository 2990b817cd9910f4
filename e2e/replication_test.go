package e2e

import (
	"bytes"
	"context"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/agentclient"
	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/faultnet"
	"github.com/ferry-dr/ferry/internal/nbd"
	"github.com/ferry-dr/ferry/internal/ordercheck"
	"github.com/ferry-dr/ferry/internal/pki"
)

// agentProc is a running 'ferry agent run' process.
type agentProc struct {
	name, dir, addr, pki string
	extra                []string // more flags for ferry agent run
	cmd                  *exec.Cmd
	log                  *bytes.Buffer
	done                 chan error
}

// handedOut remembers every port freePort gave: a port is free when
// returned, but not bound until its user starts, and the kernel may hand
// the same one out again meanwhile (a vault once got the port a test had
// set aside for its VM's forward).
var handedOut = struct {
	sync.Mutex
	ports map[string]bool
}{ports: map[string]bool{}}

func freePort(tb testing.TB) string {
	tb.Helper()
	return freePortOn(tb, "127.0.0.1")
}

// freePortOn returns host:port with a port free at host, never one it
// returned before in this test binary.
func freePortOn(tb testing.TB, host string) string {
	tb.Helper()
	for range 100 {
		ln, err := net.Listen("tcp", host+":0")
		if err != nil {
			tb.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		_, port, _ := net.SplitHostPort(addr)
		handedOut.Lock()
		seen := handedOut.ports[port]
		handedOut.ports[port] = true
		handedOut.Unlock()
		if !seen {
			return addr
		}
	}
	tb.Fatal("no port that was not handed out before")
	return ""
}

func (p *agentProc) start(tb testing.TB) {
	tb.Helper()
	p.log = &bytes.Buffer{}
	p.done = make(chan error, 1)
	args := []string{"agent", "run", "--dir", p.dir, "--name", p.name, "--listen", p.addr, "--pki", p.pki, "--point-interval", "100ms"}
	p.cmd = exec.Command(ferryBin, append(args, p.extra...)...)
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	if err := p.cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	go func() { p.done <- p.cmd.Wait() }()
	deadline := time.Now().Add(15 * time.Second)
	for {
		if c, err := net.Dial("tcp", p.addr); err == nil {
			c.Close()
			if _, err := os.Stat(filepath.Join(p.dir, "nbd.sock")); err == nil {
				return
			}
		}
		select {
		case err := <-p.done:
			tb.Fatalf("agent %s exited: %v\n%s", p.name, err, p.log)
		default:
		}
		if time.Now().After(deadline) {
			tb.Fatalf("agent %s not up\n%s", p.name, p.log)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (p *agentProc) kill() {
	p.cmd.Process.Kill()
	<-p.done
}

func (p *agentProc) stop(tb testing.TB) {
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(30 * time.Second):
		p.cmd.Process.Kill()
		tb.Errorf("agent %s did not stop\n%s", p.name, p.log)
	}
}

// sites is two agent processes, siteA and siteB, with an operator's
// clients for both; they stop (and on failure print their logs) at the
// end of the test.
type sites struct {
	a, b   *agentProc
	ca, cb *agentclient.Client
	root   string
}

func twoSites(t *testing.T) *sites { t.Helper(); return twoSitesWith(t, nil, nil) }

// twoSitesWith: extra flags for both agents; prep, if set, runs on the
// sites' root directory before they start.
func twoSitesWith(t *testing.T, extra []string, prep func(root string)) *sites {
	t.Helper()
	pk := t.TempDir()
	run(t, ferryBin, "ca", "init", "--pki", pk)
	for _, n := range []string{"site/siteA", "site/siteB", "operator/operator"} {
		role, name, _ := strings.Cut(n, "/")
		run(t, ferryBin, "ca", "issue", "--pki", pk, "--role", role, name)
	}
	root := t.TempDir()
	s := &sites{root: root,
		a: &agentProc{name: "siteA", dir: filepath.Join(root, "a"), addr: freePort(t), pki: pk},
		b: &agentProc{name: "siteB", dir: filepath.Join(root, "b"), addr: freePort(t), pki: pk}}
	s.a.extra, s.b.extra = extra, extra
	if prep != nil {
		prep(root)
	}
	s.a.start(t)
	s.b.start(t)
	t.Cleanup(func() {
		s.a.stop(t)
		s.b.stop(t)
		if t.Failed() {
			t.Logf("site A log:\n%s\nsite B log:\n%s", s.a.log, s.b.log)
		}
	})
	op, err := pki.Load(pk, "operator")
	if err != nil {
		t.Fatal(err)
	}
	s.ca = agentclient.New(op, s.a.addr, "siteA")
	s.cb = agentclient.New(op, s.b.addr, "siteB")
	return s
}

const (
	records = 12000
	lanes   = 16
)

// TestReplicationEndToEnd runs two agent processes on loopback with mutual
// TLS, writes sequence-stamped records through the source's NBD export with
// 16 lanes in flight, and meanwhile cuts the link, kills the recovery agent
// with SIGKILL and restarts it, then kills the source agent with SIGKILL
// and restarts it. After the writes stop and replication drains: every
// record acknowledged as durable is at the recovery site, the replica
// equals the source, and views at many recovery points each hold a prefix
// of every lane's records.
func TestReplicationEndToEnd(t *testing.T) {
	st2 := twoSites(t)
	a, b := st2.a, st2.b
	link, err := faultnet.New(b.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer link.Close()
	ctx := context.Background()
	ca, cb := st2.ca, st2.cb
	size := int64(records * ordercheck.RecordSize)
	if err := ca.CreateGroup(ctx, "vm1", []api.DiskSpec{{Name: "vda", Size: size}}); err != nil {
		t.Fatal(err)
	}
	if err := cb.ExpectReplica(ctx, "vm1", "siteA"); err != nil {
		t.Fatal(err)
	}
	if err := ca.Replicate(ctx, "vm1", api.Replicate{PeerAddr: link.Addr(), PeerName: "siteB"}); err != nil {
		t.Fatal(err)
	}
	w := ordercheck.NewWriter(lanes)
	write := func(from, to uint64, during func()) {
		t.Helper()
		nc, err := nbd.Dial(ctx, "unix", filepath.Join(a.dir, "nbd.sock"), "vm1/vda")
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		done := make(chan error, 1)
		go func() { done <- w.Run(ctx, nc, from, to) }()
		if during != nil {
			during()
		}
		if err := <-done; err != nil {
			t.Fatalf("writing records %d..%d: %v", from, to, err)
		}
	}
	// stillWriting fails the test if a disruption came after the writes
	// of its phase were over: it would prove nothing.
	stillWriting := func(to uint64, what string) {
		t.Helper()
		var max uint64
		for _, k := range w.Acked() {
			max = maxU(max, k)
		}
		if max >= to {
			t.Fatalf("%s came after the phase's writes ended; make the phase longer", what)
		}
	}
	// Phase 1: link cuts under load.
	write(1, 5000, func() {
		for i := 0; i < 3; i++ {
			time.Sleep(60 * time.Millisecond)
			stillWriting(5000, "a link cut")
			link.Cut()
		}
	})
	// Phase 2: the recovery agent dies (SIGKILL) and comes back.
	write(5001, 9000, func() {
		time.Sleep(60 * time.Millisecond)
		stillWriting(9000, "the kill of the recovery agent")
		b.kill()
		time.Sleep(100 * time.Millisecond)
		b.start(t)
	})
	// Phase 3: the source agent dies (SIGKILL) between writes and comes
	// back; everything it acknowledged must still reach the replica.
	a.kill()
	a.start(t)
	write(9001, records, nil)

	// Drain.
	deadline := time.Now().Add(60 * time.Second)
	for {
		st, err := ca.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		r := st.Groups[0].Replication
		if r != nil && r.State == api.ReplStreaming && r.AckedSeq == st.Groups[0].LastSeq {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("replication did not drain: %+v\nA:\n%s\nB:\n%s", r, a.log, b.log)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// Let the source record a point after its last write, and the replica
	// receive it.
	if _, err := ca.Mark(ctx, "vm1", api.Marker{Type: api.PointNamed, Label: "final"}); err != nil {
		t.Fatal(err)
	}
	var pts []api.Point
	for {
		var err error
		if pts, err = cb.Points(ctx, "vm1"); err != nil {
			t.Fatal(err)
		}
		if slices.ContainsFunc(pts, func(p api.Point) bool { return p.Label == "final" }) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("final point never arrived")
		}
		time.Sleep(20 * time.Millisecond)
	}
	readView := func(seq uint64) []byte {
		vi, err := cb.OpenView(ctx, "vm1", api.OpenView{Disk: "vda", Seq: seq})
		if err != nil {
			t.Fatal(err)
		}
		defer cb.CloseView(ctx, vi.ID)
		vc, err := nbd.Dial(ctx, "unix", vi.Socket, vi.Export)
		if err != nil {
			t.Fatal(err)
		}
		defer vc.Close()
		return readAll(t, vc, size)
	}
	// The newest point: everything acknowledged is there, and it equals
	// the source.
	final := readView(pts[len(pts)-1].Seq)
	top, err := ordercheck.Verify(final, lanes)
	if err != nil {
		t.Fatal(err)
	}
	for l, acked := range w.Acked() {
		if top[l] < acked {
			t.Fatalf("lane %d: record %d acknowledged at the source, replica has only up to %d", l, acked, top[l])
		}
	}
	nc, err := nbd.Dial(ctx, "unix", filepath.Join(a.dir, "nbd.sock"), "vm1/vda")
	if err != nil {
		t.Fatal(err)
	}
	src := readAll(t, nc, size)
	nc.Close()
	if !bytes.Equal(src, final) {
		t.Fatal("replica at the final point differs from the source")
	}
	// Many points: each a prefix in every lane.
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))
	checked := 0
	for i := 0; i < 25 && len(pts) > 0; i++ {
		p := pts[rng.IntN(len(pts))]
		if _, err := ordercheck.Verify(readView(p.Seq), lanes); err != nil {
			t.Fatalf("view at point %d (%s): %v", p.Seq, p.Time, err)
		}
		checked++
	}
	t.Logf("%d points in the catalog, %d checked", len(pts), checked)
	if checked == 0 {
		t.Fatal("no point checked")
	}
}

func maxU(a, b uint64) uint64 {
	if a > b {
		return a
	}
	return b
}

// readAll reads a whole export in requests the server accepts.
func readAll(tb testing.TB, c *nbd.Client, size int64) []byte {
	tb.Helper()
	img := make([]byte, size)
	for off := int64(0); off < size; off += 4 << 20 {
		if err := c.ReadAt(context.Background(), img[off:min(size, off+4<<20)], off); err != nil {
			tb.Fatal(err)
		}
	}
	return img
}
