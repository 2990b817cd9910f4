package nbd

import (
	"context"
	"sync"
)

// Switch is a Device whose backing device can be replaced while clients
// stay connected: a commit moves a running VM from the views it was
// failed over onto to the standalone group that replaces them, on the
// same export and connection. Pause waits for every operation in flight
// (Flush included) and holds new ones; Resume lets them go on, on the new
// device. Operations never see a mix of the two.
type Switch struct {
	mu  sync.RWMutex
	dev Device
}

var (
	_ Device      = (*Switch)(nil)
	_ BatchWriter = (*Switch)(nil)

	_ JournalingBatchWriter = (*Switch)(nil)
)

// NewSwitch returns a Switch on dev.
func NewSwitch(dev Device) *Switch { return &Switch{dev: dev} }

// Pause returns once no operation runs; new ones wait for Resume.
func (s *Switch) Pause() { s.mu.Lock() }

// Resume lets operations go on, on next if it is not nil.
func (s *Switch) Resume(next Device) {
	if next != nil {
		s.dev = next
	}
	s.mu.Unlock()
}

// ReadAt implements Device.
func (s *Switch) ReadAt(ctx context.Context, p []byte, off int64) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.dev.ReadAt(ctx, p, off)
}

// WriteAt implements Device.
func (s *Switch) WriteAt(ctx context.Context, p []byte, off int64) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.dev.WriteAt(ctx, p, off)
}

// WriteAtBatch implements BatchWriter: one batch for a device that
// batches, the writes in order for one that does not.
func (s *Switch) WriteAtBatch(ctx context.Context, ps [][]byte, offs []int64) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.writeBatch(ctx, ps, offs)
}

// writeBatch writes a batch to the current device. Caller holds mu.
func (s *Switch) writeBatch(ctx context.Context, ps [][]byte, offs []int64) error {
	if bw, ok := s.dev.(BatchWriter); ok {
		return bw.WriteAtBatch(ctx, ps, offs)
	}
	for i, p := range ps {
		if err := s.dev.WriteAt(ctx, p, offs[i]); err != nil {
			return err
		}
	}
	return nil
}

// WriteAtBatchJournaled implements JournalingBatchWriter for a device
// that does; for another, it is WriteAtBatch. A batch acknowledged early
// still holds off Pause until it is applied.
func (s *Switch) WriteAtBatchJournaled(ctx context.Context, ps [][]byte, offs []int64, journaled func()) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if jw, ok := s.dev.(JournalingBatchWriter); ok {
		return jw.WriteAtBatchJournaled(ctx, ps, offs, journaled)
	}
	return s.writeBatch(ctx, ps, offs)
}

// WriteZeroes implements Device.
func (s *Switch) WriteZeroes(ctx context.Context, off, n int64) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.dev.WriteZeroes(ctx, off, n)
}

// Trim implements Device.
func (s *Switch) Trim(ctx context.Context, off, n int64) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.dev.Trim(ctx, off, n)
}

// Flush implements Device. A Flush covers the writes that returned before
// it on the device it runs on; whoever switches devices makes the old
// one's writes durable in the new one first.
func (s *Switch) Flush(ctx context.Context) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.dev.Flush(ctx)
}
