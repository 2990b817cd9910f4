// Package leader elects one vault among several that share an etcd
// store, so that only one of them acts (runs jobs, polls sites) while the
// others serve reads and wait to take over. It is etcd's election on a
// lease: the leader holds a key attached to its session's lease, and a
// leader that dies or is cut off loses it once the lease expires (its TTL
// bounds how long the vaults go without a leader).
package leader

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
)

// Etcd is a candidate in one election.
type Etcd struct {
	c   *clientv3.Client
	key string
	id  string
	ttl time.Duration

	mu   sync.Mutex // guards sess and el, set once Campaign wins
	sess *concurrency.Session
	el   *concurrency.Election
}

// New returns a candidate named id (the vault's API address, which the
// others give clients to follow) in the election at key. ttl is the
// lease: a leader that stops renewing it is replaced after about that
// long (default 5 s; whole seconds).
func New(c *clientv3.Client, key, id string, ttl time.Duration) *Etcd {
	if ttl <= 0 {
		ttl = 5 * time.Second
	}
	return &Etcd{c: c, key: key, id: id, ttl: ttl}
}

// Campaign blocks until this candidate leads, or ctx ends (its error).
// It returns a channel closed when the leadership is lost: the session's
// lease expired (etcd unreachable for longer than the TTL) or Resign.
// The caller must stop acting as the leader at once when it closes.
func (e *Etcd) Campaign(ctx context.Context) (<-chan struct{}, error) {
	sess, err := concurrency.NewSession(e.c, concurrency.WithTTL(int((e.ttl+time.Second-1)/time.Second)), concurrency.WithContext(ctx))
	if err != nil {
		return nil, fmt.Errorf("leader: session: %w", err)
	}
	el := concurrency.NewElection(sess, e.key)
	if err := el.Campaign(ctx, e.id); err != nil {
		sess.Close()
		return nil, fmt.Errorf("leader: campaign: %w", err)
	}
	e.mu.Lock()
	e.sess, e.el = sess, el
	e.mu.Unlock()
	return sess.Done(), nil
}

// Leader returns the current leader's id, or "" if there is none.
func (e *Etcd) Leader(ctx context.Context) (string, error) {
	e.mu.Lock()
	sess, el := e.sess, e.el
	e.mu.Unlock()
	if sess == nil {
		// A follower reads the election without a session of its own.
		resp, err := e.c.Get(ctx, e.key+"/", clientv3.WithFirstCreate()...)
		if err != nil {
			return "", err
		}
		if len(resp.Kvs) == 0 {
			return "", nil
		}
		return string(resp.Kvs[0].Value), nil
	}
	resp, err := el.Leader(ctx)
	if errors.Is(err, concurrency.ErrElectionNoLeader) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	return string(resp.Kvs[0].Value), nil
}

// Epoch returns the fencing token of this candidate's leadership: the
// etcd revision at which its election key was created, greater for every
// later leader; 0 before it won. It stays the same after the leadership
// is lost, so calls the old leader still makes are refused by sites that
// obeyed its successor (api.LeaderEpochHeader).
func (e *Etcd) Epoch() int64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.el == nil {
		return 0
	}
	return e.el.Rev()
}

// Resign gives the leadership up (on a clean shutdown, so that another
// vault takes over at once rather than after the lease).
func (e *Etcd) Resign(ctx context.Context) error {
	e.mu.Lock()
	sess, el := e.sess, e.el
	e.mu.Unlock()
	if sess == nil {
		return nil
	}
	err := el.Resign(ctx)
	sess.Close()
	return err
}
