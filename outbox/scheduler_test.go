package outbox

import (
	"log/slog"
	"testing"
	"testing/synctest"
	"time"
)

// newTestScheduler returns a scheduler owning every partition until far in
// the future.
func newTestScheduler(partitions, maxPending, maxInFlight int, now time.Time) *scheduler {
	s := newScheduler(partitions, maxPending, maxInFlight)
	for p := range s.parts {
		s.parts[p] = partitionState{owned: true, validUntil: now.Add(time.Hour)}
	}
	return s
}

func claimed(id int64, key string) claimedRow {
	return claimedRow{id: id, uuid: "u", kind: "k", key: key, keyHash: int64(keyHash(key))}
}

func drainIDs(s *scheduler, now time.Time) []int64 {
	var ids []int64
	for r := s.next(now); r != nil; r = s.next(now) {
		ids = append(ids, r.id)
	}
	return ids
}

func TestSchedulerOrderPerKey(t *testing.T) {
	now := time.Unix(1000, 0)
	s := newTestScheduler(4, 100, 100, now)
	if gb := s.admit([]claimedRow{claimed(1, "a"), claimed(2, "b"), claimed(3, "a"), claimed(4, "b"), claimed(5, "")}, now); len(gb) > 0 {
		t.Fatalf("gave back %v", gb)
	}
	// Only the heads of a and b go, plus the keyless row.
	got := drainIDs(s, now)
	if want := []int64{1, 2, 5}; !equalIDs(got, want) {
		t.Fatalf("first round %v, want %v", got, want)
	}
	// Finishing a's head releases 3; b stays held by 2.
	s.finish(s.rows[1], now)
	if got := drainIDs(s, now); !equalIDs(got, []int64{3}) {
		t.Fatalf("after finishing 1: %v, want [3]", got)
	}
	s.finish(s.rows[2], now)
	if got := drainIDs(s, now); !equalIDs(got, []int64{4}) {
		t.Fatalf("after finishing 2: %v, want [4]", got)
	}
	if s.inflight != 3 || s.pending != 3 {
		t.Fatalf("inflight %d pending %d, want 3 and 3", s.inflight, s.pending)
	}
}

func TestSchedulerRetryHoldsOnlyItsKey(t *testing.T) {
	now := time.Unix(1000, 0)
	s := newTestScheduler(4, 100, 100, now)
	s.admit([]claimedRow{claimed(1, "a"), claimed(2, "a"), claimed(3, "b")}, now)
	drainIDs(s, now) // 1 and 3 in flight
	r := s.rows[1]
	r.nextAt = now.Add(5 * time.Second)
	s.retry(r, now)
	s.finish(s.rows[3], now)
	if got := drainIDs(s, now); len(got) != 0 {
		t.Fatalf("rows ready while a's head waits for its retry: %v", got)
	}
	if due := s.nextDue(); !due.Equal(now.Add(5 * time.Second)) {
		t.Fatalf("nextDue %v, want now+5s", due)
	}
	// Another key arrives and goes at once.
	s.admit([]claimedRow{claimed(4, "c")}, now)
	if got := drainIDs(s, now.Add(time.Second)); !equalIDs(got, []int64{4}) {
		t.Fatalf("c's row: %v, want [4]", got)
	}
	// At the due time the retried head goes, and 2 still waits behind it.
	if got := drainIDs(s, now.Add(5*time.Second)); !equalIDs(got, []int64{1}) {
		t.Fatalf("at due time: %v, want [1]", got)
	}
	s.finish(s.rows[1], now.Add(5*time.Second))
	if got := drainIDs(s, now.Add(5*time.Second)); !equalIDs(got, []int64{2}) {
		t.Fatalf("after the retry succeeded: %v, want [2]", got)
	}
}

func TestSchedulerBounds(t *testing.T) {
	now := time.Unix(1000, 0)
	// maxPending 16 → keyCap 2.
	s := newTestScheduler(1, 16, 2, now)
	gb := s.admit([]claimedRow{claimed(1, "a"), claimed(2, "a"), claimed(3, "a"), claimed(4, "b"), claimed(5, "c"), claimed(6, "d")}, now)
	if !equalIDs(gb, []int64{3}) {
		t.Fatalf("gave back %v, want [3] (a's queue is full)", gb)
	}
	if skip := s.skipKeys(); len(skip) != 1 || skip[0] != "a" {
		t.Fatalf("skip keys %v, want [a]", skip)
	}
	if got := drainIDs(s, now); len(got) != 2 {
		t.Fatalf("%d in flight, want maxInFlight 2", len(got))
	}
	if s.room() != 16-5 {
		t.Fatalf("room %d, want 11", s.room())
	}
	s.finish(s.rows[1], now)
	if skip := s.skipKeys(); len(skip) != 0 {
		t.Fatalf("skip keys %v after a's queue went down to half", skip)
	}
	if sig := s.takeSignals(); sig&sigRoom == 0 {
		t.Fatalf("no room signal after a row left memory")
	}
}

func TestSchedulerPartitions(t *testing.T) {
	now := time.Unix(1000, 0)
	s := newTestScheduler(2, 100, 100, now)
	var a, b claimedRow
	for i := 0; a.key == "" || b.key == ""; i++ {
		c := claimed(int64(i+1), string(rune('a'+i)))
		if s.partitionOf(c.keyHash) == 0 && a.key == "" {
			a = c
		} else if s.partitionOf(c.keyHash) == 1 && b.key == "" {
			b = c
		}
	}
	s.parts[1].owned = false
	if gb := s.admit([]claimedRow{a, b}, now); !equalIDs(gb, []int64{b.id}) {
		t.Fatalf("gave back %v, want [%d] (partition 1 not owned)", gb, b.id)
	}
	// The lease of partition 0 is not known valid: its row is parked, then
	// released by a renewal.
	s.parts[0].validUntil = now
	if got := drainIDs(s, now); len(got) != 0 {
		t.Fatalf("emitted %v while the lease was not known valid", got)
	}
	s.parts[0].validUntil = now.Add(time.Minute)
	if !s.unpark(0) {
		t.Fatal("nothing parked")
	}
	if got := drainIDs(s, now); !equalIDs(got, []int64{a.id}) {
		t.Fatalf("after renewal: %v", got)
	}
	// Dropping a partition keeps what is in flight.
	s.admit([]claimedRow{{id: 99, key: a.key, keyHash: a.keyHash}}, now)
	s.parts[0].draining = true
	s.dropPartition(0)
	if s.pending != 1 || s.rows[a.id] == nil {
		t.Fatalf("pending %d after drop; the in-flight row must stay", s.pending)
	}
	s.finish(s.rows[a.id], now)
	if sig := s.takeSignals(); sig&sigPartitionIdle == 0 {
		t.Fatalf("no idle signal for the draining partition")
	}
}

// TestSchedulerClosing: while closing nothing goes out, and the last row in
// flight raises sigDrained.
func TestSchedulerClosing(t *testing.T) {
	now := time.Unix(1000, 0)
	s := newTestScheduler(1, 100, 100, now)
	s.admit([]claimedRow{claimed(1, "a"), claimed(2, "b")}, now)
	r := s.next(now)
	s.closing = true
	if got := s.next(now); got != nil {
		t.Fatalf("row %d handed out while closing", got.id)
	}
	s.takeSignals()
	s.finish(r, now)
	if sig := s.takeSignals(); sig&sigDrained == 0 {
		t.Fatal("no drained signal")
	}
}

// TestEngineRetryTimer: the dispatcher wakes for a retry when it falls
// due, on fake time (synctest): a row retried with a 30 s delay is handed
// out again after 30 s and not before.
func TestEngineRetryTimer(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := RelayConfig{Dialect: SQLite, Table: "t"}
		cfg.setDefaults()
		e := newEngine(nil, slog.New(slog.DiscardHandler), "test", cfg)
		now := time.Now()
		for p := range e.sched.parts {
			e.sched.parts[p] = partitionState{owned: true, validUntil: now.Add(time.Hour)}
		}
		e.addClaimed([]claimedRow{claimed(1, "a")})
		got := e.take(nil, 10)
		if len(got) != 1 {
			t.Fatalf("took %d rows", len(got))
		}
		start := time.Now()
		e.mu.Lock()
		got[0].nextAt = start.Add(30 * time.Second)
		e.sched.retry(got[0], start)
		e.mu.Unlock()
		done := make(chan time.Duration)
		go func() {
			for {
				if b := e.take(nil, 10); len(b) > 0 {
					done <- time.Since(start)
					return
				}
				if !e.waitDispatch() {
					return
				}
			}
		}()
		if d := <-done; d != 30*time.Second {
			t.Fatalf("retried after %s, want 30s", d)
		}
		close(e.stopDispatch)
	})
}

func equalIDs(a, b []int64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
