package replication

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/disk"
	"github.com/ferry-dr/ferry/internal/faultnet"
	"github.com/ferry-dr/ferry/internal/journal"
	"github.com/ferry-dr/ferry/internal/link"
	"github.com/ferry-dr/ferry/internal/pki"
	"github.com/ferry-dr/ferry/internal/replica"
)

const diskSize = 4 << 20

type env struct {
	g      *disk.Group
	rep    *replica.Replica
	repDir string
	sh     *Shipper
	proxy  *faultnet.Proxy
	cfg    ShipperConfig
	mu     sync.Mutex // guards rep swaps
}

func setup(t *testing.T) *env { return setupWith(t, nil) }

func setupWith(t *testing.T, tweak func(*ShipperConfig)) *env {
	t.Helper()
	pk := t.TempDir()
	now := time.Now()
	if err := pki.InitCA(pk, "ca", now); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"src", "dst"} {
		if err := pki.Issue(pk, pk, pki.Peer{Role: pki.RoleSite, Name: n}, []string{"127.0.0.1"}, now); err != nil {
			t.Fatal(err)
		}
	}
	srcID, _ := pki.Load(pk, "src")
	dstID, _ := pki.Load(pk, "dst")
	e := &env{repDir: t.TempDir()}
	var err error
	e.g, err = disk.Open(disk.Config{Dir: t.TempDir(), SegmentSize: 256 << 10})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.g.Close() })
	e.g.CreateDisk("a", diskSize)
	e.g.CreateDisk("b", diskSize)
	e.rep, err = replica.Open(replica.Config{Dir: e.repDir, SegmentSize: 256 << 10})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.mu.Lock(); e.rep.Close(); e.mu.Unlock() })

	ln, err := tls.Listen("tcp", "127.0.0.1:0", dstID.ServerConfig())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	rc := &Receiver{ReplicaFor: func(link.Hello) (*replica.Replica, error) {
		e.mu.Lock()
		defer e.mu.Unlock()
		return e.rep, nil
	}}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go rc.Serve(context.Background(), c, nil)
		}
	}()
	e.proxy, err = faultnet.New(ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.proxy.Close() })
	cfg := ShipperConfig{
		Group: e.g, Name: "vm1", Source: "src", StateDir: t.TempDir(),
		MinBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
		Dial: func(ctx context.Context) (io.ReadWriteCloser, error) {
			d := tls.Dialer{Config: srcID.ClientConfig(pki.Peer{Role: pki.RoleSite, Name: "dst"})}
			return d.DialContext(ctx, "tcp", e.proxy.Addr())
		},
	}
	if tweak != nil {
		tweak(&cfg)
	}
	e.cfg = cfg
	e.sh = NewShipper(cfg)
	return e
}

func writeRandom(t *testing.T, g *disk.Group, rng *rand.Rand, n int) {
	ctx := context.Background()
	for i := 0; i < n; i++ {
		d, _ := g.Disk([]string{"a", "b"}[rng.IntN(2)])
		off := rng.Int64N(diskSize - 1)
		ln := 1 + rng.Int64N(min(diskSize-off, 128<<10))
		var err error
		if rng.IntN(8) == 0 {
			err = d.WriteZeroes(ctx, off, ln)
		} else {
			p := make([]byte, ln)
			for k := range p {
				p[k] = byte(rng.Uint32() | 1)
			}
			err = d.WriteAt(ctx, p, off)
		}
		if err != nil {
			t.Error(err)
			return
		}
		if i%20 == 0 {
			g.Mark(replica.Marker{Type: "crash"}.Encode())
		}
	}
}

// drain waits until the recovery site acknowledged the source's last entry.
func drain(t *testing.T, e *env) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		st := e.sh.Status()
		if st.AckedSeq == st.LastSeq && st.State == StateStreaming {
			if st.RPO != 0 {
				t.Fatalf("RPO %v with nothing pending", st.RPO)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("replication did not drain: %+v", st)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func sameAsSource(t *testing.T, e *env) {
	t.Helper()
	e.mu.Lock()
	rep := e.rep
	e.mu.Unlock()
	last := e.g.Journal().LastSeq()
	for _, s := range e.g.Disks() {
		d, _ := e.g.Disk(s.Name)
		want := make([]byte, s.Size)
		d.ReadAt(context.Background(), want, 0)
		v, err := rep.OpenView(s.Name, last, "")
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, s.Size)
		if err := v.ReadAt(context.Background(), got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("replica of %s at %d differs from the source", s.Name, last)
		}
	}
}

// TestReplicateWithCutsAndRestart replicates while writing: the initial copy
// runs under writes, the link is cut several times, the recovery side's
// replica is closed and reopened; afterwards the replica equals the source
// and every acknowledged entry arrived exactly once (AppendCopies refuses
// gaps and duplicates).
func TestReplicateWithCutsAndRestart(t *testing.T) {
	e := setup(t)
	rng := rand.New(rand.NewPCG(1, 1))
	writeRandom(t, e.g, rng, 50) // data before replication starts
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	e.sh.Start(ctx)
	defer e.sh.Close()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); writeRandom(t, e.g, rand.New(rand.NewPCG(2, 2)), 400) }()
	for i := 0; i < 4; i++ {
		time.Sleep(time.Duration(20+rng.IntN(60)) * time.Millisecond)
		e.proxy.Cut()
	}
	wg.Wait()
	drain(t, e)
	sameAsSource(t, e)
	if st := e.sh.Status(); st.Reconnects == 0 {
		t.Fatalf("no reconnects after cuts: %+v", st)
	}

	// Restart the recovery side's replica mid-stream.
	wg.Add(1)
	go func() { defer wg.Done(); writeRandom(t, e.g, rand.New(rand.NewPCG(3, 3)), 200) }()
	time.Sleep(30 * time.Millisecond)
	e.mu.Lock()
	e.proxy.Cut()
	e.rep.Close()
	rep, err := replica.Open(replica.Config{Dir: e.repDir, SegmentSize: 256 << 10})
	if err != nil {
		e.mu.Unlock()
		t.Fatal(err)
	}
	e.rep = rep
	e.mu.Unlock()
	e.proxy.Cut()
	wg.Wait()
	drain(t, e)
	sameAsSource(t, e)

	// Views at the catalog's points equal a replay of the source journal.
	st := e.rep.Status()
	pts := e.rep.Points()
	if len(pts) < 5 {
		t.Fatalf("only %d points", len(pts))
	}
	checkPointsAgainstReplay(t, e, st, pts[len(pts)-5:])
}

func checkPointsAgainstReplay(t *testing.T, e *env, st replica.Status, pts []replica.Point) {
	t.Helper()
	// The source journal is held from the copy's start (no checkpoint ran),
	// so replaying it over the replica's own view at ConsistentSeq gives
	// each point.
	base := map[string][]byte{}
	for _, s := range e.g.Disks() {
		v, err := e.rep.OpenView(s.Name, st.ConsistentSeq, "")
		if err != nil {
			t.Fatal(err)
		}
		b := make([]byte, s.Size)
		v.ReadAt(context.Background(), b, 0)
		base[s.Name] = b
	}
	r, err := e.g.Journal().NewReader(st.ConsistentSeq + 1)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	names := map[uint16]string{}
	for _, s := range e.g.Disks() {
		names[s.ID] = s.Name
	}
	seq := st.ConsistentSeq
	for _, p := range pts {
		for seq < p.Seq {
			en, ok, err := r.TryNext()
			if err != nil || !ok {
				t.Fatalf("replay: %v %v", ok, err)
			}
			seq = en.Seq
			img := base[names[en.Disk]]
			switch en.Kind {
			case journal.KindWrite:
				copy(img[en.Offset:], en.Data)
			case journal.KindZero, journal.KindTrim:
				clear(img[en.Offset : en.Offset+uint64(en.Length)])
			}
		}
		for name, want := range base {
			v, err := e.rep.OpenView(name, p.Seq, "")
			if err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(want))
			v.ReadAt(context.Background(), got, 0)
			if !bytes.Equal(got, want) {
				t.Fatalf("view of %s at point %d differs from replay", name, p.Seq)
			}
		}
	}
}

// TestOutageBeyondJournalBound keeps writing while the recovery site is
// unreachable, far past the source journal's bound: the source switches to
// a dirty-block bitmap (its journal stays bounded), and when the link is
// back it resends only the dirty blocks, not the disks. Old points stay
// valid, points inside the resynchronization are not offered, and the
// replica ends equal to the source.
func TestOutageBeyondJournalBound(t *testing.T) {
	const bound = 16 << 20 // above what the first phase writes
	e := setupWith(t, func(c *ShipperConfig) { c.MaxJournalBytes = bound })
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	e.sh.Start(ctx)
	defer e.sh.Close()
	writeRandom(t, e.g, rand.New(rand.NewPCG(4, 4)), 100)
	e.g.Mark(replica.Marker{Type: "named", Label: "before"}.Encode())
	drain(t, e)
	pts := e.rep.Points()
	before := pts[len(pts)-1]
	if before.Label != "before" {
		t.Fatalf("last point %+v", before)
	}
	imgBefore := readView(t, e.rep, "a", before.Seq)

	e.proxy.SetDown(true)
	a, _ := e.g.Disk("a")
	p := make([]byte, 4096)
	written := int64(0)
	for i := 0; i < 6000; i++ {
		p[0] = byte(i)
		p[1] = byte(i >> 8)
		// Overwrites within the first 512 KiB: 8 dirty 64 KiB chunks.
		if err := a.WriteAt(ctx, p, int64(i%128)*4096); err != nil {
			t.Fatal(err)
		}
		written += 4096
		if i%200 == 0 {
			e.g.Mark(replica.Marker{Type: "crash"}.Encode())
			e.g.Checkpoint(ctx)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for !e.sh.Status().BitmapMode {
		if time.Now().After(deadline) {
			t.Fatalf("never switched to the bitmap: %+v", e.sh.Status())
		}
		time.Sleep(20 * time.Millisecond)
	}
	// With the journal released (the bitmap is saved and the hold moved
	// every 200 ms), checkpoints keep it within its bound.
	for {
		for i := 0; i < 10; i++ {
			a.WriteAt(ctx, p, 0)
		}
		if err := e.g.Checkpoint(ctx); err != nil {
			t.Fatal(err)
		}
		got := e.g.Journal().Size()
		if got <= bound {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("source journal %d bytes, bound %d", got, bound)
		}
		time.Sleep(50 * time.Millisecond)
	}
	sentBefore := e.sh.Status().SentBytes
	e.proxy.SetDown(false)
	drain(t, e)
	for e.sh.Status().BitmapMode {
		if time.Now().After(deadline.Add(20 * time.Second)) {
			t.Fatalf("resync never finished: %+v", e.sh.Status())
		}
		time.Sleep(20 * time.Millisecond)
		drain(t, e)
	}
	st := e.sh.Status()
	sent := st.SentBytes - sentBefore
	if st.ResyncTotal != 512<<10 {
		t.Fatalf("resync sent %d bytes of blocks, want the 512 KiB that changed", st.ResyncTotal)
	}
	if sent > st.ResyncTotal*11/10+64<<10 || sent >= written/4 {
		t.Fatalf("sent %d bytes to resync %d dirty bytes (%d written during the outage)", sent, st.ResyncTotal, written)
	}
	t.Logf("outage: %d bytes written, %d dirty, %d sent to resync", written, st.ResyncTotal, sent)
	sameAsSource(t, e)
	if got := readView(t, e.rep, "a", before.Seq); !bytes.Equal(got, imgBefore) {
		t.Fatal("the point before the outage changed")
	}
	// A point taken during the outage at the source lies inside the gap.
	var sawGap bool
	for seq := before.Seq + 1; seq < e.rep.Status().LastSeq; seq++ {
		if _, err := e.rep.OpenView("a", seq, ""); err != nil {
			sawGap = true
			break
		}
	}
	if !sawGap {
		t.Fatal("no sequence refused between the old point and the resync's end")
	}
}

// A source journal over the bound for the group's own reasons (recent
// writes not folded, no checkpoint yet) while the recovery site keeps up
// is not lag: the shipper must stay in streaming mode, not give up the
// journal and resynchronize (that cost RPO seconds in bench/replication.sh).
func TestBigJournalIsNotLag(t *testing.T) {
	const bound = 1 << 20
	e := setupWith(t, func(c *ShipperConfig) { c.MaxJournalBytes = bound })
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	e.sh.Start(ctx)
	defer e.sh.Close()
	a, _ := e.g.Disk("a")
	p := make([]byte, 4096)
	i := 0
	write := func() {
		t.Helper()
		p[0], p[1] = byte(i), byte(i>>8)
		if err := a.WriteAt(ctx, p, int64(i%1024)*4096); err != nil {
			t.Fatal(err)
		}
		i++
	}
	// In batches the recovery site acknowledges before the next: the
	// journal grows past the bound, what the shipper holds never does.
	for e.g.Journal().Size() <= 2*bound {
		for k := 0; k < 16; k++ {
			write()
		}
		drain(t, e)
	}
	// The watcher looks every 200 ms; writes go on through several looks,
	// so the old test (whole journal over the bound, an entry in flight)
	// would have fired.
	for end := time.Now().Add(time.Second); time.Now().Before(end); {
		write()
		time.Sleep(2 * time.Millisecond)
		if e.sh.Status().BitmapMode {
			t.Fatalf("switched to the bitmap with the recovery site keeping up; journal %d bytes, %d after the acknowledged entry",
				e.g.Journal().Size(), e.g.Journal().SizeAfter(e.sh.Status().AckedSeq))
		}
	}
	drain(t, e)
	if st := e.sh.Status(); st.BitmapMode || st.Reconnects != 0 {
		t.Fatalf("status %+v: want streaming throughout", st)
	}
	sameAsSource(t, e)
}

func readView(t *testing.T, rep *replica.Replica, name string, at uint64) []byte {
	t.Helper()
	v, err := rep.OpenView(name, at, "")
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	b := make([]byte, v.Size())
	if err := v.ReadAt(context.Background(), b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestBitmapSurvivesRestart switches to the bitmap during an outage, then
// replaces the shipper (an agent restart): the new one resumes the saved
// bitmap, keeps marking, and resyncs only the dirty blocks.
func TestBitmapSurvivesRestart(t *testing.T) {
	const bound = 1 << 20
	e := setupWith(t, func(c *ShipperConfig) { c.MaxJournalBytes = bound })
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	e.sh.Start(ctx)
	writeRandom(t, e.g, rand.New(rand.NewPCG(6, 6)), 5)
	drain(t, e)
	e.proxy.SetDown(true)
	a, _ := e.g.Disk("a")
	b, _ := e.g.Disk("b")
	p := bytes.Repeat([]byte{7}, 64<<10)
	for i := 0; i < 40; i++ { // 2.5 MiB into the first 256 KiB of a
		a.WriteAt(ctx, p, int64(i%4)*(64<<10))
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		st := e.sh.Status()
		if st.BitmapMode {
			if _, err := os.Stat(filepath.Join(e.cfg.StateDir, "bitmap.json")); err == nil {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no bitmap: %+v", st)
		}
		time.Sleep(20 * time.Millisecond)
	}
	e.sh.Close()
	// Writes while no shipper runs are in the journal, held from the
	// bitmap's Marked point.
	for i := 0; i < 8; i++ {
		b.WriteAt(ctx, p, int64(i)*(64<<10)) // 512 KiB of b
	}
	e.g.Checkpoint(ctx)
	e.sh = NewShipper(e.cfg)
	if !e.sh.Status().BitmapMode {
		t.Fatal("restarted shipper did not resume the bitmap")
	}
	e.sh.Start(ctx)
	defer e.sh.Close()
	for i := 0; i < 4; i++ { // and writes after the restart
		b.WriteAt(ctx, p, (1<<20)+int64(i)*(64<<10))
	}
	e.proxy.SetDown(false)
	for {
		st := e.sh.Status()
		if !st.BitmapMode && st.State == StateStreaming && st.AckedSeq == st.LastSeq {
			break
		}
		if time.Now().After(deadline.Add(20 * time.Second)) {
			t.Fatalf("resync after restart did not finish: %+v", st)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// 256 KiB of a, 512 KiB + 256 KiB of b.
	if got, want := e.sh.Status().ResyncTotal, int64(1<<20); got != want {
		t.Fatalf("resynced %d bytes, want %d", got, want)
	}
	sameAsSource(t, e)
}

// TestDeltaCopy gives the recovery site older copies of the disks (as after
// a failover, when the old source becomes the replica) that differ in a few
// places: the copy sends only the chunks that differ, then streams.
func TestDeltaCopy(t *testing.T) {
	diverged := []int64{0, 5 << 20 / 8, 3 << 20, 3<<20 + 64<<10, 4<<20 - 100}
	cases := []struct {
		name    string
		tracked func(upTo uint64) (Chunks, error) // nil: compare hashes
		wantErr bool                              // the replica must end up different
	}{
		{name: "checksum compare"},
		{name: "changed-block tracking", tracked: func(uint64) (Chunks, error) {
			c := NewChunks()
			for _, off := range diverged {
				c.Add("a", off, 8)
			}
			return c, nil
		}},
		{name: "tracking unavailable falls back to checksums", tracked: func(uint64) (Chunks, error) {
			return nil, os.ErrNotExist
		}},
		{name: "tracking that misses a chunk is trusted", wantErr: true, tracked: func(uint64) (Chunks, error) {
			c := NewChunks()
			for _, off := range diverged[1:] {
				c.Add("a", off, 8)
			}
			return c, nil
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			copied := 0
			e := setupWith(t, func(c *ShipperConfig) {
				c.DeltaChunks = tc.tracked
				c.Copied = func() { copied++ }
			})
			ctx := context.Background()
			writeRandom(t, e.g, rand.New(rand.NewPCG(9, 9)), 60)
			e.g.Checkpoint(ctx)
			// The old copies: the source's images now, then changed in 5 chunks.
			e.mu.Lock()
			e.rep.Close()
			os.RemoveAll(e.repDir)
			images := map[string]string{}
			for _, s := range e.g.Disks() {
				d, _ := e.g.Disk(s.Name)
				b := make([]byte, s.Size)
				d.ReadAt(ctx, b, 0)
				p := filepath.Join(t.TempDir(), s.Name)
				os.WriteFile(p, b, 0o600)
				images[s.Name] = p
			}
			f, _ := os.OpenFile(images["a"], os.O_RDWR, 0)
			for _, off := range diverged {
				f.WriteAt([]byte("diverged"), off)
			}
			f.Close()
			rep, err := replica.Adopt(replica.Config{Dir: e.repDir}, "vm1", e.g.Disks(), images)
			if err != nil {
				e.mu.Unlock()
				t.Fatal(err)
			}
			e.rep = rep
			e.mu.Unlock()
			runCtx, cancel := context.WithCancel(ctx)
			defer cancel()
			e.sh.Start(runCtx)
			defer e.sh.Close()
			drain(t, e)
			st := e.sh.Status()
			unit := int64(ChunkSize) // checksums compare chunks
			if tc.tracked != nil && tc.name != "tracking unavailable falls back to checksums" {
				unit = TrackSize // tracking sends blocks
			}
			want := int64(len(diverged)) * unit
			if tc.wantErr {
				want -= unit
			}
			if st.SentBytes < want || st.SentBytes > want*11/10 {
				t.Fatalf("delta copy sent %d bytes; want %d", st.SentBytes, want)
			}
			if copied != 1 {
				t.Fatalf("Copied called %d times", copied)
			}
			t.Logf("delta copy: %d bytes sent for %d bytes of disks", st.SentBytes, st.CopyTotal)
			writeRandom(t, e.g, rand.New(rand.NewPCG(10, 10)), 20)
			drain(t, e)
			if tc.wantErr {
				v, err := e.rep.OpenView("a", e.g.Journal().LastSeq(), "")
				if err != nil {
					t.Fatal(err)
				}
				got := make([]byte, 8)
				v.ReadAt(ctx, got, 0)
				src, _ := e.g.Disk("a")
				want := make([]byte, 8)
				src.ReadAt(ctx, want, 0)
				if bytes.Equal(got, want) {
					t.Fatal("a chunk the tracking left out was sent anyway: the tracking is not what the copy used")
				}
				return
			}
			sameAsSource(t, e)
		})
	}
}

func TestChunks(t *testing.T) {
	c := NewChunks()
	c.Add("a", 0, 1)
	c.Add("a", TrackSize-1, 2)              // blocks 0 and 1
	c.Add("b", 130*TrackSize, 3*TrackSize)  // 130..132
	c.Add("b", 5, 0)                        // nothing
	c.Add("c", 60*TrackSize, 200*TrackSize) // 60..259: whole words at once
	tests := []struct {
		disk string
		i    int64
		want bool
	}{{"a", 0, true}, {"a", 1, true}, {"a", 2, false}, {"b", 0, false}, {"b", 129, false},
		{"b", 130, true}, {"b", 132, true}, {"b", 133, false}, {"c", 59, false}, {"c", 60, true},
		{"c", 64, true}, {"c", 127, true}, {"c", 259, true}, {"c", 260, false}, {"d", 0, false}, {"b", 1 << 30, false}}
	for _, tt := range tests {
		if got := c.Has(tt.disk, tt.i); got != tt.want {
			t.Errorf("Has(%s, %d) = %v, want %v", tt.disk, tt.i, got, tt.want)
		}
	}
	if got, want := c.Count(), 5+200; got != want {
		t.Fatalf("Count = %d, want %d", got, want)
	}
	var runs [][2]int64
	c.Runs("c", 1<<30, 64*TrackSize, func(off, n int64) error { runs = append(runs, [2]int64{off / TrackSize, n / TrackSize}); return nil })
	if want := [][2]int64{{60, 64}, {124, 64}, {188, 64}, {252, 8}}; !slices.Equal(runs, want) {
		t.Fatalf("Runs = %v, want %v", runs, want)
	}
	runs = nil
	c.Runs("b", 131*TrackSize+100, 1<<20, func(off, n int64) error { runs = append(runs, [2]int64{off, n}); return nil })
	if want := [][2]int64{{130 * TrackSize, TrackSize + 100}}; !slices.Equal(runs, want) {
		t.Fatalf("Runs clipped to the disk = %v, want %v", runs, want)
	}
	// JSON: sparse sets as runs, dense ones as a bitmap; both read back.
	dense := NewChunks()
	for i := int64(0); i < 4096; i += 2 {
		dense.Add("x", i*TrackSize, 1)
	}
	for _, set := range []Chunks{c, dense} {
		b, err := json.Marshal(set)
		if err != nil {
			t.Fatal(err)
		}
		var back Chunks
		if err := json.Unmarshal(b, &back); err != nil {
			t.Fatal(err)
		}
		if back.Count() != set.Count() {
			t.Fatalf("round trip of %.60s: %d blocks, want %d", b, back.Count(), set.Count())
		}
		for d := range set {
			for i := int64(0); i < 5000; i++ {
				if back.Has(d, i) != set.Has(d, i) {
					t.Fatalf("round trip: block %d of %s differs", i, d)
				}
			}
		}
	}
	if b, _ := json.Marshal(c); !strings.Contains(string(b), `"c":[[60,200]]`) {
		t.Fatalf("a sparse set is not written as runs: %s", b)
	}
	u := NewChunks()
	u.Add("a", 3*TrackSize, 1)
	u.Union(c)
	if got, want := u.Count(), 206; got != want || !u.Has("b", 131) || !u.Has("a", 3) {
		t.Fatalf("after union: %d blocks, want %d", got, want)
	}
	var back Chunks
	for _, bad := range []string{`{"a":"!!"}`, `{"a":"AAA="}`, `[1]`, `{"a":[[-1,2]]}`, `{"a":[[0,0]]}`, `{"a":[[0,99999999999]]}`, `{"a":{}}`} {
		if err := json.Unmarshal([]byte(bad), &back); err == nil {
			t.Errorf("Unmarshal(%s) accepted", bad)
		}
	}
}

// TestShipperChanges: what a stopped shipper reports as changed after a
// point covers every write after it, from the journal and, past the
// journal's bound, from the dirty-block bitmap.
func TestShipperChanges(t *testing.T) {
	e := setupWith(t, func(c *ShipperConfig) { c.MaxJournalBytes = 512 << 10 })
	ctx := context.Background()
	writeRandom(t, e.g, rand.New(rand.NewPCG(3, 3)), 10)
	runCtx, cancel := context.WithCancel(ctx)
	e.sh.Start(runCtx)
	drain(t, e)
	if e.sh.Status().BitmapMode {
		// A bitmap entered before the initial copy was acknowledged
		// (its journal counted from 0) outlived it.
		t.Fatal("the shipper streams with a dirty-block bitmap: it would resend every block ever written")
	}
	point := e.g.Journal().LastSeq()
	e.proxy.SetDown(true) // the link is down from here
	e.proxy.Cut()
	a, _ := e.g.Disk("a")
	want := NewChunks()
	for i := int64(0); i < 40; i++ {
		off := (i * 7 % 16) * ChunkSize
		a.WriteAt(ctx, bytes.Repeat([]byte{byte(i + 1)}, 64<<10), off)
		want.Add("a", off, 64<<10)
	}
	until := time.Now().Add(10 * time.Second)
	for !e.sh.Status().BitmapMode && time.Now().Before(until) {
		time.Sleep(20 * time.Millisecond)
	}
	if !e.sh.Status().BitmapMode {
		t.Fatal("the shipper did not switch to the bitmap")
	}
	e.g.Checkpoint(ctx) // trims the journal behind the bitmap
	cancel()
	e.sh.Close()
	got, from, err := e.sh.Changes(point)
	if err != nil {
		t.Fatal(err)
	}
	if from > point+1 {
		t.Fatalf("changes complete only from %d, the point is %d", from, point)
	}
	for i := int64(0); i < 16*ChunkSize/TrackSize; i++ {
		if got.Has("a", i) != want.Has("a", i) {
			t.Errorf("block %d: changed %v, want %v", i, got.Has("a", i), want.Has("a", i))
		}
	}
	if got.Count() != want.Count() {
		t.Fatalf("%d chunks changed, want %d", got.Count(), want.Count())
	}
}
