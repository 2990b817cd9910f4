package vault

import (
	"context"
	"reflect"
	"testing"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/store"
)

// TestBandwidthCaps: caps set at the vault reach the source site (the
// pair's at once, a VM's where it is protected from), bad ones are
// refused with the right status, a site that was down gets them at its
// next poll, and readers cannot change them.
func TestBandwidthCaps(t *testing.T) {
	f := newFixture(t, store.NewMem())
	f.setup(t)
	f.job(t, "/v1/protections", map[string]string{"vm": "vm1", "target": "west"})
	lim := api.BandwidthLimit{BitsPerSecond: 50e6, TimeZone: "UTC",
		Schedule: []api.BandwidthWindow{{Days: "mon-fri", From: "08:00", To: "18:00", BitsPerSecond: 20e6}}}
	tests := []struct {
		name  string
		token string
		path  string
		body  any
		code  int
	}{
		{"pair", f.op, "/v1/bandwidth/pairs/east/west", lim, 200},
		{"vm", f.op, "/v1/bandwidth/vms/vm1", api.BandwidthLimit{BitsPerSecond: 10e6}, 200},
		{"reader", f.reader, "/v1/bandwidth/vms/vm1", api.BandwidthLimit{BitsPerSecond: 1}, 403},
		{"unknown site", f.op, "/v1/bandwidth/pairs/east/mars", lim, 404},
		{"same site", f.op, "/v1/bandwidth/pairs/east/east", lim, 400},
		{"unknown vm", f.op, "/v1/bandwidth/vms/nope", lim, 404},
		{"negative", f.op, "/v1/bandwidth/pairs/east/west", api.BandwidthLimit{BitsPerSecond: -1}, 400},
		{"bad window", f.op, "/v1/bandwidth/vms/vm1", api.BandwidthLimit{Schedule: []api.BandwidthWindow{{Days: "someday", From: "08:00", To: "09:00"}}}, 400},
		{"bad zone", f.op, "/v1/bandwidth/vms/vm1", api.BandwidthLimit{TimeZone: "Mars/Base"}, 400},
	}
	for _, tt := range tests {
		if got := f.call(t, tt.token, "PUT", tt.path, tt.body, nil); got != tt.code {
			t.Errorf("%s: PUT %s = %d, want %d", tt.name, tt.path, got, tt.code)
		}
	}
	var caps api.BandwidthCaps
	if code := f.call(t, f.reader, "GET", "/v1/bandwidth", nil, &caps); code != 200 {
		t.Fatalf("GET /v1/bandwidth: %d", code)
	}
	want := api.BandwidthCaps{Pairs: []api.BandwidthPair{{From: "east", To: "west", Limit: lim}},
		VMs: map[string]api.BandwidthLimit{"vm1": {BitsPerSecond: 10e6}}}
	if !reflect.DeepEqual(caps, want) {
		t.Fatalf("caps %+v, want %+v", caps, want)
	}
	east := func() api.Bandwidth { f.east.mu.Lock(); defer f.east.mu.Unlock(); return f.east.bw }
	wantEast := api.Bandwidth{Peers: map[string]api.BandwidthLimit{"west": lim}, Groups: map[string]api.BandwidthLimit{"vm1": {BitsPerSecond: 10e6}}}
	if got := east(); !reflect.DeepEqual(got, wantEast) {
		t.Errorf("east holds %+v, want %+v", got, wantEast)
	}
	if got := f.west.bw; got.Peers != nil || got.Groups != nil {
		t.Errorf("west holds %+v: it streams nothing", got)
	}
	// East is down while the pair's cap is lifted: it gets that at its
	// next poll once it is back.
	f.east.mu.Lock()
	f.east.down = true
	f.east.mu.Unlock()
	if code := f.call(t, f.op, "PUT", "/v1/bandwidth/pairs/east/west", api.BandwidthLimit{}, nil); code != 200 {
		t.Fatalf("lift the pair's cap with east down: %d", code)
	}
	f.east.mu.Lock()
	f.east.down = false
	f.east.mu.Unlock()
	f.v.Heartbeat(context.Background())
	wantEast.Peers = nil
	if got := east(); !reflect.DeepEqual(got, wantEast) {
		t.Errorf("after east came back: %+v, want %+v", got, wantEast)
	}
}
