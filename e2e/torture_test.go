package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/clock"
	"github.com/ferry-dr/ferry/internal/nbd"
	"github.com/ferry-dr/ferry/internal/ordercheck"
)

// The torture suite: two sites in their own network namespaces joined by
// a veth pair, real agent processes replicating over mutual TLS through a
// userspace proxy (in site A's namespace) that adds delay and loss-like
// stalls, since this kernel has no netem; tc tbf for rate. Each scenario
// writes sequence-stamped records (the write-order checker) and, after it,
// checks a view of the replica at a fresh point: every record
// acknowledged before the point is there, intact, and each lane's records
// form a prefix. FERRY_TORTURE=full (make torture) runs the long
// versions; make test runs them short. The suite ends with
//
//	RESULT torture scenarios=N passed=N failed=0 lost_records=0
//
// Not here yet (see the note): killing the vault and the agents
// in the middle of each lifecycle job with QEMU guests, and a clock jump
// at one site.

// proxyChild is the delay proxy, run as the test binary inside site A's
// namespace: FERRY_E2E_PROXY=listen,target,delay,loss-percent.
func proxyChild(arg string) {
	f := strings.Split(arg, ",")
	delay, _ := time.ParseDuration(f[2])
	loss, _ := strconv.ParseFloat(f[3], 64)
	ln, err := net.Listen("tcp", f[0])
	if err != nil {
		fmt.Println(err)
		os.Exit(1)
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			os.Exit(0)
		}
		u, err := net.Dial("tcp", f[1])
		if err != nil {
			c.Close()
			continue
		}
		go pump(u, c, delay, loss)
		go pump(c, u, delay, loss)
	}
}

// pump copies src to dst, delivering each chunk delay after it was read,
// in order; a chunk "lost" (loss percent of them) waits one more round
// trip, as a fast retransmission would, and holds up what follows it.
func pump(dst, src net.Conn, delay time.Duration, loss float64) {
	type chunk struct {
		at time.Time
		b  []byte
	}
	ch := make(chan chunk, 4096)
	go func() {
		defer close(ch)
		for {
			b := make([]byte, 64<<10)
			n, err := src.Read(b)
			if n > 0 {
				at := time.Now().Add(delay)
				if rand.Float64()*100 < loss {
					at = at.Add(2 * delay) // a retransmission: one more round trip
				}
				ch <- chunk{at, b[:n]}
			}
			if err != nil {
				return
			}
		}
	}()
	var last time.Time
	for c := range ch {
		at := c.at
		if at.Before(last) {
			at = last
		}
		last = at
		time.Sleep(time.Until(at))
		if _, err := dst.Write(c.b); err != nil {
			break
		}
	}
	dst.Close()
	src.Close()
}

type tortureSite struct {
	ns, name, addr, dir string
	clock               string // the file FERRY_FAULT_CLOCK names: seconds the agent's wall clock is off
	cmd                 *exec.Cmd
	log                 *bytes.Buffer
	extra               []string
}

type torture struct {
	t        *testing.T
	full     bool
	pk       string
	a, b     *tortureSite
	vethA    string
	proxy    *exec.Cmd
	proxyArg string
	groups   []string // created by the running scenario
}

func (tn *torture) startAgent(s *tortureSite) {
	t := tn.t
	t.Helper()
	args := append([]string{ferryBin, "agent", "run", "--dir", s.dir, "--name", s.name, "--listen", s.addr, "--pki", tn.pk,
		"--point-interval", "200ms"}, s.extra...)
	if s.log == nil {
		s.log = &bytes.Buffer{}
	}
	fmt.Fprintf(s.log, "--- agent %s (re)started at %s\n", s.name, time.Now().Format(time.RFC3339Nano))
	s.cmd = netnsCmd(s.ns, args...)
	s.cmd.Env = append(os.Environ(), clock.FaultEnv+"="+s.clock)
	s.cmd.Stdout, s.cmd.Stderr = s.log, s.log
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	tn.until(20*time.Second, s.name+" up", func() bool { _, err := tn.status(s); return err == nil })
}

func (tn *torture) kill9(s *tortureSite) {
	s.cmd.Process.Signal(syscall.SIGKILL)
	s.cmd.Wait()
}

func (tn *torture) cli(s *tortureSite, args ...string) (string, error) {
	words := 1
	if args[0] == "group" || args[0] == "view" || args[0] == "replica" {
		words = 2
	}
	full := append([]string{ferryBin, "--output", "json", "agent"}, args[:words]...)
	full = append(full, "--agent", s.addr, "--site", s.name, "--pki", tn.pk)
	out, err := netnsCmd(s.ns, append(full, args[words:]...)...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

func (tn *torture) must(s *tortureSite, args ...string) string {
	tn.t.Helper()
	out, err := tn.cli(s, args...)
	if err != nil {
		tn.t.Fatal(err)
	}
	return out
}

type tStatus struct {
	Groups []struct {
		Name        string `json:"name"`
		LastSeq     uint64 `json:"last_seq"`
		Replication *struct {
			State     string  `json:"state"`
			AckedSeq  uint64  `json:"acked_seq"`
			RPO       float64 `json:"rpo_seconds"`
			SentBytes int64   `json:"sent_bytes"`
			LastError string  `json:"last_error"`
		} `json:"replication"`
	} `json:"groups"`
}

func (tn *torture) status(s *tortureSite) (tStatus, error) {
	var st tStatus
	out, err := tn.cli(s, "status")
	if err != nil {
		return st, err
	}
	return st, json.Unmarshal([]byte(out), &st)
}

func (tn *torture) repl(group string) (state string, acked, last uint64, rpo float64, sent int64, lastErr string) {
	st, err := tn.status(tn.a)
	if err != nil {
		return "down", 0, 1, 0, 0, err.Error()
	}
	for _, g := range st.Groups {
		if g.Name == group && g.Replication != nil {
			r := g.Replication
			return r.State, r.AckedSeq, g.LastSeq, r.RPO, r.SentBytes, r.LastError
		}
	}
	return "none", 0, 1, 0, 0, ""
}

func (tn *torture) until(d time.Duration, what string, cond func() bool) {
	tn.t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			tn.t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (tn *torture) drained(group string) bool {
	state, acked, last, _, _, _ := tn.repl(group)
	return state == "streaming" && acked == last
}

// paced lets at most one write through per tick (shared by all lanes), so
// that a long scenario's records fit its disk.
type paced struct {
	d    ordercheck.Disk
	tick <-chan time.Time
}

func (p paced) WriteAt(ctx context.Context, b []byte, off int64, fua bool) error {
	select {
	case <-p.tick:
	case <-ctx.Done():
		return ctx.Err()
	}
	return p.d.WriteAt(ctx, b, off, fua)
}

// records starts writing records to group's disk at site A from lanes
// lanes, at most 4000 a second (16 MB/s); stop returns how many each lane
// had acknowledged.
func (tn *torture) records(group string, lanes int) (w *ordercheck.Writer, stop func() []uint64) {
	ctx, cancel := context.WithCancel(context.Background())
	w = ordercheck.NewWriter(lanes)
	ticker := time.NewTicker(250 * time.Microsecond)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			c, err := nbd.Dial(ctx, "unix", filepath.Join(tn.a.dir, "nbd.sock"), group+"/vda")
			if err != nil {
				time.Sleep(100 * time.Millisecond) // the agent restarts
				continue
			}
			// Every lane resumes at or before its next record: records
			// written (and maybe acknowledged) before a kill are written
			// again with the same content, which is what a guest retrying
			// does, and no lane skips one.
			from := uint64(1 << 62)
			for _, k := range w.Acked() {
				from = min(from, k+1)
			}
			w.Run(ctx, paced{c, ticker.C}, from, 1<<40)
			c.Close()
		}
	}()
	return w, func() []uint64 {
		cancel()
		<-done
		ticker.Stop()
		return w.Acked()
	}
}

// verify marks a point at A once A's group is drained, opens a view of it
// at B and checks every record acknowledged; it returns the records lost.
func (tn *torture) verify(group string, lanes int, acked []uint64) int {
	t := tn.t
	t.Helper()
	tn.until(240*time.Second, group+" drained", func() bool { return tn.drained(group) })
	var m struct {
		Seq uint64 `json:"seq"`
	}
	json.Unmarshal([]byte(tn.must(tn.a, "mark", "--label", "verify", group)), &m)
	tn.until(60*time.Second, "the verify point at B", func() bool {
		out, err := tn.cli(tn.b, "points", group)
		return err == nil && strings.Contains(out, `"verify"`)
	})
	return tn.checkView(group, m.Seq, lanes, acked)
}

func (tn *torture) checkView(group string, seq uint64, lanes int, acked []uint64) int {
	t := tn.t
	t.Helper()
	var vi struct {
		ID     string `json:"id"`
		Export string `json:"export"`
		Socket string `json:"socket"`
	}
	json.Unmarshal([]byte(tn.must(tn.b, "view", "open", "--seq", fmt.Sprint(seq), group, "vda")), &vi)
	defer tn.cli(tn.b, "view", "close", vi.ID)
	ctx := context.Background()
	c, err := nbd.Dial(ctx, "unix", vi.Socket, vi.Export)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var top uint64
	for _, k := range acked {
		top = max(top, k)
	}
	n := int64(top+uint64(lanes)) * ordercheck.RecordSize
	img := make([]byte, n)
	for off := int64(0); off < n; off += 1 << 20 {
		if err := c.ReadAt(ctx, img[off:min(n, off+1<<20)], off); err != nil {
			t.Fatal(err)
		}
	}
	present, err := ordercheck.Verify(img, lanes)
	if err != nil {
		t.Fatalf("view at %d: %v", seq, err)
	}
	lost := 0
	for l := range acked {
		if present[l] < acked[l] {
			lost += int(acked[l] - present[l])
		}
	}
	if lost > 0 {
		t.Errorf("view at %d: %d acknowledged records missing (present %v, acknowledged %v)", seq, lost, present, acked)
	}
	return lost
}

func (tn *torture) group(name, size string) {
	tn.groups = append(tn.groups, name)
	tn.must(tn.a, "group", "create", "--disk", "vda="+size, name)
	tn.must(tn.a, "replicate", "--to", tn.proxyAddr(), "--to-site", "siteB", name)
	tn.until(60*time.Second, name+" streaming", func() bool { return tn.drained(name) })
}

func (tn *torture) proxyAddr() string { return "127.0.0.1:7499" }

func (tn *torture) startProxy(delay time.Duration, loss float64) {
	if tn.proxy != nil {
		tn.proxy.Process.Kill()
		tn.proxy.Wait()
	}
	tn.proxy = netnsCmd(tn.a.ns, os.Args[0], "-test.run=^$")
	tn.proxy.Env = append(os.Environ(), fmt.Sprintf("FERRY_E2E_PROXY=%s,%s,%s,%g", tn.proxyAddr(), tn.b.addr, delay, loss))
	if err := tn.proxy.Start(); err != nil {
		tn.t.Fatal(err)
	}
	tn.until(10*time.Second, "the proxy", func() bool {
		return netnsCmd(tn.a.ns, "bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/7499").Run() == nil
	})
}

func newTorture(t *testing.T) *torture {
	if os.Geteuid() != 0 {
		t.Fatal("the torture suite needs root for network namespaces and tmpfs (CI runs as root)")
	}
	need(t, "ip", "tc")
	tn := &torture{t: t, full: os.Getenv("FERRY_TORTURE") == "full"}
	suffix := fmt.Sprint(os.Getpid() % 10000)
	nsA, nsB := "ftA"+suffix, "ftB"+suffix
	tn.vethA = "ta" + suffix
	vB := "tb" + suffix
	for _, ns := range []string{nsA, nsB} {
		mustRun(t, exec.Command("ip", "netns", "add", ns))
		t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
	}
	mustRun(t, exec.Command("ip", "link", "add", tn.vethA, "netns", nsA, "type", "veth", "peer", "name", vB, "netns", nsB))
	mustRun(t, exec.Command("ip", "-n", nsA, "addr", "add", "10.78.0.1/24", "dev", tn.vethA))
	mustRun(t, exec.Command("ip", "-n", nsB, "addr", "add", "10.78.0.2/24", "dev", vB))
	for _, x := range [][2]string{{nsA, tn.vethA}, {nsB, vB}} {
		mustRun(t, exec.Command("ip", "-n", x[0], "link", "set", x[1], "up"))
		mustRun(t, exec.Command("ip", "-n", x[0], "link", "set", "lo", "up"))
	}
	// The link's rate: 1 Gbit/s, as a WAN uplink could be.
	mustRun(t, exec.Command("ip", "netns", "exec", nsA, "tc", "qdisc", "add", "dev", tn.vethA, "root", "tbf", "rate", "1gbit", "burst", "1mb", "latency", "50ms"))
	tn.pk = t.TempDir()
	run(t, ferryBin, "ca", "init", "--pki", tn.pk)
	run(t, ferryBin, "ca", "issue", "--pki", tn.pk, "--role", "site", "--host", "10.78.0.1", "siteA")
	run(t, ferryBin, "ca", "issue", "--pki", tn.pk, "--role", "site", "--host", "10.78.0.2,127.0.0.1", "siteB")
	run(t, ferryBin, "ca", "issue", "--pki", tn.pk, "--role", "operator", "operator")
	root := t.TempDir()
	bdir := filepath.Join(root, "b")
	os.MkdirAll(bdir, 0o700)
	// Site B's disk: a tmpfs the disk-full scenario fills.
	size := "1500m"
	if tn.full {
		size = "6g" // 30 s scenarios at up to 50 MB/s
	}
	mustRun(t, exec.Command("mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", bdir))
	t.Cleanup(func() { exec.Command("umount", "-l", bdir).Run() })
	tn.a = &tortureSite{ns: nsA, name: "siteA", addr: "10.78.0.1:7410", dir: filepath.Join(root, "a"), extra: []string{"--max-unshipped", "16"},
		clock: filepath.Join(root, "a.clock")}
	// A retention shorter than the clock steps: a clock that followed a
	// step forward would drop every point.
	tn.b = &tortureSite{ns: nsB, name: "siteB", addr: "10.78.0.2:7410", dir: bdir, extra: []string{"--retention", "30m"},
		clock: filepath.Join(root, "b.clock")}
	tn.startAgent(tn.a)
	tn.startAgent(tn.b)
	t.Cleanup(func() {
		tn.kill9(tn.a)
		tn.kill9(tn.b)
		if tn.proxy != nil {
			tn.proxy.Process.Kill()
			tn.proxy.Wait()
		}
		if t.Failed() {
			t.Logf("site A log:\n%s\nsite B log:\n%s", tailLog(tn.a.log), tailLog(tn.b.log))
		}
	})
	tn.startProxy(0, 0)
	return tn
}

func tailLog(b *bytes.Buffer) string {
	s := b.String()
	if len(s) > 6000 {
		s = s[len(s)-6000:]
	}
	return s
}

func TestTorture(t *testing.T) {
	tn := newTorture(t)
	secs := func(short, full time.Duration) time.Duration {
		if tn.full {
			return full
		}
		return short
	}
	const lanes = 4
	var passed, failed, lost int
	scenario := func(name string, fn func(t *testing.T) int) {
		ok := t.Run(name, func(t *testing.T) {
			tn.t = t
			lost += fn(t)
		})
		if !ok {
			// The whole logs, for the scenario that failed (the test's
			// own output has only their tails).
			for _, s := range []*tortureSite{tn.a, tn.b} {
				path := filepath.Join(os.TempDir(), fmt.Sprintf("ferry-torture-%s-%s.log", name, s.name))
				if err := os.WriteFile(path, s.log.Bytes(), 0o600); err == nil {
					t.Logf("%s's whole log: %s", s.name, path)
				}
			}
		}
		// Each scenario's group goes at both sites, so that the next one
		// starts with site B's disk as empty as it was.
		for _, g := range tn.groups {
			tn.cli(tn.a, "unreplicate", g)
			tn.cli(tn.a, "group", "delete", g)
			tn.cli(tn.b, "replica", "delete", g)
		}
		tn.groups = nil
		if ok {
			passed++
		} else {
			failed++
		}
	}

	scenario("partition-then-heal", func(t *testing.T) int {
		tn.group("part", "512M")
		_, stop := tn.records("part", lanes)
		time.Sleep(time.Second) // some records replicate before the cut
		mustRun(t, exec.Command("ip", "-n", tn.a.ns, "link", "set", tn.vethA, "down"))
		_, _, _, _, sent0, _ := tn.repl("part")
		cut := time.Now()
		// Writes go on; past --max-unshipped (16 MiB) the source keeps a
		// dirty-block bitmap and lets its journal go.
		time.Sleep(secs(8*time.Second, 30*time.Second))
		acked := stop()
		var written uint64 // records are numbered across lanes
		for _, k := range acked {
			written = max(written, k)
		}
		mustRun(t, exec.Command("ip", "-n", tn.a.ns, "link", "set", tn.vethA, "up"))
		tn.until(120*time.Second, "the resync after the partition", func() bool { return tn.drained("part") })
		_, _, _, rpo, sent1, _ := tn.repl("part")
		// What went over the link after the heal is about what was
		// written (records, in 64 KiB chunks), not the 512 MiB disk.
		limit := int64(written)*ordercheck.RecordSize*2 + 16<<20
		if sent1-sent0 > limit {
			t.Errorf("the heal sent %d bytes for %d bytes of records: a full copy?", sent1-sent0, written*ordercheck.RecordSize)
		}
		t.Logf("partition %v: %d records written, %d bytes sent after, RPO after the heal %.2fs", time.Since(cut).Round(time.Second),
			written, sent1-sent0, rpo)
		if rpo > 5 {
			t.Errorf("RPO did not recover: %.1fs", rpo)
		}
		n := tn.verify("part", lanes, acked)
		// Every point the replica offers after the heal is a state the
		// source had: the write-order checker passes at each.
		var pts []struct {
			Seq uint64 `json:"seq"`
		}
		json.Unmarshal([]byte(tn.must(tn.b, "points", "part")), &pts)
		sort.Slice(pts, func(i, j int) bool { return pts[i].Seq < pts[j].Seq })
		for i := 0; i < len(pts); i += max(1, len(pts)/8) {
			tn.checkView("part", pts[i].Seq, lanes, make([]uint64, lanes))
		}
		return n
	})

	scenario("wan-100ms-rtt-1pct-loss", func(t *testing.T) int {
		tn.startProxy(50*time.Millisecond, 1)
		defer tn.startProxy(0, 0)
		tn.group("wan", "512M")
		_, stop := tn.records("wan", lanes)
		// Bulk churn beside the records (up to 16 MB/s): 1 MiB writes at
		// 34 MB/s, 50 MB/s in all.
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := nbd.Dial(ctx, "unix", filepath.Join(tn.a.dir, "nbd.sock"), "wan/vda")
			if err != nil {
				return
			}
			defer c.Close()
			p := bytes.Repeat([]byte{0x5A}, 1<<20)
			tick := time.NewTicker(30 * time.Millisecond)
			defer tick.Stop()
			for i := 0; ctx.Err() == nil; i++ {
				<-tick.C
				c.WriteAt(ctx, p, 256<<20+int64(i%200)<<20, false)
			}
		}()
		var rpos []float64
		end := time.Now().Add(secs(8*time.Second, 30*time.Second))
		for time.Now().Before(end) {
			if _, _, _, rpo, _, _ := tn.repl("wan"); rpo >= 0 {
				rpos = append(rpos, rpo*1000)
			}
			time.Sleep(200 * time.Millisecond)
		}
		cancel()
		wg.Wait()
		acked := stop()
		sort.Float64s(rpos)
		p99 := rpos[min(len(rpos)-1, len(rpos)*99/100)]
		t.Logf("RPO over a 100 ms RTT link with 1%% loss-like stalls at 50 MB/s: p50 %.0f ms, p99 %.0f ms (%d samples)", rpos[len(rpos)/2], p99, len(rpos))
		fmt.Printf("TORTURE wan rpo_p99_ms=%.0f samples=%d\n", p99, len(rpos))
		return tn.verify("wan", lanes, acked)
	})

	scenario("kill-9-source-agent", func(t *testing.T) int {
		tn.group("ks", "256M")
		_, stop := tn.records("ks", lanes)
		time.Sleep(secs(2*time.Second, 5*time.Second))
		tn.kill9(tn.a)
		tn.startAgent(tn.a)
		time.Sleep(time.Second) // the writer reconnects and goes on
		acked := stop()
		return tn.verify("ks", lanes, acked)
	})

	scenario("kill-9-recovery-agent", func(t *testing.T) int {
		tn.group("kr", "256M")
		_, stop := tn.records("kr", lanes)
		time.Sleep(secs(2*time.Second, 5*time.Second))
		tn.kill9(tn.b)
		time.Sleep(time.Second) // the source goes on alone
		tn.startAgent(tn.b)
		acked := stop()
		return tn.verify("kr", lanes, acked)
	})

	scenario("recovery-site-disk-full", func(t *testing.T) int {
		tn.group("full", "256M")
		// Fill site B's file system to a few MiB free.
		var fs syscall.Statfs_t
		syscall.Statfs(tn.b.dir, &fs)
		free := int64(fs.Bavail) * fs.Bsize
		filler := filepath.Join(tn.b.dir, "filler")
		f, _ := os.Create(filler)
		if err := f.Truncate(0); err == nil {
			chunk := make([]byte, 1<<20)
			for w := int64(0); w < free-4<<20; w += int64(len(chunk)) {
				if _, err := f.Write(chunk); err != nil {
					break
				}
			}
		}
		f.Close()
		w, stop := tn.records("full", lanes)
		// The source keeps serving: records go on being acknowledged
		// while replication stalls with the reason.
		tn.until(60*time.Second, "replication to stall with a reason", func() bool {
			_, _, _, _, _, e := tn.repl("full")
			return strings.Contains(e, "no space") || strings.Contains(e, "ENOSPC")
		})
		before := w.Acked()
		tn.until(30*time.Second, "the source to keep taking writes", func() bool {
			now := w.Acked()
			for l := range now {
				if now[l] > before[l] {
					return true
				}
			}
			return false
		})
		_, _, _, _, _, reason := tn.repl("full")
		t.Logf("stalled with: %s", reason)
		os.Remove(filler)
		acked := stop()
		return tn.verify("full", lanes, acked)
	})

	scenario("clock-steps-1h", func(t *testing.T) int {
		tn.group("clk", "256M")
		_, stop := tn.records("clk", lanes)
		type point struct {
			Seq  uint64    `json:"seq"`
			Time time.Time `json:"time"`
		}
		points := func() []point {
			var ps []point
			out, err := tn.cli(tn.b, "points", "clk")
			if err == nil {
				json.Unmarshal([]byte(out), &ps)
			}
			return ps
		}
		tn.until(30*time.Second, "points at B", func() bool { return len(points()) >= 5 })
		// Each site's clock steps an hour forward, then back, while the
		// VM writes and the points flow; RPO is sampled throughout.
		var worstRPO float64
		for _, step := range []struct {
			s   *tortureSite
			off string
		}{{tn.a, "3600"}, {tn.a, "-3600"}, {tn.a, "0"}, {tn.b, "3600"}, {tn.b, "-3600"}, {tn.b, "0"}} {
			if err := os.WriteFile(step.s.clock, []byte(step.off), 0o600); err != nil {
				t.Fatal(err)
			}
			end := time.Now().Add(secs(1500*time.Millisecond, 5*time.Second))
			for time.Now().Before(end) {
				if _, _, _, rpo, _, _ := tn.repl("clk"); rpo > worstRPO {
					worstRPO = rpo
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
		acked := stop()
		lost := tn.verify("clk", lanes, acked)
		ps := points()
		t.Logf("RPO worst %.2f s through the steps; %d points at B", worstRPO, len(ps))
		if worstRPO > 30 {
			t.Errorf("RPO reached %.0f s while the clocks stepped", worstRPO)
		}
		if len(ps) < 10 {
			t.Errorf("only %d points left at B: retention followed a clock step", len(ps))
		}
		real := time.Now()
		for i, p := range ps {
			if i > 0 && p.Time.Before(ps[i-1].Time) {
				t.Errorf("point %d at %v is before point %d at %v", p.Seq, p.Time, ps[i-1].Seq, ps[i-1].Time)
			}
			if d := p.Time.Sub(real); d > time.Minute || d < -time.Hour/2 {
				t.Errorf("point %d is stamped %v, %v from the real time", p.Seq, p.Time, d)
			}
		}
		return lost
	})

	fmt.Printf("RESULT torture scenarios=%d passed=%d failed=%d lost_records=%d\n", passed+failed, passed, failed, lost)
	if failed > 0 || lost > 0 {
		t.Fatalf("torture: %d failed, %d records lost", failed, lost)
	}
}
