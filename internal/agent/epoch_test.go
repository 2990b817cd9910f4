package agent

import (
	"context"
	"errors"
	"net/http"
	"sync/atomic"
	"testing"

	"github.com/ferry-dr/ferry/internal/agentclient"
	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/pki/pkitest"
)

// TestLeaderEpochFence: a change from a vault whose leadership epoch is
// older than one the site obeyed is refused with ErrStaleLeader, also
// after a restart; reads, calls without an epoch and newer epochs go
// through; a malformed epoch is invalid.
func TestLeaderEpochFence(t *testing.T) {
	pk := pkiDir(t, "siteA", "vault")
	dir := t.TempDir()
	a := startAgentWith(t, Config{Name: "siteA", PKIDir: pk, Dir: dir})
	id := pkitest.Load(t, pk, "vault")
	ctx := context.Background()
	var deposed atomic.Int64
	asLeader := func(a *Agent, epoch int64) *agentclient.Client {
		c := agentclient.New(id, a.Addr(), "siteA")
		c.SetLeaderEpoch(func() int64 { return epoch }, func() { deposed.Add(1) })
		return c
	}
	bw := api.Bandwidth{Peers: map[string]api.BandwidthLimit{"siteB": {BitsPerSecond: 10e6}}}
	steps := []struct {
		epoch int64
		want  error
	}{
		{5, nil},
		{5, nil}, // the same leader again
		{3, api.ErrStaleLeader},
		{7, nil},
		{5, api.ErrStaleLeader},
		{0, nil}, // no epoch: a lone vault or an operator
	}
	for _, s := range steps {
		err := asLeader(a, s.epoch).SetBandwidth(ctx, bw)
		if !errors.Is(err, s.want) || (s.want == nil && err != nil) {
			t.Fatalf("change at epoch %d: %v, want %v", s.epoch, err, s.want)
		}
	}
	if _, err := asLeader(a, 1).Status(ctx); err != nil {
		t.Errorf("a read from an old leader: %v, want it served", err)
	}
	st := a.Status()
	if st.LeaderEpoch != 7 || st.StaleLeaderRefused != 2 {
		t.Errorf("status: epoch %d, refused %d; want 7 and 2", st.LeaderEpoch, st.StaleLeaderRefused)
	}
	if got := deposed.Load(); got != 2 {
		t.Errorf("the client was told it was deposed %d times, want once per refused call (2)", got)
	}

	a.Close()
	b := startAgentWith(t, Config{Name: "siteA", PKIDir: pk, Dir: dir})
	if err := asLeader(b, 6).SetBandwidth(ctx, bw); !errors.Is(err, api.ErrStaleLeader) {
		t.Errorf("after a restart, epoch 6: %v, want ErrStaleLeader (7 was obeyed)", err)
	}
	if err := asLeader(b, 8).SetBandwidth(ctx, bw); err != nil {
		t.Errorf("after a restart, epoch 8: %v", err)
	}

	raw := newRaw(id, b.Addr(), "siteA")
	for _, h := range []string{"x", "-4", "0"} {
		req, _ := http.NewRequestWithContext(ctx, "PUT", raw.base+"/v1/bandwidth", nil)
		req.Header.Set(api.LeaderEpochHeader, h)
		resp, err := raw.hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("epoch %q: status %d, want 400", h, resp.StatusCode)
		}
	}
}
