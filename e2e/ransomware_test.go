package e2e

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/entropy"
	"github.com/ferry-dr/ferry/internal/guest"
	"github.com/ferry-dr/ferry/internal/vaultclient"
)

// ransomwareDocs: documents the guest writes (256 KiB each: 24 MiB).
const ransomwareDocs = 96

func post(t *testing.T, addr, p string) {
	t.Helper()
	resp, err := http.Post("http://"+addr+p, "text/plain", nil)
	if err != nil {
		t.Fatalf("POST %s: %v", p, err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("POST %s: %d %s", p, resp.StatusCode, b)
	}
}

func officeState(t *testing.T, addr string) guest.OfficeState {
	t.Helper()
	st, err := guest.FetchState(addr)
	if err != nil {
		return guest.OfficeState{Error: err.Error()}
	}
	return st.Office
}

// fileAt reads one file of vm at point through the vault.
func fileAt(t *testing.T, c *vaultclient.Client, vm, point, p string) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	resp, err := c.FileContent(ctx, vm, point, p, true)
	if err != nil {
		t.Fatalf("get %s at %s: %v", p, point, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("read %s at %s: %v", p, point, err)
	}
	return b
}

// TestRansomware: a guest writes ordinary documents, then writes
// compressed and random data into new files for a while (no alert may
// come of it), then encrypts its documents in place. The recovery site
// raises an alert naming the last clean point; a document restored from
// that point equals the original, the same document at the newest point
// does not; a drill at that point boots with every document intact.
func TestRansomware(t *testing.T) {
	need(t, "qemu-system-x86_64", "qemu-img", "mkfs.ext4", "/usr/bin/python3")
	g := guestDir(t)
	s := twoSites(t)
	c, vp := startVaultProc(t, s)
	ctx := context.Background()
	webA, webB, drill := freePort(t), freePort(t), freePort(t)
	defineWorkloadVMSize(t, c, s, g, "fin", webA, webB, 256<<20)
	ok := runJob(t, c, api.JobSucceeded)
	if _, err := c.PutNetwork(ctx, "siteB", api.Network{Name: "drill-b", Kind: api.NetworkIsolated, Subnet: "10.99.0.0/24"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.SetForwards(ctx, "fin", map[string]string{"siteB/drill-b": drill}); err != nil {
		t.Fatal(err)
	}
	ok(c.Enable(ctx, api.EnableRequest{VM: "fin", Target: "siteB", TestNetwork: "drill-b"}))
	post(t, webA, fmt.Sprintf("/docs?n=%d", ransomwareDocs))
	docsAt := time.Now()
	incident := func() *api.EntropyIncident {
		p, err := c.Protection(ctx, "fin")
		if err != nil {
			t.Fatal(err)
		}
		return p.Ransomware
	}

	// Compressed and random data into new files, as fast as the
	// encryption below goes: no alert.
	post(t, webA, "/noise?seconds=20&rate=4194304")
	until(t, 60*time.Second, "the noise workload", func() bool { return officeState(t, webA).NoiseDone })
	noiseBytes := officeState(t, webA).NoiseBytes
	// Until the recovery site has all of it.
	until(t, 60*time.Second, "the recovery site to catch up", func() bool {
		p, err := c.Protection(ctx, "fin")
		return err == nil && p.Link != nil && p.Link.PendingBytes == 0 && p.LastPoint.After(time.Now().Add(-2*time.Second))
	})
	falseAlerts := 0
	if incident() != nil {
		falseAlerts++
		t.Errorf("an incident after %d MiB of compressed and random writes: %+v", noiseBytes>>20, incident())
	}

	// Encryption in place.
	encStart := time.Now()
	post(t, webA, "/encrypt")
	var inc *api.EntropyIncident
	until(t, 90*time.Second, "the ransomware alert", func() bool { inc = incident(); return inc != nil })
	detect := time.Since(encStart)
	until(t, 90*time.Second, "the encryption to end", func() bool { return officeState(t, webA).EncryptDone })
	if st := officeState(t, webA); st.Encrypted != ransomwareDocs || st.Error != "" {
		t.Fatalf("the guest's encryption: %+v", st)
	}
	if alert := findAlert(t, c, "ransomware/fin"); alert == nil || alert.Severity != "critical" {
		t.Fatalf("alert: %+v, want a critical ransomware/fin", alert)
	}
	if inc.LastClean == nil {
		t.Fatalf("the incident names no last clean point: %+v", inc)
	}
	lc := inc.LastClean
	t.Logf("incident %+v; detected %v after the encryption began; last clean point %d at %v (docs written %v, encryption began %v)",
		inc, detect.Round(time.Millisecond), lc.Seq, lc.Time, docsAt, encStart)
	lastCleanOK := lc.Time.After(docsAt) && lc.Time.Before(encStart.Add(time.Second)) && lc.Time.After(encStart.Add(-3*time.Second))
	if !lastCleanOK {
		t.Errorf("last clean point at %v: want after the documents (%v), within 3 s before the encryption (%v)", lc.Time, docsAt, encStart)
	}

	// Files: the root lists the disk's file system; a document from the
	// last clean point is the original, at the newest point it is not.
	l, err := c.Files(ctx, "fin", "last-clean", "/")
	if err != nil {
		t.Fatal(err)
	}
	if len(l.Entries) != 1 || l.Entries[0].Name != "vda" || l.Entries[0].FSType != "ext4" || l.Point.Seq != lc.Seq {
		t.Fatalf("files at the last clean point: %+v", l)
	}
	l, err = c.Files(ctx, "fin", "last-clean", "/vda/docs")
	if err != nil {
		t.Fatal(err)
	}
	if len(l.Entries) != ransomwareDocs {
		t.Fatalf("/vda/docs at the last clean point: %d entries, want %d", len(l.Entries), ransomwareDocs)
	}
	restoreOK := true
	for _, i := range []int{0, 1, 2, ransomwareDocs - 1} {
		name, want := guest.DocFile(i)
		if got := fileAt(t, c, "fin", "last-clean", "/vda/docs/"+name); !bytes.Equal(got, want) {
			restoreOK = false
			t.Errorf("%s from the last clean point: %d bytes, not the original", name, len(got))
		}
	}
	// The whole tree, as a tar (the CLI's ferry files get).
	tctx, tcancel := context.WithTimeout(ctx, 3*time.Minute)
	resp, err := c.FileContent(tctx, "fin", "last-clean", "/vda/docs", false)
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(resp.Body)
	files := 0
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("the tree's tar: %v", err)
		}
		if h.Typeflag == tar.TypeReg {
			b, _ := io.ReadAll(tr)
			if _, want := guest.DocFile(files); len(b) != len(want) || !strings.HasPrefix(h.Name, "docs/") {
				t.Errorf("tar entry %s: %d bytes", h.Name, len(b))
			}
			files++
		}
	}
	resp.Body.Close()
	tcancel()
	if files != ransomwareDocs {
		t.Errorf("the tree's tar holds %d files, want %d", files, ransomwareDocs)
	}
	name, orig := guest.DocFile(5)
	if got := fileAt(t, c, "fin", "latest-processed", "/vda/docs/"+name); bytes.Equal(got, orig) || len(got) != len(orig) {
		t.Errorf("%s at the newest point: equal to the original (%v) or not its size (%d)", name, bytes.Equal(got, orig), len(got))
	}
	if _, err := c.Files(ctx, "fin", "last-clean", "/vda/nope"); !errors.Is(err, api.ErrNotFound) {
		t.Errorf("a missing path: %v, want not found", err)
	}
	if _, err := c.Files(ctx, "fin", "last-clean", "/vdz"); !errors.Is(err, api.ErrNotFound) {
		t.Errorf("a missing file system: %v, want not found", err)
	}

	portalRansomware(t, vp, lc.Seq)

	// A drill at the last clean point boots with the documents intact.
	ok(c.TestFailover(ctx, "fin", "last-clean"))
	var ds guest.WorkloadState
	until(t, 90*time.Second, "the drill VM's workload", func() bool {
		var err error
		ds, err = guest.FetchState(drill)
		return err == nil
	})
	if ds.Office.DocsOK != ransomwareDocs || ds.Office.DocsBad != 0 {
		t.Errorf("the drill at the last clean point: %d documents intact, %d not; want %d and 0", ds.Office.DocsOK, ds.Office.DocsBad, ransomwareDocs)
	}
	ok(c.CleanupTestFailover(ctx, "fin", "ransomware drill"))
	if err := c.DismissIncident(ctx, "fin"); err != nil {
		t.Fatal(err)
	}
	until(t, 30*time.Second, "the alert to clear", func() bool { return findAlert(t, c, "ransomware/fin") == nil })
	t.Logf("RESULT ransomware detect_s=%.1f last_clean_ok=%d false_alerts=%d restore_ok=%d entropy_mbps_per_core=%.0f",
		detect.Seconds(), b2i(lastCleanOK), falseAlerts, b2i(restoreOK), classifyRate())
}

// portalRansomware checks the portal with the incident open: the item
// page's banner names the last clean point, the failover dialog offers it
// first, and the file browser lists the documents at it.
func portalRansomware(t *testing.T, vp *vaultProc, lastClean uint64) {
	t.Helper()
	bctx := operatorBrowser(t, vp, "operator signs in", 20*time.Second, goHash("#/items/fin"), chromedp.WaitVisible(chromedp.CSS("#ransomware #last-clean")))
	if got := eval[string](t, bctx, `document.querySelector("#last-clean").textContent`); !strings.HasPrefix(got, fmt.Sprint(lastClean)+" ") {
		t.Errorf("the banner's last clean point: %q, want %d", got, lastClean)
	}
	runB(t, bctx, "the failover dialog", 20*time.Second,
		jsClick("#act-failover"), chromedp.WaitVisible(chromedp.CSS("#choice-last-clean")))
	if !eval[bool](t, bctx, `document.querySelector("#choice-last-clean").checked`) {
		t.Error("the failover dialog does not choose the last clean point first")
	}
	shot(t, bctx, "ransomware")
	runB(t, bctx, "close the dialog; browse the files", 3*time.Minute,
		chromedp.Click(chromedp.CSS("#dialog-cancel")), chromedp.WaitNotVisible(chromedp.CSS("#dialog")),
		chromedp.SetValue(chromedp.CSS("#files-point"), "last-clean"), jsClick("#files-browse"),
		chromedp.WaitVisible(chromedp.CSS(`#files-list a.dir`)))
	runB(t, bctx, "into /vda/docs", 60*time.Second,
		jsClick(`#files-list a.dir[data-name="vda"]`), chromedp.WaitVisible(chromedp.CSS(`#files-list a.dir[data-name="docs"]`)),
		jsClick(`#files-list a.dir[data-name="docs"]`),
		chromedp.WaitVisible(chromedp.CSS(`#files-list tr[data-name="report-000.txt"]`)))
	if n := eval[int](t, bctx, `document.querySelectorAll("#files-list tr").length`); n != ransomwareDocs {
		t.Errorf("the file browser lists %d documents, want %d", n, ransomwareDocs)
	}
	shot(t, bctx, "files")
}

// jsClick clicks the element sel names through the DOM, not at its
// coordinates: the item page's live figures above it reflow the page
// every 2 s, and a click at where the link was a moment ago can miss.
func jsClick(sel string) chromedp.Action[chromedp.Void] {
	return func(ctx context.Context, t *chromedp.Target) (chromedp.Void, error) {
		ok, err := chromedp.Evaluate[bool](fmt.Sprintf(`(e => e ? (e.click(), true) : false)(document.querySelector(%q))`, sel))(ctx, t)
		if err == nil && !ok {
			err = fmt.Errorf("no element %s to click", sel)
		}
		return chromedp.Void{}, err
	}
}

// findAlert returns the alert in force for object, or nil.
func findAlert(t *testing.T, c *vaultclient.Client, object string) *api.Alert {
	t.Helper()
	as, err := c.Alerts(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for i := range as {
		if as[i].Object == object {
			return &as[i]
		}
	}
	return nil
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// classifyRate measures the detector's classification on one core, in
// MB/s (a figure for the RESULT line, not an assertion).
func classifyRate() float64 {
	blk := make([]byte, entropy.BlockSize)
	_, doc := guest.DocFile(0)
	copy(blk, doc)
	start := time.Now()
	n := 0
	for time.Since(start) < 300*time.Millisecond {
		for range 256 {
			entropy.Classify(blk)
		}
		n += 256
	}
	return float64(n*entropy.BlockSize) / time.Since(start).Seconds() / 1e6
}
