package nbd

import (
	"context"
	"time"
)

// Observer is told how long each device operation took: op is "read",
// "write", "write_zeroes", "trim" or "flush", n the bytes it covered, err
// its outcome. It is called on the request's goroutine and must be cheap
// and safe for concurrent use.
type Observer func(op string, n int64, d time.Duration, err error)

// Observe wraps dev so that obs sees every operation's latency: metrics
// wrap the device rather than living in the server's data path. The
// wrapper keeps dev's write batching (a batch is one observation per
// write, each with the batch's latency, as each request waited that long).
func Observe(dev Device, obs Observer) Device {
	o := observed{dev: dev, obs: obs}
	if bw, ok := dev.(BatchWriter); ok {
		return &observedBatch{observed: o, bw: bw}
	}
	return &o
}

type observed struct {
	dev Device
	obs Observer
}

var (
	_ Device      = (*observed)(nil)
	_ BatchWriter = (*observedBatch)(nil)

	_ JournalingBatchWriter = (*observedBatch)(nil)
)

func (o *observed) ReadAt(ctx context.Context, p []byte, off int64) error {
	t := time.Now()
	err := o.dev.ReadAt(ctx, p, off)
	o.obs("read", int64(len(p)), time.Since(t), err)
	return err
}

func (o *observed) WriteAt(ctx context.Context, p []byte, off int64) error {
	t := time.Now()
	err := o.dev.WriteAt(ctx, p, off)
	o.obs("write", int64(len(p)), time.Since(t), err)
	return err
}

func (o *observed) WriteZeroes(ctx context.Context, off, n int64) error {
	t := time.Now()
	err := o.dev.WriteZeroes(ctx, off, n)
	o.obs("write_zeroes", n, time.Since(t), err)
	return err
}

func (o *observed) Trim(ctx context.Context, off, n int64) error {
	t := time.Now()
	err := o.dev.Trim(ctx, off, n)
	o.obs("trim", n, time.Since(t), err)
	return err
}

func (o *observed) Flush(ctx context.Context) error {
	t := time.Now()
	err := o.dev.Flush(ctx)
	o.obs("flush", 0, time.Since(t), err)
	return err
}

type observedBatch struct {
	observed
	bw BatchWriter
}

func (o *observedBatch) WriteAtBatch(ctx context.Context, ps [][]byte, offs []int64) error {
	t := time.Now()
	err := o.bw.WriteAtBatch(ctx, ps, offs)
	d := time.Since(t)
	for _, p := range ps {
		o.obs("write", int64(len(p)), d, err)
	}
	return err
}

// WriteAtBatchJournaled keeps the device's early acknowledgement; the
// observation is still the whole call's.
func (o *observedBatch) WriteAtBatchJournaled(ctx context.Context, ps [][]byte, offs []int64, journaled func()) error {
	t := time.Now()
	var err error
	if jw, ok := o.bw.(JournalingBatchWriter); ok {
		err = jw.WriteAtBatchJournaled(ctx, ps, offs, journaled)
	} else {
		err = o.bw.WriteAtBatch(ctx, ps, offs)
	}
	d := time.Since(t)
	for _, p := range ps {
		o.obs("write", int64(len(p)), d, err)
	}
	return err
}
