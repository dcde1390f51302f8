// Package sqlbus uses a PostgreSQL database as a message broker, for the
// tailrace bus: no broker to run, and messages as durable as the database.
//
// It is a thin, configured constructor over watermill-sql/v3 with its
// default PostgreSQL schema and offsets adapters: a topic is a table
// (watermill_<topic>) of messages plus a table of consumer-group offsets
// (watermill_offsets_<topic>).
//
// Guarantees:
//   - Publish returns nil once the INSERT committed: the message is as
//     durable as the database (fsync on). The messages of one Publish call
//     are one INSERT, so they are stored all or none.
//   - A message published before anyone consumes is kept: a consumer group
//     starts from the first row. Rows are never deleted by this package.
//   - Each consumer group receives every message once it acked it
//     (at-least-once: a crash between the handler and the offset update
//     redelivers), in insertion order, one group member at a time.
//   - Failures of the database connection (no connection, a connection
//     refused, reset or timed out, SQLSTATE class 08, a server shutting
//     down or refusing connections, out of resources) are marked with
//     tailrace.Unavailable: the outbox relay takes them for an outage and
//     counts no attempt against the message. Other SQL errors (a missing
//     table, a payload the column refuses) are the message's.
//   - One message at a time, with a transaction open meanwhile (not
//     fixed here; see docs/bus.md): watermill-sql v3.1.0's subscriber reads
//     a batch of up to BatchSize rows in a REPEATABLE READ transaction that
//     locks the group's offsets row (SELECT ... FOR UPDATE), hands over one
//     message, waits for its ack, records the offset in that transaction,
//     and commits after the batch. The transaction therefore stays open
//     ("idle in transaction") for as long as the handlers of the batch
//     take, one after the other, and holds back, by the visibility rule
//     below, every sqlbus subscriber on the server meanwhile. A concurrent
//     bus.Consumer gets one message at a time from it.
//   - Latency is the poll interval (Config.PollInterval) when idle. A
//     subscriber sees only messages whose transaction is older than the
//     oldest transaction still open anywhere on the PostgreSQL server
//     (watermill-sql's guard against skipping late commits), so a
//     long-running transaction — in any database of the cluster — holds
//     back delivery until it ends.
//
// Schema creation is explicit: call InitializeSchema for each topic at
// start-up or in a migration, or set Config.InitializeSchema. It cannot run
// inside a transaction (CREATE TABLE would commit it).
//
// Topic names are validated before any SQL is built: letters, digits and
// - $ : . _ only, and short enough that PostgreSQL does not truncate the
// table names (which would map two topics to one table).
package sqlbus

import (
	"context"
	stdsql "database/sql"
	"errors"
	"fmt"
	"regexp"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	wsql "github.com/ThreeDotsLabs/watermill-sql/v3/pkg/sql"
	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/tailrace/tailrace/internal/transport"
)

// Defaults for Config fields left at their zero value.
const (
	DefaultConsumerGroup  = "default"
	DefaultPollInterval   = 100 * time.Millisecond
	DefaultResendInterval = time.Second
	DefaultAckDeadline    = 30 * time.Second
	DefaultBatchSize      = 100
	DefaultPayloadType    = "BYTEA"
)

// MaxTopicLen is the longest topic whose table names PostgreSQL keeps whole:
// 63 bytes minus len("watermill_offsets_").
const MaxTopicLen = 63 - len("watermill_offsets_")

// ErrInvalidTopic: the topic has characters other than letters, digits and
// - $ : . _, or is longer than MaxTopicLen bytes.
var ErrInvalidTopic = errors.New("bus/sqlbus: invalid topic")

var topicRe = regexp.MustCompile(`^[A-Za-z0-9\-\$\:\.\_]+$`)

// ValidateTopic reports whether topic can name a table pair.
func ValidateTopic(topic string) error {
	switch {
	case !topicRe.MatchString(topic):
		return fmt.Errorf("%w %q: use letters, digits and - $ : . _", ErrInvalidTopic, topic)
	case len(topic) > MaxTopicLen:
		return fmt.Errorf("%w %q: longer than %d bytes, PostgreSQL would truncate its table names", ErrInvalidTopic, topic, MaxTopicLen)
	}
	return nil
}

// Config configures a Publisher and a Subscriber.
type Config struct {
	// ConsumerGroup names the subscriber's offsets: subscribers with the
	// same group share the messages, each group gets all of them. Default
	// "default".
	ConsumerGroup string
	// PollInterval is the wait between queries when no message is pending.
	// Default 100ms (watermill-sql's is 1s).
	PollInterval time.Duration
	// ResendInterval is the wait before redelivering a nacked message.
	// Default 1s.
	ResendInterval time.Duration
	// AckDeadline redelivers a message not acked within it. Default 30s.
	AckDeadline time.Duration
	// BatchSize is how many messages one query reads. Default 100; 1 is the
	// fewest redeliveries after a crash.
	BatchSize int
	// PayloadType is the payload column's type. Default "BYTEA" (any bytes);
	// "JSON" or "JSONB" require JSON payloads.
	PayloadType string
	// InitializeSchema creates a topic's tables on first publish and
	// subscribe. Default false: call InitializeSchema. Never set it for a
	// publisher on a transaction.
	InitializeSchema bool
}

func (c *Config) setDefaults() {
	if c.ConsumerGroup == "" {
		c.ConsumerGroup = DefaultConsumerGroup
	}
	if c.PollInterval == 0 {
		c.PollInterval = DefaultPollInterval
	}
	if c.ResendInterval == 0 {
		c.ResendInterval = DefaultResendInterval
	}
	if c.AckDeadline == 0 {
		c.AckDeadline = DefaultAckDeadline
	}
	if c.BatchSize == 0 {
		c.BatchSize = DefaultBatchSize
	}
	if c.PayloadType == "" {
		c.PayloadType = DefaultPayloadType
	}
}

// Validate reports every problem in c at once (errors.Join). Zero fields
// stand for their defaults and are valid.
func (c Config) Validate() error {
	c.setDefaults()
	return c.validate()
}

// validate checks a Config whose defaults are applied.
func (c *Config) validate() error {
	var errs []error
	for name, d := range map[string]time.Duration{
		"PollInterval": c.PollInterval, "ResendInterval": c.ResendInterval, "AckDeadline": c.AckDeadline,
	} {
		if d <= 0 {
			errs = append(errs, fmt.Errorf("bus/sqlbus: %s must be positive, got %v", name, d))
		}
	}
	if c.BatchSize < 1 {
		errs = append(errs, fmt.Errorf("bus/sqlbus: BatchSize must be at least 1, got %d", c.BatchSize))
	}
	switch c.PayloadType {
	case "BYTEA", "JSON", "JSONB":
	default:
		errs = append(errs, fmt.Errorf("bus/sqlbus: PayloadType %q: want BYTEA, JSON or JSONB", c.PayloadType))
	}
	if c.ConsumerGroup != "" && len(c.ConsumerGroup) > 255 {
		errs = append(errs, errors.New("bus/sqlbus: ConsumerGroup longer than 255 bytes"))
	}
	return errors.Join(errs...)
}

func (c *Config) adapters() (wsql.SchemaAdapter, wsql.OffsetsAdapter) {
	payload := c.PayloadType
	return wsql.DefaultPostgreSQLSchema{
			GeneratePayloadType: func(string) string { return payload },
			SubscribeBatchSize:  c.BatchSize,
		},
		wsql.DefaultPostgreSQLOffsetsAdapter{}
}

// Publisher inserts messages into topic tables; see the package doc.
type Publisher struct{ pub *wsql.Publisher }

var _ message.Publisher = (*Publisher)(nil)

// NewPublisher publishes through db: a *sql.DB, or a *sql.Tx to publish
// inside the caller's transaction (then the messages exist only if it
// commits, and InitializeSchema must be false). A nil logger logs nothing.
func NewPublisher(db wsql.ContextExecutor, cfg Config, logger watermill.LoggerAdapter) (*Publisher, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if _, isTx := db.(*stdsql.Tx); isTx && cfg.InitializeSchema {
		return nil, errors.New("bus/sqlbus: InitializeSchema cannot run on a transaction (CREATE TABLE would commit it); call InitializeSchema beforehand")
	}
	if logger == nil {
		logger = watermill.NopLogger{}
	}
	schema, _ := cfg.adapters()
	pub, err := wsql.NewPublisher(db, wsql.PublisherConfig{SchemaAdapter: schema, AutoInitializeSchema: cfg.InitializeSchema},
		logger.With(watermill.LogFields{"component": "bus/sqlbus.Publisher"}))
	if err != nil {
		return nil, fmt.Errorf("bus/sqlbus: %w", err)
	}
	return &Publisher{pub: pub}, nil
}

// Publish inserts messages into topic's table in one statement. Failures
// of the database connection are marked with tailrace.Unavailable.
func (p *Publisher) Publish(topic string, messages ...*message.Message) error {
	if err := ValidateTopic(topic); err != nil {
		return err
	}
	if err := p.pub.Publish(topic, messages...); err != nil {
		return transport.Mark(fmt.Errorf("bus/sqlbus: publish to %q: %w", topic, err), transport.SQL)
	}
	return nil
}

// Close waits for Publish calls in progress. It does not close the database.
func (p *Publisher) Close() error { return p.pub.Close() }

// Subscriber polls topic tables; see the package doc.
//
// Close returns only after every channel returned by Subscribe is closed.
// (watermill-sql's own Close can return a moment before it closes them.)
type Subscriber struct {
	sub       *wsql.Subscriber
	closing   chan struct{}
	closeOnce sync.Once
	wg        sync.WaitGroup
}

var (
	_ message.Subscriber           = (*Subscriber)(nil)
	_ message.SubscribeInitializer = (*Subscriber)(nil)
)

// NewSubscriber reads through db. A nil logger logs nothing.
func NewSubscriber(db *stdsql.DB, cfg Config, logger watermill.LoggerAdapter) (*Subscriber, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if db == nil {
		return nil, errors.New("bus/sqlbus: nil *sql.DB")
	}
	if logger == nil {
		logger = watermill.NopLogger{}
	}
	schema, offsets := cfg.adapters()
	ack := cfg.AckDeadline
	sub, err := wsql.NewSubscriber(db, wsql.SubscriberConfig{
		ConsumerGroup:    cfg.ConsumerGroup,
		AckDeadline:      &ack,
		PollInterval:     cfg.PollInterval,
		ResendInterval:   cfg.ResendInterval,
		RetryInterval:    time.Second,
		SchemaAdapter:    schema,
		OffsetsAdapter:   offsets,
		InitializeSchema: cfg.InitializeSchema,
	}, logger.With(watermill.LogFields{"component": "bus/sqlbus.Subscriber"}))
	if err != nil {
		return nil, fmt.Errorf("bus/sqlbus: %w", err)
	}
	return &Subscriber{sub: sub, closing: make(chan struct{})}, nil
}

// Subscribe returns topic's messages for the consumer group. The channel
// closes when ctx is done or on Close.
func (s *Subscriber) Subscribe(ctx context.Context, topic string) (<-chan *message.Message, error) {
	if err := ValidateTopic(topic); err != nil {
		return nil, err
	}
	select {
	case <-s.closing:
		return nil, errors.New("bus/sqlbus: subscriber closed")
	default:
	}
	in, err := s.sub.Subscribe(ctx, topic)
	if err != nil {
		return nil, fmt.Errorf("bus/sqlbus: subscribe to %q: %w", topic, err)
	}
	out := make(chan *message.Message)
	s.wg.Add(1)
	go s.forward(ctx, in, out)
	return out, nil
}

// drain discards messages until watermill-sql closes in, which it does
// promptly once the subscription ends.
func drain(in <-chan *message.Message) {
	for range in {
	}
}

// forward hands messages from watermill-sql's channel to the caller's and
// closes the caller's once watermill-sql's is closed, so that Close can wait
// for it. A message not handed over is neither acked nor nacked: watermill-sql
// stops waiting for it when the subscription ends and it is redelivered.
func (s *Subscriber) forward(ctx context.Context, in <-chan *message.Message, out chan<- *message.Message) {
	defer s.wg.Done()
	defer close(out)
	for msg := range in {
		select {
		case out <- msg:
		case <-s.closing:
			drain(in)
			return
		case <-ctx.Done():
			drain(in)
			return
		}
	}
}

// SubscribeInitialize creates topic's tables (idempotent).
func (s *Subscriber) SubscribeInitialize(topic string) error {
	if err := ValidateTopic(topic); err != nil {
		return err
	}
	return s.sub.SubscribeInitialize(topic)
}

// Close stops the subscriptions and returns once every channel returned by
// Subscribe is closed. It does not close the database.
func (s *Subscriber) Close() error {
	var err error
	s.closeOnce.Do(func() {
		close(s.closing)
		err = s.sub.Close()
		s.wg.Wait()
	})
	return err
}

// InitializeSchema creates the tables of each topic (messages and offsets),
// idempotently. Run it at start-up or in a migration, outside any
// transaction.
func InitializeSchema(ctx context.Context, db *stdsql.DB, cfg Config, topics ...string) error {
	for _, t := range topics {
		if err := ValidateTopic(t); err != nil {
			return err
		}
	}
	sub, err := NewSubscriber(db, cfg, nil)
	if err != nil {
		return err
	}
	defer sub.Close()
	for _, t := range topics {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := sub.SubscribeInitialize(t); err != nil {
			return fmt.Errorf("bus/sqlbus: initialize schema for %q: %w", t, err)
		}
	}
	return nil
}
