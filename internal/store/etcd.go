package store

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Etcd keeps the documents in etcd, so that vaults at several sites share
// one state that survives the loss of a site (issue 16: a vault per
// site over one etcd cluster). A document is the key PREFIX/KIND/ID; its
// Version is etcd's per-key version, which counts the puts since the key
// was created (1 at creation, +1 per put, back to 1 after a delete), the
// very contract Store.Put states. Compare-and-set is one etcd transaction
// on that version, so two vaults can never both win a write. Every write
// is durable when it returns: etcd acknowledges once a quorum of members
// fsynced it.
type Etcd struct {
	c      *clientv3.Client
	prefix string
}

var _ Store = (*Etcd)(nil)

// EtcdConfig says how to reach etcd.
type EtcdConfig struct {
	Endpoints []string
	// Prefix of ferry's keys (default "/ferry"), so that one cluster can
	// hold several installations.
	Prefix string
	// TLS for the client connections (nil: plain, for tests).
	TLS         *tls.Config
	DialTimeout time.Duration // default 5 s
}

// ErrUnavailable: etcd did not answer (no quorum, or no member reachable).
var ErrUnavailable = errors.New("store: etcd unavailable")

// OpenEtcd connects to etcd and checks that it answers.
func OpenEtcd(ctx context.Context, cfg EtcdConfig) (*Etcd, error) {
	if len(cfg.Endpoints) == 0 {
		return nil, fmt.Errorf("etcd store: no endpoints")
	}
	if cfg.Prefix == "" {
		cfg.Prefix = "/ferry"
	}
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = 5 * time.Second
	}
	// The client's own retry warnings would flood the vault's log; its
	// errors reach the caller.
	c, err := clientv3.New(clientv3.Config{Endpoints: cfg.Endpoints, TLS: cfg.TLS, DialTimeout: cfg.DialTimeout, Logger: zap.NewNop()})
	if err != nil {
		return nil, fmt.Errorf("etcd store %v: %w", cfg.Endpoints, err)
	}
	cctx, cancel := context.WithTimeout(ctx, cfg.DialTimeout)
	defer cancel()
	if _, err := c.Get(cctx, strings.TrimSuffix(cfg.Prefix, "/")+"/"); err != nil {
		c.Close()
		return nil, fmt.Errorf("%w: %v: %v", ErrUnavailable, cfg.Endpoints, err)
	}
	return &Etcd{c: c, prefix: strings.TrimSuffix(cfg.Prefix, "/")}, nil
}

// key escapes kind and id so that neither can reach into another's keys.
func (s *Etcd) key(kind, id string) string {
	return s.kindPrefix(kind) + url.PathEscape(id)
}

func (s *Etcd) kindPrefix(kind string) string {
	return s.prefix + "/" + url.PathEscape(kind) + "/"
}

func unavailable(op string, err error) error {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("etcd store: %s: %w", op, err)
	}
	return fmt.Errorf("%w: %s: %v", ErrUnavailable, op, err)
}

// Get implements Store.
func (s *Etcd) Get(ctx context.Context, kind, id string) (Doc, error) {
	resp, err := s.c.Get(ctx, s.key(kind, id))
	if err != nil {
		return Doc{}, unavailable("get "+kind+"/"+id, err)
	}
	if len(resp.Kvs) == 0 {
		return Doc{}, fmt.Errorf("%w: %s %s", ErrNotFound, kind, id)
	}
	kv := resp.Kvs[0]
	return Doc{Kind: kind, ID: id, Data: kv.Value, Version: kv.Version}, nil
}

// List implements Store.
func (s *Etcd) List(ctx context.Context, kind string) ([]Doc, error) {
	p := s.kindPrefix(kind)
	resp, err := s.c.Get(ctx, p, clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend))
	if err != nil {
		return nil, unavailable("list "+kind, err)
	}
	var out []Doc
	for _, kv := range resp.Kvs {
		id, err := url.PathUnescape(strings.TrimPrefix(string(kv.Key), p))
		if err != nil {
			return nil, fmt.Errorf("etcd store: key %q: %w", kv.Key, err)
		}
		out = append(out, Doc{Kind: kind, ID: id, Data: kv.Value, Version: kv.Version})
	}
	return out, nil
}

// Put implements Store.
func (s *Etcd) Put(ctx context.Context, kind, id string, data []byte, version int64) (int64, error) {
	if version < 0 {
		return 0, fmt.Errorf("%w: version %d", ErrConflict, version)
	}
	k := s.key(kind, id)
	// Version 0 compares with a key that does not exist: etcd gives an
	// absent key version 0.
	resp, err := s.c.Txn(ctx).If(clientv3.Compare(clientv3.Version(k), "=", version)).Then(clientv3.OpPut(k, string(data))).Commit()
	if err != nil {
		return 0, unavailable("put "+kind+"/"+id, err)
	}
	if !resp.Succeeded {
		return 0, fmt.Errorf("%w: %s %s changed since version %d", ErrConflict, kind, id, version)
	}
	return version + 1, nil
}

// Delete implements Store.
func (s *Etcd) Delete(ctx context.Context, kind, id string, version int64) error {
	k := s.key(kind, id)
	resp, err := s.c.Txn(ctx).If(clientv3.Compare(clientv3.Version(k), "=", version), clientv3.Compare(clientv3.Version(k), ">", 0)).
		Then(clientv3.OpDelete(k)).Else(clientv3.OpGet(k)).Commit()
	if err != nil {
		return unavailable("delete "+kind+"/"+id, err)
	}
	if resp.Succeeded {
		return nil
	}
	if len(resp.Responses) == 1 && len(resp.Responses[0].GetResponseRange().Kvs) == 0 {
		return fmt.Errorf("%w: %s %s", ErrNotFound, kind, id)
	}
	return fmt.Errorf("%w: %s %s changed since version %d", ErrConflict, kind, id, version)
}

// Client is the etcd client, for an election on the same cluster
// (package leader).
func (s *Etcd) Client() *clientv3.Client { return s.c }

// Close implements Store.
func (s *Etcd) Close() error { return s.c.Close() }
