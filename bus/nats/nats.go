// Package nats publishes to and consumes from NATS JetStream, for the
// tailrace bus.
//
// The Publisher is a thin, configured constructor over watermill-nats/v2
// (pkg/nats with JetStream on); the Subscriber is written here directly on
// nats.go's JetStream API (see Subscriber for why), reusing watermill-nats's
// message format and subject naming. The settings a relay needs are decided
// once:
//
//   - Publish waits for JetStream's PubAck for every message: nil means the
//     message is stored in a stream. A subject no stream captures fails with
//     nats.ErrNoStreamResponse (no responders) — never a silent success.
//   - Streams are file-backed (they survive a server restart) and created on
//     first use, one per topic, capturing the subject named after the topic
//     (Config.NoProvision turns that off when streams are managed elsewhere);
//     the result is cached, so publishing costs no extra round trip.
//   - Each message carries its UUID as Nats-Msg-Id, so JetStream drops a
//     re-publish of the same message within the stream's duplicate window
//     (2 minutes by default): a relay retry does not make a second copy.
//   - A consumer group (Config.ConsumerGroup) shares one durable consumer
//     and queue group, so each message goes to one member. Delivery is
//     at-least-once with explicit acks; order is the stream's for a single
//     subscriber. Subscribe's channel is closed exactly once, after the last
//     send on it, and Close returns only once every such channel is closed.
//   - The client reconnects by itself (Config.ReconnectWait, forever by
//     default). A Publish while the connection is down fails at once with
//     ErrNotConnected; one cut off mid-way fails after the JetStream request
//     timeout. A Publisher can be built while the server is unreachable:
//     it connects in the background (Config.FailFast turns that off).
//   - Failures of the transport (ErrNotConnected, a closed, draining or
//     reconnecting connection, a timeout, no servers, JetStream
//     temporarily unavailable, network errors) are marked with
//     tailrace.Unavailable: the outbox relay takes them for an outage and
//     counts no attempt against the message. A subject no stream captures,
//     a payload over the server's limit and other refusals are the
//     message's failures.
//
// Consumer groups are durable: the group's consumer, named
// ConsumerName(group, topic) on the topic's stream, is created with the
// JetStream management API by the first Subscribe of any member (starting
// at the stream's first message) and only bound to by the subscriptions, so
// no member's Close, crash or restart deletes it; it lives as long as the
// stream. A member that (re)starts continues from the group's position: it
// gets the messages published while no member ran and those left unacked
// (after AckWait), never those already acked. Members may start at the same
// time; one creates the consumer, the others use it. An existing consumer
// is checked against the Config (deliver group, filter subject = topic,
// explicit acks, AckWait, push delivery) and a mismatch fails Subscribe with
// ErrConsumerMismatch. (Not caught: members with different AckWait values
// creating a new group's consumer at the same instant. Servers before NATS
// 2.10 create or update in one call, so the last creation's AckWait wins.)
// To reset or retire a group, delete its consumer
// while no member runs, with `nats consumer rm <stream> <consumer>` where
// the nats CLI is installed, or from Go (busnats being this package, js a
// nats.go JetStreamContext):
//
//	err := js.DeleteConsumer(busnats.StreamName(topic), busnats.ConsumerName(group, topic))
//
// The next member recreates it at the stream's first message. To change a group's AckWait without losing its position,
// update the consumer's AckWait (JetStreamManager.UpdateConsumer) when
// deploying the new Config.
//
// Without a ConsumerGroup nothing is durable: each Subscribe call gets an
// ephemeral consumer of its own that starts at the stream's first message
// and is deleted when the subscription ends (or by the server, once a
// crashed process has been gone a while), so a restart receives the whole
// stream again.
//
// Credentials in the URL never appear in a log line or a returned error.
package nats

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	wnats "github.com/ThreeDotsLabs/watermill-nats/v2/pkg/nats"
	"github.com/ThreeDotsLabs/watermill/message"
	nc "github.com/nats-io/nats.go"

	"github.com/tailrace/tailrace/bus/internal/secret"
	"github.com/tailrace/tailrace/internal/transport"
)

// Defaults for Config fields left at their zero value.
const (
	DefaultName           = "tailrace"
	DefaultConnectTimeout = 10 * time.Second
	DefaultReconnectWait  = time.Second
	DefaultAckWait        = 30 * time.Second
	DefaultCloseTimeout   = 30 * time.Second
	DefaultPublishTimeout = 10 * time.Second
	DefaultSubscribers    = 1
)

// Config configures a Publisher and a Subscriber.
type Config struct {
	// URL of the server(s), nats://[user:password@]host:4222, several
	// separated by commas. Required. Printed only redacted.
	URL string
	// Name of the connection, shown by the server. Default "tailrace".
	Name string
	// ConnectTimeout bounds the initial connect. Default 10s.
	ConnectTimeout time.Duration
	// ReconnectWait is the pause between reconnect attempts (the client
	// retries forever). Default 1s.
	ReconnectWait time.Duration
	// PublishTimeout bounds the wait for each message's PubAck. Default 10s.
	PublishTimeout time.Duration
	// FailFast makes NewPublisher return an error when no server can be
	// reached at construction. Default false: the Publisher is returned and
	// connects in the background (nats.go's RetryOnFailedConnect), Publish
	// failing with ErrNotConnected until it does. The Subscriber always
	// needs a server at construction.
	FailFast bool
	// Options are extra nats.go connection options (TLS, credentials
	// files, …), applied after the ones derived from this Config.
	Options []nc.Option

	// NoProvision disables creating a topic's stream on first use. Default
	// false: a missing stream is created (file storage, limits retention,
	// subject = topic, name = topic with characters streams refuse
	// replaced by '_').
	NoProvision bool
	// NoMsgID stops sending the message UUID as Nats-Msg-Id. Default false:
	// JetStream deduplicates re-publishes within the duplicate window.
	NoMsgID bool

	// ConsumerGroup makes subscribers of one topic with the same group share
	// a durable consumer (ConsumerName) and a queue group: each message goes
	// to one of them, and the group keeps its position across restarts (see
	// the package doc). Empty: each Subscribe call gets every message from
	// an ephemeral consumer that does not outlive it.
	ConsumerGroup string
	// Subscribers is how many NATS subscriptions a Subscribe call opens
	// (more than 1 needs a ConsumerGroup). Default 1.
	Subscribers int
	// AckWait is how long the server waits for an ack before redelivering.
	// Default 30s.
	AckWait time.Duration
	// CloseTimeout bounds how long Close waits for in-flight acks.
	// Default 30s.
	CloseTimeout time.Duration

	// MaxAckPending is how many messages the server pushes to a
	// subscription (to a ConsumerGroup's consumer: to all its members
	// together) before their acks. The subscriber hands them over without
	// waiting for acks, so a concurrent reader (bus.Consumer) works on up
	// to MaxAckPending at once; keep it at or above the consumer's
	// Concurrency. A ConsumerGroup's consumer gets it when it is created;
	// an existing one keeps its own (JetStreamManager.UpdateConsumer
	// changes it), it is not compared. 1 delivers one message at a time.
	// Default DefaultMaxAckPending (64).
	MaxAckPending int
}

// DefaultMaxAckPending is Config.MaxAckPending's default: twice bus's
// default consumer Concurrency.
const DefaultMaxAckPending = 64

func (c *Config) setDefaults() {
	if c.Name == "" {
		c.Name = DefaultName
	}
	if c.ConnectTimeout == 0 {
		c.ConnectTimeout = DefaultConnectTimeout
	}
	if c.ReconnectWait == 0 {
		c.ReconnectWait = DefaultReconnectWait
	}
	if c.PublishTimeout == 0 {
		c.PublishTimeout = DefaultPublishTimeout
	}
	if c.Subscribers == 0 {
		c.Subscribers = DefaultSubscribers
	}
	if c.AckWait == 0 {
		c.AckWait = DefaultAckWait
	}
	if c.CloseTimeout == 0 {
		c.CloseTimeout = DefaultCloseTimeout
	}
	if c.MaxAckPending == 0 {
		c.MaxAckPending = DefaultMaxAckPending
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
	if c.URL == "" {
		errs = append(errs, errors.New("bus/nats: URL is required"))
	}
	for _, u := range strings.Split(c.URL, ",") {
		if u = strings.TrimSpace(u); u == "" {
			continue
		}
		if !strings.Contains(u, "://") {
			u = "nats://" + u
		}
		if _, err := secret.Parse(u); err != nil {
			errs = append(errs, fmt.Errorf("bus/nats: invalid URL %w", err))
		}
	}
	for name, d := range map[string]time.Duration{
		"ConnectTimeout": c.ConnectTimeout, "ReconnectWait": c.ReconnectWait, "PublishTimeout": c.PublishTimeout,
		"AckWait": c.AckWait, "CloseTimeout": c.CloseTimeout,
	} {
		if d <= 0 {
			errs = append(errs, fmt.Errorf("bus/nats: %s must be positive, got %v", name, d))
		}
	}
	if c.MaxAckPending < 1 {
		errs = append(errs, fmt.Errorf("bus/nats: MaxAckPending must be at least 1, got %d", c.MaxAckPending))
	}
	if c.Subscribers < 1 {
		errs = append(errs, fmt.Errorf("bus/nats: Subscribers must be at least 1, got %d", c.Subscribers))
	}
	if c.Subscribers > 1 && c.ConsumerGroup == "" {
		errs = append(errs, errors.New("bus/nats: Subscribers > 1 needs a ConsumerGroup"))
	}
	if strings.ContainsAny(c.ConsumerGroup, " .*>\t\r\n") {
		errs = append(errs, fmt.Errorf("bus/nats: ConsumerGroup %q must not contain spaces, '.', '*' or '>'", c.ConsumerGroup))
	}
	return errors.Join(errs...)
}

// StreamName is the stream a topic's messages are stored in when streams are
// provisioned here: the topic with characters stream names refuse replaced by
// '_'.
func StreamName(topic string) string {
	return strings.Map(func(r rune) rune {
		switch r {
		case '.', '*', '>', ' ', '\t', '\r', '\n', '/', '\\':
			return '_'
		}
		return r
	}, topic)
}

func (c *Config) natsOptions(logger watermill.LoggerAdapter, red string) []nc.Option {
	opts := []nc.Option{
		nc.Name(c.Name),
		nc.Timeout(c.ConnectTimeout),
		nc.ReconnectWait(c.ReconnectWait),
		nc.MaxReconnects(-1),
		nc.DisconnectErrHandler(func(conn *nc.Conn, err error) {
			// A Close disconnects with a nil error: that is not a fault.
			if err == nil || conn.IsClosed() {
				logger.Debug("Disconnected", watermill.LogFields{"url": red})
				return
			}
			logger.Error("Disconnected", secret.NewScrubber(c.URL).Error(err), watermill.LogFields{"url": red})
		}),
		nc.ReconnectHandler(func(*nc.Conn) {
			logger.Info("Reconnected", watermill.LogFields{"url": red})
		}),
	}
	return append(opts, c.Options...)
}

func (c *Config) jetStream() wnats.JetStreamConfig {
	// Only the Publisher uses this; the Subscriber sets up its consumers
	// itself (consumer.go).
	return wnats.JetStreamConfig{
		AutoProvision:  false, // done here, cached, with valid stream names
		ConnectOptions: []nc.JSOpt{nc.MaxWait(c.PublishTimeout)},
		TrackMsgId:     !c.NoMsgID,
	}
}

// provisioner creates streams on first use and remembers them.
type provisioner struct {
	js   nc.JetStreamManager
	off  bool
	done sync.Map // topic -> struct{}
	mu   sync.Mutex
}

func (p *provisioner) ensure(topic string) error {
	if p.off {
		return nil
	}
	if _, ok := p.done.Load(topic); ok {
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.done.Load(topic); ok {
		return nil
	}
	name := StreamName(topic)
	if _, err := p.js.StreamInfo(name); errors.Is(err, nc.ErrStreamNotFound) {
		_, err = p.js.AddStream(&nc.StreamConfig{
			Name:      name,
			Subjects:  []string{topic},
			Storage:   nc.FileStorage,
			Retention: nc.LimitsPolicy,
		})
		if err != nil && !errors.Is(err, nc.ErrStreamNameAlreadyInUse) {
			return fmt.Errorf("bus/nats: create stream %q for topic %q: %w", name, topic, err)
		}
	} else if err != nil {
		return fmt.Errorf("bus/nats: look up stream %q for topic %q: %w", name, topic, err)
	}
	p.done.Store(topic, struct{}{})
	return nil
}

// open validates cfg (defaults applied), names the logger's component and
// connects: what NewPublisher and NewSubscriber share. With background, a
// server that cannot be reached yet is connected to in the background.
func open(cfg *Config, logger watermill.LoggerAdapter, component string, background bool) (*nc.Conn, secret.Scrubber, watermill.LoggerAdapter, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, secret.Scrubber{}, nil, err
	}
	if logger == nil {
		logger = watermill.NopLogger{}
	}
	logger = logger.With(watermill.LogFields{"component": component})
	conn, scrub, err := connect(cfg, logger, background)
	return conn, scrub, logger, err
}

// connect opens a connection with the config's options.
func connect(cfg *Config, logger watermill.LoggerAdapter, background bool) (*nc.Conn, secret.Scrubber, error) {
	scrub := secret.NewScrubber(cfg.URL)
	red := secret.URL(cfg.URL)
	opts := cfg.natsOptions(logger, red)
	if background {
		opts = append([]nc.Option{nc.RetryOnFailedConnect(true), nc.ConnectHandler(func(*nc.Conn) {
			logger.Info("Connected", watermill.LogFields{"url": red})
		})}, opts...)
	}
	conn, err := nc.Connect(cfg.URL, opts...)
	if err != nil {
		return nil, scrub, fmt.Errorf("bus/nats: connect to %s: %w", red, scrub.Error(err))
	}
	return conn, scrub, nil
}

// Publisher publishes to JetStream; see the package doc for its guarantees.
type Publisher struct {
	pub   *wnats.Publisher
	conn  *nc.Conn
	prov  *provisioner
	scrub secret.Scrubber
	url   string // redacted
}

var _ message.Publisher = (*Publisher)(nil)

// NewPublisher validates cfg and connects; a server that cannot be reached
// yet is connected to in the background unless cfg.FailFast. A nil logger
// logs nothing.
func NewPublisher(cfg Config, logger watermill.LoggerAdapter) (*Publisher, error) {
	conn, scrub, logger, err := open(&cfg, logger, "bus/nats.Publisher", !cfg.FailFast)
	if err != nil {
		return nil, err
	}
	js := cfg.jetStream()
	pub, err := wnats.NewPublisherWithNatsConn(conn, wnats.PublisherPublishConfig{
		Marshaler:         &wnats.NATSMarshaler{},
		SubjectCalculator: wnats.DefaultSubjectCalculator,
		JetStream:         js,
	}, logger)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("bus/nats: %w", scrub.Error(err))
	}
	jsm, err := conn.JetStream(js.ConnectOptions...)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("bus/nats: %w", scrub.Error(err))
	}
	if !conn.IsConnected() {
		logger.Error("Server unreachable; connecting in the background", nil, watermill.LogFields{"url": secret.URL(cfg.URL)})
	}
	return &Publisher{pub: pub, conn: conn, prov: &provisioner{js: jsm, off: cfg.NoProvision}, scrub: scrub, url: secret.URL(cfg.URL)}, nil
}

// ErrNotConnected: the publisher's connection is down (not yet made, or
// reconnecting); nothing was sent. Publish returns it marked with
// tailrace.Unavailable.
var ErrNotConnected = errors.New("bus/nats: not connected")

// Publish stores messages in topic's stream, one PubAck at a time, and
// returns at the first failure. Failures of the transport are marked with
// tailrace.Unavailable.
func (p *Publisher) Publish(topic string, messages ...*message.Message) error {
	return transport.Mark(p.publish(topic, messages...), transportFailure)
}

func (p *Publisher) publish(topic string, messages ...*message.Message) error {
	if !p.conn.IsConnected() {
		if p.conn.IsClosed() {
			return fmt.Errorf("%w to %s: %w", ErrNotConnected, p.url, nc.ErrConnectionClosed)
		}
		return fmt.Errorf("%w to %s", ErrNotConnected, p.url)
	}
	if err := p.prov.ensure(topic); err != nil {
		return p.scrub.Error(err)
	}
	if err := p.pub.Publish(topic, messages...); err != nil {
		return fmt.Errorf("bus/nats: publish to %q: %w", topic, p.scrub.Error(err))
	}
	return nil
}

// Connected reports whether the publisher's connection is up now.
func (p *Publisher) Connected() bool { return p.conn.IsConnected() }

// transportFailure reports whether err is a failure of the connection to
// NATS rather than of the message.
func transportFailure(err error) bool {
	for _, target := range []error{ErrNotConnected, nc.ErrConnectionClosed, nc.ErrConnectionDraining,
		nc.ErrConnectionReconnecting, nc.ErrTimeout, nc.ErrNoServers, nc.ErrReconnectBufExceeded,
		nc.ErrStaleConnection, nc.ErrDisconnected} {
		if errors.Is(err, target) {
			return true
		}
	}
	// JetStream answering 503: temporarily unavailable (no leader yet, a
	// server starting up).
	var api *nc.APIError
	return errors.As(err, &api) && api.Code == 503
}

// Close closes the connection.
func (p *Publisher) Close() error { return p.scrub.Error(p.pub.Close()) }
