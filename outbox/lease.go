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

func (s *subscriber) leaseLoop() {
	defer s.leaseWG.Done()
	tick := s.cfg.LeaseTTL / 3
	bo := newDBBackoff()
	n := 0
	for {
		wait := tick
		if err := s.leaseTick(n); err != nil {
			if errors.Is(err, errPartitionMismatch) {
				s.fail(err)
				return
			}
			wait = min(bo.NextBackOff(), tick)
			s.log.Warn("outbox relay: lease renewal failed; retrying", "err", err, "retry_in", wait)
		} else {
			bo.Reset()
			n++
		}
		t := time.NewTimer(wait)
	idle:
		for {
			select {
			case <-s.stopLease:
				t.Stop()
				return
			case <-t.C:
				break idle
			case <-s.leaseWake:
				if err := s.releaseDrained(); err != nil {
					s.log.Warn("outbox relay: cannot release partitions; retrying at the next tick", "err", err)
				}
			}
		}
	}
}

func (s *subscriber) leaseTick(n int) error {
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.LeaseTTL)
	defer cancel()
	owner, ttl, P := s.cfg.Owner, s.cfg.LeaseTTL, s.cfg.Partitions
	start := time.Now()
	validUntil := start.Add(ttl - ttl/5)

	if err := s.q.heartbeat(ctx, s.db, owner, ttl); err != nil {
		return fmt.Errorf("heartbeat: %w", err)
	}
	live, err := s.q.liveRelays(ctx, s.db)
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
				errPartitionMismatch, owner, P, r.owner, s.cfg.Table, r.partitions)
		}
	}
	if err := s.q.renew(ctx, s.db, owner, ttl); err != nil {
		return fmt.Errorf("renew leases: %w", err)
	}
	leases, err := s.q.listLeases(ctx, s.db)
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
	s.mu.Lock()
	active := 0
	for p := range s.parts {
		ps := &s.parts[p]
		switch {
		case ps.owned && !mine[p]:
			s.log.Warn("outbox relay: lost the lease of a partition; another relay took it over", "partition", p)
			s.dropPartitionLocked(p)
			ps.owned, ps.draining = false, false
		case ps.owned:
			ps.validUntil = validUntil
			if len(ps.parked) > 0 {
				s.ready = append(s.ready, ps.parked...)
				ps.parked = nil
				wake(s.emitWake)
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
		ps := &s.parts[p]
		if ps.owned && !ps.draining {
			s.dropPartitionLocked(p)
			ps.draining = true
			active--
		}
	}
	var ownedActive []int
	for p := range s.parts {
		if s.parts[p].owned && !s.parts[p].draining {
			ownedActive = append(ownedActive, p)
		}
	}
	closing := s.closing
	var stalled int
	for _, r := range s.rows {
		if r.inflight && start.Sub(r.sentAt) > stallAfter {
			stalled++
		}
	}
	s.mu.Unlock()
	if stalled > 0 {
		s.log.Warn("outbox relay: publishes are not returning; the output publisher looks stuck", "stuck_messages", stalled, "for_over", stallAfter)
	}
	if closing {
		return nil
	}
	if err := s.releaseDrained(); err != nil {
		return err
	}

	// Take up to the fair share from partitions nobody holds, starting at
	// an offset of our own so that relays starting together spread out.
	var acquired []int
	want := share - active - len(adopt)
	offset := int(s.token % int64(P))
	for i := 0; i < P && want > 0; i++ {
		p := (offset + i) % P
		s.mu.Lock()
		free := !s.parts[p].owned && s.parts[p].inMem == 0 && !taken[p] && !mine[p]
		s.mu.Unlock()
		if !free {
			continue
		}
		ok, err := s.q.acquire(ctx, s.db, p, owner, s.token, ttl)
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
		if _, err := s.q.resetClaims(ctx, s.db, acquired, 0); err != nil {
			_ = s.q.release(ctx, s.db, owner, acquired)
			return fmt.Errorf("reset claims of acquired partitions: %w", err)
		}
		s.mu.Lock()
		for _, p := range acquired {
			s.parts[p] = partitionState{owned: true, validUntil: validUntil}
		}
		s.mu.Unlock()
		s.log.Info("outbox relay: took partitions", "partitions", acquired, "live_relays", len(live), "share", share)
		wake(s.claimWake)
	}

	// Sweep: rows in our partitions claimed by someone else's token.
	if len(ownedActive) > 0 {
		k, err := s.q.resetClaims(ctx, s.db, ownedActive, s.token)
		if err != nil {
			return fmt.Errorf("sweep stale claims: %w", err)
		}
		if k > 0 {
			s.log.Warn("outbox relay: gave back rows claimed by a relay that no longer holds their partition", "rows", k)
			wake(s.claimWake)
		}
	}
	if n%30 == 29 {
		if err := s.q.forgetDeadRelays(ctx, s.db, time.Hour); err != nil {
			s.log.Debug("outbox relay: cannot delete old relay rows", "err", err)
		}
	}
	return nil
}

// dropPartitionLocked forgets every row of partition p that is not in
// flight; in-flight ones finish (their acks still count).
func (s *subscriber) dropPartitionLocked(p int) {
	for key, q := range s.keys {
		if q[0].part != p {
			continue
		}
		keep := q[:0]
		for _, r := range q {
			if r.inflight {
				keep = append(keep, r)
			} else {
				s.forgetLocked(r)
			}
		}
		if len(keep) == 0 {
			delete(s.keys, key)
		} else {
			s.keys[key] = keep
		}
	}
	for _, r := range s.rows {
		if r.part == p && !r.inflight {
			s.forgetLocked(r)
		}
	}
	s.parts[p].parked = nil
}

// releaseDrained deletes the leases of draining partitions whose in-flight
// messages are done, after their acks are written.
func (s *subscriber) releaseDrained() error {
	s.mu.Lock()
	var ps []int
	for p := range s.parts {
		if s.parts[p].draining && s.parts[p].inFlight == 0 {
			ps = append(ps, p)
		}
	}
	s.mu.Unlock()
	if len(ps) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.LeaseTTL)
	defer cancel()
	if err := s.flushAcks(ctx); err != nil {
		return fmt.Errorf("flush acks before release: %w", err)
	}
	if err := s.q.release(ctx, s.db, s.cfg.Owner, ps); err != nil {
		return fmt.Errorf("release partitions: %w", err)
	}
	s.mu.Lock()
	for _, p := range ps {
		if s.parts[p].draining && s.parts[p].inFlight == 0 {
			s.parts[p].owned, s.parts[p].draining = false, false
		}
	}
	s.mu.Unlock()
	s.log.Info("outbox relay: released partitions to other relays", "partitions", ps)
	return nil
}

// releaseAll runs at the end of Close: it releases every partition with
// nothing in flight (the rest expire) and unregisters the relay.
func (s *subscriber) releaseAll() {
	ctx, cancel := context.WithTimeout(s.ctx, 5*time.Second)
	defer cancel()
	s.mu.Lock()
	var ps []int
	for p := range s.parts {
		if s.parts[p].owned && s.parts[p].inFlight == 0 {
			ps = append(ps, p)
		}
	}
	s.mu.Unlock()
	if err := s.q.release(ctx, s.db, s.cfg.Owner, ps); err != nil {
		s.log.Warn("outbox relay: cannot release partitions at close; they will expire", "err", err, "lease_ttl", s.cfg.LeaseTTL)
	}
	if err := s.q.unregister(ctx, s.db, s.cfg.Owner); err != nil {
		s.log.Warn("outbox relay: cannot unregister at close", "err", err)
	}
}

// cleanLoop prunes relayed rows older than Retention, in bounded batches.
func (s *subscriber) cleanLoop() {
	defer s.leaseWG.Done()
	const batch = 1000
	for {
		if !sleep(s.cfg.CleanupInterval, s.stopLease) {
			return
		}
		for {
			ctx, cancel := context.WithTimeout(s.ctx, time.Minute)
			n, err := s.q.prune(ctx, s.db, s.cfg.Retention, batch)
			cancel()
			if err != nil {
				s.log.Warn("outbox relay: cannot prune relayed rows; retrying later", "err", err)
				break
			}
			if n < batch || !sleep(10*time.Millisecond, s.stopLease) {
				break
			}
		}
	}
}
