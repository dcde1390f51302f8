package outbox

import (
	"fmt"
	"time"
)

// claimLoop claims batches of rows whenever something woke it: the
// in-process Notifier, a PostgreSQL notification (listenLoop), room freed
// in memory, a partition taken, or the poll ticker.
func (e *engine) claimLoop() {
	defer e.wg.Done()
	var notify <-chan struct{}
	if e.cfg.Notifier != nil {
		ch, unsub := e.cfg.Notifier.Subscribe()
		defer unsub()
		notify = ch
	}
	poll := time.NewTicker(e.cfg.PollInterval)
	defer poll.Stop()
	bo := newDBBackoff()
	for {
		select {
		case <-e.stopClaim:
			return
		case <-e.claimWake:
		case <-notify:
		case <-poll.C:
		}
		for {
			more, err := e.claimOnce()
			if err != nil {
				e.claimLost = true
				d := bo.NextBackOff()
				e.log.Warn(e.name+": claim failed; retrying", "err", err, "retry_in", d)
				if !sleep(d, e.stopClaim) {
					return
				}
				wake(e.claimWake)
				break
			}
			bo.Reset()
			if !more {
				break
			}
			select {
			case <-e.stopClaim:
				return
			default:
			}
		}
	}
}

// claimOnce claims one batch; more reports that a full batch came back and
// there is room for another.
func (e *engine) claimOnce() (more bool, err error) {
	e.mu.Lock()
	parts := e.sched.activeParts(time.Now())
	room := e.sched.room()
	closing := e.sched.closing
	if room < e.cfg.BatchSize/2 {
		// Claim again when a whole batch fits (signalsLocked wakes us),
		// rather than in dribbles after every acknowledgement.
		e.wantRoom = true
	}
	skip := e.sched.skipKeys()
	giveBack := e.giveBack
	e.giveBack = nil
	e.mu.Unlock()
	if len(giveBack) > 0 {
		if err := e.q.unclaim(e.ctx, e.db, giveBack, e.token); err != nil {
			e.mu.Lock()
			e.giveBack = append(giveBack, e.giveBack...)
			e.mu.Unlock()
			return false, fmt.Errorf("give back claimed rows: %w", err)
		}
	}
	if closing || len(parts) == 0 {
		return false, nil
	}
	if e.claimLost {
		if err := e.reclaimLost(); err != nil {
			return false, fmt.Errorf("give back rows of a failed claim: %w", err)
		}
		e.claimLost = false
	}
	if room < max(1, e.cfg.BatchSize/2) {
		return false, nil
	}
	n := min(e.cfg.BatchSize, room)
	rows, err := e.q.claim(e.ctx, e.db, parts, n, e.token, skip)
	if err != nil {
		return false, err
	}
	e.addClaimed(rows)
	return len(rows) == n, nil
}

// reclaimLost gives back (claim_token = NULL) every unrelayed row claimed
// with this engine's token that it does not hold: neither in memory nor
// acknowledged and waiting to be deleted. It runs in the claimer, so no
// claim adds rows meanwhile, and holds flushMu, so no acknowledged row is
// deleted meanwhile.
func (e *engine) reclaimLost() error {
	e.flushMu.Lock()
	defer e.flushMu.Unlock()
	e.mu.Lock()
	held := append(e.sched.held(), e.acks...)
	e.mu.Unlock()
	n, err := e.q.unclaimExcept(e.ctx, e.db, e.token, held)
	if err != nil {
		return err
	}
	if n > 0 {
		e.log.Warn(e.name+": gave back rows claimed by a claim whose reply was lost", "rows", n)
	}
	return nil
}

// addClaimed admits claimed rows into the scheduler; what it refuses goes
// back to the table before the next claim.
func (e *engine) addClaimed(rows []claimedRow) {
	if len(rows) == 0 {
		return
	}
	e.mu.Lock()
	e.giveBack = append(e.giveBack, e.sched.admit(rows, time.Now())...)
	e.mu.Unlock()
	wake(e.dispatchWake)
}
