package bus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"runtime/debug"
	"strconv"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/cenkalti/backoff/v5"

	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/internal/wlog"
	"github.com/tailrace/tailrace/mediator"
	"github.com/tailrace/tailrace/outbox"
)

// Defaults of ConsumerConfig.
const (
	DefaultConsumerName            = "tailrace"
	DefaultConsumerMaxAttempts     = 5
	DefaultConsumerInitialInterval = 100 * time.Millisecond
	DefaultConsumerMaxInterval     = 10 * time.Second
	DefaultConsumerMultiplier      = 2.0
	DefaultConsumerJitter          = 0.2
	DefaultPoisonTopic             = "tailrace_poison"
	DefaultConsumerCloseTimeout    = 30 * time.Second
	DefaultConsumerConcurrency     = 32
	// MaxPoisonReasonBytes bounds the reason stamped on a poisoned message
	// (broker headers are small).
	MaxPoisonReasonBytes = 2048
)

// Metadata a consumer stamps on a message it sends to the poison queue.
// Watermill's own keys (reason_poisoned, topic_poisoned, handler_poisoned)
// are set too, for tools that know them.
const (
	// MetaPoisonReason is the last error, truncated to MaxPoisonReasonBytes.
	MetaPoisonReason = "tailrace_poison_reason"
	// MetaPoisonAttempts is how many times the handler was tried.
	MetaPoisonAttempts = "tailrace_poison_attempts"
	// MetaPoisonPermanent is "true" when the error was permanent (unknown
	// kind, undecodable payload, tailrace.Permanent from the handler, a
	// panic), "false" when attempts ran out.
	MetaPoisonPermanent = "tailrace_poison_permanent"
	// MetaPoisonDestination is the destination the message was consumed
	// from.
	MetaPoisonDestination = "tailrace_poison_destination"
	// MetaPoisonConsumer is the consumer's name.
	MetaPoisonConsumer = "tailrace_poison_consumer"
	// MetaPoisonedAt is when it was poisoned, RFC 3339 with nanoseconds, UTC.
	MetaPoisonedAt = "tailrace_poisoned_at"
)

// The keys Watermill's PoisonQueue middleware sets (its package pulls in a
// circuit breaker library, so they are repeated here).
const (
	watermillReasonPoisoned  = "reason_poisoned"
	watermillTopicPoisoned   = "topic_poisoned"
	watermillHandlerPoisoned = "handler_poisoned"
)

// PanicError is a panic in a consumed message's handler, recovered. It is
// permanent: the message goes to the poison queue with the panic value and
// the start of the stack as the reason.
type PanicError struct {
	Value any
	Stack []byte
}

func (e *PanicError) Error() string {
	return fmt.Sprintf("bus: handler panicked: %v\n%s", e.Value, e.Stack)
}

// Errors of consumers. Match them with errors.Is.
var (
	// ErrUnknownKind: a consumed message has a kind no handler is
	// registered for (or none). It goes to the poison queue at once.
	ErrUnknownKind = errors.New("bus: no handler for the message kind")
	// ErrDecode: the payload does not decode into the kind's Go type. It
	// goes to the poison queue at once.
	ErrDecode = errors.New("bus: cannot decode the message payload")
	// ErrConsumerClosed: the consumer closed while a message waited for a
	// retry. The message is not acknowledged: the broker redelivers it.
	ErrConsumerClosed = errors.New("bus: consumer closed")
	// ErrConsumerRunning: a handler or subscription was added after Run.
	ErrConsumerRunning = errors.New("bus: consumer already running")
	// ErrDuplicateKind: a kind has a handler already.
	ErrDuplicateKind = errors.New("bus: kind already handled")
)

// ConsumerConfig configures a Consumer. The zero value is the recommended
// default, except for PoisonPublisher, which is required.
type ConsumerConfig struct {
	// Name names the consumer: the inbox records message ids under it
	// (outbox.WithConsumer), the router's handlers and the logs carry it.
	// Two consumers of the same messages in one database need different
	// names. Default DefaultConsumerName ("tailrace").
	Name string

	// Unmarshal decodes a payload into the registered Go type. It must
	// match the outbox's Marshaler. Default encoding/json.Unmarshal.
	Unmarshal func(data []byte, v any) error

	// MaxAttempts is how many times a message is handed to its handler,
	// the first time included, before it goes to the poison queue. Errors
	// marked tailrace.Permanent (and unknown kinds, undecodable payloads,
	// panics) go there after the first. Default 5.
	MaxAttempts int
	// InitialInterval is the wait before the second attempt. Default
	// 100 ms.
	InitialInterval time.Duration
	// MaxInterval caps the wait between attempts. Default 10 s.
	MaxInterval time.Duration
	// Multiplier grows the wait from one attempt to the next. Default 2.
	Multiplier float64
	// Jitter randomizes each wait by ± this fraction, in [0, 1). Default
	// 0.2; a negative value means none.
	Jitter float64

	// PoisonPublisher receives the messages that failed for good, with
	// the MetaPoison* metadata. Required: without a poison queue a message
	// that can never be handled would be redelivered forever and block
	// the ones behind it.
	PoisonPublisher message.Publisher
	// PoisonTopic is the topic they are published to. Default
	// DefaultPoisonTopic ("tailrace_poison").
	PoisonTopic string

	// Concurrency is how many handlers the consumer runs at once, over
	// all its subscriptions. Messages of one partition key
	// (tailrace.MetaPartitionKey) still run one after the other, in the
	// order they were delivered; different keys, and messages without a
	// key, run in parallel. A message waiting for its key's previous
	// message, or for a retry, does not take a place. Each handler inside
	// the Transaction behavior holds a database connection while it runs:
	// keep Concurrency at or below the pool's limit (sql.DB's
	// SetMaxOpenConns) minus what the rest of the service needs. The
	// subscriber must deliver several messages before their acks for this
	// to help (RabbitMQ's prefetch, NATS's MaxAckPending, ...; see
	// docs/bus.md). Default DefaultConsumerConcurrency (32); 1 handles one
	// message at a time.
	Concurrency int

	// CloseTimeout bounds how long Close waits for the handlers running
	// when it is called; their contexts are cancelled after it. Default
	// 30 s.
	CloseTimeout time.Duration

	// Middlewares wrap each handler inside the consumer's own (metrics,
	// tracing, a timeout); they see each attempt. Default none.
	Middlewares []message.HandlerMiddleware
}

func (c *ConsumerConfig) setDefaults() {
	if c.Name == "" {
		c.Name = DefaultConsumerName
	}
	if c.Unmarshal == nil {
		c.Unmarshal = json.Unmarshal
	}
	if c.MaxAttempts == 0 {
		c.MaxAttempts = DefaultConsumerMaxAttempts
	}
	if c.InitialInterval == 0 {
		c.InitialInterval = DefaultConsumerInitialInterval
	}
	if c.MaxInterval == 0 {
		c.MaxInterval = DefaultConsumerMaxInterval
	}
	if c.Multiplier == 0 {
		c.Multiplier = DefaultConsumerMultiplier
	}
	switch {
	case c.Jitter == 0:
		c.Jitter = DefaultConsumerJitter
	case c.Jitter < 0:
		c.Jitter = 0
	}
	if c.PoisonTopic == "" {
		c.PoisonTopic = DefaultPoisonTopic
	}
	if c.CloseTimeout == 0 {
		c.CloseTimeout = DefaultConsumerCloseTimeout
	}
	if c.Concurrency == 0 {
		c.Concurrency = DefaultConsumerConcurrency
	}
}

// Validate reports every problem of c at once. NewConsumer calls it after
// filling in the defaults.
func (c ConsumerConfig) Validate() error {
	var errs []error
	if len(c.Name) > outbox.MaxFieldLen {
		errs = append(errs, fmt.Errorf("bus: ConsumerConfig.Name is longer than %d bytes", outbox.MaxFieldLen))
	}
	if c.MaxAttempts < 1 {
		errs = append(errs, fmt.Errorf("bus: ConsumerConfig.MaxAttempts must be at least 1, got %d", c.MaxAttempts))
	}
	if c.InitialInterval < 0 {
		errs = append(errs, fmt.Errorf("bus: ConsumerConfig.InitialInterval must not be negative, got %v", c.InitialInterval))
	}
	if c.MaxInterval < c.InitialInterval {
		errs = append(errs, fmt.Errorf("bus: ConsumerConfig.MaxInterval %v is below InitialInterval %v", c.MaxInterval, c.InitialInterval))
	}
	if c.Multiplier < 1 {
		errs = append(errs, fmt.Errorf("bus: ConsumerConfig.Multiplier must be at least 1, got %v", c.Multiplier))
	}
	if c.Jitter >= 1 {
		errs = append(errs, fmt.Errorf("bus: ConsumerConfig.Jitter must be below 1, got %v", c.Jitter))
	}
	if c.PoisonPublisher == nil {
		errs = append(errs, errors.New("bus: ConsumerConfig.PoisonPublisher is required (a message that keeps failing must go somewhere)"))
	}
	if c.CloseTimeout < 0 {
		errs = append(errs, fmt.Errorf("bus: ConsumerConfig.CloseTimeout must not be negative, got %v", c.CloseTimeout))
	}
	if c.Concurrency < 1 {
		errs = append(errs, fmt.Errorf("bus: ConsumerConfig.Concurrency must be at least 1, got %d", c.Concurrency))
	}
	return errors.Join(errs...)
}

// dispatchFunc decodes a payload and dispatches it into the mediator.
type dispatchFunc func(ctx context.Context, msg *message.Message) error

// Consumer takes messages off the bus and dispatches them into a mediator:
// commands through mediator.Send (the seed sample's CommandWorker), events
// through mediator.Publish. It runs on Watermill's message.Router, one
// router handler per subscribed destination.
//
// Each message is decoded by its kind (tailrace.MetaKind): HandleCommand,
// HandleEvent and HandleFunc register, per kind, a closure that decodes into
// the concrete Go type and dispatches it, so the hot path uses no
// reflection.
//
// Concurrency and order: up to ConsumerConfig.Concurrency handlers run at
// once. Messages with the same partition key (tailrace.MetaPartitionKey,
// which the outbox stamps) are handled one after the other in the order the
// subscriber delivered them: a key's next handler starts only after the
// previous one has returned — inside the Transaction behavior, after its
// transaction committed. Messages of different keys, and messages without a
// key, run in parallel. A message waiting for a retry holds only its own
// key: it takes no place among the Concurrency while it waits, and other
// keys go on. Acknowledgements go out as messages finish, so they may reach
// the broker out of delivery order. If a message is given up rather than
// handled (Close, or the poison queue unreachable) it is nacked, and so are
// the messages of its key delivered after it, so that the broker redelivers
// them in order (RabbitMQ requeues in place; see docs/bus.md for the other
// transports).
//
// Around every handler, from the outside in:
//
//   - order: wait for the key's previous message (above);
//   - poison queue: a message that failed for good is published to
//     ConsumerConfig.PoisonTopic with the reason (MetaPoison* metadata) and
//     acknowledged, so it never blocks the ones behind it;
//   - retry: up to MaxAttempts attempts with exponential backoff; a
//     permanent error (tailrace.Permanent, an unknown kind, an undecodable
//     payload, a panic) is not retried; each attempt takes one of the
//     Concurrency places, the wait between attempts none;
//   - recover: a panic in the handler becomes a permanent error;
//   - context: the handler's context carries the message id
//     (outbox.WithMessageID, for the Inbox behavior), the consumer's name
//     (outbox.WithConsumer), the message's correlation id
//     (outbox.WithCorrelationID; its own id when it has none), the message
//     id as causation id (outbox.WithCausationID) and its tenant
//     (outbox.WithTenant), so that the messages the handler stages continue
//     the conversation; MessageFromContext returns the message itself.
//
// Exactly-once effects come from the mediator's behaviors, not from the
// Consumer: register Transaction and, inside it, Inbox on the mediator (see
// behaviors.Inbox). Brokers deliver at least once; the inbox drops the
// duplicates in the handler's transaction.
//
// The handler's context is not cancelled when the consumer starts closing:
// Close lets running handlers finish (their transactions commit and their
// messages are acked) for up to CloseTimeout, then cancels their contexts.
//
// Register handlers and subscriptions, then Run; Close stops it.
type Consumer struct {
	m      *mediator.Mediator
	logger *slog.Logger
	cfg    ConsumerConfig
	router *message.Router

	order *keyOrder
	turns sync.Map      // *message.Message -> *turn, from delivery to handler
	slots chan struct{} // one per running handler attempt, cap Concurrency

	mu      sync.Mutex
	kinds   map[string]dispatchFunc
	subs    map[string]bool
	running bool
	closed  bool
	runDone chan struct{}

	closing   chan struct{} // closed when the consumer starts closing
	closeOnce sync.Once
	abort     context.Context // cancelled CloseTimeout after closing starts
	abortNow  context.CancelFunc
}

// NewConsumer returns a consumer dispatching into m. A nil logger discards.
func NewConsumer(m *mediator.Mediator, logger *slog.Logger, cfg ConsumerConfig) (*Consumer, error) {
	cfg.setDefaults()
	err := cfg.Validate()
	if m == nil {
		err = errors.Join(errors.New("bus: NewConsumer needs a *mediator.Mediator"), err)
	}
	if err != nil {
		return nil, err
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	logger = logger.With(slog.String("consumer", cfg.Name))
	router, err := message.NewRouter(message.RouterConfig{CloseTimeout: cfg.CloseTimeout}, wlog.New(logger, false))
	if err != nil {
		return nil, fmt.Errorf("bus: NewConsumer: %w", err)
	}
	abort, abortNow := context.WithCancel(context.Background())
	return &Consumer{
		m: m, logger: logger, cfg: cfg, router: router,
		order:   newKeyOrder(),
		slots:   make(chan struct{}, cfg.Concurrency),
		kinds:   map[string]dispatchFunc{},
		subs:    map[string]bool{},
		closing: make(chan struct{}),
		runDone: make(chan struct{}),
		abort:   abort, abortNow: abortNow,
	}, nil
}

// Name returns the consumer's name.
func (c *Consumer) Name() string { return c.cfg.Name }

// HandleOption configures one registration.
type HandleOption func(*handleOptions)

type handleOptions struct{ kind string }

// WithKind gives the kind a registration handles, instead of the type's
// Kind() method or the name registered in the mediator.
func WithKind(kind string) HandleOption { return func(o *handleOptions) { o.kind = kind } }

// HandleCommand registers the command type C: a message of C's kind is
// decoded into a C and dispatched with mediator.Send (its response is
// dropped; a mediator without a handler for C is a permanent error). The
// kind comes from WithKind, C's Kind() method or the name
// registered for C in the mediator. It must be called before Run and
// panics on a missing or duplicate kind; a Consumer is configured once, at
// start-up.
//
//	bus.HandleCommand[PlaceOrder](consumer)
func HandleCommand[C mediator.Request[R], R any](c *Consumer, opts ...HandleOption) {
	kind := c.kindFor(sampleOf[C](), opts)
	c.register(kind, func(ctx context.Context, msg *message.Message) error {
		var cmd C
		if err := c.cfg.Unmarshal(msg.Payload, &cmd); err != nil {
			return tailrace.Permanent(fmt.Errorf("%w %s (kind %q): %w", ErrDecode, msg.UUID, kind, err))
		}
		_, err := mediator.Send(ctx, c.m, cmd)
		if errors.Is(err, mediator.ErrNoHandler) {
			// Configuration, not a passing failure: no retry will find one.
			err = tailrace.Permanent(err)
		}
		return err
	})
}

// HandleEvent registers the event (notification) type E: a message of E's
// kind is decoded into an E and dispatched with mediator.Publish to every
// handler the mediator has for E. Kind and panics as for HandleCommand.
//
//	bus.HandleEvent[OrderPlaced](consumer)
func HandleEvent[E mediator.Notifiable](c *Consumer, opts ...HandleOption) {
	kind := c.kindFor(sampleOf[E](), opts)
	c.register(kind, func(ctx context.Context, msg *message.Message) error {
		var ev E
		if err := c.cfg.Unmarshal(msg.Payload, &ev); err != nil {
			return tailrace.Permanent(fmt.Errorf("%w %s (kind %q): %w", ErrDecode, msg.UUID, kind, err))
		}
		return mediator.Publish(ctx, c.m, ev)
	})
}

// HandleFunc registers f for the messages of kind, for payloads that do not
// go through the mediator. ctx is the handler context described on
// Consumer. It panics on an invalid or duplicate kind, or after Run.
func (c *Consumer) HandleFunc(kind string, f func(ctx context.Context, msg *message.Message) error) {
	if err := mediator.ValidateKind(kind); err != nil {
		panic(fmt.Errorf("bus: HandleFunc: %w", err))
	}
	if f == nil {
		panic("bus: HandleFunc: nil handler")
	}
	c.register(kind, f)
}

// sampleOf returns a non-nil value of T where possible (for a pointer type,
// a pointer to a zero value), to ask its kind. Registration only.
func sampleOf[T any]() any {
	t := reflect.TypeFor[T]()
	if t.Kind() == reflect.Pointer {
		return reflect.New(t.Elem()).Interface()
	}
	var zero T
	return zero
}

func (c *Consumer) kindFor(sample any, opts []HandleOption) string {
	var o handleOptions
	for _, opt := range opts {
		opt(&o)
	}
	if o.kind != "" {
		if err := mediator.ValidateKind(o.kind); err != nil {
			panic(fmt.Errorf("bus: %w", err))
		}
		return o.kind
	}
	kind, err := c.m.KindOf(sample)
	if err != nil {
		panic(fmt.Errorf("bus: %T has no kind (add a Kind() method, register a name in the mediator or use bus.WithKind): %w", sample, err))
	}
	return kind
}

func (c *Consumer) register(kind string, f dispatchFunc) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.running {
		panic(fmt.Errorf("%w: register kind %q before Run", ErrConsumerRunning, kind))
	}
	if _, ok := c.kinds[kind]; ok {
		panic(fmt.Errorf("%w: %q", ErrDuplicateKind, kind))
	}
	c.kinds[kind] = f
}

// Kinds returns the kinds the consumer handles, in no particular order.
func (c *Consumer) Kinds() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]string, 0, len(c.kinds))
	for k := range c.kinds {
		out = append(out, k)
	}
	return out
}

// Subscribe consumes destination (a topic, queue or subject, as the
// subscriber understands it) with sub. Call it before Run, once per
// destination. The consumer does not close sub: the caller owns it (and may
// share it between consumers) and closes it after Close; the subscription
// itself ends when the consumer stops, by the cancellation of its context.
func (c *Consumer) Subscribe(destination string, sub message.Subscriber) error {
	if sub == nil {
		return errors.New("bus: Subscribe: nil subscriber")
	}
	if destination == "" {
		return errors.New("bus: Subscribe: empty destination")
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.running {
		return fmt.Errorf("%w: subscribe to %q before Run", ErrConsumerRunning, destination)
	}
	if c.subs[destination] {
		return fmt.Errorf("bus: consumer %q already subscribes to %q", c.cfg.Name, destination)
	}
	c.subs[destination] = true
	name := c.cfg.Name + "/" + destination
	h := c.router.AddConsumerHandler(name, destination, &sequenced{sub: sub, c: c}, c.handle)
	mws := []message.HandlerMiddleware{c.inTurn, c.poison(destination), c.retry, recoverer}
	mws = append(mws, c.cfg.Middlewares...)
	h.AddMiddleware(mws...)
	return nil
}

// sequenced is the subscriber the Router consumes through. It gives each
// message its turn in its key's queue as it is delivered — in delivery
// order, before the Router starts a goroutine for it — and hides the
// subscriber's Close from the Router, which would close it when it stops:
// the subscriber belongs to the caller, who may share it between consumers.
// The Router ends each subscription by cancelling its context instead.
type sequenced struct {
	sub message.Subscriber
	c   *Consumer
}

func (s *sequenced) Subscribe(ctx context.Context, topic string) (<-chan *message.Message, error) {
	in, err := s.sub.Subscribe(ctx, topic)
	if err != nil {
		return nil, err
	}
	out := make(chan *message.Message)
	go s.c.sequence(ctx, topic, in, out)
	return out, nil
}

func (*sequenced) Close() error { return nil }

// sequence forwards in to out, entering each message in its key's queue
// first. Once ctx is done it closes out and nacks what in still delivers
// until the subscriber closes it.
func (c *Consumer) sequence(ctx context.Context, destination string, in <-chan *message.Message, out chan<- *message.Message) {
	defer func() {
		close(out)
		for msg := range in {
			msg.Nack()
		}
	}()
	for {
		select {
		case msg, ok := <-in:
			if !ok {
				return
			}
			var key string
			if k := msg.Metadata.Get(tailrace.MetaPartitionKey); k != "" {
				// Keys are ordered per destination: deliveries of two
				// destinations have no order between them to keep.
				key = destination + "\x00" + k
			}
			t := c.order.enter(key)
			c.turns.Store(msg, t)
			select {
			case out <- msg:
			case <-ctx.Done():
				c.turns.Delete(msg)
				c.order.leave(t, false)
				msg.Nack()
				return
			}
		case <-ctx.Done():
			return
		}
	}
}

// inTurn is the outermost middleware: it waits for the message's turn in
// its key, runs the rest with a context that outlives the start of Close
// (up to CloseTimeout), and lets the key's next message go once this one is
// settled.
func (c *Consumer) inTurn(h message.HandlerFunc) message.HandlerFunc {
	return func(msg *message.Message) (_ []*message.Message, err error) {
		var t *turn
		if v, ok := c.turns.LoadAndDelete(msg); ok {
			t = v.(*turn)
		} else {
			t = c.order.enter("") // not delivered through sequence: no key order to keep
		}
		handled := false
		defer func() { c.order.leave(t, handled) }()
		select {
		case <-t.ready():
		case <-c.closing:
			return nil, fmt.Errorf("%w: message %s left for redelivery", ErrConsumerClosed, msg.UUID)
		}
		if !t.predecessorOK() {
			return nil, fmt.Errorf("bus: message %s left for redelivery: the message before it with partition key %q was not handled",
				msg.UUID, msg.Metadata.Get(tailrace.MetaPartitionKey))
		}
		ctx, cancel := context.WithCancel(context.WithoutCancel(msg.Context()))
		defer cancel()
		defer context.AfterFunc(c.abort, cancel)()
		msg.SetContext(ctx)
		out, err := h(msg)
		handled = err == nil
		return out, err
	}
}

// stop starts closing: waits give up at once, running handlers get
// CloseTimeout before their contexts are cancelled.
func (c *Consumer) stop() {
	c.closeOnce.Do(func() {
		close(c.closing)
		time.AfterFunc(c.cfg.CloseTimeout, c.abortNow)
	})
}

// Run consumes until ctx is done or Close is called, then returns once the
// messages being handled are done (up to CloseTimeout). A Consumer runs
// once: Run after Close returns ErrConsumerClosed, a second Run
// ErrConsumerRunning.
func (c *Consumer) Run(ctx context.Context) error {
	c.mu.Lock()
	switch {
	case c.closed:
		c.mu.Unlock()
		return ErrConsumerClosed
	case c.running:
		c.mu.Unlock()
		return ErrConsumerRunning
	}
	c.running = true
	c.mu.Unlock()
	defer close(c.runDone)
	defer c.abortNow() // handlers still running after CloseTimeout
	go func() {
		select {
		case <-ctx.Done():
			c.stop()
		case <-c.runDone:
		}
	}()
	return c.router.Run(ctx)
}

// Running is closed once every subscription is consuming.
func (c *Consumer) Running() <-chan struct{} { return c.router.Running() }

// Close stops consuming and waits (up to CloseTimeout) for the handlers
// running; after CloseTimeout their contexts are cancelled. Messages
// waiting for their key's previous message or for a retry are nacked at
// once, left for the broker to redeliver to the next run. Close before Run
// just prevents it from running. Close is idempotent.
func (c *Consumer) Close() error {
	c.stop()
	c.mu.Lock()
	c.closed = true
	running := c.running
	c.mu.Unlock()
	if !running {
		// Watermill's Router waits for handlers that never started.
		return nil
	}
	select {
	case <-c.router.Running():
	case <-c.runDone:
		return nil // Run failed before it started consuming
	}
	return c.router.Close()
}

type messageKey struct{}

// MessageFromContext returns the message a consumer is handling, from the
// context its handler got. Do not modify it.
func MessageFromContext(ctx context.Context) (*message.Message, bool) {
	m, ok := ctx.Value(messageKey{}).(*message.Message)
	return m, ok
}

// handle is the router handler: find the kind's dispatcher, build the
// handler's context, dispatch.
func (c *Consumer) handle(msg *message.Message) error {
	kind := msg.Metadata.Get(tailrace.MetaKind)
	c.mu.Lock()
	f, ok := c.kinds[kind]
	c.mu.Unlock()
	if !ok {
		return tailrace.Permanent(fmt.Errorf("%w %q (message %s)", ErrUnknownKind, kind, msg.UUID))
	}
	return f(c.handlerContext(msg), msg)
}

func (c *Consumer) handlerContext(msg *message.Message) context.Context {
	ctx := msg.Context()
	ctx = context.WithValue(ctx, messageKey{}, msg)
	ctx = outbox.WithMessageID(ctx, msg.UUID)
	ctx = outbox.WithConsumer(ctx, c.cfg.Name)
	corr := msg.Metadata.Get(tailrace.MetaCorrelationID)
	if corr == "" {
		corr = msg.UUID
	}
	ctx = outbox.WithCorrelationID(ctx, corr)
	ctx = outbox.WithCausationID(ctx, msg.UUID)
	if t, tier := msg.Metadata.Get(tailrace.MetaTenant), msg.Metadata.Get(tailrace.MetaTenantTier); t != "" || tier != "" {
		ctx = outbox.WithTenant(ctx, t, tier)
	}
	return ctx
}

// attemptsError carries the number of attempts from retry to poison.
type attemptsError struct {
	attempts int
	err      error
}

func (e *attemptsError) Error() string { return e.err.Error() }
func (e *attemptsError) Unwrap() error { return e.err }

// retry runs the handler up to MaxAttempts times with backoff. A permanent
// error stops it at once.
func (c *Consumer) retry(h message.HandlerFunc) message.HandlerFunc {
	return func(msg *message.Message) ([]*message.Message, error) {
		b := backoff.NewExponentialBackOff()
		b.InitialInterval = c.cfg.InitialInterval
		b.MaxInterval = c.cfg.MaxInterval
		b.Multiplier = c.cfg.Multiplier
		b.RandomizationFactor = c.cfg.Jitter
		for attempt := 1; ; attempt++ {
			if !c.takeSlot() {
				return nil, fmt.Errorf("%w: message %s left for redelivery before attempt %d", ErrConsumerClosed, msg.UUID, attempt)
			}
			out, err := c.attempt(h, msg)
			if err == nil {
				return out, nil
			}
			if tailrace.IsPermanent(err) || attempt >= c.cfg.MaxAttempts {
				return nil, &attemptsError{attempts: attempt, err: err}
			}
			wait := b.NextBackOff()
			c.logger.LogAttrs(msg.Context(), slog.LevelWarn, "bus: handler failed, retrying",
				slog.String("message_id", msg.UUID), slog.String("kind", msg.Metadata.Get(tailrace.MetaKind)),
				slog.Int("attempt", attempt), slog.Duration("wait", wait), slog.String("error", err.Error()))
			t := time.NewTimer(wait)
			select {
			case <-t.C:
			case <-c.closing:
				t.Stop()
				return nil, fmt.Errorf("%w after attempt %d of message %s: %w", ErrConsumerClosed, attempt, msg.UUID, err)
			case <-msg.Context().Done():
				t.Stop()
				return nil, fmt.Errorf("bus: message %s: %w (after attempt %d: %w)", msg.UUID, msg.Context().Err(), attempt, err)
			}
		}
	}
}

// takeSlot waits for one of the Concurrency places; false when the
// consumer closes first (no new attempt starts once it is closing).
func (c *Consumer) takeSlot() bool {
	select {
	case <-c.closing:
		return false
	default:
	}
	select {
	case c.slots <- struct{}{}:
		return true
	case <-c.closing:
		return false
	}
}

// attempt runs h once in one of the Concurrency places.
func (c *Consumer) attempt(h message.HandlerFunc, msg *message.Message) ([]*message.Message, error) {
	defer func() { <-c.slots }()
	return h(msg)
}

// recoverer turns a panic in the handler into a permanent error.
func recoverer(h message.HandlerFunc) message.HandlerFunc {
	return func(msg *message.Message) (out []*message.Message, err error) {
		defer func() {
			if v := recover(); v != nil {
				err = tailrace.Permanent(&PanicError{Value: v, Stack: debug.Stack()})
			}
		}()
		return h(msg)
	}
}

// poison publishes a message that failed for good to the poison queue and
// acknowledges it. A message interrupted by Close is not poisoned: it is
// nacked for redelivery.
func (c *Consumer) poison(destination string) message.HandlerMiddleware {
	return func(h message.HandlerFunc) message.HandlerFunc {
		return func(msg *message.Message) ([]*message.Message, error) {
			out, err := h(msg)
			if err == nil {
				return out, nil
			}
			var ae *attemptsError
			if !errors.As(err, &ae) {
				// Interrupted by Close or by the message's context: let
				// the broker redeliver it.
				return nil, err
			}
			reason := ae.err.Error()
			if len(reason) > MaxPoisonReasonBytes {
				reason = reason[:MaxPoisonReasonBytes]
			}
			p := msg.Copy()
			permanent := tailrace.IsPermanent(ae.err)
			p.Metadata.Set(MetaPoisonReason, reason)
			p.Metadata.Set(MetaPoisonAttempts, strconv.Itoa(ae.attempts))
			p.Metadata.Set(MetaPoisonPermanent, strconv.FormatBool(permanent))
			p.Metadata.Set(MetaPoisonDestination, destination)
			p.Metadata.Set(MetaPoisonConsumer, c.cfg.Name)
			p.Metadata.Set(MetaPoisonedAt, time.Now().UTC().Format(time.RFC3339Nano))
			p.Metadata.Set(watermillReasonPoisoned, reason)
			p.Metadata.Set(watermillTopicPoisoned, destination)
			p.Metadata.Set(watermillHandlerPoisoned, message.HandlerNameFromCtx(msg.Context()))
			if perr := c.cfg.PoisonPublisher.Publish(c.cfg.PoisonTopic, p); perr != nil {
				c.logger.LogAttrs(msg.Context(), slog.LevelError, "bus: cannot publish to the poison queue; the message will be redelivered",
					slog.String("message_id", msg.UUID), slog.String("poison_topic", c.cfg.PoisonTopic),
					slog.String("error", perr.Error()), slog.String("reason", reason))
				return nil, errors.Join(err, fmt.Errorf("bus: publish to poison queue %q: %w", c.cfg.PoisonTopic, perr))
			}
			c.logger.LogAttrs(msg.Context(), slog.LevelError, "bus: message sent to the poison queue",
				slog.String("message_id", msg.UUID), slog.String("kind", msg.Metadata.Get(tailrace.MetaKind)),
				slog.String("destination", destination), slog.Int("attempts", ae.attempts),
				slog.Bool("permanent", permanent), slog.String("reason", reason))
			return nil, nil
		}
	}
}
