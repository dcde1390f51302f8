package outbox

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill/components/forwarder"
	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/tailrace/tailrace/internal/wlog"
)

// Defaults of RelayConfig.
const (
	DefaultRelayPartitions   = 16
	DefaultRelayBatchSize    = 256
	DefaultRelayMaxInFlight  = 512
	DefaultRelayPollInterval = time.Second
	DefaultRelayLeaseTTL     = 10 * time.Second
	DefaultRelayMaxAttempts  = 10
	DefaultRelayCloseTimeout = 30 * time.Second
)

// RelayConfig configures a Relay. The zero value of every field but Dialect
// and Table means "the default" given in its doc.
type RelayConfig struct {
	// Dialect of the database holding the outbox. Required.
	Dialect Dialect
	// Table is the outbox table (the forwarder topic staging wrote to).
	// Required.
	Table string

	// Partitions is the number of partitions the outbox is split into by
	// the hash of the partition key; each is relayed by one relay at a time,
	// so it bounds how many relays can share the work. Every relay on one
	// table must use the same value: a relay stops with an error next to an
	// older live relay configured differently. Default 16.
	Partitions int
	// BatchSize is the most rows one claim query takes. Default 256.
	BatchSize int
	// MaxInFlight is the most messages handed to the forwarder and not yet
	// acknowledged (published and confirmed) at once. Default 512.
	//
	// A crashed relay's successor re-sends at most MaxInFlight +
	// 2 × BatchSize messages: the ones in flight, and the confirmed ones
	// whose rows were not yet deleted (the relay stops sending while two
	// batches wait for their DELETE).
	MaxInFlight int
	// MaxPending bounds the claimed rows held in memory, in flight or
	// waiting behind an earlier message of their key or a retry. Claiming
	// pauses at this bound. Default 8 × BatchSize, at least MaxInFlight.
	MaxPending int

	// PollInterval is how often the relay looks for rows when nothing woke
	// it (no Notifier signal, no PostgreSQL notification). Default 1 s.
	PollInterval time.Duration
	// Notifier, when set, wakes the relay at once when a transaction in this
	// process staged messages and committed.
	Notifier *Notifier
	// DisableListen turns off PostgreSQL LISTEN (which wakes the relay on
	// commits made by other processes). It holds one pooled connection.
	DisableListen bool

	// LeaseTTL is how long a partition lease lasts without renewal; leases
	// are renewed every LeaseTTL/3. A relay that dies without releasing
	// its partitions has them taken over within about LeaseTTL. Default 10 s.
	LeaseTTL time.Duration
	// Owner names this relay in the leases table. Default
	// "<hostname>-<pid>-<random>". It must be unique among live relays.
	Owner string

	// MaxAttempts is how many times a message is tried in all before it is
	// dead-lettered (Synapse's MaxRetryAttempts). Default 10.
	MaxAttempts int
	// InitialInterval is the delay before the first retry (Synapse's
	// InitialRetryDelay). Default 500 ms.
	InitialInterval time.Duration
	// Multiplier grows the delay from one retry to the next (Synapse's
	// BackoffFactor). Default 2.
	Multiplier float64
	// MaxInterval caps the delay between retries. Default 1 min.
	MaxInterval time.Duration
	// Jitter randomizes each delay by ± this fraction. Default 0.2; set a
	// negative value for none.
	Jitter float64

	// AckInterval is the longest an acknowledged row waits before the batch
	// of acknowledged rows is deleted (or stamped, with Retention). A crash
	// re-relays at most the rows not yet deleted. Default 20 ms.
	AckInterval time.Duration
	// Retention, when positive, keeps relayed rows (relayed_at set) that long
	// before a cleaner deletes them in bounded batches. Zero deletes rows as
	// soon as they are acknowledged. Default 0.
	Retention time.Duration
	// CleanupInterval is how often the cleaner runs with Retention. Default
	// 1 min.
	CleanupInterval time.Duration

	// CloseTimeout bounds how long Close waits for messages in flight to be
	// confirmed. What is not confirmed by then is not acknowledged: it stays
	// in the outbox and is relayed again. Default 30 s.
	CloseTimeout time.Duration

	// Observer, when set, is told of every message the relay
	// dead-letters (Metrics implements it). Optional.
	Observer Observer

	// Middlewares decorate the forwarder's handler (inside the relay's own
	// error-capturing middleware): Watermill's metrics, tracing, a
	// timeout. A middleware that swallows an error acknowledges the message.
	Middlewares []message.HandlerMiddleware
}

func (c *RelayConfig) setDefaults() {
	if c.Partitions == 0 {
		c.Partitions = DefaultRelayPartitions
	}
	if c.BatchSize == 0 {
		c.BatchSize = DefaultRelayBatchSize
	}
	if c.MaxInFlight == 0 {
		c.MaxInFlight = DefaultRelayMaxInFlight
	}
	if c.MaxPending == 0 {
		c.MaxPending = max(8*c.BatchSize, c.MaxInFlight)
	}
	if c.PollInterval == 0 {
		c.PollInterval = DefaultRelayPollInterval
	}
	if c.LeaseTTL == 0 {
		c.LeaseTTL = DefaultRelayLeaseTTL
	}
	if c.Owner == "" {
		host, _ := os.Hostname()
		var b [4]byte
		_, _ = rand.Read(b[:])
		c.Owner = fmt.Sprintf("%s-%d-%s", host, os.Getpid(), hex.EncodeToString(b[:]))
	}
	if c.MaxAttempts == 0 {
		c.MaxAttempts = DefaultRelayMaxAttempts
	}
	if c.InitialInterval == 0 {
		c.InitialInterval = 500 * time.Millisecond
	}
	if c.Multiplier == 0 {
		c.Multiplier = 2
	}
	if c.MaxInterval == 0 {
		c.MaxInterval = time.Minute
	}
	if c.Jitter == 0 {
		c.Jitter = 0.2
	} else if c.Jitter < 0 {
		c.Jitter = 0
	}
	if c.AckInterval == 0 {
		c.AckInterval = 20 * time.Millisecond
	}
	if c.CleanupInterval == 0 {
		c.CleanupInterval = time.Minute
	}
	if c.CloseTimeout == 0 {
		c.CloseTimeout = DefaultRelayCloseTimeout
	}
}

// Validate reports every problem of the configuration at once. NewRelay
// calls it after filling in defaults.
func (c *RelayConfig) Validate() error {
	var errs []error
	if c.Dialect == nil {
		errs = append(errs, errors.New("outbox: RelayConfig.Dialect is nil; use outbox.PostgreSQL, outbox.MySQL or outbox.SQLite"))
	}
	if err := ValidateTableName(c.Table); err != nil {
		errs = append(errs, fmt.Errorf("outbox: RelayConfig.Table: %w", err))
	}
	positive := func(name string, v int) {
		if v <= 0 {
			errs = append(errs, fmt.Errorf("outbox: RelayConfig.%s must be positive, got %d", name, v))
		}
	}
	positive("Partitions", c.Partitions)
	positive("BatchSize", c.BatchSize)
	positive("MaxInFlight", c.MaxInFlight)
	positive("MaxPending", c.MaxPending)
	positive("MaxAttempts", c.MaxAttempts)
	if c.Partitions > 4096 {
		errs = append(errs, fmt.Errorf("outbox: RelayConfig.Partitions is %d; at most 4096", c.Partitions))
	}
	if c.MaxPending < c.BatchSize {
		errs = append(errs, fmt.Errorf("outbox: RelayConfig.MaxPending (%d) is smaller than BatchSize (%d)", c.MaxPending, c.BatchSize))
	}
	durs := []struct {
		name string
		v    time.Duration
	}{
		{"PollInterval", c.PollInterval}, {"LeaseTTL", c.LeaseTTL}, {"InitialInterval", c.InitialInterval},
		{"MaxInterval", c.MaxInterval}, {"AckInterval", c.AckInterval}, {"CleanupInterval", c.CleanupInterval},
		{"CloseTimeout", c.CloseTimeout},
	}
	for _, d := range durs {
		if d.v <= 0 {
			errs = append(errs, fmt.Errorf("outbox: RelayConfig.%s must be positive, got %s", d.name, d.v))
		}
	}
	if c.LeaseTTL > 0 && c.LeaseTTL < 300*time.Millisecond {
		errs = append(errs, fmt.Errorf("outbox: RelayConfig.LeaseTTL is %s; at least 300ms", c.LeaseTTL))
	}
	if c.Retention < 0 {
		errs = append(errs, fmt.Errorf("outbox: RelayConfig.Retention must not be negative, got %s", c.Retention))
	}
	if c.Multiplier < 1 {
		errs = append(errs, fmt.Errorf("outbox: RelayConfig.Multiplier must be at least 1, got %g", c.Multiplier))
	}
	if c.Jitter >= 1 {
		errs = append(errs, fmt.Errorf("outbox: RelayConfig.Jitter must be below 1, got %g", c.Jitter))
	}
	if len(c.Owner) > 255 {
		errs = append(errs, fmt.Errorf("outbox: RelayConfig.Owner is %d bytes; at most 255", len(c.Owner)))
	}
	return errors.Join(errs...)
}

// Relay moves committed outbox rows to the broker: a Watermill
// forwarder.Forwarder and message.Router fed by the relay's own outbox
// subscriber, which claims rows in batches, keeps many messages in flight,
// keeps commit order per partition key, retries with backoff, dead-letters
// what keeps failing and deletes what the publisher confirmed. Several
// relays (processes) may run on one outbox: partitions are shared out
// through leases in the database.
type Relay struct {
	sub  *subscriber
	fwd  *forwarder.Forwarder
	cfg  RelayConfig
	once sync.Once
	done chan struct{}
	err  error

	mu      sync.Mutex
	started bool // Run was called
	closed  bool // Close was called

	db     *sql.DB      // for the schema check at start (migrate.go)
	logger *slog.Logger // the relay's
}

// ErrRelayClosed is returned by Run on a relay that was closed before it
// ran. A closed relay cannot run again: build a new one.
var ErrRelayClosed = errors.New("outbox: relay closed")

// NewRelay builds a relay that reads the outbox table cfg.Table in db and
// publishes every message to its destination topic through publisher. With
// publisher confirms (watermill-amqp's ConfirmDelivery, a synchronous
// publisher) a row is deleted only after the broker confirmed its message.
// A nil logger discards; give one: the relay logs retries, dead letters,
// outages and database errors there. Run starts it.
func NewRelay(db *sql.DB, publisher message.Publisher, logger *slog.Logger, cfg RelayConfig) (*Relay, error) {
	if db == nil {
		return nil, errors.New("outbox: NewRelay: db is nil")
	}
	if publisher == nil {
		return nil, errors.New("outbox: NewRelay: publisher is nil")
	}
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	logger = logger.With("outbox_table", cfg.Table, "relay", cfg.Owner)
	// The router's lifecycle chatter (adding, starting, closing) is debug
	// here; its per-message errors stay errors.
	wlogger := wlog.New(logger, true)
	sub := newSubscriber(db, logger, cfg)
	mws := append([]message.HandlerMiddleware{captureError}, cfg.Middlewares...)
	fwd, err := forwarder.NewForwarder(sub, publisher, wlogger, forwarder.Config{
		ForwarderTopic: cfg.Table,
		Middlewares:    mws,
		// The subscriber's Close already waited CloseTimeout for the
		// messages in flight; the router only needs a little more.
		CloseTimeout: cfg.CloseTimeout + 5*time.Second,
	})
	if err != nil {
		return nil, fmt.Errorf("outbox: NewRelay: %w", err)
	}
	return &Relay{sub: sub, fwd: fwd, cfg: cfg, done: make(chan struct{}), db: db, logger: logger}, nil
}

// Owner is the name this relay holds leases under.
func (r *Relay) Owner() string { return r.cfg.Owner }

// Output reports the state of the relay's output as the relay sees it:
// whether it is in outage mode (publishing fails for a reason that is not
// the messages'), since when, the latest failure, and how many messages
// the relay holds waiting. HealthConfig.Relay turns it into the health
// check's "publisher" component and Metrics.ObserveRelay into gauges.
// Safe to call at any time, from any goroutine.
func (r *Relay) Output() OutputStatus { return r.sub.output() }

// Run relays until Close is called or ctx is cancelled, then shuts down as
// Close does. It returns an error when the relay cannot start or must stop
// (another live relay on the table uses a different partition count; the
// schema is newer than this code or misses a table: a *SchemaError, see
// CheckSchema — an older schema is only logged); it does not return on
// database or broker outages: it retries them with backoff and logs.
func (r *Relay) Run(ctx context.Context) error {
	r.mu.Lock()
	closed := r.closed
	r.mu.Unlock()
	if closed {
		return ErrRelayClosed
	}
	// A schema newer than this code, or missing, stops here with a clear
	// error rather than failing query by query.
	if err := checkSchemaAtStart(ctx, r.db, r.cfg.Dialect, r.cfg.Table, r.logger); err != nil {
		return err
	}
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return ErrRelayClosed
	}
	r.started = true
	r.mu.Unlock()
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		select {
		case <-ctx.Done():
			_ = r.Close()
		case <-stop:
		}
	}()
	err := r.fwd.Run(context.WithoutCancel(ctx))
	// The router returns once its handler stopped, which is when the
	// subscriber stopped emitting; wait for the subscriber's own close
	// (acks flushed, leases released) before the caller closes the db.
	if cerr := r.sub.Close(); cerr != nil && err == nil {
		err = cerr
	}
	if ferr := r.sub.fatalErr(); ferr != nil {
		return ferr
	}
	return err
}

// Running is closed once the relay runs.
func (r *Relay) Running() <-chan struct{} { return r.fwd.Running() }

// Close stops claiming, waits up to CloseTimeout for the messages in flight
// to be confirmed, deletes the rows of those that were, and releases the
// relay's partitions so other relays take them over at once. Nothing
// unconfirmed is acknowledged. Close is idempotent; on a relay that never
// ran it returns at once, and a later Run returns ErrRelayClosed.
func (r *Relay) Close() error {
	r.once.Do(func() {
		r.mu.Lock()
		r.closed = true
		started := r.started
		r.mu.Unlock()
		var err error
		if started {
			// A router that never ran would wait out its close timeout
			// for handlers that never started.
			err = r.fwd.Close()
		}
		// The router closes the subscriber only if Run got that far.
		r.err = errors.Join(err, r.sub.Close())
		close(r.done)
	})
	<-r.done
	return r.err
}

// errHolder carries the forwarder's error from the handler to the
// subscriber, which sees only Nack.
type errHolder struct {
	mu  sync.Mutex
	err error
}

func (h *errHolder) set(err error) {
	h.mu.Lock()
	h.err = err
	h.mu.Unlock()
}

func (h *errHolder) get() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.err
}

type errHolderKey struct{}

// captureError is the outermost forwarder middleware: it stores the error
// the handler chain returned in the message's errHolder, so that the
// subscriber can tell a permanent error from a transient one on Nack, and
// it refuses messages the relay already gave up on.
func captureError(h message.HandlerFunc) message.HandlerFunc {
	return func(msg *message.Message) ([]*message.Message, error) {
		if err := msg.Context().Err(); err != nil {
			// The relay gave up on this message (Close timed out) before the
			// router got to run it: publishing now would only duplicate it.
			return nil, err
		}
		out, err := h(msg)
		if err != nil {
			if eh, ok := msg.Context().Value(errHolderKey{}).(*errHolder); ok {
				eh.set(err)
			}
		}
		return out, err
	}
}

func randomToken() int64 {
	var b [8]byte
	_, _ = rand.Read(b[:])
	t := int64(binary.BigEndian.Uint64(b[:]) & 0x7fffffffffffffff)
	if t == 0 {
		t = 1
	}
	return t
}
