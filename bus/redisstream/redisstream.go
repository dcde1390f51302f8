// Package redisstream publishes to and consumes from Redis Streams, for the
// tailrace bus.
//
// The Publisher is a configured watermill-redisstream Publisher; the
// Subscriber is this package's own, on go-redis v9, reading the same message
// format (watermill-redisstream's DefaultMarshallerUnmarshaller). A topic is
// a stream key; a message is one XADD entry.
//
// Guarantees:
//   - Publish returns nil once Redis has appended every message (XADD
//     replied). Durability is Redis's: with appendonly yes (and appendfsync
//     always or everysec) an acknowledged entry survives a restart; with RDB
//     snapshots only, the last seconds may be lost. Choose it on the server.
//   - A stream keeps its entries whether or not anybody reads them (up to
//     Config.MaxLen), so a message published before its consumers exist is
//     not lost: a consumer group created later starts from the first entry.
//   - With a ConsumerGroup, each entry goes to one member and stays pending
//     until acked; a member that dies leaves entries that others claim after
//     MaxIdleTime, and a member restarted with the same Consumer name gets
//     its own pending entries first. Delivery is at-least-once. Each
//     subscription hands over up to MaxInFlight entries in stream order
//     before their acks, each settled on its own; a nacked entry is handed
//     over again (see Subscriber). Without a group every subscriber receives
//     the entries appended after it subscribed (fan-out).
//   - go-redis reconnects by itself; a Publish during an outage fails with
//     the client's error (dial or read timeout) instead of hanging. A
//     Publisher can be built while the server is unreachable: the client
//     dials on use (Config.FailFast turns that off).
//   - Failures of the transport (dial, read or write errors and timeouts, a
//     closed client, a server LOADING, READONLY, MASTERDOWN, TRYAGAIN,
//     CLUSTERDOWN or BUSY) are marked with tailrace.Unavailable: the outbox
//     relay takes them for an outage and counts no attempt against the
//     message. Other server errors (OOM, WRONGTYPE, …) are the message's.
//
// Credentials in the URL never appear in a log line or a returned error.
package redisstream

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill-redisstream/pkg/redisstream"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/redis/go-redis/v9"

	"github.com/tailrace/tailrace/bus/internal/secret"
	"github.com/tailrace/tailrace/internal/transport"
)

// Defaults for Config fields left at their zero value.
const (
	DefaultDialTimeout   = 5 * time.Second
	DefaultBlockTime     = 100 * time.Millisecond
	DefaultClaimInterval = 5 * time.Second
	DefaultMaxIdleTime   = 60 * time.Second
	DefaultMaxInFlight   = 64
	DefaultCloseTimeout  = 30 * time.Second
)

// Config configures a Publisher and a Subscriber.
type Config struct {
	// URL of the server: redis://[user:password@]host:6379[/db], rediss://
	// for TLS. Required. Printed only redacted.
	URL string
	// DialTimeout bounds connecting; read and write timeouts are go-redis's
	// defaults. Default 5s.
	DialTimeout time.Duration

	// FailFast makes NewPublisher return an error when the server does not
	// answer a PING at construction. Default false: the failure is logged
	// and the Publisher returned; the client dials when used, Publish
	// failing with the network error (marked tailrace.Unavailable) until
	// the server is reachable. The Subscriber always needs the server at
	// construction.
	FailFast bool

	// MaxLen caps each stream at about this many entries (XADD MAXLEN ~),
	// dropping the oldest. Default 0: unlimited.
	MaxLen int64

	// ConsumerGroup names the subscriber's consumer group: members share
	// the entries, each acked once. Empty: fan-out, every subscriber gets
	// every entry appended after it subscribed.
	ConsumerGroup string
	// Consumer names this subscriber inside its group. Default: random.
	Consumer string
	// BlockTime is how long one XREADGROUP waits for new entries. Default
	// 100ms.
	BlockTime time.Duration
	// ClaimInterval is how often pending entries of dead members are
	// looked for. Default 5s.
	ClaimInterval time.Duration
	// MaxIdleTime is how long an entry stays pending before another member
	// claims it. Default 60s: longer than any handler should take.
	MaxIdleTime time.Duration
	// NackResendSleep delays the redelivery of a nacked message. Default 0.
	NackResendSleep time.Duration
	// MaxInFlight is how many entries one subscription hands over before
	// their acks: the window of a bus.Consumer working on several messages
	// at once. Keep it at or above the consumer's Concurrency. 1 hands over
	// one entry at a time. Default 64.
	MaxInFlight int
	// CloseTimeout bounds how long Close waits for the entries already
	// handed over to be acked or nacked. Default 30s.
	CloseTimeout time.Duration
}

func (c *Config) setDefaults() {
	if c.DialTimeout == 0 {
		c.DialTimeout = DefaultDialTimeout
	}
	if c.BlockTime == 0 {
		c.BlockTime = DefaultBlockTime
	}
	if c.ClaimInterval == 0 {
		c.ClaimInterval = DefaultClaimInterval
	}
	if c.MaxIdleTime == 0 {
		c.MaxIdleTime = DefaultMaxIdleTime
	}
	if c.MaxInFlight == 0 {
		c.MaxInFlight = DefaultMaxInFlight
	}
	if c.CloseTimeout == 0 {
		c.CloseTimeout = DefaultCloseTimeout
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
	if _, err := c.options(); err != nil {
		errs = append(errs, err)
	}
	for name, d := range map[string]time.Duration{
		"DialTimeout": c.DialTimeout, "BlockTime": c.BlockTime, "ClaimInterval": c.ClaimInterval, "MaxIdleTime": c.MaxIdleTime,
		"CloseTimeout": c.CloseTimeout,
	} {
		if d <= 0 {
			errs = append(errs, fmt.Errorf("bus/redisstream: %s must be positive, got %v", name, d))
		}
	}
	if c.NackResendSleep < 0 {
		errs = append(errs, fmt.Errorf("bus/redisstream: NackResendSleep must not be negative, got %v", c.NackResendSleep))
	}
	if c.MaxInFlight < 0 {
		errs = append(errs, fmt.Errorf("bus/redisstream: MaxInFlight must be positive, got %d", c.MaxInFlight))
	}
	if c.MaxLen < 0 {
		errs = append(errs, fmt.Errorf("bus/redisstream: MaxLen must not be negative, got %d", c.MaxLen))
	}
	return errors.Join(errs...)
}

// options parses the URL without ever quoting its password.
func (c *Config) options() (*redis.Options, error) {
	if c.URL == "" {
		return nil, errors.New("bus/redisstream: URL is required")
	}
	if _, err := secret.Parse(c.URL); err != nil {
		return nil, fmt.Errorf("bus/redisstream: invalid URL %w", err)
	}
	opts, err := redis.ParseURL(c.URL)
	if err != nil {
		return nil, fmt.Errorf("bus/redisstream: invalid URL %s: %w", secret.URL(c.URL), secret.NewScrubber(c.URL).Error(err))
	}
	opts.DialTimeout = c.DialTimeout
	return opts, nil
}

// client opens a client and checks the server answers. With tolerate, a
// server that cannot be reached is logged, not an error.
func (c *Config) client(tolerate bool, logger watermill.LoggerAdapter) (redis.UniversalClient, secret.Scrubber, error) {
	scrub := secret.NewScrubber(c.URL)
	opts, err := c.options()
	if err != nil {
		return nil, scrub, err
	}
	cl := redis.NewClient(opts)
	ctx, cancel := context.WithTimeout(context.Background(), c.DialTimeout)
	defer cancel()
	if err := cl.Ping(ctx).Err(); err != nil {
		err = fmt.Errorf("bus/redisstream: connect to %s: %w", secret.URL(c.URL), scrub.Error(err))
		if tolerate && transportFailure(err) {
			logger.Error("Server unreachable; the client dials again when used", err, nil)
			return cl, scrub, nil
		}
		_ = cl.Close()
		return nil, scrub, err
	}
	return cl, scrub, nil
}

// transportFailure reports whether err is a failure of the connection to
// Redis (or a server not ready to serve) rather than of the message.
func transportFailure(err error) bool {
	if transport.Network(err) || errors.Is(err, redis.ErrClosed) {
		return true
	}
	var rerr redis.Error
	if errors.As(err, &rerr) {
		msg := rerr.Error()
		for _, p := range []string{"LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "BUSY"} {
			if strings.HasPrefix(msg, p) {
				return true
			}
		}
	}
	return false
}

// Publisher appends messages to streams; see the package doc.
type Publisher struct {
	pub   *redisstream.Publisher
	scrub secret.Scrubber
}

var _ message.Publisher = (*Publisher)(nil)

// NewPublisher validates cfg and connects. A nil logger logs nothing.
func NewPublisher(cfg Config, logger watermill.LoggerAdapter) (*Publisher, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if logger == nil {
		logger = watermill.NopLogger{}
	}
	cl, scrub, err := cfg.client(!cfg.FailFast, logger.With(watermill.LogFields{"component": "bus/redisstream.Publisher"}))
	if err != nil {
		return nil, err
	}
	pub, err := redisstream.NewPublisher(redisstream.PublisherConfig{Client: cl, DefaultMaxlen: cfg.MaxLen},
		logger.With(watermill.LogFields{"component": "bus/redisstream.Publisher"}))
	if err != nil {
		_ = cl.Close()
		return nil, fmt.Errorf("bus/redisstream: %w", scrub.Error(err))
	}
	return &Publisher{pub: pub, scrub: scrub}, nil
}

// Publish appends messages to the stream named topic, in order, and returns
// at the first failure. Failures of the transport are marked with
// tailrace.Unavailable.
func (p *Publisher) Publish(topic string, messages ...*message.Message) error {
	if err := p.pub.Publish(topic, messages...); err != nil {
		return transport.Mark(fmt.Errorf("bus/redisstream: publish to %q: %w", topic, p.scrub.Error(err)), transportFailure)
	}
	return nil
}

// Close closes the client.
func (p *Publisher) Close() error { return p.scrub.Error(p.pub.Close()) }
