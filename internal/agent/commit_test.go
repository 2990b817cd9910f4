package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/agentclient"
	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/disk"
	"github.com/ferry-dr/ferry/internal/nbd"
	"github.com/ferry-dr/ferry/internal/pki"
	"github.com/ferry-dr/ferry/internal/replica"
)

// TestMain lets the test binary act as the child of TestCommitCrash.
func TestMain(m *testing.M) {
	if arg := os.Getenv("FERRY_AGENT_COMMIT_CHILD"); arg != "" {
		commitChild(arg)
		return
	}
	if arg := os.Getenv("FERRY_AGENT_TOREPLICA_CHILD"); arg != "" {
		toReplicaChild(arg)
		return
	}
	os.Exit(m.Run())
}

const commitDiskSize = 8 << 20

// replicatedPair starts siteA replicating group vm1 (one 8 MiB disk with
// random data) to siteB in dirB, marks a point once everything is at B and
// returns the agents, that point and the disk's content at it.
func replicatedPair(t *testing.T, pk, dirB string, cfgB Config) (a, b *Agent, seq uint64, content []byte) {
	t.Helper()
	ctx := context.Background()
	a = startAgent(t, pk, "siteA")
	cfgB.Name, cfgB.PKIDir, cfgB.Dir = "siteB", pk, dirB
	b = startAgentWith(t, cfgB)
	op, _ := pki.Load(pk, "operator")
	ca := agentclient.New(op, a.Addr(), "siteA")
	cb := agentclient.New(op, b.Addr(), "siteB")
	if err := ca.CreateGroup(ctx, "vm1", []disk.Spec{{Name: "vda", Size: commitDiskSize}}); err != nil {
		t.Fatal(err)
	}
	nc := replicateVM1(t, a, b, ca, cb)
	rng := rand.New(rand.NewPCG(7, 7))
	for i := range 300 {
		p := make([]byte, 512*(1+rng.IntN(40)))
		for k := range p {
			p[k] = byte(rng.Uint32())
		}
		if err := nc.WriteAt(ctx, p, rng.Int64N(commitDiskSize-int64(len(p)))&^511, i%10 == 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := nc.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	seq, err := a.Mark(ctx, "vm1", replica.Marker{Type: "named", Label: "commit-test"})
	if err != nil {
		t.Fatal(err)
	}
	a.groups["vm1"].g.Flush(ctx)
	waitReplicaSeq(t, b, seq)
	content = make([]byte, commitDiskSize)
	if err := nc.ReadAt(ctx, content, 0); err != nil {
		t.Fatal(err)
	}
	// From here on siteA is out of the picture, as after a failover.
	if err := ca.Unreplicate(ctx, "vm1"); err != nil {
		t.Fatal(err)
	}
	return a, b, seq, content
}

// waitReplicaSeq waits until b's replica vm1 holds seq.
func waitReplicaSeq(t *testing.T, b *Agent, seq uint64) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		b.mu.Lock()
		rep := b.replicas["vm1"]
		b.mu.Unlock()
		if rep != nil && rep.Status().LastSeq >= seq {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("seq %d did not reach %s", seq, b.cfg.Name)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// checkExport reads a whole export and compares it with want.
func checkExport(t *testing.T, sock, export string, want []byte) {
	t.Helper()
	ctx := context.Background()
	c, err := nbd.Dial(ctx, "unix", sock, export)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got := make([]byte, len(want))
	for off := 0; off < len(got); off += 1 << 20 {
		if err := c.ReadAt(ctx, got[off:off+1<<20], int64(off)); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(got, want) {
		for i := range got {
			if got[i] != want[i] {
				t.Fatalf("%s differs from what was written at byte %d", export, i)
			}
		}
	}
}

// TestCommitUnderIO commits the writable view a client is writing to:
// no request fails, the client stays connected, and the group holds the
// point plus every write, before the fold, after it, and after a restart
// in the middle of it.
func TestCommitUnderIO(t *testing.T) {
	ctx := context.Background()
	pk := pkiDir(t, "siteA", "siteB", "operator")
	dirB := t.TempDir()
	// The test drives the fold, so that the restart below happens in the
	// middle of it.
	_, b, seq, content := replicatedPair(t, pk, dirB, Config{NoFold: true, PointInterval: 50 * time.Millisecond})
	ov, err := b.OpenView("vm1", "vda", seq, true)
	if err != nil {
		t.Fatal(err)
	}
	c, err := nbd.Dial(ctx, "unix", b.NBDSocket(), ov.export)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	model := append([]byte(nil), content...)
	var mu sync.Mutex
	writes := 0
	stop := make(chan struct{})
	errc := make(chan error, 1)
	go func() {
		rng := rand.New(rand.NewPCG(1, 2))
		for {
			select {
			case <-stop:
				errc <- nil
				return
			default:
			}
			p := make([]byte, 1+rng.IntN(3*disk.BlockSize))
			for k := range p {
				p[k] = byte(rng.Uint32())
			}
			off := rng.Int64N(commitDiskSize - int64(len(p)))
			if err := c.WriteAt(ctx, p, off, rng.IntN(4) == 0); err != nil {
				errc <- fmt.Errorf("write %d: %w", writes, err)
				return
			}
			got := make([]byte, len(p))
			if err := c.ReadAt(ctx, got, off); err != nil || !bytes.Equal(got, p) {
				errc <- fmt.Errorf("read back write %d: %v", writes, err)
				return
			}
			mu.Lock()
			copy(model[off:], p)
			writes++
			mu.Unlock()
		}
	}()
	waitWrites := func(n int) {
		deadline := time.Now().Add(20 * time.Second)
		for {
			mu.Lock()
			w := writes
			mu.Unlock()
			if w >= n {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("the writer is stuck at %d writes", w)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	waitWrites(100)
	b.mu.Lock()
	rep := b.replicas["vm1"]
	b.mu.Unlock()
	steps, err := b.commitViews(ctx, "vm1", rep, []*openView{ov})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("commit: %v", steps)
	mu.Lock()
	at := writes
	mu.Unlock()
	waitWrites(at + 100)
	close(stop)
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	st := b.Status()
	if len(st.Replicas) != 0 || len(st.Groups) != 1 || st.Groups[0].Fold == nil || st.Groups[0].Fold.Phase == api.FoldDone {
		t.Fatalf("after commit: replicas %+v, groups %+v", st.Replicas, st.Groups)
	}
	if _, err := b.Points("vm1"); !errors.Is(err, api.ErrNotFound) {
		t.Fatalf("points after commit: %v", err)
	}
	checkExport(t, b.NBDSocket(), ov.export, model)
	checkExport(t, b.NBDSocket(), "vm1/vda", model)
	if _, err := os.Stat(filepath.Join(dirB, "groups", "vm1", "divergence.json")); err != nil {
		t.Logf("divergence record: %v", err)
	}
	if _, err := b.GroupDivergence("vm1"); err != nil {
		t.Fatalf("changed-block tracking after commit: %v", err)
	}

	// A restart in the middle of the fold: the group opens over its base.
	b.mu.Lock()
	gr := b.groups["vm1"]
	b.mu.Unlock()
	if _, _, err := gr.g.FoldStep(ctx); err != nil {
		t.Fatal(err)
	}
	c.Close()
	b.Close()
	b2 := startAgentWith(t, Config{Name: "siteB", PKIDir: pk, Dir: dirB, PointInterval: -1, NoFold: true})
	b2.mu.Lock()
	gr = b2.groups["vm1"]
	nrep := len(b2.replicas)
	b2.mu.Unlock()
	if gr == nil || nrep != 0 || !gr.g.Layered() {
		t.Fatalf("after a restart mid-fold: group %v, %d replicas", gr != nil, nrep)
	}
	checkExport(t, b2.NBDSocket(), "vm1/vda", model)
	// A copy of the base, to play a crash between the fold's end and the
	// base's removal below.
	leftover := filepath.Join(t.TempDir(), "base")
	if out, err := exec.Command("cp", "-a", filepath.Join(dirB, "replicas", "vm1"), leftover).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if err := gr.g.FinishFold(ctx); err != nil {
		t.Fatal(err)
	}
	if gr.g.Layered() {
		t.Fatal("still layered after the fold")
	}
	if _, err := os.Stat(filepath.Join(dirB, "replicas", "vm1")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the committed replica is still there after the fold: %v", err)
	}
	checkExport(t, b2.NBDSocket(), "vm1/vda", model)
	if f := b2.Status().Groups[0].Fold; f != nil {
		t.Fatalf("fold status after the fold: %+v", f)
	}
	// The leftover base is removed at the next start, not reported.
	b2.Close()
	if out, err := exec.Command("cp", "-a", leftover, filepath.Join(dirB, "replicas", "vm1")).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	b3 := startAgentWith(t, Config{Name: "siteB", PKIDir: pk, Dir: dirB, PointInterval: -1, NoFold: true})
	if st := b3.Status(); len(st.Problems) != 0 || len(st.Replicas) != 0 || len(st.Groups) != 1 {
		t.Fatalf("after a restart with the fold's leftover base: %+v %+v %+v", st.Problems, st.Replicas, st.Groups)
	}
	if _, err := os.Stat(filepath.Join(dirB, "replicas", "vm1")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the leftover base is still there: %v", err)
	}
	checkExport(t, b3.NBDSocket(), "vm1/vda", model)
}

// TestCommitCrash kills the agent (the test binary as a child) at each
// crash point of a commit and restarts it: before the group is in place
// the replica is back as it was, with its points; after, the group holds
// the point plus the view's writes.
func TestCommitCrash(t *testing.T) {
	for _, point := range []string{"commit-replica-marked", "commit-group-in-place"} {
		t.Run(point, func(t *testing.T) {
			pk := pkiDir(t, "siteA", "siteB", "operator")
			dirB := t.TempDir()
			a, b, seq, content := replicatedPair(t, pk, dirB, Config{PointInterval: -1})
			b.Close()
			a.Close()
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), fmt.Sprintf("FERRY_AGENT_COMMIT_CHILD=%s:%s:%s:%d", point, dirB, pk, seq))
			out, err := cmd.CombinedOutput()
			if ee := (*exec.ExitError)(nil); !errors.As(err, &ee) || ee.ExitCode() != 3 {
				t.Fatalf("child did not die at %s: %v\n%s", point, err, out)
			}
			b2 := startAgentWith(t, Config{Name: "siteB", PKIDir: pk, Dir: dirB, PointInterval: -1})
			if len(b2.Status().Problems) != 0 {
				t.Fatalf("problems after the crash: %+v", b2.Status().Problems)
			}
			if point == "commit-replica-marked" {
				pts, err := b2.Points("vm1")
				if err != nil || len(pts) == 0 {
					t.Fatalf("the replica's points after a commit that did not finish: %v %v", pts, err)
				}
				if _, err := b2.group("vm1"); err == nil {
					t.Fatal("a group exists after a commit that did not finish")
				}
				ov, err := b2.OpenView("vm1", "vda", seq, false)
				if err != nil {
					t.Fatal(err)
				}
				checkExport(t, b2.NBDSocket(), ov.export, content)
				return
			}
			want := append([]byte(nil), content...)
			copy(want[3*disk.BlockSize+100:], bytes.Repeat([]byte{0xCD}, 5000))
			checkExport(t, b2.NBDSocket(), "vm1/vda", want)
			b2.mu.Lock()
			gr := b2.groups["vm1"]
			b2.mu.Unlock()
			if err := gr.g.FinishFold(context.Background()); err != nil {
				t.Fatal(err)
			}
			checkExport(t, b2.NBDSocket(), "vm1/vda", want)
		})
	}
}

// commitChild is the child of TestCommitCrash: it starts siteB, writes
// through a writable view and commits it, dying at the named point.
func commitChild(arg string) {
	parts := strings.SplitN(arg, ":", 4)
	point, dir, pk := parts[0], parts[1], parts[2]
	var seq uint64
	fmt.Sscan(parts[3], &seq)
	fail := func(err error) {
		fmt.Println(err)
		os.Exit(1)
	}
	ctx := context.Background()
	b, err := New(Config{Name: "siteB", PKIDir: pk, Dir: dir, Listen: "127.0.0.1:0", PointInterval: -1})
	if err != nil {
		fail(err)
	}
	if err := b.Start(ctx); err != nil {
		fail(err)
	}
	ov, err := b.OpenView("vm1", "vda", seq, true)
	if err != nil {
		fail(err)
	}
	c, err := nbd.Dial(ctx, "unix", b.NBDSocket(), ov.export)
	if err != nil {
		fail(err)
	}
	if err := c.WriteAt(ctx, bytes.Repeat([]byte{0xCD}, 5000), 3*disk.BlockSize+100, false); err != nil {
		fail(err)
	}
	CrashPoint = func(name string) {
		if name == point {
			os.Exit(3)
		}
	}
	b.mu.Lock()
	rep := b.replicas["vm1"]
	b.mu.Unlock()
	if _, err := b.commitViews(ctx, "vm1", rep, []*openView{ov}); err != nil {
		fail(err)
	}
	fail(errors.New("commit finished without reaching the crash point"))
}

// TestToReplicaCrash kills the agent at each step of turning a group into
// a replica (a reprotect reusing the old source's disks) and restarts it:
// the move finishes, the group is gone, the replica holds the group's
// images intact as a copy to redo, and nothing is reported damaged.
func TestToReplicaCrash(t *testing.T) {
	for _, point := range []string{"to-replica-intent", "adopt-manifest-saved", "adopt-image-moved", "to-replica-adopted"} {
		t.Run(point, func(t *testing.T) {
			ctx := context.Background()
			pk := pkiDir(t, "siteA", "operator")
			dir := t.TempDir()
			a := startAgentWith(t, Config{Name: "siteA", PKIDir: pk, Dir: dir, PointInterval: -1})
			if err := a.CreateGroup("vm1", []disk.Spec{{Name: "vda", Size: 1 << 20}, {Name: "vdb", Size: 1 << 20}}); err != nil {
				t.Fatal(err)
			}
			want := map[string][]byte{}
			for i, d := range []string{"vda", "vdb"} {
				c, err := nbd.Dial(ctx, "unix", a.NBDSocket(), "vm1/"+d)
				if err != nil {
					t.Fatal(err)
				}
				p := bytes.Repeat([]byte{byte(0xA0 + i)}, 1<<20)
				if err := c.WriteAt(ctx, p, 0, true); err != nil {
					t.Fatal(err)
				}
				c.Close()
				want[d] = p
			}
			a.Close()
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), fmt.Sprintf("FERRY_AGENT_TOREPLICA_CHILD=%s:%s:%s", point, dir, pk))
			out, err := cmd.CombinedOutput()
			if ee := (*exec.ExitError)(nil); !errors.As(err, &ee) || ee.ExitCode() != 3 {
				t.Fatalf("child did not die at %s: %v\n%s", point, err, out)
			}
			a2 := startAgentWith(t, Config{Name: "siteA", PKIDir: pk, Dir: dir, PointInterval: -1})
			st := a2.Status()
			if len(st.Problems) != 0 || len(st.Groups) != 0 || len(st.Replicas) != 1 {
				t.Fatalf("after a crash at %s: problems %+v, groups %+v, replicas %+v", point, st.Problems, st.Groups, st.Replicas)
			}
			if _, err := os.Stat(a2.groupDir("vm1")); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("the group's directory is still there: %v", err)
			}
			for d, p := range want {
				got, err := os.ReadFile(filepath.Join(dir, "replicas", "vm1", "images", d+".img"))
				if err != nil || !bytes.Equal(got, p) {
					t.Fatalf("image %s of the replica: %v (equal: %v)", d, err, bytes.Equal(got, p))
				}
			}
		})
	}
}

// toReplicaChild is the child of TestToReplicaCrash.
func toReplicaChild(arg string) {
	parts := strings.SplitN(arg, ":", 3)
	point, dir, pk := parts[0], parts[1], parts[2]
	fail := func(err error) {
		fmt.Println(err)
		os.Exit(1)
	}
	a, err := New(Config{Name: "siteA", PKIDir: pk, Dir: dir, Listen: "127.0.0.1:0", PointInterval: -1})
	if err != nil {
		fail(err)
	}
	if err := a.Start(context.Background()); err != nil {
		fail(err)
	}
	die := func(name string) {
		if name == point {
			os.Exit(3)
		}
	}
	CrashPoint, replica.CrashPoint = die, die
	if _, _, err := a.GroupToReplica(context.Background(), "vm1", 0, "siteB"); err != nil {
		fail(err)
	}
	fail(errors.New("to-replica finished without reaching the crash point"))
}
