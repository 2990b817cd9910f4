package guest

import (
	"bytes"
	"compress/gzip"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// This file: the ransomware test's workloads, run by the workload's HTTP
// server (POST /docs, /encrypt, /noise): ordinary documents, their
// encryption in place, and writes of data that is already high-entropy.

// DocSize is the size of each document.
const DocSize = 256 << 10

var docWords = []string{"invoice", "customer", "order", "shipped", "paid", "the", "of", "and", "total", "amount",
	"quarterly", "report", "revenue", "account", "balance", "meeting", "notes", "project", "deadline", "review"}

// DocFile returns document i: its name and content, the same every time
// (the host checks restored files against it). Kinds rotate: a text
// report, an application log, and a small database of fixed-size records.
func DocFile(i int) (string, []byte) {
	r := mrand.New(mrand.NewPCG(uint64(i), 7))
	var b bytes.Buffer
	var name string
	switch i % 3 {
	case 0:
		name = fmt.Sprintf("report-%03d.txt", i)
		for b.Len() < DocSize {
			for w := 0; w < 12; w++ {
				b.WriteString(docWords[r.IntN(len(docWords))])
				b.WriteByte(' ')
			}
			b.WriteString(".\n")
		}
	case 1:
		name = fmt.Sprintf("app-%03d.log", i)
		t := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
		for n := 0; b.Len() < DocSize; n++ {
			fmt.Fprintf(&b, "%s INFO request %d GET /orders/%d served in %d ms\n", t.Add(time.Duration(n)*time.Second).Format(time.RFC3339), n, r.IntN(100000), r.IntN(900))
		}
	default:
		name = fmt.Sprintf("ledger-%03d.db", i)
		rec := make([]byte, 128)
		for n := 0; b.Len() < DocSize; n++ {
			clear(rec)
			copy(rec, fmt.Sprintf("%08d|%-20s|%10d.%02d|EUR|", n, docWords[r.IntN(len(docWords))], r.IntN(100000), r.IntN(100)))
			b.Write(rec)
		}
	}
	return name, b.Bytes()[:DocSize]
}

// office is the state of those workloads, served in WorkloadState.
type office struct {
	mu  sync.Mutex
	dir string
	st  OfficeState
}

// OfficeState is what the workload reports of them.
type OfficeState struct {
	// Docs found at start: equal to DocFile, or not (encrypted).
	DocsOK  int `json:"docs_ok"`
	DocsBad int `json:"docs_bad"`
	// Written: documents written by POST /docs.
	Written int `json:"docs_written"`
	// Encrypted: documents encrypted in place so far; EncryptDone when
	// all are.
	Encrypted   int  `json:"encrypted"`
	EncryptDone bool `json:"encrypt_done"`
	// NoiseBytes: bytes of random data and gzip streams written into new
	// files so far; NoiseDone when the time asked is over.
	NoiseBytes int64  `json:"noise_bytes"`
	NoiseDone  bool   `json:"noise_done"`
	Error      string `json:"office_error,omitempty"`
}

func newOffice(dir string) *office {
	o := &office{dir: dir}
	os.MkdirAll(filepath.Join(dir, "docs"), 0o755)
	for i := 0; ; i++ {
		name, want := DocFile(i)
		got, err := os.ReadFile(filepath.Join(dir, "docs", name))
		if err != nil {
			break
		}
		if bytes.Equal(got, want) {
			o.st.DocsOK++
		} else {
			o.st.DocsBad++
		}
	}
	return o
}

func (o *office) state() OfficeState {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.st
}

func (o *office) fail(err error) {
	o.mu.Lock()
	o.st.Error = err.Error()
	o.mu.Unlock()
}

// writeDocs writes documents 0..n-1, each durable.
func (o *office) writeDocs(n int) error {
	for i := 0; i < n; i++ {
		name, data := DocFile(i)
		if err := writeFile(filepath.Join(o.dir, "docs", name), data); err != nil {
			return err
		}
	}
	o.mu.Lock()
	o.st.Written = n
	o.st.DocsOK = n
	o.mu.Unlock()
	return nil
}

// encrypt encrypts every document in place with AES-256-CTR under a
// random key, 64 KiB at a time over the same bytes, each file durable
// before the next: what file-encrypting ransomware does.
func (o *office) encrypt() {
	key := make([]byte, 32)
	rand.Read(key)
	blk, _ := aes.NewCipher(key)
	buf := make([]byte, 64<<10)
	for i := 0; ; i++ {
		name, _ := DocFile(i)
		f, err := os.OpenFile(filepath.Join(o.dir, "docs", name), os.O_RDWR, 0)
		if os.IsNotExist(err) {
			break
		}
		if err != nil {
			o.fail(err)
			return
		}
		iv := make([]byte, aes.BlockSize)
		rand.Read(iv)
		ctr := cipher.NewCTR(blk, iv)
		for off := int64(0); ; off += int64(len(buf)) {
			n, rerr := f.ReadAt(buf, off)
			if n > 0 {
				ctr.XORKeyStream(buf[:n], buf[:n])
				if _, err := f.WriteAt(buf[:n], off); err != nil {
					o.fail(err)
					f.Close()
					return
				}
			}
			if rerr != nil {
				break
			}
		}
		err = f.Sync()
		f.Close()
		if err != nil {
			o.fail(err)
			return
		}
		o.mu.Lock()
		o.st.Encrypted++
		o.mu.Unlock()
	}
	o.mu.Lock()
	o.st.EncryptDone = true
	o.mu.Unlock()
}

// noise writes, for d, new files of random bytes and of gzip streams of
// random text at about rate bytes per second: a guest whose normal work
// is compressed or encrypted data (backups, media, archives).
func (o *office) noise(d time.Duration, rate int64) {
	dir := filepath.Join(o.dir, "noise")
	os.MkdirAll(dir, 0o755)
	r := mrand.New(mrand.NewPCG(uint64(time.Now().UnixNano()), 1))
	end := time.Now().Add(d)
	chunk := 1 << 20
	for n := 0; time.Now().Before(end); n++ {
		var data []byte
		if n%2 == 0 {
			data = make([]byte, chunk)
			rand.Read(data)
		} else {
			var text bytes.Buffer
			for text.Len() < 4*chunk {
				text.WriteString(docWords[r.IntN(len(docWords))])
				fmt.Fprintf(&text, " %d ", r.Int64())
			}
			var z bytes.Buffer
			w := gzip.NewWriter(&z)
			w.Write(text.Bytes())
			w.Close()
			data = z.Bytes()
		}
		start := time.Now()
		if err := writeFile(filepath.Join(dir, fmt.Sprintf("blob-%04d", n)), data); err != nil {
			o.fail(err)
			return
		}
		o.mu.Lock()
		o.st.NoiseBytes += int64(len(data))
		o.mu.Unlock()
		if pause := time.Duration(int64(len(data))*int64(time.Second)/rate) - time.Since(start); pause > 0 {
			time.Sleep(pause)
		}
	}
	o.mu.Lock()
	o.st.NoiseDone = true
	o.mu.Unlock()
}

// CheckDocs is "ferry-guest docs DIR N" (host side): it checks that DIR
// holds documents 0..N-1 as DocFile makes them, and says how many do.
func CheckDocs(args []string) error {
	if len(args) != 2 {
		return fmt.Errorf("usage: ferry-guest docs DIR N")
	}
	var n int
	if _, err := fmt.Sscan(args[1], &n); err != nil {
		return fmt.Errorf("N: %w", err)
	}
	bad := 0
	for i := 0; i < n; i++ {
		name, want := DocFile(i)
		got, err := os.ReadFile(filepath.Join(args[0], name))
		if err != nil || !bytes.Equal(got, want) {
			bad++
		}
	}
	fmt.Printf("%d of %d documents in %s equal the originals\n", n-bad, n, args[0])
	if bad > 0 {
		return fmt.Errorf("%d documents differ or are missing", bad)
	}
	return nil
}
