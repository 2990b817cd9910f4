package guest

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"hash/crc32"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// RecordSize is the size of one workload record in the log.
const RecordSize = 512

var recMagic = []byte("FRYWL001")

// EncodeRecord returns record seq, written at time t.
func EncodeRecord(seq uint64, t int64) []byte { return encodeRecord(seq, t, 0) }

// encodeRecord: a follower's record names the peer record it was told of
// in bytes 28..35 (RecordPeer).
func encodeRecord(seq uint64, t int64, peer uint64) []byte {
	b := make([]byte, RecordSize)
	copy(b, recMagic)
	binary.LittleEndian.PutUint64(b[8:], seq)
	binary.LittleEndian.PutUint64(b[16:], uint64(t))
	for i := 28; i < RecordSize; i++ {
		b[i] = byte(seq) ^ byte(i)
	}
	if peer != 0 {
		binary.LittleEndian.PutUint64(b[28:], peer)
	}
	binary.LittleEndian.PutUint32(b[24:], crc32.ChecksumIEEE(append(b[:24:24], b[28:]...)))
	return b
}

// RecordPeers returns, for a follower's record log, the peer record each
// of its first n records names (0: none).
func RecordPeers(log []byte, n uint64) []uint64 {
	out := make([]uint64, 0, n)
	for i := uint64(0); i < n && int((i+1)*RecordSize) <= len(log); i++ {
		b := log[i*RecordSize : (i+1)*RecordSize]
		peer := binary.LittleEndian.Uint64(b[28:])
		if peer == patternWord(i+1) {
			peer = 0 // the plain pattern
		}
		out = append(out, peer)
	}
	return out
}

// patternWord is bytes 28..35 of a record without a peer.
func patternWord(seq uint64) uint64 {
	var w [8]byte
	for i := range w {
		w[i] = byte(seq) ^ byte(28+i)
	}
	return binary.LittleEndian.Uint64(w[:])
}

// ErrRecords: a record log that is not a clean prefix.
var ErrRecords = errors.New("workload: record log damaged")

// VerifyRecords checks a record log: records 1..n back to back, each
// intact, then nothing but zeros or a torn last record (a crash while it
// was written). It returns n.
func VerifyRecords(log []byte) (uint64, error) {
	var n uint64
	for off := 0; off+RecordSize <= len(log); off += RecordSize {
		b := log[off : off+RecordSize]
		if string(b[:8]) != string(recMagic) {
			for _, c := range log[off:] {
				if c != 0 {
					return n, fmt.Errorf("%w: garbage after record %d", ErrRecords, n)
				}
			}
			return n, nil
		}
		seq := binary.LittleEndian.Uint64(b[8:])
		want := crc32.ChecksumIEEE(append(append([]byte(nil), b[:24]...), b[28:]...))
		if seq != n+1 || binary.LittleEndian.Uint32(b[24:]) != want {
			if off+RecordSize == len(log) || off+2*RecordSize > len(log) {
				return n, nil // torn last record
			}
			return n, fmt.Errorf("%w: record at %d has seq %d (want %d) or a bad checksum", ErrRecords, off, seq, n+1)
		}
		n = seq
	}
	return n, nil
}

// WorkloadState is what the workload serves over HTTP.
type WorkloadState struct {
	// ResumedAfter is the last intact record found at start (after a
	// failover: the last record the recovery point held), written at
	// ResumedTime (Unix nanoseconds).
	ResumedAfter   uint64 `json:"resumed_after"`
	ResumedTime    int64  `json:"resumed_time"`
	LastDurable    uint64 `json:"last_durable"`
	Files          uint64 `json:"files"`
	ChecksumErrors int    `json:"checksum_errors"`
	Error          string `json:"error,omitempty"`
	// Addr is the guest's IPv4 address: it shows which network the NIC
	// was attached to.
	Addr string `json:"addr,omitempty"`
	// NICs are the guest's network interfaces in the kernel's order
	// (eth0 first), each "NAME MAC": which NICs a VM kept through a
	// failover, and in which order the guest found them.
	NICs []string `json:"nics,omitempty"`
	// Started is when the workload started (the guest's clock, Unix
	// nanoseconds): the boot order of several VMs, as they saw it.
	Started int64 `json:"started,omitempty"`
	// ResumedPeer, for a follower, is the highest record of its peer
	// that the records found at start name: after a failover it must not
	// exceed the peer's ResumedAfter (cross-VM consistency).
	ResumedPeer uint64 `json:"resumed_peer,omitempty"`
	// Office: the ransomware test's documents (office.go).
	Office OfficeState `json:"office"`
}

// FetchState asks a workload for its state over HTTP (host side; addr is
// the forwarded host address).
func FetchState(addr string) (WorkloadState, error) {
	var st WorkloadState
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get("http://" + addr + "/")
	if err != nil {
		return st, err
	}
	defer resp.Body.Close()
	return st, json.NewDecoder(resp.Body).Decode(&st)
}

// RunWorkload is "ferry-guest workload".
func RunWorkload(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("workload", flag.ContinueOnError)
	dev := fs.String("dev", "/dev/vdb", "ext4 data disk")
	dir := fs.String("mount", "/data", "mount point")
	rate := fs.Int("rate", 200, "records per second (0: as fast as fsync allows)")
	addr := fs.String("http", ":80", "HTTP address for the state")
	fileEvery := fs.Uint64("file-every", 16, "also create one file per this many records")
	tell := fs.String("tell", "", "HOST:PORT of a peer workload to tell each durable record's number")
	follow := fs.String("follow", "", "1: write a record only when a peer tells one of its own (POST /tell?seq=N), naming it")
	if err := fs.Parse(args); err != nil {
		return err
	}
	os.MkdirAll(*dir, 0o755)
	if err := unix.Mount(*dev, *dir, "ext4", 0, ""); err != nil && !errors.Is(err, unix.EBUSY) {
		return fmt.Errorf("mount %s: %w", *dev, err)
	}
	os.MkdirAll(filepath.Join(*dir, "files"), 0o755)
	logPath := filepath.Join(*dir, "records.log")
	old, _ := os.ReadFile(logPath)
	last, err := VerifyRecords(old)
	st := WorkloadState{LastDurable: last, ResumedAfter: last, Started: time.Now().UnixNano()}
	if last > 0 {
		st.ResumedTime = int64(binary.LittleEndian.Uint64(old[(last-1)*RecordSize+16:]))
		if *follow == "1" {
			for _, p := range RecordPeers(old, last) {
				st.ResumedPeer = max(st.ResumedPeer, p)
			}
		}
	}
	if err != nil {
		st.ChecksumErrors++
		st.Error = err.Error()
	}
	f, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	var mu sync.Mutex
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return err
	}
	told := make(chan tellReq)
	off := newOffice(*dir)
	go http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost {
			switch r.URL.Path {
			case "/docs":
				var n int
				fmt.Sscan(r.URL.Query().Get("n"), &n)
				if err := off.writeDocs(n); err != nil {
					http.Error(w, err.Error(), http.StatusInternalServerError)
				}
				return
			case "/encrypt":
				go off.encrypt()
				return
			case "/noise":
				var secs, rate int64
				fmt.Sscan(r.URL.Query().Get("seconds"), &secs)
				fmt.Sscan(r.URL.Query().Get("rate"), &rate)
				go off.noise(time.Duration(secs)*time.Second, max(rate, 1<<20))
				return
			}
		}
		if r.URL.Path == "/tell" && *follow == "1" {
			var peer uint64
			fmt.Sscan(r.URL.Query().Get("seq"), &peer)
			done := make(chan error, 1)
			select {
			case told <- tellReq{peer, done}:
			case <-r.Context().Done():
				return
			}
			if err := <-done; err != nil {
				http.Error(w, err.Error(), http.StatusInternalServerError)
			}
			return
		}
		mu.Lock()
		defer mu.Unlock()
		st.Addr, st.NICs = guestAddr(), guestNICs()
		st.Office = off.state()
		json.NewEncoder(w).Encode(st)
	}))
	teller := &http.Client{Timeout: 2 * time.Second}
	fmt.Printf("ferry-guest: workload up, resuming after record %d\n", last)
	var tick <-chan time.Time
	if *rate > 0 && *follow != "1" {
		t := time.NewTicker(time.Second / time.Duration(*rate))
		defer t.Stop()
		tick = t.C
	}
	for seq := last + 1; ctx.Err() == nil; seq++ {
		var peer uint64
		var answer chan error
		switch {
		case *follow == "1":
			select {
			case <-ctx.Done():
				return nil
			case t := <-told:
				peer, answer = t.peer, t.done
			}
		case tick != nil:
			select {
			case <-ctx.Done():
				return nil
			case <-tick:
			}
		}
		rec := encodeRecord(seq, time.Now().UnixNano(), peer)
		_, err := f.WriteAt(rec, int64(seq-1)*RecordSize)
		if err == nil {
			err = unix.Fdatasync(int(f.Fd()))
		}
		if err == nil && seq%*fileEvery == 0 {
			err = writeFile(filepath.Join(*dir, "files", fmt.Sprint(seq)), rec)
		}
		if answer != nil {
			answer <- err
		}
		mu.Lock()
		if err != nil {
			st.Error = err.Error()
			mu.Unlock()
			// A frozen file system blocks writes; anything else is fatal.
			return fmt.Errorf("record %d: %w", seq, err)
		}
		st.LastDurable = seq
		if seq%*fileEvery == 0 {
			st.Files++
		}
		mu.Unlock()
		if *tell != "" {
			// Only after the record is durable: whatever the peer writes
			// because of it comes after it.
			if resp, err := teller.Post("http://"+*tell+"/tell?seq="+fmt.Sprint(seq), "text/plain", nil); err == nil {
				resp.Body.Close()
			}
		}
	}
	return nil
}

type tellReq struct {
	peer uint64
	done chan error
}

func writeFile(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	f.Close()
	d, err := os.Open(filepath.Dir(path))
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// guestNICs lists the non-loopback interfaces, "NAME MAC", by index.
func guestNICs() []string {
	ifs, _ := net.Interfaces()
	var out []string
	for _, i := range ifs {
		if i.Flags&net.FlagLoopback == 0 && len(i.HardwareAddr) > 0 {
			out = append(out, i.Name+" "+i.HardwareAddr.String())
		}
	}
	return out
}

// guestAddr is the first non-loopback IPv4 address, or "".
func guestAddr() string {
	addrs, _ := net.InterfaceAddrs()
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && !n.IP.IsLoopback() && n.IP.To4() != nil {
			return n.IP.String()
		}
	}
	return ""
}
