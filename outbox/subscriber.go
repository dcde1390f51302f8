package outbox

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/cenkalti/backoff/v5"

	"github.com/tailrace/tailrace"
)

// subscriber is the relay's message.Subscriber for the forwarder topic. Unlike
// watermill-sql's, which hands out one message and waits for its ack, it
// keeps up to MaxInFlight messages out at once (the router runs each in its
// own goroutine), holding back only the next message of a key whose
// previous one is not yet acknowledged.
//
// Row life cycle: claimed (claim_token set, held in memory) → ready (head of
// its key's queue, retry delay over) → in flight (emitted) → acked (deleted
// in the next ack batch) or nacked (attempts persisted, retried after a
// backoff, or moved to the dead-letter table).
type subscriber struct {
	db     *sql.DB
	log    *slog.Logger
	cfg    RelayConfig
	q      *relaySQL
	token  int64 // claim_token and lease token of this relay instance
	retain bool

	// ctx is cancelled at the very end of Close (or when it gives up): it
	// bounds database calls and the publishes still running then.
	ctx    context.Context
	cancel context.CancelFunc

	mu       sync.Mutex
	started  bool
	closing  bool
	rows     map[int64]*relayRow
	keys     map[string][]*relayRow // per-key FIFO; head is [0]
	parts    []partitionState
	ready    []*relayRow
	pending  int  // rows in memory
	wantRoom bool // the claimer stopped for lack of room in memory
	keyCap   int  // most rows of one key held in memory
	// full are keys whose queue reached keyCap: claims skip them until
	// their queue is down to half, so that one key with a long backlog
	// behind a failing message cannot fill the memory bound and hold
	// every other key back.
	full     map[string]struct{}
	giveBack []int64 // claimed rows to unclaim before the next claim
	// claimLost is set when a claim failed: it may have committed with
	// its reply lost (a connection reset), leaving rows claimed with our
	// token that are not in memory. The claimer gives back such rows
	// before it claims again (reclaimLost).
	claimLost bool
	inflight  int
	acks      []int64
	// unflushed counts acknowledged rows not yet deleted: in acks or in a
	// flush under way. Emission pauses at maxUnflushed, so that a crash
	// re-sends at most MaxInFlight + maxUnflushed messages however slow
	// the database is.
	unflushed int
	fatal     error

	// outage decides when the relay's output is down (outage.go): then
	// emission pauses and one probe message at a time goes out until one
	// gets through.
	outage    outage
	drainedCh chan struct{} // closed by whoever sees inflight reach 0 while closing

	out       chan *message.Message
	emitWake  chan struct{}
	claimWake chan struct{}
	ackWake   chan struct{}
	leaseWake chan struct{}

	stopClaim chan struct{}
	stopEmit  chan struct{}
	stopAck   chan struct{}
	stopLease chan struct{}
	abandon   chan struct{} // closed when Close returns: waiters give up
	wg        sync.WaitGroup
	leaseWG   sync.WaitGroup

	flushMu   sync.Mutex
	closeOnce sync.Once
	closeErr  error
}

type relayRow struct {
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
	sentAt   time.Time // when it was last emitted
	probe    bool      // emitted as the outage breaker's probe
	gone     bool      // no longer in memory (done, dropped); late timers ignore it
}

type partitionState struct {
	owned      bool
	draining   bool      // being released: no claims, waiting for in-flight
	validUntil time.Time // local clock: the lease is surely ours until then
	inMem      int
	inFlight   int
	parked     []*relayRow // ready while the lease was not known valid
}

func newSubscriber(db *sql.DB, logger *slog.Logger, cfg RelayConfig) *subscriber {
	ctx, cancel := context.WithCancel(context.Background())
	return &subscriber{
		db:        db,
		log:       logger,
		cfg:       cfg,
		q:         newRelaySQL(cfg.Dialect, cfg.Table, cfg.Partitions),
		token:     randomToken(),
		retain:    cfg.Retention > 0,
		ctx:       ctx,
		cancel:    cancel,
		rows:      make(map[int64]*relayRow),
		keys:      make(map[string][]*relayRow),
		parts:     make([]partitionState, cfg.Partitions),
		out:       make(chan *message.Message, emitBatch),
		emitWake:  make(chan struct{}, 1),
		claimWake: make(chan struct{}, 1),
		ackWake:   make(chan struct{}, 1),
		leaseWake: make(chan struct{}, 1),
		stopClaim: make(chan struct{}),
		stopEmit:  make(chan struct{}),
		stopAck:   make(chan struct{}),
		stopLease: make(chan struct{}),
		abandon:   make(chan struct{}),
		drainedCh: make(chan struct{}),
		keyCap:    max(1, cfg.MaxPending/8),
		full:      make(map[string]struct{}),
	}
}

func wake(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// Subscribe starts the relay's loops and returns the channel the router
// reads. It may be called once, with the relay's table as topic.
func (s *subscriber) Subscribe(ctx context.Context, topic string) (<-chan *message.Message, error) {
	if topic != s.cfg.Table {
		return nil, fmt.Errorf("outbox: relay subscriber serves topic %q, not %q", s.cfg.Table, topic)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.started {
		return nil, errors.New("outbox: relay subscriber is already subscribed")
	}
	if s.closing {
		return nil, errors.New("outbox: relay subscriber is closed")
	}
	s.started = true
	s.wg.Add(3)
	go s.claimLoop()
	go s.emitLoop()
	go s.ackLoop()
	s.leaseWG.Add(1)
	go s.leaseLoop()
	if s.retain {
		s.leaseWG.Add(1)
		go s.cleanLoop()
	}
	if s.q.pg && !s.cfg.DisableListen {
		s.leaseWG.Add(1)
		go s.listenLoop()
	}
	go func() {
		select {
		case <-ctx.Done():
			_ = s.Close()
		case <-s.abandon:
		}
	}()
	return s.out, nil
}

func (s *subscriber) fatalErr() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.fatal
}

// fail stops the relay for good with err (configuration conflicts).
func (s *subscriber) fail(err error) {
	s.mu.Lock()
	if s.fatal == nil {
		s.fatal = err
	}
	s.mu.Unlock()
	s.log.Error("outbox relay: stopping", "err", err)
	go func() { _ = s.Close() }()
}

// sleep waits d or until stop is closed; it reports whether d elapsed.
func sleep(d time.Duration, stop <-chan struct{}) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-stop:
		return false
	}
}

func newDBBackoff() *backoff.ExponentialBackOff {
	b := &backoff.ExponentialBackOff{
		InitialInterval:     100 * time.Millisecond,
		RandomizationFactor: 0.3,
		Multiplier:          2,
		MaxInterval:         5 * time.Second,
	}
	b.Reset()
	return b
}

// ------------------------------------------------------------------ claiming

func (s *subscriber) claimLoop() {
	defer s.wg.Done()
	var notify <-chan struct{}
	if s.cfg.Notifier != nil {
		ch, unsub := s.cfg.Notifier.Subscribe()
		defer unsub()
		notify = ch
	}
	poll := time.NewTicker(s.cfg.PollInterval)
	defer poll.Stop()
	bo := newDBBackoff()
	for {
		select {
		case <-s.stopClaim:
			return
		case <-s.claimWake:
		case <-notify:
		case <-poll.C:
		}
		for {
			more, err := s.claimOnce()
			if err != nil {
				s.claimLost = true
				d := bo.NextBackOff()
				s.log.Warn("outbox relay: claim failed; retrying", "err", err, "retry_in", d)
				if !sleep(d, s.stopClaim) {
					return
				}
				wake(s.claimWake)
				break
			}
			bo.Reset()
			if !more {
				break
			}
			select {
			case <-s.stopClaim:
				return
			default:
			}
		}
	}
}

// activePartsLocked lists the partitions this relay may claim from now.
func (s *subscriber) activePartsLocked(now time.Time) []int {
	var ps []int
	for i := range s.parts {
		p := &s.parts[i]
		if p.owned && !p.draining && now.Before(p.validUntil) {
			ps = append(ps, i)
		}
	}
	return ps
}

// claimOnce claims one batch; more reports that a full batch came back and
// there is room for another.
func (s *subscriber) claimOnce() (more bool, err error) {
	s.mu.Lock()
	parts := s.activePartsLocked(time.Now())
	room := s.cfg.MaxPending - s.pending
	closing := s.closing
	if room < s.cfg.BatchSize/2 {
		// Claim again when a whole batch fits (forgetLocked wakes us),
		// rather than in dribbles after every acknowledgement.
		s.wantRoom = true
	}
	var skip []string
	for k := range s.full {
		if len(s.keys[k]) <= s.keyCap/2 {
			delete(s.full, k)
		} else {
			skip = append(skip, k)
		}
	}
	giveBack := s.giveBack
	s.giveBack = nil
	s.mu.Unlock()
	if len(giveBack) > 0 {
		if err := s.q.unclaim(s.ctx, s.db, giveBack, s.token); err != nil {
			s.mu.Lock()
			s.giveBack = append(giveBack, s.giveBack...)
			s.mu.Unlock()
			return false, fmt.Errorf("give back claimed rows: %w", err)
		}
	}
	if closing || len(parts) == 0 {
		return false, nil
	}
	if s.claimLost {
		if err := s.reclaimLost(); err != nil {
			return false, fmt.Errorf("give back rows of a failed claim: %w", err)
		}
		s.claimLost = false
	}
	if room < max(1, s.cfg.BatchSize/2) {
		return false, nil
	}
	n := min(s.cfg.BatchSize, room)
	rows, err := s.q.claim(s.ctx, s.db, parts, n, s.token, skip)
	if err != nil {
		return false, err
	}
	s.addClaimed(rows)
	return len(rows) == n, nil
}

// reclaimLost gives back (claim_token = NULL) every unrelayed row claimed
// with this relay's token that it does not hold: neither in memory nor
// acknowledged and waiting to be deleted. It runs in the claimer, so no
// claim adds rows meanwhile, and holds flushMu, so no acknowledged row is
// deleted meanwhile.
func (s *subscriber) reclaimLost() error {
	s.flushMu.Lock()
	defer s.flushMu.Unlock()
	s.mu.Lock()
	held := make([]int64, 0, len(s.rows)+len(s.acks))
	for id := range s.rows {
		held = append(held, id)
	}
	held = append(held, s.acks...)
	s.mu.Unlock()
	n, err := s.q.unclaimExcept(s.ctx, s.db, s.token, held)
	if err != nil {
		return err
	}
	if n > 0 {
		s.log.Warn("outbox relay: gave back rows claimed by a claim whose reply was lost", "rows", n)
	}
	return nil
}

func (s *subscriber) addClaimed(rows []claimedRow) {
	if len(rows) == 0 {
		return
	}
	s.mu.Lock()
	now := time.Now()
	for _, c := range rows {
		part := int(c.keyHash % int64(s.cfg.Partitions))
		if part < 0 {
			part += s.cfg.Partitions
		}
		p := &s.parts[part]
		if s.closing || !p.owned || p.draining || !now.Before(p.validUntil) {
			// The partition went away while the claim ran: give it back.
			s.giveBack = append(s.giveBack, c.id)
			continue
		}
		if c.key != "" && len(s.keys[c.key]) >= s.keyCap {
			// Its key's queue is full: back to the table, in order, for a
			// later claim; skip the key until its queue is down to half.
			s.full[c.key] = struct{}{}
			s.giveBack = append(s.giveBack, c.id)
			continue
		}
		if _, dup := s.rows[c.id]; dup {
			continue
		}
		r := &relayRow{
			id: c.id, uuid: c.uuid, kind: c.kind, key: c.key, part: part,
			payload: c.payload, metadata: c.metadata,
			attempts: c.attempts, nextAt: c.nextAt,
		}
		s.rows[r.id] = r
		s.pending++
		p.inMem++
		if r.key == "" {
			s.makeReadyLocked(r)
			continue
		}
		q := append(s.keys[r.key], r)
		s.keys[r.key] = q
		if len(q) == 1 {
			s.makeReadyLocked(r)
		}
	}
	s.mu.Unlock()
	wake(s.emitWake)
}

// makeReadyLocked queues r for emission, after its retry delay if any.
func (s *subscriber) makeReadyLocked(r *relayRow) {
	if d := time.Until(r.nextAt); d > 0 {
		at := r.nextAt
		time.AfterFunc(d, func() {
			s.mu.Lock()
			// A changed nextAt: released early (resumeLocked) or failed
			// again; that made it ready or set a timer of its own.
			if !r.gone && !s.closing && r.nextAt.Equal(at) {
				s.ready = append(s.ready, r)
			}
			s.mu.Unlock()
			wake(s.emitWake)
		})
		return
	}
	s.ready = append(s.ready, r)
}

// ------------------------------------------------------------------ emitting

// emitBatch is how many rows the emitter takes per lock. With the buffered
// output channel it keeps the router fed even when the emitter and the
// router's loop get the CPU rarely (hundreds of publishing goroutines
// queue before them in the scheduler): handing over one message per
// scheduling round capped a drain at a third of MaxInFlight in flight.
const emitBatch = 64

func (s *subscriber) emitLoop() {
	defer s.wg.Done()
	defer close(s.out)
	batch := make([]*relayRow, 0, emitBatch)
	for {
		batch = batch[:0]
		s.mu.Lock()
		now := time.Now()
		for len(batch) < emitBatch {
			r := s.nextLocked(now)
			if r == nil {
				break
			}
			batch = append(batch, r)
		}
		s.mu.Unlock()
		if len(batch) == 0 {
			select {
			case <-s.stopEmit:
				return
			case <-s.emitWake:
				continue
			}
		}
		for i, r := range batch {
			stopped := false
			select {
			case <-s.stopEmit:
				stopped = true
			default:
				select {
				case s.out <- s.toMessage(r):
				case <-s.stopEmit:
					stopped = true
				}
			}
			if stopped {
				s.mu.Lock()
				for _, x := range batch[i:] {
					s.unflyLocked(x)
				}
				s.mu.Unlock()
				return
			}
		}
	}
}

// nextLocked pops the next row to emit and marks it in flight.
func (s *subscriber) nextLocked(now time.Time) *relayRow {
	ok, probe := s.outage.mayEmit(now)
	if !ok {
		return nil
	}
	for len(s.ready) > 0 && s.inflight < s.cfg.MaxInFlight && s.unflushed < s.maxUnflushed() && !s.closing {
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
		if probe {
			r.probe = true
			s.outage.probeSent()
		}
		return r
	}
	return nil
}

func (s *subscriber) unflyLocked(r *relayRow) {
	if !r.inflight {
		return
	}
	r.inflight = false
	s.inflight--
	s.parts[r.part].inFlight--
	if r.probe {
		r.probe = false
		s.outage.probeReturned()
	}
	if s.closing && s.inflight == 0 {
		s.closeDrainedLocked()
	}
}

func (s *subscriber) closeDrainedLocked() {
	select {
	case <-s.drainedCh:
	default:
		close(s.drainedCh)
	}
}

func (s *subscriber) toMessage(r *relayRow) *message.Message {
	msg := message.NewMessage(r.uuid, r.payload)
	if len(r.metadata) > 2 {
		var md map[string]string
		if json.Unmarshal(r.metadata, &md) == nil {
			for k, v := range md {
				msg.Metadata.Set(k, v)
			}
		}
	}
	h := &errHolder{}
	msg.SetContext(context.WithValue(s.ctx, errHolderKey{}, h))
	go s.await(r, msg, h)
	return msg
}

func (s *subscriber) await(r *relayRow, msg *message.Message, h *errHolder) {
	select {
	case <-msg.Acked():
		s.onAck(r)
	case <-msg.Nacked():
		s.onNack(r, h.get())
	case <-s.abandon:
	}
}

// ---------------------------------------------------------- acks and nacks

func (s *subscriber) onAck(r *relayRow) {
	s.mu.Lock()
	r.probe = false // not an unsent probe: unflyLocked must not touch the outage
	if s.outage.succeeded() {
		s.log.Warn("outbox relay: publishing works again; resuming")
		s.resumeLocked()
	}
	s.acks = append(s.acks, r.id)
	s.unflushed++
	s.finishLocked(r)
	s.mu.Unlock()
	wake(s.ackWake)
}

// finishLocked removes a row that is done (acknowledged or dead-lettered)
// and releases its key to the next row.
func (s *subscriber) finishLocked(r *relayRow) {
	s.unflyLocked(r)
	s.forgetLocked(r)
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
				s.makeReadyLocked(q[0])
			}
		}
	}
	wake(s.emitWake)
}

// forgetLocked drops r from the memory accounting.
func (s *subscriber) forgetLocked(r *relayRow) {
	if r.gone {
		return
	}
	r.gone = true
	delete(s.rows, r.id)
	s.pending--
	p := &s.parts[r.part]
	p.inMem--
	if s.wantRoom && s.cfg.MaxPending-s.pending >= s.cfg.BatchSize {
		s.wantRoom = false
		wake(s.claimWake)
	}
	if p.draining && p.inFlight == 0 {
		wake(s.leaseWake)
	}
}

func (s *subscriber) onNack(r *relayRow, cause error) {
	if cause == nil {
		cause = errors.New("outbox: the forwarder nacked the message without an error (a panic or a middleware)")
	}
	failed := r.attempts + 1
	reason := ""
	if err := checkEnvelope(r.payload); err != nil {
		cause, reason = fmt.Errorf("outbox: the forwarder envelope cannot be unwrapped: %w", err), "unwrappable"
	} else if tailrace.IsPermanent(cause) {
		reason = "permanent"
	} else if !s.countFailure(r, cause) {
		// A transport failure, or one during an outage: the broker is
		// down, not this message. Back in line without an attempt counted.
		s.mu.Lock()
		s.unflyLocked(r)
		p := &s.parts[r.part]
		if s.closing || !p.owned || p.draining {
			s.dropKeyLocked(r)
		} else {
			s.makeReadyLocked(r)
		}
		s.mu.Unlock()
		wake(s.emitWake)
		return
	} else if failed >= s.cfg.MaxAttempts {
		reason = "attempts"
	}
	lastErr := truncate(cause.Error(), 4000)
	if reason != "" {
		s.bury(r, failed, lastErr, reason)
		return
	}
	delay := s.retryDelay(failed)
	if err := s.q.retryLater(s.ctx, s.db, r.id, failed, lastErr, delay); err != nil {
		// The count lives on in memory; after a restart it restarts lower.
		s.log.Warn("outbox relay: cannot record a failed attempt", "err", err, "id", r.id)
	}
	s.log.Info("outbox relay: publish failed; will retry", "id", r.id, "uuid", r.uuid,
		"attempt", failed, "max_attempts", s.cfg.MaxAttempts, "retry_in", delay, "err", cause)
	s.mu.Lock()
	r.attempts = failed
	r.nextAt = time.Now().Add(delay)
	s.unflyLocked(r)
	p := &s.parts[r.part]
	if s.closing || !p.owned || p.draining {
		s.dropKeyLocked(r)
	} else {
		s.makeReadyLocked(r)
	}
	s.mu.Unlock()
	wake(s.emitWake)
}

// countFailure feeds the outage state (outage.go) with a transient
// failure of r and reports whether it counts as an attempt of r.
func (s *subscriber) countFailure(r *relayRow, cause error) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	v := s.outage.failed(r.id, tailrace.IsUnavailable(cause), r.probe, truncate(cause.Error(), 500), now)
	r.probe = false // settled: unflyLocked must not touch the outage
	if !v.WakeAt.IsZero() {
		time.AfterFunc(v.WakeAt.Sub(now), func() { wake(s.emitWake) })
	}
	switch {
	case v.Entered:
		s.log.Warn("outbox relay: publishing fails for a reason that is not the message's; outage mode: pausing, then probing with one message at a time",
			"err", cause, "pending", s.pending)
	case v.Resumed:
		s.log.Warn("outbox relay: the broker answered again; resuming")
		s.resumeLocked()
	}
	return v.Count
}

// resumeLocked ends the wait of every message held back by a retry delay,
// when an outage ended: they go out now, not after their backoff.
func (s *subscriber) resumeLocked() {
	now := time.Now()
	for _, r := range s.rows {
		if r.inflight || r.gone || !r.nextAt.After(now) {
			continue
		}
		if r.key != "" {
			if q := s.keys[r.key]; len(q) == 0 || q[0] != r {
				continue // not yet the head of its key: not waiting
			}
		}
		r.nextAt = time.Time{} // its timer sees the change and does nothing
		s.ready = append(s.ready, r)
	}
	wake(s.emitWake)
}

// output reports the state of the relay's output.
func (s *subscriber) output() OutputStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.outage.status(time.Now())
	st.Waiting = s.pending
	return st
}

// dropKeyLocked forgets r and everything queued behind it (its partition
// is going away, or the relay is closing).
func (s *subscriber) dropKeyLocked(r *relayRow) {
	if r.key == "" {
		s.forgetLocked(r)
		return
	}
	for _, x := range s.keys[r.key] {
		if !x.inflight {
			s.forgetLocked(x)
		}
	}
	delete(s.keys, r.key)
	s.forgetLocked(r)
}

// bury moves r to the dead-letter table, retrying the database until it
// succeeds or the relay is abandoned; r keeps its key meanwhile.
func (s *subscriber) bury(r *relayRow, attempts int, lastErr, reason string) {
	bo := newDBBackoff()
	for {
		err := s.q.bury(s.ctx, s.db, r.id, attempts, lastErr)
		if err == nil {
			break
		}
		d := bo.NextBackOff()
		s.log.Warn("outbox relay: cannot dead-letter a message; retrying", "err", err, "id", r.id, "retry_in", d)
		if !sleep(d, s.abandon) {
			return
		}
	}
	s.log.Warn("outbox relay: message dead-lettered", "id", r.id, "uuid", r.uuid, "kind", r.kind, "partition_key", r.key,
		"attempts", attempts, "reason", reason, "err", lastErr)
	if s.cfg.Observer != nil {
		s.cfg.Observer.DeadLettered(s.ctx, s.cfg.Table, r.kind, reason)
	}
	s.mu.Lock()
	s.finishLocked(r)
	s.mu.Unlock()
}

func (s *subscriber) retryDelay(failed int) time.Duration {
	b := backoff.ExponentialBackOff{
		InitialInterval:     s.cfg.InitialInterval,
		RandomizationFactor: s.cfg.Jitter,
		Multiplier:          s.cfg.Multiplier,
		MaxInterval:         s.cfg.MaxInterval,
	}
	b.Reset()
	var d time.Duration
	for i := 0; i < failed && i < 64; i++ {
		d = b.NextBackOff()
	}
	return d
}

// checkEnvelope reports whether payload is a forwarder envelope the
// forwarder can unwrap (the same checks it makes).
func checkEnvelope(payload []byte) error {
	var e struct {
		DestinationTopic string            `json:"destination_topic"`
		UUID             string            `json:"uuid"`
		Payload          []byte            `json:"payload"`
		Metadata         map[string]string `json:"metadata"`
	}
	if err := json.Unmarshal(payload, &e); err != nil {
		return err
	}
	if e.DestinationTopic == "" {
		return errors.New("no destination topic")
	}
	return nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// ------------------------------------------------------------------- acking

func (s *subscriber) ackLoop() {
	defer s.wg.Done()
	bo := newDBBackoff()
	for {
		select {
		case <-s.stopAck:
			return
		case <-s.ackWake:
		}
		// Gather for up to AckInterval, or until a batch is full.
		t := time.NewTimer(s.cfg.AckInterval)
	gather:
		for {
			s.mu.Lock()
			n := len(s.acks)
			s.mu.Unlock()
			if n >= s.cfg.BatchSize {
				break
			}
			select {
			case <-t.C:
				break gather
			case <-s.ackWake:
			case <-s.stopAck:
				break gather
			}
		}
		t.Stop()
		if err := s.flushAcks(s.ctx); err != nil {
			d := bo.NextBackOff()
			s.log.Warn("outbox relay: cannot delete relayed rows; retrying", "err", err, "retry_in", d)
			if !sleep(d, s.stopAck) {
				return
			}
			wake(s.ackWake)
			continue
		}
		bo.Reset()
	}
}

// flushAcks deletes (or stamps) every acknowledged row noted so far. On
// error the ids are kept for the next flush.
func (s *subscriber) flushAcks(ctx context.Context) error {
	s.flushMu.Lock()
	defer s.flushMu.Unlock()
	s.mu.Lock()
	ids := s.acks
	s.acks = nil
	s.mu.Unlock()
	for len(ids) > 0 {
		n := min(len(ids), 1000)
		if err := s.q.ack(ctx, s.db, ids[:n], s.retain); err != nil {
			s.mu.Lock()
			s.acks = append(ids, s.acks...)
			s.mu.Unlock()
			return err
		}
		ids = ids[n:]
		s.mu.Lock()
		s.unflushed -= n
		s.mu.Unlock()
		wake(s.emitWake)
	}
	return nil
}

// maxUnflushed is how many acknowledged rows may wait for their DELETE
// before emission pauses: two batches, one being deleted while the next
// gathers.
func (s *subscriber) maxUnflushed() int { return 2 * s.cfg.BatchSize }

// ------------------------------------------------------------------ closing

// Close stops claiming and emitting, waits up to CloseTimeout for the
// messages in flight, deletes the rows of those acknowledged, and releases
// the leases of partitions with nothing left in flight.
func (s *subscriber) Close() error {
	s.closeOnce.Do(func() { s.closeErr = s.close() })
	return s.closeErr
}

func (s *subscriber) close() error {
	s.mu.Lock()
	s.closing = true
	started := s.started
	if s.inflight == 0 {
		s.closeDrainedLocked()
	}
	s.mu.Unlock()
	if !started {
		close(s.abandon)
		s.cancel()
		return nil
	}
	close(s.stopClaim)
	close(s.stopEmit)
	var errs []error
	t := time.NewTimer(s.cfg.CloseTimeout)
	select {
	case <-s.drainedCh:
	case <-t.C:
		s.mu.Lock()
		n := s.inflight
		s.mu.Unlock()
		s.log.Warn("outbox relay: close timed out; unconfirmed messages stay in the outbox and will be relayed again", "in_flight", n)
		errs = append(errs, fmt.Errorf("outbox: relay close timed out after %s with %d messages in flight", s.cfg.CloseTimeout, n))
	}
	t.Stop()
	close(s.stopAck)
	s.wg.Wait()
	// Final flush, retried for a short while.
	fctx, fcancel := context.WithTimeout(s.ctx, 10*time.Second)
	bo := newDBBackoff()
	for {
		err := s.flushAcks(fctx)
		if err == nil {
			break
		}
		if fctx.Err() != nil {
			s.mu.Lock()
			n := len(s.acks)
			s.mu.Unlock()
			s.log.Error("outbox relay: cannot delete relayed rows at close; they will be relayed again", "err", err, "rows", n)
			errs = append(errs, fmt.Errorf("outbox: relay close: delete %d relayed rows: %w", n, err))
			break
		}
		sleep(bo.NextBackOff(), fctx.Done())
	}
	fcancel()
	close(s.stopLease)
	s.leaseWG.Wait()
	s.releaseAll()
	close(s.abandon)
	s.cancel()
	return errors.Join(errs...)
}

// abort stops the relay the way a crash would, for tests: no final ack
// flush, no lease release, nothing unregistered.
func (s *subscriber) abort() {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closing = true
		started := s.started
		s.closeDrainedLocked()
		s.mu.Unlock()
		s.cancel()
		if started {
			close(s.stopClaim)
			close(s.stopEmit)
			close(s.stopAck)
			close(s.stopLease)
			s.wg.Wait()
			s.leaseWG.Wait()
		}
		close(s.abandon)
	})
}
