package agent

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"reflect"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
)

// TestBandwidthCap: a cap on the site pair slows the stream to it, is
// reported in the status, and lifting it lets the stream run free again.
// Compressible writes travel compressed under the cap, where the link is
// slower than the compressor, and plain on loopback, where it is not.
func TestBandwidthCap(t *testing.T) {
	e := newTrustEnv(t)
	ctx := context.Background()
	e.write(t, 0, 1)      // streaming
	const bps = 8_000_000 // 1 MB/s
	if err := e.ca.SetBandwidth(ctx, api.Bandwidth{Peers: map[string]api.BandwidthLimit{"siteB": {BitsPerSecond: bps}}}); err != nil {
		t.Fatal(err)
	}
	if got := e.a.Status().Groups[0].Replication.CapBitsPerSecond; got != bps {
		t.Errorf("status cap %d, want %d", got, bps)
	}
	random := make([]byte, 3<<20)
	rand.Read(random)
	timed := func(b []byte) time.Duration {
		start := time.Now()
		if err := e.disk.WriteAt(ctx, b, 0, false); err != nil {
			t.Fatal(err)
		}
		e.drain(t)
		return time.Since(start)
	}
	// 3 MiB of random bytes at 1 MB/s: over 3 s (minus the 20 ms burst).
	if d := timed(random); d < 3*time.Second {
		t.Errorf("3 MiB through a 1 MB/s cap in %v", d)
	}
	text := bytes.Repeat([]byte("ferry replicates text like this compressibly. "), (3<<20)/10)[:3<<20]
	sendText := func() (payload, wire int64, st api.ReplicationStatus) {
		t.Helper()
		text[0]++ // a change, whatever was there
		before := *e.a.Status().Groups[0].Replication
		timed(text)
		after := *e.a.Status().Groups[0].Replication
		if !bytes.Equal(e.replicaBytes(t)[:3<<20], text) {
			t.Fatal("the replica differs from the source")
		}
		return after.PayloadBytes - before.PayloadBytes, after.WireBytes - before.WireBytes, after
	}
	payload, wire, st := sendText()
	if payload < 3<<20 || wire*10 > payload {
		t.Errorf("3 MiB of text under a 1 MB/s cap: %d bytes framed, %d on the wire; want under a tenth", payload, wire)
	}
	if !st.Compressing || st.LinkBitsPerSecond > bps {
		t.Errorf("under the cap: compressing %v, link %d bit/s; want compressing, link at most the cap", st.Compressing, st.LinkBitsPerSecond)
	}

	if err := e.ca.SetBandwidth(ctx, api.Bandwidth{}); err != nil {
		t.Fatal(err)
	}
	rand.Read(random)
	if d := timed(random); d > 2*time.Second {
		t.Errorf("3 MiB without a cap took %v", d)
	}
	payload, wire, st = sendText()
	if wire*2 < payload {
		t.Errorf("3 MiB of text on loopback: %d bytes framed, %d on the wire; want mostly plain (the link outruns the compressor)", payload, wire)
	}
	if st.Compressing || st.LinkBitsPerSecond < 1e9 {
		t.Errorf("on loopback: compressing %v, link %d bit/s; want plain, link over 1 Gbit/s", st.Compressing, st.LinkBitsPerSecond)
	}
}

// TestBandwidthConfig: a malformed cap is refused whole, and the caps
// survive a restart.
func TestBandwidthConfig(t *testing.T) {
	pk := pkiDir(t, "siteA")
	dir := t.TempDir()
	a := startAgentWith(t, Config{Name: "siteA", PKIDir: pk, Dir: dir})
	want := api.Bandwidth{
		Peers: map[string]api.BandwidthLimit{"siteB": {BitsPerSecond: 50e6, TimeZone: "Europe/Paris",
			Schedule: []api.BandwidthWindow{{Days: "mon-fri", From: "08:00", To: "18:00", BitsPerSecond: 10e6}}}},
		Groups: map[string]api.BandwidthLimit{"vm1": {BitsPerSecond: 5e6}},
	}
	if err := a.SetBandwidth(want); err != nil {
		t.Fatal(err)
	}
	bad := api.Bandwidth{Peers: map[string]api.BandwidthLimit{"siteB": {BitsPerSecond: 1}, "siteC": {Schedule: []api.BandwidthWindow{{From: "9", To: "10"}}}}}
	if err := a.SetBandwidth(bad); !errors.Is(err, ErrInvalid) {
		t.Fatalf("malformed schedule: %v, want ErrInvalid", err)
	}
	if got := a.Bandwidth(); !reflect.DeepEqual(got, want) {
		t.Fatalf("after a refused change: %+v, want %+v", got, want)
	}
	a.Close()
	b := startAgentWith(t, Config{Name: "siteA", PKIDir: pk, Dir: dir})
	if got := b.Bandwidth(); !reflect.DeepEqual(got, want) {
		t.Errorf("after a restart: %+v, want %+v", got, want)
	}
	if got := b.capOf("vm1", "siteB"); got != 5e6 {
		t.Errorf("cap of vm1 to siteB %d, want the lower of the two, 5e6", got)
	}
}
