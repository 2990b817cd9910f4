package leader

import (
	"context"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/store/etcdtest"
	clientv3 "go.etcd.io/etcd/client/v3"
)

func client(t *testing.T, url string) *clientv3.Client {
	t.Helper()
	c, err := clientv3.New(clientv3.Config{Endpoints: []string{url}, DialTimeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := c.Get(ctx, "/probe")
		cancel()
		if err == nil {
			return c
		}
		if time.Now().After(deadline) {
			t.Fatalf("etcd at %s: %v", url, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestElection: one of two candidates leads, the other waits and reads
// who leads; when the leader resigns the other leads at once; when the
// leader's session ends (its lease revoked, as when it is cut off for
// longer than the TTL) its lost channel closes and the other leads.
func TestElection(t *testing.T) {
	url := etcdtest.Start(t)
	ctx := context.Background()
	a := New(client(t, url), "/ferry-test/leader", "east:7400", 2*time.Second)
	b := New(client(t, url), "/ferry-test/leader", "west:7400", 2*time.Second)
	lostA, err := a.Campaign(ctx)
	if err != nil {
		t.Fatal(err)
	}
	type won struct {
		lost <-chan struct{}
		err  error
	}
	bWon := make(chan won, 1)
	go func() {
		l, err := b.Campaign(ctx)
		bWon <- won{l, err}
	}()
	select {
	case <-bWon:
		t.Fatal("two candidates lead at once")
	case <-time.After(500 * time.Millisecond):
	}
	for _, c := range []*Etcd{a, b} {
		if got, err := c.Leader(ctx); err != nil || got != "east:7400" {
			t.Fatalf("leader as seen by %s: %q, %v", c.id, got, err)
		}
	}
	if err := a.Resign(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-lostA:
	case <-time.After(5 * time.Second):
		t.Fatal("the resigned leader's lost channel stays open")
	}
	var w won
	select {
	case w = <-bWon:
	case <-time.After(5 * time.Second):
		t.Fatal("the second candidate did not lead after the first resigned")
	}
	if w.err != nil {
		t.Fatal(w.err)
	}
	if got, _ := a.Leader(ctx); got != "west:7400" {
		t.Fatalf("leader after the resignation: %q", got)
	}
	if a.Epoch() <= 0 || b.Epoch() <= a.Epoch() {
		t.Fatalf("epochs: first leader %d, second %d; want a positive token that grows", a.Epoch(), b.Epoch())
	}
	// The leader is cut off: its lease goes (revoked here, as the TTL
	// would). Its lost channel closes; a new candidate leads.
	start := time.Now()
	if _, err := b.c.Revoke(ctx, b.sess.Lease()); err != nil {
		t.Fatal(err)
	}
	select {
	case <-w.lost:
	case <-time.After(10 * time.Second):
		t.Fatal("a leader whose lease is gone does not learn it")
	}
	c := New(client(t, url), "/ferry-test/leader", "witness:7400", 2*time.Second)
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := c.Campaign(cctx); err != nil {
		t.Fatalf("a new candidate after the leader's lease went: %v", err)
	}
	if c.Epoch() <= b.Epoch() {
		t.Errorf("epoch of the leader after a lost lease %d, the lost one's %d: want greater", c.Epoch(), b.Epoch())
	}
	t.Logf("a new leader %v after the old one's lease went", time.Since(start).Round(time.Millisecond))
}
