package outbox

import (
	"errors"
	"time"

	"github.com/cenkalti/backoff/v5"

	"github.com/tailrace/tailrace"
)

// Failures: what happens to a row the sink could not finish. This file is
// the one unit that decides whether a failure counts as an attempt of the
// row (the outage breaker), when the row is tried again (backoff) and when
// it is dead-lettered.

// outageThreshold is how many different messages must fail in a row, with
// no success between them, before the relay takes the broker to be down.
// One poison message fails alone (its key holds the rest of its key back),
// so it never trips the breaker.
const outageThreshold = 8

// outageState is the outage breaker: when outageThreshold different
// messages failed in a row (no success between them), the broker is taken
// to be down: the sink pauses, then one probe message at a time goes out,
// with backoff, until one succeeds. Only the probes' failures count as
// attempts, so an outage costs a message at most a few attempts instead of
// dead-lettering everything in flight. Guarded by engine.mu; used only
// when engine.breaker is on (the relay).
type outageState struct {
	failing     map[int64]struct{}
	outage      bool
	probing     bool
	outageUntil time.Time
	outageBO    *backoff.ExponentialBackOff
}

func newOutageState() outageState {
	return outageState{failing: make(map[int64]struct{}), outageBO: newDBBackoff()}
}

// holdLocked reports whether the breaker holds the sink back at now.
func (e *engine) holdLocked(now time.Time) bool {
	return e.outage && (e.probing || now.Before(e.outageUntil))
}

// succeededLocked tells the breaker a row succeeded.
func (e *engine) succeededLocked() {
	if e.outage {
		e.outage = false
		e.log.Warn(e.name + ": publishing works again; resuming")
	}
	clear(e.failing)
}

// Reasons a row is dead-lettered, as logs and Observer.DeadLettered see
// them.
const (
	reasonAttempts    = "attempts"
	reasonPermanent   = "permanent"
	reasonUnwrappable = "unwrappable"
	reasonPanic       = "panic"
)

// failed handles a failure of r with cause. reason, when not empty, sends
// r to the dead letters at once (the sink knows the failure is for good:
// an unwrappable envelope, a panic); a tailrace.Permanent cause does too.
// Otherwise the failure counts as an attempt (unless the breaker says the
// broker is down) and r is retried after a backoff, or dead-lettered once
// MaxAttempts attempts failed.
func (e *engine) failed(r *heldRow, cause error, reason string) {
	if cause == nil {
		cause = errors.New("outbox: the forwarder nacked the message without an error (a panic or a middleware)")
	}
	failed := r.attempts + 1
	if reason != "" {
		// decided by the sink
	} else if tailrace.IsPermanent(cause) {
		reason = reasonPermanent
	} else if !e.countFailure(r) {
		// Sent before the breaker tripped: the broker is down, not this
		// message. Back in line without an attempt counted.
		e.requeue(r)
		return
	} else if failed >= e.cfg.MaxAttempts {
		reason = reasonAttempts
	}
	lastErr := truncate(cause.Error(), 4000)
	if reason != "" {
		e.bury(r, failed, lastErr, reason)
		return
	}
	delay := e.retryDelay(failed)
	if err := e.q.retryLater(e.ctx, e.db, r.id, failed, lastErr, delay); err != nil {
		// The count lives on in memory; after a restart it restarts lower.
		e.log.Warn(e.name+": cannot record a failed attempt", "err", err, "id", r.id)
	}
	e.log.Info(e.name+": attempt failed; will retry", "id", r.id, "uuid", r.uuid, "kind", r.kind,
		"attempt", failed, "max_attempts", e.cfg.MaxAttempts, "retry_in", delay, "err", cause)
	e.mu.Lock()
	r.attempts = failed
	r.nextAt = time.Now().Add(delay)
	e.unflyLocked(r)
	e.sched.retry(r, time.Now())
	e.signalsLocked()
	e.mu.Unlock()
	wake(e.dispatchWake)
}

// countFailure feeds the outage breaker with a transient failure of r and
// reports whether it counts as an attempt of r.
func (e *engine) countFailure(r *heldRow) bool {
	if !e.breaker {
		return true
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.outage {
		if !r.probe {
			return false
		}
		e.pauseLocked()
		return true
	}
	e.failing[r.id] = struct{}{}
	if len(e.failing) >= outageThreshold {
		e.outage = true
		e.outageBO.Reset()
		e.pauseLocked()
		e.log.Warn(e.name+": every publish fails; the broker looks down: pausing, then probing with one message at a time",
			"failed_messages", len(e.failing))
	}
	return true
}

// pauseLocked holds the sink back for the breaker's next backoff.
func (e *engine) pauseLocked() {
	d := e.outageBO.NextBackOff()
	e.outageUntil = time.Now().Add(d)
	time.AfterFunc(d, func() { wake(e.dispatchWake) })
}

// bury moves r to the dead-letter table, retrying the database until it
// succeeds or the engine is abandoned; r keeps its key meanwhile.
func (e *engine) bury(r *heldRow, attempts int, lastErr, reason string) {
	bo := newDBBackoff()
	for {
		err := e.q.bury(e.ctx, e.db, r.id, attempts, lastErr)
		if err == nil {
			break
		}
		d := bo.NextBackOff()
		e.log.Warn(e.name+": cannot dead-letter a message; retrying", "err", err, "id", r.id, "retry_in", d)
		if !sleep(d, e.abandon) {
			return
		}
	}
	e.log.Warn(e.name+": message dead-lettered", "id", r.id, "uuid", r.uuid, "kind", r.kind, "partition_key", r.key,
		"attempts", attempts, "reason", reason, "err", lastErr)
	if e.cfg.Observer != nil {
		e.cfg.Observer.DeadLettered(e.ctx, e.cfg.Table, r.kind, reason)
	}
	e.mu.Lock()
	e.finishLocked(r)
	e.mu.Unlock()
}

// retryDelay is the backoff before attempt failed+1.
func (e *engine) retryDelay(failed int) time.Duration {
	b := backoff.ExponentialBackOff{
		InitialInterval:     e.cfg.InitialInterval,
		RandomizationFactor: e.cfg.Jitter,
		Multiplier:          e.cfg.Multiplier,
		MaxInterval:         e.cfg.MaxInterval,
	}
	b.Reset()
	var d time.Duration
	for i := 0; i < failed && i < 64; i++ {
		d = b.NextBackOff()
	}
	return d
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
