package amqp

import (
	"crypto/tls"
	"errors"
	"fmt"
	"time"

	wamqp "github.com/ThreeDotsLabs/watermill-amqp/v2/pkg/amqp"
)

// Defaults for Config fields left at their zero value.
const (
	DefaultExchangeType     = "fanout"
	DefaultConnectionName   = "tailrace"
	DefaultHeartbeat        = 10 * time.Second
	DefaultDialTimeout      = 10 * time.Second
	DefaultPublishTimeout   = 30 * time.Second
	DefaultMaxInFlight      = 256
	DefaultReconnectInitial = 200 * time.Millisecond
	DefaultReconnectMax     = 2 * time.Second
	DefaultPrefetch         = 64
)

// Declare says when the publisher declares the exchanges (and, with
// Topology.DeclareQueues, the queues) a topic needs.
type Declare int

const (
	// DeclareOnFirstUse declares Topology.Topics when connecting and any
	// other topic just before its first publish on each connection. The
	// default.
	DeclareOnFirstUse Declare = iota
	// DeclareUpFront declares Topology.Topics when connecting and refuses
	// (ErrUndeclaredTopic) to publish to any other topic: the set of
	// destinations is fixed at start-up.
	DeclareUpFront
	// DeclareNever declares nothing: the topology is managed outside the
	// service. Before the first publish to a topic the exchange's existence
	// is checked (a passive declare), so a missing exchange fails that
	// publish only.
	DeclareNever
)

func (d Declare) String() string {
	switch d {
	case DeclareOnFirstUse:
		return "on-first-use"
	case DeclareUpFront:
		return "up-front"
	case DeclareNever:
		return "never"
	}
	return fmt.Sprintf("Declare(%d)", int(d))
}

// Topology maps Watermill topics to RabbitMQ exchanges, routing keys and
// queues. The zero value is one durable fanout exchange per topic, named
// after the topic; subscribers consume a durable queue named after the
// topic (competing consumers).
type Topology struct {
	// ExchangeName maps a topic to the exchange messages are published to.
	// Default: the topic itself. Returning "" publishes to the default
	// exchange, where the routing key is the queue name.
	ExchangeName func(topic string) string
	// ExchangeType is the type of declared exchanges: fanout, direct, topic
	// or headers. Default "fanout".
	ExchangeType string
	// RoutingKey maps a topic to the routing key used to publish and to bind
	// queues. Default: the topic itself (ignored by fanout exchanges).
	RoutingKey func(topic string) string
	// QueueName maps a topic to a queue. Subscribers consume it (declaring
	// and binding it first); the publisher declares and binds it too when
	// DeclareQueues is set. Default: the topic itself. Give each consumer
	// group its own name (topic + "." + group) to fan out to several
	// groups.
	QueueName func(topic string) string
	// DeclareQueues makes the publisher declare and bind QueueName(topic)
	// along with the exchange, so messages published before any consumer
	// started are kept rather than returned as unroutable. Default false:
	// the publisher declares exchanges only.
	DeclareQueues bool
	// Transient declares non-durable exchanges and queues (they vanish when
	// the broker restarts). Default false: durable.
	Transient bool
	// Declare says when the publisher declares topology. Default
	// DeclareOnFirstUse.
	Declare Declare
	// Topics are declared as soon as the publisher connects (and again after
	// each reconnect). Required, non-empty, with DeclareUpFront.
	Topics []string
}

// Config configures a Publisher and a Subscriber. Zero fields take the
// defaults named in their docs; NewPublisher and NewSubscriber apply them and
// call Validate.
type Config struct {
	// URL of the broker, amqp://user:password@host:port/vhost or amqps://…
	// Required. It is validated here and printed only with its password
	// redacted (see RedactURL).
	URL string
	// TLS configures amqps connections. Nil: Go's defaults.
	TLS *tls.Config
	// ConnectionName is shown by RabbitMQ's management tools. Default
	// "tailrace".
	ConnectionName string
	// Heartbeat interval negotiated with the broker. Default 10s.
	Heartbeat time.Duration
	// DialTimeout bounds the TCP connect and AMQP handshake. Default 10s.
	DialTimeout time.Duration

	// Topology maps topics to exchanges, routing keys and queues.
	Topology Topology

	// Marshaler turns Watermill messages into AMQP publishings and back.
	// Default wamqp.DefaultMarshaler{}: payload as body, metadata as
	// headers, persistent delivery mode. The publisher sets MessageId to the
	// message's UUID when the marshaler leaves it empty.
	Marshaler wamqp.Marshaler

	// PublishTimeout bounds one Publish call: waiting for a free in-flight
	// slot, sending, and waiting for the broker's confirm. A message's own
	// context can cut it shorter. Default 30s.
	PublishTimeout time.Duration
	// MaxInFlight is the most messages published but not yet confirmed on
	// the connection; further publishes wait for a slot. Default 256.
	MaxInFlight int
	// ReconnectInitial is the first wait before reconnecting after the
	// connection is lost (or could not be made at start); it doubles (with
	// jitter, each wait drawn from [d/2, d]) up to ReconnectMax. Defaults
	// 200ms and 2s: a broker that is back is reconnected to within
	// ReconnectMax (plus the dial), so the outbox relay's next probe, at
	// most 1 s later, finds it. A larger ReconnectMax delays the resumption
	// after an outage by as much.
	ReconnectInitial time.Duration
	ReconnectMax     time.Duration
	// FailFast makes NewPublisher return an error when the broker cannot be
	// reached at construction. Default false: the Publisher is returned and
	// connects in the background, Publish failing with ErrNotConnected
	// (marked tailrace.Unavailable) until it does, so that a service and
	// its outbox relay can start while the broker is down. An invalid URL,
	// bad credentials or a refused topology fail NewPublisher either way.
	// The Subscriber ignores it.
	FailFast bool

	// Prefetch is the subscriber's QoS prefetch count: how many messages a
	// subscription holds handed over but not yet acked. The subscriber
	// hands them over without waiting for acks, so a concurrent reader
	// (bus.Consumer) works on up to Prefetch at once; keep it at or above
	// the consumer's Concurrency (the default 64 is twice bus's default 32,
	// so messages waiting for their key's turn do not starve the others).
	// 1 delivers strictly one at a time. Default 64.
	Prefetch int
	// NoRequeueOnNack makes a nacked message be dropped (or dead-lettered by
	// the queue's policy) instead of requeued. Default false: requeued.
	NoRequeueOnNack bool
}

func (c *Config) setDefaults() {
	t := &c.Topology
	if t.ExchangeName == nil {
		t.ExchangeName = identity
	}
	if t.ExchangeType == "" {
		t.ExchangeType = DefaultExchangeType
	}
	if t.RoutingKey == nil {
		t.RoutingKey = identity
	}
	if t.QueueName == nil {
		t.QueueName = identity
	}
	if c.ConnectionName == "" {
		c.ConnectionName = DefaultConnectionName
	}
	if c.Heartbeat == 0 {
		c.Heartbeat = DefaultHeartbeat
	}
	if c.DialTimeout == 0 {
		c.DialTimeout = DefaultDialTimeout
	}
	if c.Marshaler == nil {
		c.Marshaler = wamqp.DefaultMarshaler{}
	}
	if c.PublishTimeout == 0 {
		c.PublishTimeout = DefaultPublishTimeout
	}
	if c.MaxInFlight == 0 {
		c.MaxInFlight = DefaultMaxInFlight
	}
	if c.ReconnectInitial == 0 {
		c.ReconnectInitial = DefaultReconnectInitial
	}
	if c.ReconnectMax == 0 {
		c.ReconnectMax = DefaultReconnectMax
	}
	if c.Prefetch == 0 {
		c.Prefetch = DefaultPrefetch
	}
}

func identity(topic string) string { return topic }

// Validate reports every problem in c at once (errors.Join). Zero fields
// stand for their defaults and are valid.
func (c Config) Validate() error {
	c.setDefaults()
	return c.validate()
}

// validate checks a Config whose defaults are applied.
func (c *Config) validate() error {
	var errs []error
	if _, err := parseURL(c.URL); err != nil {
		errs = append(errs, err)
	}
	t := c.Topology
	if t.ExchangeName == nil || t.RoutingKey == nil || t.QueueName == nil {
		errs = append(errs, errors.New("bus/amqp: Topology.ExchangeName, RoutingKey and QueueName must be set"))
	}
	switch t.ExchangeType {
	case "fanout", "direct", "topic", "headers":
	default:
		errs = append(errs, fmt.Errorf("bus/amqp: Topology.ExchangeType %q: want fanout, direct, topic or headers", t.ExchangeType))
	}
	switch t.Declare {
	case DeclareOnFirstUse, DeclareNever:
	case DeclareUpFront:
		if len(t.Topics) == 0 {
			errs = append(errs, errors.New("bus/amqp: Topology.Topics must list the topics with DeclareUpFront"))
		}
	default:
		errs = append(errs, fmt.Errorf("bus/amqp: unknown Topology.Declare %d", int(t.Declare)))
	}
	for i, topic := range t.Topics {
		if topic == "" {
			errs = append(errs, fmt.Errorf("bus/amqp: Topology.Topics[%d] is empty", i))
		}
	}
	if c.Marshaler == nil {
		errs = append(errs, errors.New("bus/amqp: Marshaler must be set"))
	}
	positive := func(name string, d time.Duration) {
		if d <= 0 {
			errs = append(errs, fmt.Errorf("bus/amqp: %s must be positive, got %v", name, d))
		}
	}
	positive("Heartbeat", c.Heartbeat)
	positive("DialTimeout", c.DialTimeout)
	positive("PublishTimeout", c.PublishTimeout)
	positive("ReconnectInitial", c.ReconnectInitial)
	positive("ReconnectMax", c.ReconnectMax)
	if c.ReconnectMax > 0 && c.ReconnectInitial > c.ReconnectMax {
		errs = append(errs, fmt.Errorf("bus/amqp: ReconnectInitial %v exceeds ReconnectMax %v", c.ReconnectInitial, c.ReconnectMax))
	}
	if c.MaxInFlight <= 0 || c.MaxInFlight > 65535 {
		errs = append(errs, fmt.Errorf("bus/amqp: MaxInFlight must be in 1..65535, got %d", c.MaxInFlight))
	}
	if c.Prefetch < 0 || c.Prefetch > 65535 {
		errs = append(errs, fmt.Errorf("bus/amqp: Prefetch must be in 0..65535, got %d", c.Prefetch))
	}
	if c.TLS != nil {
		if uri, err := parseURL(c.URL); err == nil && uri.Scheme != "amqps" {
			errs = append(errs, errors.New("bus/amqp: TLS is set but the URL scheme is not amqps"))
		}
	}
	return errors.Join(errs...)
}
