package amqp

import (
	"context"
	"fmt"
	"sync"

	"github.com/ThreeDotsLabs/watermill"
	wamqp "github.com/ThreeDotsLabs/watermill-amqp/v2/pkg/amqp"
	"github.com/ThreeDotsLabs/watermill/message"
	amqp091 "github.com/rabbitmq/amqp091-go"
)

// Subscriber consumes messages from RabbitMQ queues. It is watermill-amqp's
// subscriber configured from the same Config as the Publisher, so both agree
// on exchange, routing key and queue names.
//
// Guarantees: each Subscribe declares (durable, unless Topology.Transient)
// the exchange and the queue Topology.QueueName(topic), binds them with
// Topology.RoutingKey(topic) and consumes with manual acknowledgements: a
// message is removed from the queue only after its handler acks it; a nack
// requeues it (unless NoRequeueOnNack). Delivery is at-least-once. Several
// subscribers of one queue compete for its messages; give each consumer group
// its own queue name to have every group receive every message. Order is
// preserved for one consumer of a queue as long as nothing is nacked.
// It reconnects after the broker restarts (watermill-amqp's backoff).
type Subscriber struct {
	sub   *wamqp.Subscriber
	scrub scrubber
}

var _ message.Subscriber = (*Subscriber)(nil)

// NewSubscriber validates cfg and connects to the broker. A nil logger logs
// nothing.
func NewSubscriber(cfg Config, logger watermill.LoggerAdapter) (*Subscriber, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if logger == nil {
		logger = watermill.NopLogger{}
	}
	scrub := newScrubber(cfg.URL)
	logger = logger.With(watermill.LogFields{"component": "bus/amqp.Subscriber", "url": RedactURL(cfg.URL)})
	sub, err := wamqp.NewSubscriber(watermillConfig(cfg), logger)
	if err != nil {
		return nil, fmt.Errorf("bus/amqp: subscriber for %s: %w", RedactURL(cfg.URL), scrub.Error(err))
	}
	return &Subscriber{sub: sub, scrub: scrub}, nil
}

// Subscribe declares topic's exchange and queue and returns the messages
// delivered to the queue. The channel closes when ctx is done or the
// subscriber is closed.
func (s *Subscriber) Subscribe(ctx context.Context, topic string) (<-chan *message.Message, error) {
	ch, err := s.sub.Subscribe(ctx, topic)
	return ch, s.scrub.Error(err)
}

// SubscribeInitialize declares topic's exchange and queue without consuming,
// so messages published before the first Subscribe are kept.
func (s *Subscriber) SubscribeInitialize(topic string) error {
	return s.scrub.Error(s.sub.SubscribeInitialize(topic))
}

// Close stops every subscription and closes the connection.
func (s *Subscriber) Close() error { return s.scrub.Error(s.sub.Close()) }

// watermillConfig translates a defaulted Config for watermill-amqp.
func watermillConfig(cfg Config) wamqp.Config {
	t := cfg.Topology
	tb := &topologyBuilder{t: t, topicOf: map[string]string{}}
	return wamqp.Config{
		Connection: wamqp.ConnectionConfig{
			AmqpURI: cfg.URL,
			AmqpConfig: &amqp091.Config{
				Heartbeat:       cfg.Heartbeat,
				TLSClientConfig: cfg.TLS,
				Properties:      amqp091.Table{"connection_name": cfg.ConnectionName},
				Dial:            amqp091.DefaultDial(cfg.DialTimeout),
			},
			Reconnect: &wamqp.ReconnectConfig{
				BackoffInitialInterval:     cfg.ReconnectInitial,
				BackoffRandomizationFactor: 0.5,
				BackoffMultiplier:          2,
				BackoffMaxInterval:         cfg.ReconnectMax,
			},
		},
		Marshaler: cfg.Marshaler,
		Exchange: wamqp.ExchangeConfig{
			GenerateName: t.ExchangeName,
			Type:         t.ExchangeType,
			Durable:      !t.Transient,
		},
		Queue: wamqp.QueueConfig{
			GenerateName: tb.queueName,
			Durable:      !t.Transient,
		},
		QueueBind: wamqp.QueueBindConfig{GenerateRoutingKey: t.RoutingKey},
		Publish:   wamqp.PublishConfig{GenerateRoutingKey: t.RoutingKey},
		Consume: wamqp.ConsumeConfig{
			Qos:             wamqp.QosConfig{PrefetchCount: cfg.Prefetch},
			NoRequeueOnNack: cfg.NoRequeueOnNack,
		},
		TopologyBuilder: tb,
	}
}

// topologyBuilder declares what the Publisher declares, and binds with
// RoutingKey(topic): watermill-amqp's default builder passes the queue name
// where the topic is expected.
type topologyBuilder struct {
	t       Topology
	mu      sync.Mutex
	topicOf map[string]string // queue name -> topic
}

func (b *topologyBuilder) queueName(topic string) string {
	q := b.t.QueueName(topic)
	b.mu.Lock()
	b.topicOf[q] = topic
	b.mu.Unlock()
	return q
}

func (b *topologyBuilder) ExchangeDeclare(ch *amqp091.Channel, exchange string, _ wamqp.Config) error {
	if b.t.Declare == DeclareNever {
		return ch.ExchangeDeclarePassive(exchange, b.t.ExchangeType, !b.t.Transient, false, false, false, nil)
	}
	return ch.ExchangeDeclare(exchange, b.t.ExchangeType, !b.t.Transient, false, false, false, nil)
}

func (b *topologyBuilder) BuildTopology(ch *amqp091.Channel, queue, exchange string, cfg wamqp.Config, _ watermill.LoggerAdapter) error {
	b.mu.Lock()
	topic, ok := b.topicOf[queue]
	b.mu.Unlock()
	if !ok {
		topic = queue
	}
	durable := !b.t.Transient
	if b.t.Declare == DeclareNever {
		_, err := ch.QueueDeclarePassive(queue, durable, false, false, false, nil)
		if err != nil {
			return fmt.Errorf("bus/amqp: queue %q for topic %q (Declare is never): %w", queue, topic, err)
		}
		return nil
	}
	if _, err := ch.QueueDeclare(queue, durable, false, false, false, nil); err != nil {
		return fmt.Errorf("bus/amqp: declare queue %q for topic %q: %w", queue, topic, err)
	}
	if exchange == "" {
		return nil
	}
	if err := b.ExchangeDeclare(ch, exchange, cfg); err != nil {
		return fmt.Errorf("bus/amqp: declare exchange %q for topic %q: %w", exchange, topic, err)
	}
	if err := ch.QueueBind(queue, b.t.RoutingKey(topic), exchange, false, nil); err != nil {
		return fmt.Errorf("bus/amqp: bind queue %q to exchange %q for topic %q: %w", queue, exchange, topic, err)
	}
	return nil
}
