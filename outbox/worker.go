package outbox

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/mediator"
)

// Defaults of WorkerConfig.
const (
	DefaultWorkerConcurrency = 64
	DefaultWorkerName        = "tailrace-worker"
	DefaultWorkerMaxAttempts = 10
	DefaultWorkerLeaseTTL    = 15 * time.Second
	// DefaultWorkerPollInterval is the fallback poll of a worker that
	// LISTENs on PostgreSQL; without LISTEN (MySQL, SQLite, DisableListen)
	// it polls every DefaultRelayPollInterval (1 s).
	DefaultWorkerPollInterval = 5 * time.Second
)

// WorkerConfig configures a Worker. The zero value of every field but
// Dialect and Table means "the default" given in its doc.
type WorkerConfig struct {
	// Dialect of the database holding the command table. Required.
	Dialect Dialect
	// Table is the command table: the table Enqueue writes commands into
	// (Config.CommandTable of the Outbox). Required. No relay may run on
	// it: the worker is its only reader.
	Table string

	// Concurrency is the most handlers running at once. Each running
	// handler inside the Transaction behavior holds one pooled connection;
	// the worker itself uses up to three more (claims, acknowledgements,
	// leases) and, on PostgreSQL, one for LISTEN: size the pool
	// (sql.DB.SetMaxOpenConns) to at least Concurrency + 4, or handlers
	// queue for connections. Default 64.
	Concurrency int
	// Name is the consumer name handlers see (WithConsumer, for the Inbox
	// behavior). Default DefaultWorkerName ("tailrace-worker").
	Name string
	// Unmarshal decodes a command's payload into its Go type. It must match
	// the Outbox's Marshaler. Default encoding/json.Unmarshal.
	Unmarshal func(data []byte, v any) error

	// Partitions is the number of partitions the table is split into by the
	// hash of the partition key; each is served by one worker process at a
	// time, so it bounds how many workers share the work. All workers on
	// one table must use the same value. Default 16.
	Partitions int
	// BatchSize is the most rows one claim takes. Default 256.
	BatchSize int
	// MaxPending bounds the claimed rows held in memory (running, or
	// waiting behind an earlier command of their key or a retry). Default
	// 8 × BatchSize, at least Concurrency.
	MaxPending int
	// PollInterval is how often the worker looks for commands when nothing
	// woke it: the in-process Notifier wakes it on commits in this process,
	// and on PostgreSQL LISTEN wakes it on commits in processes that run
	// NotifyPostgres(db, Table, …), so polling is a fallback. Default 5 s
	// on PostgreSQL with LISTEN, 1 s otherwise (MySQL, SQLite,
	// DisableListen). Each poll is one statement, also when idle.
	PollInterval time.Duration
	// Notifier, when set, wakes the worker at once when a transaction in
	// this process enqueued commands and committed.
	Notifier *Notifier
	// DisableListen turns off PostgreSQL LISTEN on the channel named after
	// Table (NotifyPostgres(db, Table, …) in the enqueueing processes
	// sends to it). It holds one pooled connection.
	DisableListen bool
	// LeaseTTL is how long a partition lease lasts without renewal: a
	// worker that dies has its partitions taken over within about LeaseTTL.
	// Leases are renewed every LeaseTTL/3 (a few statements each time).
	// Default 15 s.
	LeaseTTL time.Duration
	// Owner names this worker in the leases table. Default
	// "<hostname>-<pid>-<random>"; unique among live workers.
	Owner string

	// MaxAttempts is how many times a command is tried in all before it is
	// dead-lettered. Default 10.
	MaxAttempts int
	// InitialInterval is the delay before the first retry. Default 500 ms.
	InitialInterval time.Duration
	// Multiplier grows the delay from one retry to the next. Default 2.
	Multiplier float64
	// MaxInterval caps the delay between retries. Default 1 min.
	MaxInterval time.Duration
	// Jitter randomizes each delay by ± this fraction. Default 0.2; a
	// negative value means none.
	Jitter float64
	// AckInterval is the longest the row of a command handled outside a
	// transaction waits before it is deleted in a batch. Default 20 ms.
	AckInterval time.Duration

	// CloseTimeout bounds how long Close waits for running handlers. Then
	// their contexts are cancelled; what did not finish stays in the table
	// and runs again on the next run. Default 30 s.
	CloseTimeout time.Duration

	// Observer, when set, is told of every command dead-lettered.
	Observer Observer
}

func (c *WorkerConfig) setDefaults() {
	if c.Concurrency == 0 {
		c.Concurrency = DefaultWorkerConcurrency
	}
	if c.Name == "" {
		c.Name = DefaultWorkerName
	}
	if c.Unmarshal == nil {
		c.Unmarshal = json.Unmarshal
	}
	if c.MaxAttempts == 0 {
		c.MaxAttempts = DefaultWorkerMaxAttempts
	}
	if c.LeaseTTL == 0 {
		c.LeaseTTL = DefaultWorkerLeaseTTL
	}
	if c.PollInterval == 0 {
		c.PollInterval = DefaultRelayPollInterval
		if c.Dialect != nil && c.Dialect.Name() == "postgres" && !c.DisableListen {
			c.PollInterval = DefaultWorkerPollInterval
		}
	}
}

// relayConfig maps the worker's configuration onto the engine's.
func (c WorkerConfig) relayConfig() RelayConfig {
	rc := RelayConfig{
		Dialect: c.Dialect, Table: c.Table,
		Partitions: c.Partitions, BatchSize: c.BatchSize,
		MaxInFlight: c.Concurrency, MaxPending: c.MaxPending,
		PollInterval: c.PollInterval, Notifier: c.Notifier, DisableListen: c.DisableListen,
		LeaseTTL: c.LeaseTTL, Owner: c.Owner,
		MaxAttempts: c.MaxAttempts, InitialInterval: c.InitialInterval, Multiplier: c.Multiplier,
		MaxInterval: c.MaxInterval, Jitter: c.Jitter, AckInterval: c.AckInterval,
		CloseTimeout: c.CloseTimeout, Observer: c.Observer,
	}
	rc.setDefaults()
	return rc
}

// Validate reports every problem of the configuration at once. NewWorker
// calls it after filling in defaults.
func (c WorkerConfig) Validate() error {
	var errs []error
	if c.Concurrency < 0 {
		errs = append(errs, fmt.Errorf("outbox: WorkerConfig.Concurrency must be positive, got %d", c.Concurrency))
	}
	if c.Concurrency > 10000 {
		errs = append(errs, fmt.Errorf("outbox: WorkerConfig.Concurrency is %d; at most 10000", c.Concurrency))
	}
	if err := validateField("WorkerConfig.Name", c.Name); err != nil {
		errs = append(errs, err)
	}
	rc := c.relayConfig()
	if err := rc.Validate(); err != nil {
		// The engine's checks, in the worker's words.
		errs = append(errs, errors.New(strings.ReplaceAll(err.Error(), "RelayConfig.", "WorkerConfig.")))
	}
	return errors.Join(errs...)
}

// commandFunc decodes a command's payload and dispatches it.
type commandFunc func(ctx context.Context, msg *message.Message) error

// Worker runs commands straight from a command table, with no broker: the
// commands a service enqueues for its own workers (Outbox.Enqueue with
// Config.CommandTable set). It is the relay's engine with the mediator as
// its sink: it claims rows in batches, shares the table's partitions with
// the other workers on it through leases, keeps the order of commands with
// one partition key (a key's next command starts only after the previous
// one finished: its transaction committed, or it was dead-lettered),
// handles up to Concurrency commands of different keys at once, wakes up on
// the Notifier and PostgreSQL notifications, retries failures with
// backoff, and dead-letters a command that failed MaxAttempts times, that
// failed with a tailrace.Permanent error, that panicked or whose kind has
// no handler — without holding other keys back.
//
// Guarantees, in plain words:
//
//   - A command whose handler runs inside the Transaction behavior (package
//     behaviors; it covers commands by default) runs exactly once: the
//     behavior deletes the command's row in the handler's own transaction
//     just before COMMIT (CompleteInTx), so the command's effects and its
//     completion commit together, or roll back together on failure, panic
//     or crash. If the worker lost the command's partition meanwhile, the
//     transaction rolls back (ErrNotClaimed) and the new owner runs it.
//   - A command whose handler runs outside a transaction runs at least
//     once: its row is deleted after the handler returned nil, in a batch
//     within AckInterval; a crash in between runs it again. Make such
//     handlers idempotent.
//   - Nothing is lost: a command stays in the table until it is done or
//     dead-lettered; a worker that dies leaves its partitions to the
//     others after LeaseTTL, and they run what it had not finished.
//
// Register handlers (HandleCommand, HandleFunc), then Run; Close stops it.
type Worker struct {
	e    *engine
	m    *mediator.Mediator
	cfg  WorkerConfig
	once sync.Once
	done chan struct{}
	err  error

	// hctx is the parent of handler contexts: cancelled when Close gives up
	// waiting for them.
	hctx    context.Context
	hcancel context.CancelFunc
	running sync.WaitGroup
	started chan struct{}

	mu      sync.Mutex
	kinds   map[string]commandFunc
	run     bool // Run was called
	closed  bool // Close was called
	runDone chan struct{}
}

// ErrWorkerClosed is returned by Run on a worker that was closed before it
// ran. A closed worker cannot run again: build a new one.
var ErrWorkerClosed = errors.New("outbox: worker closed")

// NewWorker builds a worker that runs the commands of cfg.Table in db
// through m. A nil logger discards; give one: the worker logs retries, dead
// letters and database errors there.
func NewWorker(db *sql.DB, m *mediator.Mediator, logger *slog.Logger, cfg WorkerConfig) (*Worker, error) {
	cfg.setDefaults()
	err := cfg.Validate()
	if db == nil {
		err = errors.Join(errors.New("outbox: NewWorker: db is nil"), err)
	}
	if m == nil {
		err = errors.Join(errors.New("outbox: NewWorker: mediator is nil"), err)
	}
	if err != nil {
		return nil, err
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	rc := cfg.relayConfig()
	logger = logger.With("outbox_table", rc.Table, "worker", rc.Owner)
	e := newEngine(db, logger, "outbox worker", rc)
	hctx, hcancel := context.WithCancel(context.Background())
	w := &Worker{
		e: e, m: m, cfg: cfg,
		done: make(chan struct{}), hctx: hctx, hcancel: hcancel,
		started: make(chan struct{}),
		kinds:   make(map[string]commandFunc),
		runDone: make(chan struct{}),
	}
	e.onCloseTimeout = hcancel
	return w, nil
}

// Owner is the name this worker holds leases under.
func (w *Worker) Owner() string { return w.e.cfg.Owner }

// HandleCommand registers the command type C with w: a command of C's kind
// (the name registered for C in the mediator, or C's Kind() method) is
// decoded into a C and dispatched with mediator.Send; its response is
// dropped. It must be called before Run and panics on a type without a
// kind, a duplicate kind or after Run: a Worker is configured once, at
// start-up.
//
//	outbox.HandleCommand[Deposit](worker)
func HandleCommand[C mediator.Request[R], R any](w *Worker) {
	var sample any
	if t := reflect.TypeFor[C](); t.Kind() == reflect.Pointer {
		sample = reflect.New(t.Elem()).Interface()
	} else {
		var zero C
		sample = zero
	}
	kind, err := w.m.KindOf(sample)
	if err != nil {
		panic(fmt.Errorf("outbox: %T has no kind (add a Kind() method or register a name in the mediator): %w", sample, err))
	}
	w.register(kind, func(ctx context.Context, msg *message.Message) error {
		var cmd C
		if err := w.cfg.Unmarshal(msg.Payload, &cmd); err != nil {
			return tailrace.Permanent(fmt.Errorf("outbox: decode command %s (kind %q): %w", msg.UUID, kind, err))
		}
		_, err := mediator.Send(ctx, w.m, cmd)
		if errors.Is(err, mediator.ErrNoHandler) {
			err = tailrace.Permanent(err)
		}
		return err
	})
}

// HandleFunc registers f for the commands of kind, for payloads that do not
// go through the mediator. msg carries the command's id (UUID), payload and
// metadata; ctx is the handler context (see Worker). f's row is deleted
// after it returns nil (at least once), unless f runs a transaction and
// calls CompleteInTx(ctx, tx, kind) before committing it (exactly once).
// It panics on an invalid or duplicate kind, or after Run.
func (w *Worker) HandleFunc(kind string, f func(ctx context.Context, msg *message.Message) error) {
	if err := mediator.ValidateKind(kind); err != nil {
		panic(fmt.Errorf("outbox: HandleFunc: %w", err))
	}
	if f == nil {
		panic("outbox: HandleFunc: nil handler")
	}
	w.register(kind, f)
}

func (w *Worker) register(kind string, f commandFunc) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.run {
		panic(fmt.Errorf("outbox: register kind %q before Run", kind))
	}
	if _, ok := w.kinds[kind]; ok {
		panic(fmt.Errorf("outbox: worker already handles kind %q", kind))
	}
	w.kinds[kind] = f
}

// Run runs commands until Close is called or ctx is cancelled, then shuts
// down as Close does. It returns an error when the worker cannot start or
// must stop (another live worker on the table uses a different partition
// count); it does not return on database outages: it retries them with
// backoff and logs.
func (w *Worker) Run(ctx context.Context) error {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return ErrWorkerClosed
	}
	if w.run {
		w.mu.Unlock()
		return errors.New("outbox: worker is already running")
	}
	w.run = true
	w.mu.Unlock()
	defer close(w.runDone)
	if err := w.e.start(w.dispatchLoop); err != nil {
		return err
	}
	close(w.started)
	select {
	case <-ctx.Done():
	case <-w.e.abandon:
	case <-w.done:
	}
	err := w.Close()
	if ferr := w.e.fatalErr(); ferr != nil {
		return ferr
	}
	return err
}

// Running is closed once the worker runs.
func (w *Worker) Running() <-chan struct{} { return w.started }

// Close stops claiming, waits up to CloseTimeout for the running handlers,
// then cancels the contexts of those still running (their transactions
// roll back); what did not finish stays in the table for the next run. It
// releases the worker's partitions so that other workers take them over at
// once. Close is idempotent.
func (w *Worker) Close() error {
	w.once.Do(func() {
		w.mu.Lock()
		w.closed = true
		w.mu.Unlock()
		err := w.e.close()
		w.hcancel()
		// Handlers whose contexts were cancelled return promptly unless
		// they ignore their context.
		waited := make(chan struct{})
		go func() { w.running.Wait(); close(waited) }()
		select {
		case <-waited:
		case <-time.After(5 * time.Second):
			err = errors.Join(err, errors.New("outbox: worker close: handlers still running after their contexts were cancelled"))
		}
		w.err = err
		close(w.done)
	})
	<-w.done
	return w.err
}

// workerBatch is how many rows the dispatcher takes per lock.
const workerBatch = 64

func (w *Worker) dispatchLoop() {
	batch := make([]*heldRow, 0, workerBatch)
	for {
		batch = w.e.take(batch[:0], workerBatch)
		if len(batch) == 0 {
			if !w.e.waitDispatch() {
				return
			}
			continue
		}
		for _, r := range batch {
			w.running.Add(1)
			go w.runRow(r)
		}
	}
}

// runRow runs one command and reports the outcome to the engine.
func (w *Worker) runRow(r *heldRow) {
	defer w.running.Done()
	inTx, err, reason := w.handle(r)
	switch {
	case err == nil && inTx:
		w.e.completed(r)
	case err == nil:
		w.e.acked(r)
	case errors.Is(err, ErrNotClaimed):
		// Its partition moved on (the new owner runs it) or the row is
		// gone already: nothing of this run was committed.
		w.e.log.Info("outbox worker: command no longer claimed by this worker; its transaction rolled back",
			"id", r.id, "uuid", r.uuid, "kind", r.kind)
		w.e.completed(r)
	case w.hctx.Err() != nil:
		// Close gave up waiting and cancelled the handler: not a failure of
		// the command. It stays in the table for the next run.
		w.e.requeue(r)
	default:
		w.e.failed(r, err, reason)
	}
}

// handle decodes and dispatches r; inTx reports that its row was deleted in
// the handler's transaction.
func (w *Worker) handle(r *heldRow) (inTx bool, err error, reason string) {
	var env envelope
	if jerr := json.Unmarshal(r.payload, &env); jerr != nil || env.UUID == "" {
		if jerr == nil {
			jerr = errors.New("no uuid")
		}
		return false, fmt.Errorf("outbox: command row %d is not a forwarder envelope: %w", r.id, jerr), reasonUnwrappable
	}
	w.mu.Lock()
	f, ok := w.kinds[r.kind]
	w.mu.Unlock()
	if !ok {
		return false, fmt.Errorf("outbox: worker has no handler for command kind %q (row %d)", r.kind, r.id), reasonPermanent
	}
	msg := message.NewMessage(env.UUID, env.Payload)
	for k, v := range env.Metadata {
		msg.Metadata.Set(k, v)
	}
	c := &completion{kind: r.kind, run: func(ctx context.Context, tx *sql.Tx) error {
		return w.e.q.complete(ctx, tx, r.id, w.e.token)
	}}
	ctx := w.handlerContext(msg, c)
	defer func() {
		if v := recover(); v != nil {
			inTx, err, reason = false, fmt.Errorf("outbox: command handler panicked: %v\n%s", v, debug.Stack()), reasonPanic
		}
	}()
	err = f(ctx, msg)
	return c.done.Load() && err == nil, err, ""
}

func (w *Worker) handlerContext(msg *message.Message, c *completion) context.Context {
	ctx := withCompletion(w.hctx, c)
	ctx = WithMessageID(ctx, msg.UUID)
	ctx = WithConsumer(ctx, w.cfg.Name)
	corr := msg.Metadata.Get(tailrace.MetaCorrelationID)
	if corr == "" {
		corr = msg.UUID
	}
	ctx = WithCorrelationID(ctx, corr)
	ctx = WithCausationID(ctx, msg.UUID)
	if t, tier := msg.Metadata.Get(tailrace.MetaTenant), msg.Metadata.Get(tailrace.MetaTenantTier); t != "" || tier != "" {
		ctx = WithTenant(ctx, t, tier)
	}
	return ctx
}
