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

// succeededLocked tells the outage state r succeeded; an outage that
// ends releases the rows waiting for a retry delay.
func (e *engine) succeededLocked(r *heldRow) {
	r.probe = false // settled: unflyLocked must not touch the outage
	if e.outage.succeeded() {
		e.log.Warn(e.name + ": publishing works again; resuming")
		e.sched.releaseDelayed()
		wake(e.dispatchWake)
	}
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
	} else if !e.countFailure(r, cause) {
		// A transport failure, or one during an outage: the broker is
		// down, not this message. Back in line without an attempt counted.
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

// countFailure feeds the outage state (outage.go) with a transient
// failure of r and reports whether it counts as an attempt of r. Without
// the breaker (the worker) only failures marked tailrace.Unavailable
// enter outage mode.
func (e *engine) countFailure(r *heldRow, cause error) bool {
	transport := tailrace.IsUnavailable(cause)
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.breaker && !transport && !e.outage.status(time.Time{}).Down {
		return true
	}
	now := time.Now()
	v := e.outage.failed(r.id, transport, r.probe, truncate(cause.Error(), 500), now)
	r.probe = false // settled: unflyLocked must not touch the outage
	if !v.WakeAt.IsZero() {
		time.AfterFunc(v.WakeAt.Sub(now), func() { wake(e.dispatchWake) })
	}
	switch {
	case v.Entered:
		e.log.Warn(e.name+": failing for a reason that is not the message's; outage mode: pausing, then probing with one message at a time",
			"err", cause, "pending", e.sched.pending)
	case v.Resumed:
		e.log.Warn(e.name + ": the broker answered again; resuming")
		e.sched.releaseDelayed()
		wake(e.dispatchWake)
	}
	return v.Count
}

// output reports the state of the engine's output.
func (e *engine) output() OutputStatus {
	e.mu.Lock()
	defer e.mu.Unlock()
	st := e.outage.status(time.Now())
	st.Waiting = e.sched.pending
	return st
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
