// Command reprotect measures what a reprotect costs after a failover: the
// delta copy that brings the old source's disk in line with the disk the
// VM now runs on, three ways in the same run, on the same images:
//
//   - ferry with changed-block tracking (the chunks both sites know they
//     changed since the failover point);
//   - ferry comparing chunk checksums (its fallback: reads both disks);
//   - rsync --inplace --no-whole-file (what users do today without ferry).
//
// The "new source" is a disk of -size bytes of random data, the "old
// source" a copy of it; then -changed percent of the new source's 64 KiB
// chunks get a 4 KiB write, 4 KiB aligned as a file system writes (the
// VM's writes since the failover), and -old-changed percent of the old
// source's chunks a 512-byte sector write (writes that never shipped). The
// divergent bytes are counted by comparing the two images. The page cache
// is dropped before each run when possible, so reads come from the disk.
// Every run must end with identical images, or the command fails.
//
// Last line: RESULT reprotect cbt_s=.. checksum_s=.. rsync_s=.. cbt_vs_rsync=.. sent_vs_divergent=.. cbt_read_mb=.. checksum_read_mb=.. divergent_mb=.. sent_cbt_mb=.. sent_checksum_mb=.. rsync_sent_mb=..
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/ferry-dr/ferry/internal/disk"
	"github.com/ferry-dr/ferry/internal/link"
	"github.com/ferry-dr/ferry/internal/pki"
	"github.com/ferry-dr/ferry/internal/replica"
	"github.com/ferry-dr/ferry/internal/replication"
)

func main() {
	dir := flag.String("dir", "/var/tmp/ferry-bench-reprotect", "scratch directory (emptied)")
	size := flag.Int64("size", 2<<30, "disk size in bytes")
	changed := flag.Float64("changed", 1, "percent of chunks the VM rewrote at the new source since the failover")
	oldChanged := flag.Float64("old-changed", 0.1, "percent of chunks the old source changed and never shipped")
	flag.Parse()
	if err := run(*dir, *size, *changed, *oldChanged); err != nil {
		log.Fatal(err)
	}
}

type result struct {
	secs       float64
	readBytes  int64 // read from the disk by this process (both sites)
	sentBytes  int64
	extraLabel string
}

func run(dir string, size int64, changed, oldChanged float64) error {
	os.RemoveAll(dir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	ctx := context.Background()
	rng := rand.New(rand.NewChaCha8([32]byte{7}))

	// The new source: a group whose disk holds random data.
	srcDir := filepath.Join(dir, "src")
	g, err := disk.Open(disk.Config{Dir: srcDir})
	if err != nil {
		return err
	}
	if _, err := g.CreateDisk("vda", size); err != nil {
		return err
	}
	g.Close()
	img := filepath.Join(srcDir, "images", "vda.img")
	if err := fillRandom(img, size, rng); err != nil {
		return err
	}
	pristineOld := filepath.Join(dir, "old-pristine.img")
	if err := copyFile(img, pristineOld); err != nil {
		return err
	}
	if g, err = disk.Open(disk.Config{Dir: srcDir}); err != nil {
		return err
	}
	defer g.Close()

	// Divergence: the VM's writes at the new source (through the group,
	// so they are journaled) and the old source's unshipped writes.
	chunks := size / replication.ChunkSize
	tracked := replication.NewChunks()
	d, _ := g.Disk("vda")
	buf := make([]byte, replication.ChunkSize)
	nNew := int(float64(chunks) * changed / 100)
	for i := 0; i < nNew; i++ {
		c := rng.Int64N(chunks)
		off := c*replication.ChunkSize + rng.Int64N(replication.ChunkSize/4096)*4096
		fillBuf(buf[:4096], rng)
		if err := d.WriteAt(ctx, buf[:4096], off); err != nil {
			return err
		}
		tracked.Add("vda", off, 4096)
	}
	if err := g.Flush(ctx); err != nil {
		return err
	}
	if err := g.Checkpoint(ctx); err != nil {
		return err
	}
	f, err := os.OpenFile(pristineOld, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	nOld := int(float64(chunks) * oldChanged / 100)
	for i := 0; i < nOld; i++ {
		off := rng.Int64N(chunks)*replication.ChunkSize + rng.Int64N(replication.ChunkSize/512)*512
		fillBuf(buf[:512], rng)
		if _, err := f.WriteAt(buf[:512], off); err != nil {
			return err
		}
		tracked.Add("vda", off, 512)
	}
	f.Close()
	divergent, err := differingBytes(img, pristineOld)
	if err != nil {
		return err
	}
	fmt.Printf("disk %d MiB; %d writes at the new source, %d at the old source; %d bytes differ; %d blocks (%.1f MiB) tracked\n",
		size>>20, nNew, nOld, divergent, tracked.Count(), mib(tracked.Bytes()))

	id, err := setupPKI(dir)
	if err != nil {
		return err
	}
	var results []result
	for _, mode := range []string{"cbt", "checksum"} {
		r, err := ferryRun(ctx, dir, g, pristineOld, id, mode, tracked)
		if err != nil {
			return fmt.Errorf("%s: %w", mode, err)
		}
		results = append(results, r)
		fmt.Printf("ferry %-9s %6.2f s, read %7.1f MiB, sent %7.1f MiB\n", mode, r.secs, mib(r.readBytes), mib(r.sentBytes))
	}
	r, err := rsyncRun(dir, img, pristineOld)
	if err != nil {
		return fmt.Errorf("rsync: %w", err)
	}
	fmt.Printf("rsync           %6.2f s, sent %7.1f MiB (%s)\n", r.secs, mib(r.sentBytes), r.extraLabel)
	results = append(results, r)
	fmt.Printf("RESULT reprotect cbt_s=%.2f checksum_s=%.2f rsync_s=%.2f cbt_vs_rsync=%.3f sent_vs_divergent=%.2f cbt_read_mb=%.1f checksum_read_mb=%.1f divergent_mb=%.2f sent_cbt_mb=%.2f sent_checksum_mb=%.1f rsync_sent_mb=%.1f\n",
		results[0].secs, results[1].secs, results[2].secs, results[0].secs/results[2].secs, float64(results[0].sentBytes)/float64(divergent),
		mib(results[0].readBytes), mib(results[1].readBytes), mib(divergent),
		mib(results[0].sentBytes), mib(results[1].sentBytes), mib(results[2].sentBytes))
	return nil
}

// ferryRun adopts a fresh copy of the old image as the replica and runs a
// shipper's delta copy against it over mutual TLS on loopback.
func ferryRun(ctx context.Context, dir string, g *disk.Group, pristineOld string, id map[string]*pki.Identity, mode string, tracked replication.Chunks) (result, error) {
	repDir := filepath.Join(dir, "replica-"+mode)
	old := filepath.Join(dir, "old-"+mode+".img")
	if err := copyFile(pristineOld, old); err != nil {
		return result{}, err
	}
	rep, err := replica.Adopt(replica.Config{Dir: repDir}, "vm1", g.Disks(), map[string]string{"vda": old})
	if err != nil {
		return result{}, err
	}
	defer rep.Close()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", id["dst"].ServerConfig())
	if err != nil {
		return result{}, err
	}
	defer ln.Close()
	rc := &replication.Receiver{ReplicaFor: func(link.Hello) (*replica.Replica, error) { return rep, nil }}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go rc.Serve(ctx, c, nil)
		}
	}()
	state := filepath.Join(dir, "state-"+mode)
	os.MkdirAll(state, 0o700)
	cfg := replication.ShipperConfig{Group: g, Name: "vm1", Source: "src", StateDir: state,
		Dial: func(ctx context.Context) (io.ReadWriteCloser, error) {
			d := tls.Dialer{Config: id["src"].ClientConfig(pki.Peer{Role: pki.RoleSite, Name: "dst"})}
			return d.DialContext(ctx, "tcp", ln.Addr().String())
		}}
	if mode == "cbt" {
		cfg.DeltaChunks = func(uint64) (replication.Chunks, error) { return tracked, nil }
	}
	dropCaches()
	readBefore := procReadBytes()
	start := time.Now()
	sh := replication.NewShipper(cfg)
	runCtx, cancel := context.WithCancel(ctx)
	sh.Start(runCtx)
	defer func() { cancel(); sh.Close() }()
	deadline := time.Now().Add(10 * time.Minute)
	for {
		st := sh.Status()
		if st.State == replication.StateStreaming && st.AckedSeq == st.LastSeq && st.CopyDone == st.CopyTotal && st.CopyTotal > 0 {
			break
		}
		if time.Now().After(deadline) {
			return result{}, fmt.Errorf("delta copy did not finish: %+v", st)
		}
		time.Sleep(5 * time.Millisecond)
	}
	r := result{secs: time.Since(start).Seconds(), readBytes: procReadBytes() - readBefore, sentBytes: sh.Status().SentBytes}
	// The replica at its last entry must equal the source.
	v, err := rep.OpenView("vda", rep.NextSeq()-1, "")
	if err != nil {
		return r, err
	}
	defer v.Close()
	src, _ := g.Disk("vda")
	if err := sameContent(ctx, src, v, g.Disks()[0].Size); err != nil {
		return r, err
	}
	return r, nil
}

func rsyncRun(dir, img, pristineOld string) (result, error) {
	if _, err := exec.LookPath("rsync"); err != nil {
		return result{}, fmt.Errorf("rsync not installed: apt-get install rsync")
	}
	old := filepath.Join(dir, "old-rsync.img")
	if err := copyFile(pristineOld, old); err != nil {
		return result{}, err
	}
	dropCaches()
	start := time.Now()
	out, err := exec.Command("rsync", "--inplace", "--no-whole-file", "--stats", img, old).CombinedOutput()
	secs := time.Since(start).Seconds()
	if err != nil {
		return result{}, fmt.Errorf("%v: %s", err, out)
	}
	r := result{secs: secs}
	if m := regexp.MustCompile(`Literal data: ([\d,]+)`).FindSubmatch(out); m != nil {
		r.sentBytes, _ = strconv.ParseInt(strings.ReplaceAll(string(m[1]), ",", ""), 10, 64)
	}
	if m := regexp.MustCompile(`Matched data: ([\d,]+)`).FindSubmatch(out); m != nil {
		r.extraLabel = "literal data; matched " + string(m[1])
	}
	a, _ := os.ReadFile(img)
	b, _ := os.ReadFile(old)
	if !bytes.Equal(a, b) {
		return r, fmt.Errorf("rsync left the images different")
	}
	return r, nil
}

type readerAt interface {
	ReadAt(ctx context.Context, p []byte, off int64) error
}

func sameContent(ctx context.Context, a, b readerAt, size int64) error {
	x, y := make([]byte, 4<<20), make([]byte, 4<<20)
	for off := int64(0); off < size; off += int64(len(x)) {
		n := min(int64(len(x)), size-off)
		if err := a.ReadAt(ctx, x[:n], off); err != nil {
			return err
		}
		if err := b.ReadAt(ctx, y[:n], off); err != nil {
			return err
		}
		if !bytes.Equal(x[:n], y[:n]) {
			return fmt.Errorf("the replica differs from the source near offset %d", off)
		}
	}
	return nil
}

func setupPKI(dir string) (map[string]*pki.Identity, error) {
	pk := filepath.Join(dir, "pki")
	now := time.Now()
	if err := pki.InitCA(pk, "ca", now); err != nil {
		return nil, err
	}
	out := map[string]*pki.Identity{}
	for _, n := range []string{"src", "dst"} {
		if err := pki.Issue(pk, pk, pki.Peer{Role: pki.RoleSite, Name: n}, []string{"127.0.0.1"}, now); err != nil {
			return nil, err
		}
		id, err := pki.Load(pk, n)
		if err != nil {
			return nil, err
		}
		out[n] = id
	}
	return out, nil
}

func fillBuf(b []byte, rng *rand.Rand) {
	for i := 0; i+8 <= len(b); i += 8 {
		v := rng.Uint64()
		for k := 0; k < 8; k++ {
			b[i+k] = byte(v >> (8 * k))
		}
	}
}

func fillRandom(path string, size int64, rng *rand.Rand) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, 4<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		fillBuf(buf, rng)
		n := min(int64(len(buf)), size-off)
		if _, err := f.WriteAt(buf[:n], off); err != nil {
			return err
		}
	}
	return f.Sync()
}

// differingBytes counts the bytes at which two files of the same size
// differ.
func differingBytes(a, b string) (int64, error) {
	fa, err := os.Open(a)
	if err != nil {
		return 0, err
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		return 0, err
	}
	defer fb.Close()
	x, y := make([]byte, 4<<20), make([]byte, 4<<20)
	var n int64
	for {
		k, errA := io.ReadFull(fa, x)
		_, errB := io.ReadFull(fb, y[:k])
		for i := 0; i < k; i++ {
			if x[i] != y[i] {
				n++
			}
		}
		if errA != nil || errB != nil {
			return n, nil
		}
	}
}

func copyFile(from, to string) error {
	out, err := exec.Command("cp", "--sparse=always", from, to).CombinedOutput()
	if err != nil {
		return fmt.Errorf("cp %s: %v %s", from, err, out)
	}
	return nil
}

// dropCaches empties the page cache (root only), so that every run reads
// from the disk; without it the numbers favour whoever reads most.
func dropCaches() {
	exec.Command("sync").Run()
	os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0o200)
}

// procReadBytes is what this process read from storage so far.
func procReadBytes() int64 {
	b, _ := os.ReadFile("/proc/self/io")
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "read_bytes: "); ok {
			n, _ := strconv.ParseInt(v, 10, 64)
			return n
		}
	}
	return 0
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }
