package outbox

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v5"
)

// engine moves claimed outbox rows to a sink: the relay (publish to a
// broker) or the worker (run a command's handler). The parts, one job each:
//
//   - claiming (claim.go): batched claims of unclaimed rows of the
//     partitions this engine leases, through relaySQL;
//   - scheduling (scheduler.go): pure code deciding which held row goes to
//     the sink next (order per key, retry delays, memory and concurrency
//     bounds);
//   - acknowledging (ack.go): done rows are deleted in batches (or, for a
//     worker's transactional handler, were deleted in the handler's own
//     transaction);
//   - failures (failure.go): a failed row is retried with backoff or
//     dead-lettered, and the outage breaker pauses the sink when everything
//     fails;
//   - leasing (lease.go): partition leases shared among the engines on one
//     table, so that N processes share the work;
//   - listening (relay_listen.go): PostgreSQL LISTEN and the in-process
//     Notifier wake the claimer.
//
// The sink runs the dispatch loop: it takes ready rows (take), hands them
// over, and reports each outcome (acked, completed, failed).
type engine struct {
	db     *sql.DB
	log    *slog.Logger
	name   string // "outbox relay" or "outbox worker", for logs and errors
	cfg    RelayConfig
	q      *relaySQL
	token  int64 // claim_token and lease token of this engine instance
	retain bool
	// breaker: unclassified failures can trip outage mode too (the
	// relay); failures marked tailrace.Unavailable always do.
	breaker bool

	// ctx is cancelled at the very end of close (or when it gives up): it
	// bounds database calls and the sink's work still running then.
	ctx    context.Context
	cancel context.CancelFunc

	mu       sync.Mutex
	sched    *scheduler
	started  bool
	wantRoom bool // the claimer stopped for lack of room in memory
	giveBack []int64
	// claimLost is set when a claim failed: it may have committed with its
	// reply lost (a connection reset), leaving rows claimed with our token
	// that are not in memory. The claimer gives back such rows before it
	// claims again (reclaimLost).
	claimLost bool
	acks      []int64
	// unflushed counts acknowledged rows not yet deleted: in acks or in a
	// flush under way. The sink pauses at maxUnflushed, so that a crash
	// repeats at most MaxInFlight + maxUnflushed rows however slow the
	// database is.
	unflushed int
	fatal     error
	// outage decides when the sink's output is down (outage.go): then the
	// sink pauses and one probe row at a time goes out until one gets
	// through.
	outage    outage
	drainedCh chan struct{} // closed by whoever sees in flight reach 0 while closing

	dispatchWake chan struct{}
	claimWake    chan struct{}
	ackWake      chan struct{}
	leaseWake    chan struct{}

	stopClaim    chan struct{}
	stopDispatch chan struct{}
	stopAck      chan struct{}
	stopLease    chan struct{}
	abandon      chan struct{} // closed when close returns: waiters give up
	wg           sync.WaitGroup
	leaseWG      sync.WaitGroup

	// onCloseTimeout, when set, runs when close gave up waiting for the
	// rows in flight (the worker cancels its handlers).
	onCloseTimeout func()

	flushMu   sync.Mutex
	closeOnce sync.Once
	closeErr  error
}

func newEngine(db *sql.DB, logger *slog.Logger, name string, cfg RelayConfig) *engine {
	ctx, cancel := context.WithCancel(context.Background())
	return &engine{
		db:           db,
		log:          logger,
		name:         name,
		cfg:          cfg,
		q:            newRelaySQL(cfg.Dialect, cfg.Table, cfg.Partitions),
		token:        randomToken(),
		retain:       cfg.Retention > 0,
		ctx:          ctx,
		cancel:       cancel,
		sched:        newScheduler(cfg.Partitions, cfg.MaxPending, cfg.MaxInFlight),
		dispatchWake: make(chan struct{}, 1),
		claimWake:    make(chan struct{}, 1),
		ackWake:      make(chan struct{}, 1),
		leaseWake:    make(chan struct{}, 1),
		stopClaim:    make(chan struct{}),
		stopDispatch: make(chan struct{}),
		stopAck:      make(chan struct{}),
		stopLease:    make(chan struct{}),
		abandon:      make(chan struct{}),
		drainedCh:    make(chan struct{}),
	}
}

func wake(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
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

// start starts the engine's loops and dispatch, the sink's dispatch loop
// (run in the engine's wait group; it must return when stopDispatch is
// closed). It fails on an engine already started or closed.
func (e *engine) start(dispatch func()) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.started {
		return fmt.Errorf("outbox: %s is already running", e.name)
	}
	if e.sched.closing {
		return fmt.Errorf("outbox: %s is closed", e.name)
	}
	e.started = true
	e.wg.Add(3)
	go e.claimLoop()
	go func() {
		defer e.wg.Done()
		dispatch()
	}()
	go e.ackLoop()
	e.leaseWG.Add(1)
	go e.leaseLoop()
	if e.retain {
		e.leaseWG.Add(1)
		go e.cleanLoop()
	}
	if e.q.pg && !e.cfg.DisableListen {
		e.leaseWG.Add(1)
		go e.listenLoop()
	}
	return nil
}

func (e *engine) fatalErr() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.fatal
}

// fail stops the engine for good with err (configuration conflicts).
func (e *engine) fail(err error) {
	e.mu.Lock()
	if e.fatal == nil {
		e.fatal = err
	}
	e.mu.Unlock()
	e.log.Error(e.name+": stopping", "err", err)
	go func() { _ = e.close() }()
}

// ------------------------------------------------------------ the sink's side

// take appends to batch up to n rows the sink may start now, each marked in
// flight.
func (e *engine) take(batch []*heldRow, n int) []*heldRow {
	e.mu.Lock()
	defer e.mu.Unlock()
	now := time.Now()
	for len(batch) < n {
		r := e.nextLocked(now)
		if r == nil {
			break
		}
		batch = append(batch, r)
	}
	return batch
}

// nextLocked pops the next row for the sink, or nil.
func (e *engine) nextLocked(now time.Time) *heldRow {
	ok, probe := e.outage.mayEmit(now)
	if !ok || e.unflushed >= e.maxUnflushed() {
		return nil
	}
	r := e.sched.next(now)
	if r != nil && probe {
		r.probe = true
		e.outage.probeSent()
	}
	return r
}

// waitDispatch blocks until the sink may find work: a wake-up, the next
// retry falling due, or stop. It reports false on stop.
func (e *engine) waitDispatch() bool {
	e.mu.Lock()
	due := e.sched.nextDue()
	e.mu.Unlock()
	var tc <-chan time.Time
	if !due.IsZero() {
		t := time.NewTimer(max(time.Until(due), time.Millisecond))
		defer t.Stop()
		tc = t.C
	}
	select {
	case <-e.stopDispatch:
		return false
	case <-e.dispatchWake:
	case <-tc:
	}
	return true
}

// unfly returns rows the sink took but did not start (it was stopped).
func (e *engine) unfly(rows []*heldRow) {
	e.mu.Lock()
	for _, r := range rows {
		e.unflyLocked(r)
	}
	e.signalsLocked()
	e.mu.Unlock()
}

func (e *engine) unflyLocked(r *heldRow) {
	e.sched.unfly(r)
	if r.probe {
		r.probe = false
		e.outage.probeReturned()
	}
}

// signalsLocked acts on what the scheduler signalled.
func (e *engine) signalsLocked() {
	sig := e.sched.takeSignals()
	if sig&sigRoom != 0 && e.wantRoom && e.sched.room() >= e.cfg.BatchSize {
		e.wantRoom = false
		wake(e.claimWake)
	}
	if sig&sigPartitionIdle != 0 {
		wake(e.leaseWake)
	}
	if sig&sigDrained != 0 {
		e.closeDrainedLocked()
	}
}

// finishLocked removes a row that is done (acknowledged, completed or
// dead-lettered) and releases its key to the next row.
func (e *engine) finishLocked(r *heldRow) {
	e.unflyLocked(r)
	e.sched.finish(r, time.Now())
	e.signalsLocked()
	wake(e.dispatchWake)
}

// acked records that the sink is done with r: its row is deleted (or
// stamped, with Retention) by the next ack flush.
func (e *engine) acked(r *heldRow) {
	e.mu.Lock()
	e.succeededLocked(r)
	e.acks = append(e.acks, r.id)
	e.unflushed++
	e.finishLocked(r)
	e.mu.Unlock()
	wake(e.ackWake)
}

// completed records that r's row was already deleted, in the transaction
// of the worker's handler: nothing is left to write.
func (e *engine) completed(r *heldRow) {
	e.mu.Lock()
	e.succeededLocked(r)
	e.finishLocked(r)
	e.mu.Unlock()
}

// requeue puts r back in line with no outcome and no attempt counted (the
// broker is down; the worker is closing and cancelled its handler): it is
// tried again after its current delay, or, closing, dropped from memory and
// left claimed in the table for the next run.
func (e *engine) requeue(r *heldRow) {
	e.mu.Lock()
	e.unflyLocked(r)
	e.sched.retry(r, time.Now())
	e.signalsLocked()
	e.mu.Unlock()
	wake(e.dispatchWake)
}

func (e *engine) closeDrainedLocked() {
	select {
	case <-e.drainedCh:
	default:
		close(e.drainedCh)
	}
}

// ------------------------------------------------------------------ closing

// close stops claiming and dispatching, waits up to CloseTimeout for the
// rows in flight, deletes the rows of those done, and releases the leases
// of partitions with nothing left in flight.
func (e *engine) close() error {
	e.closeOnce.Do(func() { e.closeErr = e.doClose() })
	return e.closeErr
}

func (e *engine) doClose() error {
	e.mu.Lock()
	e.sched.closing = true
	started := e.started
	if e.sched.inflight == 0 {
		e.closeDrainedLocked()
	}
	e.mu.Unlock()
	if !started {
		close(e.abandon)
		e.cancel()
		return nil
	}
	close(e.stopClaim)
	close(e.stopDispatch)
	var errs []error
	t := time.NewTimer(e.cfg.CloseTimeout)
	select {
	case <-e.drainedCh:
	case <-t.C:
		e.mu.Lock()
		n := e.sched.inflight
		e.mu.Unlock()
		e.log.Warn(e.name+": close timed out; what is not done stays in the outbox for the next run", "in_flight", n)
		errs = append(errs, fmt.Errorf("outbox: %s close timed out after %s with %d messages in flight", e.name, e.cfg.CloseTimeout, n))
		if e.onCloseTimeout != nil {
			e.onCloseTimeout()
		}
	}
	t.Stop()
	close(e.stopAck)
	e.wg.Wait()
	// Final flush, retried for a short while.
	fctx, fcancel := context.WithTimeout(e.ctx, 10*time.Second)
	bo := newDBBackoff()
	for {
		err := e.flushAcks(fctx)
		if err == nil {
			break
		}
		if fctx.Err() != nil {
			e.mu.Lock()
			n := len(e.acks)
			e.mu.Unlock()
			e.log.Error(e.name+": cannot delete done rows at close; they will be handled again", "err", err, "rows", n)
			errs = append(errs, fmt.Errorf("outbox: %s close: delete %d done rows: %w", e.name, n, err))
			break
		}
		sleep(bo.NextBackOff(), fctx.Done())
	}
	fcancel()
	close(e.stopLease)
	e.leaseWG.Wait()
	e.releaseAll()
	close(e.abandon)
	e.cancel()
	return errors.Join(errs...)
}

// abort stops the engine the way a crash would, for tests: no final ack
// flush, no lease release, nothing unregistered.
func (e *engine) abort() {
	e.closeOnce.Do(func() {
		e.mu.Lock()
		e.sched.closing = true
		started := e.started
		e.closeDrainedLocked()
		e.mu.Unlock()
		e.cancel()
		if started {
			close(e.stopClaim)
			close(e.stopDispatch)
			close(e.stopAck)
			close(e.stopLease)
			e.wg.Wait()
			e.leaseWG.Wait()
		}
		close(e.abandon)
	})
}
