package outbox

import (
	"context"
	"time"
)

// ackLoop deletes (or stamps, with Retention) the rows the sink is done
// with, in batches: it gathers for up to AckInterval or until a batch is
// full.
func (e *engine) ackLoop() {
	defer e.wg.Done()
	bo := newDBBackoff()
	for {
		select {
		case <-e.stopAck:
			return
		case <-e.ackWake:
		}
		t := time.NewTimer(e.cfg.AckInterval)
	gather:
		for {
			e.mu.Lock()
			n := len(e.acks)
			e.mu.Unlock()
			if n >= e.cfg.BatchSize {
				break
			}
			select {
			case <-t.C:
				break gather
			case <-e.ackWake:
			case <-e.stopAck:
				break gather
			}
		}
		t.Stop()
		if err := e.flushAcks(e.ctx); err != nil {
			d := bo.NextBackOff()
			e.log.Warn(e.name+": cannot delete done rows; retrying", "err", err, "retry_in", d)
			if !sleep(d, e.stopAck) {
				return
			}
			wake(e.ackWake)
			continue
		}
		bo.Reset()
	}
}

// flushAcks deletes (or stamps) every acknowledged row noted so far. On
// error the ids are kept for the next flush.
func (e *engine) flushAcks(ctx context.Context) error {
	e.flushMu.Lock()
	defer e.flushMu.Unlock()
	e.mu.Lock()
	ids := e.acks
	e.acks = nil
	e.mu.Unlock()
	for len(ids) > 0 {
		n := min(len(ids), 1000)
		if err := e.q.ack(ctx, e.db, ids[:n], e.retain); err != nil {
			e.mu.Lock()
			e.acks = append(ids, e.acks...)
			e.mu.Unlock()
			return err
		}
		ids = ids[n:]
		e.mu.Lock()
		e.unflushed -= n
		e.mu.Unlock()
		wake(e.dispatchWake)
	}
	return nil
}

// maxUnflushed is how many acknowledged rows may wait for their DELETE
// before the sink pauses: two batches, one being deleted while the next
// gathers.
func (e *engine) maxUnflushed() int { return 2 * e.cfg.BatchSize }
