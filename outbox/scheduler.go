package outbox

import (
	"slices"
	"time"
)

// heldRow is one claimed outbox row held in memory by the engine.
//
// Life cycle: claimed (claim_token set, admitted into the scheduler) →
// ready (head of its key's queue, retry delay over) → in flight (handed to
// the sink: published by the relay, handled by the worker) → done (deleted
// by the ack flush or by the handler's own transaction) or failed (attempts
// persisted and retried after a backoff, or moved to the dead-letter
// table).
type heldRow struct {
	id       int64
	uuid     string
	kind     string
	key      string
	part     int
	payload  []byte
	metadata []byte
	attempts int
	nextAt   time.Time

	inflight bool
	sentAt   time.Time // when it was last handed to the sink
	probe    bool      // handed out as the outage breaker's probe
	gone     bool      // no longer in memory (done, dropped); late events ignore it
}

// partitionState is what the engine knows of one partition: whether it holds
// the lease, until when the lease is surely valid, and the rows of the
// partition it holds.
type partitionState struct {
	owned      bool
	draining   bool      // being released: no claims, waiting for in-flight
	validUntil time.Time // local clock: the lease is surely ours until then
	inMem      int
	inFlight   int
	parked     []*heldRow // ready while the lease was not known valid
}

// Signals a scheduler raises for the engine (see takeSignals).
const (
	// sigRoom: rows left memory; the claimer that stopped for lack of
	// room may claim again.
	sigRoom = 1 << iota
	// sigPartitionIdle: a draining partition has nothing in flight any
	// more; its lease can be released.
	sigPartitionIdle
	// sigDrained: closing, and nothing is in flight any more.
	sigDrained
)

// scheduler decides which claimed row goes to the sink next. It is pure
// state: no database, no goroutines, no timers, no clock of its own (every
// method that needs the time takes it), so it is tested on its own
// (scheduler_test.go). It is not safe for concurrent use: the engine calls
// it under its mutex.
//
// What it keeps:
//
//   - order per partition key: a key's rows form a FIFO queue and only its
//     head is ever ready or in flight; the next row of a key becomes ready
//     when the head is finished (done or dead-lettered);
//   - retry delays: a row whose next attempt lies in the future waits in a
//     time-ordered list and becomes ready once it is due (nextDue tells
//     the engine when to look again);
//   - the memory bound: at most maxPending rows, at most keyCap of one key
//     (a key over it is skipped by claims until its queue is down to half,
//     so that one key with a long backlog behind a failing message cannot
//     fill the bound and hold every other key back);
//   - the concurrency bound: at most maxInFlight rows in flight;
//   - partitions: rows are handed out only while their partition's lease
//     is known valid; rows of a partition that went away are dropped.
type scheduler struct {
	partitions  int
	maxPending  int
	maxInFlight int
	keyCap      int

	rows     map[int64]*heldRow
	keys     map[string][]*heldRow // per-key FIFO; head is [0]
	parts    []partitionState
	ready    []*heldRow
	delayed  []*heldRow // waiting for nextAt, sorted by nextAt
	pending  int        // rows in memory
	inflight int
	full     map[string]struct{}
	closing  bool
	signals  int
}

func newScheduler(partitions, maxPending, maxInFlight int) *scheduler {
	return &scheduler{
		partitions:  partitions,
		maxPending:  maxPending,
		maxInFlight: maxInFlight,
		keyCap:      max(1, maxPending/8),
		rows:        make(map[int64]*heldRow),
		keys:        make(map[string][]*heldRow),
		parts:       make([]partitionState, partitions),
		full:        make(map[string]struct{}),
	}
}

// takeSignals returns the signals raised since the last call and clears
// them.
func (s *scheduler) takeSignals() int {
	v := s.signals
	s.signals = 0
	return v
}

// room is how many more rows memory takes.
func (s *scheduler) room() int { return s.maxPending - s.pending }

// activeParts lists the partitions the engine may claim from at now.
func (s *scheduler) activeParts(now time.Time) []int {
	var ps []int
	for i := range s.parts {
		p := &s.parts[i]
		if p.owned && !p.draining && now.Before(p.validUntil) {
			ps = append(ps, i)
		}
	}
	return ps
}

// skipKeys lists the keys claims must skip now: those whose queue reached
// keyCap and is not yet down to half.
func (s *scheduler) skipKeys() []string {
	var skip []string
	for k := range s.full {
		if len(s.keys[k]) <= s.keyCap/2 {
			delete(s.full, k)
		} else {
			skip = append(skip, k)
		}
	}
	return skip
}

// partitionOf maps a key hash to its partition.
func (s *scheduler) partitionOf(keyHash int64) int {
	part := int(keyHash % int64(s.partitions))
	if part < 0 {
		part += s.partitions
	}
	return part
}

// admit takes claimed rows into memory, in id order, and returns the ids
// that must be given back to the table (claim_token = NULL): rows of a
// partition that went away while the claim ran, and rows of a key whose
// queue is full.
func (s *scheduler) admit(rows []claimedRow, now time.Time) (giveBack []int64) {
	for _, c := range rows {
		part := s.partitionOf(c.keyHash)
		p := &s.parts[part]
		if s.closing || !p.owned || p.draining || !now.Before(p.validUntil) {
			giveBack = append(giveBack, c.id)
			continue
		}
		if c.key != "" && len(s.keys[c.key]) >= s.keyCap {
			// Back to the table, in order, for a later claim; skip the key
			// until its queue is down to half.
			s.full[c.key] = struct{}{}
			giveBack = append(giveBack, c.id)
			continue
		}
		if _, dup := s.rows[c.id]; dup {
			continue
		}
		r := &heldRow{
			id: c.id, uuid: c.uuid, kind: c.kind, key: c.key, part: part,
			payload: c.payload, metadata: c.metadata,
			attempts: c.attempts, nextAt: c.nextAt,
		}
		s.rows[r.id] = r
		s.pending++
		p.inMem++
		if r.key == "" {
			s.makeReady(r, now)
			continue
		}
		q := append(s.keys[r.key], r)
		s.keys[r.key] = q
		if len(q) == 1 {
			s.makeReady(r, now)
		}
	}
	return giveBack
}

// makeReady queues r for the sink, after its retry delay if any.
func (s *scheduler) makeReady(r *heldRow, now time.Time) {
	if r.nextAt.After(now) {
		i, _ := slices.BinarySearchFunc(s.delayed, r.nextAt, func(x *heldRow, t time.Time) int {
			if x.nextAt.After(t) {
				return 1
			}
			return -1 // equal times keep arrival order
		})
		s.delayed = slices.Insert(s.delayed, i, r)
		return
	}
	s.ready = append(s.ready, r)
}

// promote moves the delayed rows due at now to the ready queue.
func (s *scheduler) promote(now time.Time) {
	n := 0
	for n < len(s.delayed) && !s.delayed[n].nextAt.After(now) {
		r := s.delayed[n]
		s.delayed[n] = nil
		if !r.gone && !s.closing {
			s.ready = append(s.ready, r)
		}
		n++
	}
	if n > 0 {
		s.delayed = s.delayed[n:]
	}
}

// releaseDelayed makes every row waiting for a retry delay ready now (an
// outage ended: they go at once, not after their backoff).
func (s *scheduler) releaseDelayed() {
	for i, r := range s.delayed {
		s.delayed[i] = nil
		if !r.gone && !s.closing {
			r.nextAt = time.Time{}
			s.ready = append(s.ready, r)
		}
	}
	s.delayed = s.delayed[:0]
}

// nextDue is when the earliest delayed row becomes ready; zero if none.
func (s *scheduler) nextDue() time.Time {
	for len(s.delayed) > 0 && s.delayed[0].gone {
		s.delayed[0] = nil
		s.delayed = s.delayed[1:]
	}
	if len(s.delayed) == 0 {
		return time.Time{}
	}
	return s.delayed[0].nextAt
}

// next pops the next row to hand to the sink and marks it in flight; nil
// when none may go now.
func (s *scheduler) next(now time.Time) *heldRow {
	s.promote(now)
	for len(s.ready) > 0 && s.inflight < s.maxInFlight && !s.closing {
		r := s.ready[0]
		s.ready[0] = nil
		s.ready = s.ready[1:]
		if r.gone {
			continue
		}
		p := &s.parts[r.part]
		if !p.owned || p.draining {
			continue // dropped with its partition
		}
		if !now.Before(p.validUntil) {
			p.parked = append(p.parked, r)
			continue
		}
		r.inflight = true
		r.sentAt = now
		s.inflight++
		p.inFlight++
		return r
	}
	return nil
}

// hasReady reports whether a row is ready or due at now (next may still
// return nil for a bound).
func (s *scheduler) hasReady(now time.Time) bool {
	s.promote(now)
	return len(s.ready) > 0
}

// unfly marks r no longer in flight.
func (s *scheduler) unfly(r *heldRow) {
	if !r.inflight {
		return
	}
	r.inflight = false
	s.inflight--
	s.parts[r.part].inFlight--
	if s.closing && s.inflight == 0 {
		s.signals |= sigDrained
	}
}

// finish removes a row that is done (acknowledged, completed or
// dead-lettered) and releases its key to the next row.
func (s *scheduler) finish(r *heldRow, now time.Time) {
	s.unfly(r)
	s.forget(r)
	if r.key != "" {
		q := s.keys[r.key]
		if len(q) > 0 && q[0] == r {
			q[0] = nil
			q = q[1:]
		}
		if len(q) == 0 {
			delete(s.keys, r.key)
		} else {
			s.keys[r.key] = q
			if !s.closing {
				s.makeReady(q[0], now)
			}
		}
	}
}

// retry puts r, which failed and stays the head of its key, back in line
// for its next attempt at r.nextAt; if its partition went away or the
// engine is closing, r and its key are dropped from memory instead (the
// rows stay claimed in the table until the lease moves on or the next
// run).
func (s *scheduler) retry(r *heldRow, now time.Time) {
	s.unfly(r)
	p := &s.parts[r.part]
	if s.closing || !p.owned || p.draining {
		s.dropKey(r)
		return
	}
	s.makeReady(r, now)
}

// forget drops r from the memory accounting.
func (s *scheduler) forget(r *heldRow) {
	if r.gone {
		return
	}
	r.gone = true
	delete(s.rows, r.id)
	s.pending--
	p := &s.parts[r.part]
	p.inMem--
	s.signals |= sigRoom
	if p.draining && p.inFlight == 0 {
		s.signals |= sigPartitionIdle
	}
}

// dropKey forgets r and everything queued behind it that is not in flight.
func (s *scheduler) dropKey(r *heldRow) {
	if r.key == "" {
		s.forget(r)
		return
	}
	for _, x := range s.keys[r.key] {
		if !x.inflight {
			s.forget(x)
		}
	}
	delete(s.keys, r.key)
	s.forget(r)
}

// dropPartition forgets every row of partition p that is not in flight;
// in-flight ones finish (their outcome still counts).
func (s *scheduler) dropPartition(p int) {
	for key, q := range s.keys {
		if q[0].part != p {
			continue
		}
		keep := q[:0]
		for _, r := range q {
			if r.inflight {
				keep = append(keep, r)
			} else {
				s.forget(r)
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
			s.forget(r)
		}
	}
	s.parts[p].parked = nil
}

// unpark makes the rows parked on partition p ready again (its lease was
// renewed).
func (s *scheduler) unpark(p int) bool {
	ps := &s.parts[p]
	if len(ps.parked) == 0 {
		return false
	}
	s.ready = append(s.ready, ps.parked...)
	ps.parked = nil
	return true
}

// held lists the ids of the rows in memory.
func (s *scheduler) held() []int64 {
	ids := make([]int64, 0, len(s.rows))
	for id := range s.rows {
		ids = append(ids, id)
	}
	return ids
}

// stalled counts the rows in flight since before t.
func (s *scheduler) stalled(t time.Time) int {
	n := 0
	for _, r := range s.rows {
		if r.inflight && r.sentAt.Before(t) {
			n++
		}
	}
	return n
}
