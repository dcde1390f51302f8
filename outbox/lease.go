package outbox

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Partition leases.
//
// The outbox is split into Partitions partitions by key_hash % Partitions.
// A relay relays a partition only while it holds that partition's row in
// <table>_leases (owner, token, expires_at in database time). Every
// LeaseTTL/3 each relay:
//
//  1. refreshes its row in <table>_relays (the heartbeat) and counts the live
//     relays N; a relay whose partition count differs from that of an older
//     live relay stops with an error;
//  2. renews all its leases in one UPDATE and reads the lease table: a
//     partition it thought it held but no longer does is dropped at once
//     (nothing more is emitted for it);
//  3. keeps a fair share ceil(Partitions / N): excess partitions are drained
//     (no more claims, rows not in flight dropped from memory) and their
//     leases deleted once their in-flight messages are done and acked, so a
//     newcomer gets work within a few ticks; missing ones are taken from
//     partitions without a live lease;
//  4. on taking a partition, gives back (claim_token = NULL) every claimed,
//     unrelayed row in it: what a dead previous owner had in flight, which
//     is relayed again (duplicates after a crash, never loss);
//  5. sweeps its partitions for rows claimed with another relay's token (a
//     stalled previous owner whose claim landed after the takeover).
//
// A relay also keeps, on its own monotonic clock, the time until which a
// lease is surely still its own (the start of the last successful renewal
// plus 4/5 of the TTL); past it, it neither claims nor emits for that
// partition until a renewal succeeds. There is no leader: each relay only
// ever writes its own rows and takes leases that expired.

// stallAfter is how long a publish may run before the relay warns that the
// output publisher is stuck (it cannot take a message back from it).
const stallAfter = time.Minute

// errPartitionMismatch is the fatal error for relays that disagree.
var errPartitionMismatch = errors.New("outbox: relays on one outbox table must use the same RelayConfig.Partitions")

func (e *engine) leaseLoop() {
	defer e.leaseWG.Done()
	tick := e.cfg.LeaseTTL / 3
	bo := newDBBackoff()
	n := 0
	for {
		wait := tick
		if err := e.leaseTick(n); err != nil {
			if errors.Is(err, errPartitionMismatch) {
				e.fail(err)
				return
			}
			wait = min(bo.NextBackOff(), tick)
			e.log.Warn(e.name+": lease renewal failed; retrying", "err", err, "retry_in", wait)
		} else {
			bo.Reset()
			n++
		}
		t := time.NewTimer(wait)
	idle:
		for {
			select {
			case <-e.stopLease:
				t.Stop()
				return
			case <-t.C:
				break idle
			case <-e.leaseWake:
				if err := e.releaseDrained(); err != nil {
					e.log.Warn(e.name+": cannot release partitions; retrying at the next tick", "err", err)
				}
			}
		}
	}
}

func (e *engine) leaseTick(n int) error {
	ctx, cancel := context.WithTimeout(e.ctx, e.cfg.LeaseTTL)
	defer cancel()
	owner, ttl, P := e.cfg.Owner, e.cfg.LeaseTTL, e.cfg.Partitions
	start := time.Now()
	validUntil := start.Add(ttl - ttl/5)

	if err := e.q.heartbeat(ctx, e.db, owner, ttl); err != nil {
		return fmt.Errorf("heartbeat: %w", err)
	}
	live, err := e.q.liveRelays(ctx, e.db)
	if err != nil {
		return fmt.Errorf("list relays: %w", err)
	}
	// Of two relays that disagree, the younger one stops.
	for _, r := range live {
		if r.owner == owner {
			break
		}
		if r.partitions != P {
			return fmt.Errorf("%w: this relay (%s) has %d, live relay %s on table %q has %d",
				errPartitionMismatch, owner, P, r.owner, e.cfg.Table, r.partitions)
		}
	}
	if err := e.q.renew(ctx, e.db, owner, ttl); err != nil {
		return fmt.Errorf("renew leases: %w", err)
	}
	leases, err := e.q.listLeases(ctx, e.db)
	if err != nil {
		return fmt.Errorf("list leases: %w", err)
	}
	mine := make([]bool, P)
	taken := make([]bool, P)
	for _, l := range leases {
		if l.partition < 0 || l.partition >= P {
			continue
		}
		if l.owner == owner {
			mine[l.partition] = true // just renewed
		} else if l.live {
			taken[l.partition] = true
		}
	}
	share := (P + max(1, len(live)) - 1) / max(1, len(live))

	var adopt []int // leases we hold but did not know of (an acquire whose reply was lost)
	e.mu.Lock()
	sc := e.sched
	active := 0
	for p := range sc.parts {
		ps := &sc.parts[p]
		switch {
		case ps.owned && !mine[p]:
			e.log.Warn(e.name+": lost the lease of a partition; another relay took it over", "partition", p)
			sc.dropPartition(p)
			ps.owned, ps.draining = false, false
		case ps.owned:
			if !time.Now().Before(ps.validUntil) && !ps.draining {
				// The lease was not known valid (a slow renewal): claims
				// skipped this partition meanwhile; claim again now rather
				// than at the next poll.
				wake(e.claimWake)
			}
			ps.validUntil = validUntil
			if sc.unpark(p) {
				wake(e.dispatchWake)
			}
			if !ps.draining {
				active++
			}
		case mine[p] && ps.inMem == 0:
			adopt = append(adopt, p)
		}
	}
	// Give back the excess, highest partition numbers first.
	for p := P - 1; p >= 0 && active > share; p-- {
		ps := &sc.parts[p]
		if ps.owned && !ps.draining {
			sc.dropPartition(p)
			ps.draining = true
			active--
		}
	}
	var ownedActive []int
	for p := range sc.parts {
		if sc.parts[p].owned && !sc.parts[p].draining {
			ownedActive = append(ownedActive, p)
		}
	}
	closing := sc.closing
	stalled := sc.stalled(start.Add(-stallAfter))
	e.signalsLocked()
	e.mu.Unlock()
	if stalled > 0 {
		e.log.Warn(e.name+": publishes are not returning; the output publisher looks stuck", "stuck_messages", stalled, "for_over", stallAfter)
	}
	if closing {
		return nil
	}
	if err := e.releaseDrained(); err != nil {
		return err
	}

	// Take up to the fair share from partitions nobody holds, starting at
	// an offset of our own so that relays starting together spread out.
	var acquired []int
	want := share - active - len(adopt)
	offset := int(e.token % int64(P))
	for i := 0; i < P && want > 0; i++ {
		p := (offset + i) % P
		e.mu.Lock()
		free := !e.sched.parts[p].owned && e.sched.parts[p].inMem == 0 && !taken[p] && !mine[p]
		e.mu.Unlock()
		if !free {
			continue
		}
		ok, err := e.q.acquire(ctx, e.db, p, owner, e.token, ttl)
		if err != nil {
			return fmt.Errorf("acquire partition %d: %w", p, err)
		}
		if ok {
			acquired = append(acquired, p)
			want--
		}
	}
	acquired = append(acquired, adopt...)
	if len(acquired) > 0 {
		// Give back what a previous owner had claimed and not relayed, before
		// claiming: it comes first in id order, so per-key order holds.
		if _, err := e.q.resetClaims(ctx, e.db, acquired, 0); err != nil {
			_ = e.q.release(ctx, e.db, owner, acquired)
			return fmt.Errorf("reset claims of acquired partitions: %w", err)
		}
		e.mu.Lock()
		for _, p := range acquired {
			e.sched.parts[p] = partitionState{owned: true, validUntil: validUntil}
		}
		e.mu.Unlock()
		e.log.Info(e.name+": took partitions", "partitions", acquired, "live_relays", len(live), "share", share)
		wake(e.claimWake)
	}

	// Sweep: rows in our partitions claimed by someone else's token.
	if len(ownedActive) > 0 {
		k, err := e.q.resetClaims(ctx, e.db, ownedActive, e.token)
		if err != nil {
			return fmt.Errorf("sweep stale claims: %w", err)
		}
		if k > 0 {
			e.log.Warn(e.name+": gave back rows claimed by a relay that no longer holds their partition", "rows", k)
			wake(e.claimWake)
		}
	}
	if n%30 == 29 {
		if err := e.q.forgetDeadRelays(ctx, e.db, time.Hour); err != nil {
			e.log.Debug(e.name+": cannot delete old relay rows", "err", err)
		}
	}
	return nil
}

// releaseDrained deletes the leases of draining partitions whose in-flight
// messages are done, after their acks are written.
func (e *engine) releaseDrained() error {
	e.mu.Lock()
	var ps []int
	for p := range e.sched.parts {
		if e.sched.parts[p].draining && e.sched.parts[p].inFlight == 0 {
			ps = append(ps, p)
		}
	}
	e.mu.Unlock()
	if len(ps) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(e.ctx, e.cfg.LeaseTTL)
	defer cancel()
	if err := e.flushAcks(ctx); err != nil {
		return fmt.Errorf("flush acks before release: %w", err)
	}
	if err := e.q.release(ctx, e.db, e.cfg.Owner, ps); err != nil {
		return fmt.Errorf("release partitions: %w", err)
	}
	e.mu.Lock()
	for _, p := range ps {
		if e.sched.parts[p].draining && e.sched.parts[p].inFlight == 0 {
			e.sched.parts[p].owned, e.sched.parts[p].draining = false, false
		}
	}
	e.mu.Unlock()
	e.log.Info(e.name+": released partitions to other relays", "partitions", ps)
	return nil
}

// releaseAll runs at the end of Close: it releases every partition with
// nothing in flight (the rest expire) and unregisters the relay.
func (e *engine) releaseAll() {
	ctx, cancel := context.WithTimeout(e.ctx, 5*time.Second)
	defer cancel()
	e.mu.Lock()
	var ps []int
	for p := range e.sched.parts {
		if e.sched.parts[p].owned && e.sched.parts[p].inFlight == 0 {
			ps = append(ps, p)
		}
	}
	e.mu.Unlock()
	if err := e.q.release(ctx, e.db, e.cfg.Owner, ps); err != nil {
		e.log.Warn(e.name+": cannot release partitions at close; they will expire", "err", err, "lease_ttl", e.cfg.LeaseTTL)
	}
	if err := e.q.unregister(ctx, e.db, e.cfg.Owner); err != nil {
		e.log.Warn(e.name+": cannot unregister at close", "err", err)
	}
}

// cleanLoop prunes relayed rows older than Retention, in bounded batches.
func (e *engine) cleanLoop() {
	defer e.leaseWG.Done()
	const batch = 1000
	for {
		if !sleep(e.cfg.CleanupInterval, e.stopLease) {
			return
		}
		for {
			ctx, cancel := context.WithTimeout(e.ctx, time.Minute)
			n, err := e.q.prune(ctx, e.db, e.cfg.Retention, batch)
			cancel()
			if err != nil {
				e.log.Warn(e.name+": cannot prune relayed rows; retrying later", "err", err)
				break
			}
			if n < batch || !sleep(10*time.Millisecond, e.stopLease) {
				break
			}
		}
	}
}
