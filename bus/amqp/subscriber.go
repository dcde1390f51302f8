package amqp

import (
	"context"
	"errors"
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
//
// Closing: the channel returned by Subscribe is this wrapper's own, sent on
// and closed by one goroutine, so it is closed exactly once and never sent on
// after. It closes when ctx is done — even if nobody reads it any more — or
// on Close, and Close returns only after every such channel is closed. A
// message not handed over when the channel closes is nacked (requeued); one
// handed over and neither acked nor nacked stays unacked on its AMQP channel
// until Close, which requeues it.
//
// Why a wrapper: watermill-amqp (v2.1.1) waits to hand a message over, and
// for its ack, without watching ctx, so its channel stays open after ctx is
// done until something reads it or Close; and Subscribe concurrent with Close
// is a data race there (its WaitGroup Add against Close's Wait, and the
// connection's connected field rewritten on close while Subscribe reads it).
// Subscribe and Close are serialised here; Subscribe after Close returns
// ErrSubscriberClosed.
type Subscriber struct {
	sub   *wamqp.Subscriber
	scrub scrubber

	mu      sync.RWMutex // Subscribe holds RLock; Close takes Lock to set closed
	closed  bool
	closing chan struct{}
	wg      sync.WaitGroup // one per Subscribe, Done once its channel is closed and drained
}

// ErrSubscriberClosed is returned by Subscribe after Close.
var ErrSubscriberClosed = errors.New("bus/amqp: subscriber closed")

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
	return &Subscriber{sub: sub, scrub: scrub, closing: make(chan struct{})}, nil
}

// Subscribe declares topic's exchange and queue and returns the messages
// delivered to the queue. The channel closes when ctx is done or the
// subscriber is closed.
func (s *Subscriber) Subscribe(ctx context.Context, topic string) (<-chan *message.Message, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return nil, ErrSubscriberClosed
	}
	in, err := s.sub.Subscribe(ctx, topic)
	if err != nil {
		return nil, s.scrub.Error(err)
	}
	out := make(chan *message.Message)
	s.wg.Add(1) // under RLock: before Close's Wait
	go s.forward(ctx, in, out)
	return out, nil
}

// forward hands messages from watermill-amqp's channel to the caller's until
// in closes, ctx is done or the subscriber closes; then it closes out and
// nacks whatever watermill-amqp still hands over until it closes in (it
// does once it sees ctx or Close).
func (s *Subscriber) forward(ctx context.Context, in <-chan *message.Message, out chan<- *message.Message) {
	defer s.wg.Done()
	defer func() {
		for msg := range in {
			msg.Nack()
		}
	}()
	defer close(out)
	for {
		select {
		case msg, ok := <-in:
			if !ok {
				return
			}
			select {
			case out <- msg:
			case <-s.closing:
				msg.Nack()
				return
			case <-ctx.Done():
				msg.Nack()
				return
			}
		case <-s.closing:
			return
		case <-ctx.Done():
			return
		}
	}
}

// SubscribeInitialize declares topic's exchange and queue without consuming,
// so messages published before the first Subscribe are kept.
func (s *Subscriber) SubscribeInitialize(topic string) error {
	return s.scrub.Error(s.sub.SubscribeInitialize(topic))
}

// Close stops every subscription, requeues the messages not acked, returns
// once every channel returned by Subscribe is closed, and closes the
// connection.
func (s *Subscriber) Close() error {
	s.mu.Lock()
	if !s.closed {
		s.closed = true
		close(s.closing)
	}
	s.mu.Unlock()
	err := s.sub.Close() // closes watermill-amqp's channels, so the forwards end
	s.wg.Wait()
	return s.scrub.Error(err)
}

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
