package amqp

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	wamqp "github.com/ThreeDotsLabs/watermill-amqp/v2/pkg/amqp"
	"github.com/ThreeDotsLabs/watermill/message"
	amqp091 "github.com/rabbitmq/amqp091-go"
)

// Subscriber consumes messages from RabbitMQ queues, configured from the
// same Config as the Publisher, so both agree on exchange, routing key and
// queue names.
//
// Guarantees: each Subscribe declares (durable, unless Topology.Transient)
// the exchange and the queue Topology.QueueName(topic), binds them with
// Topology.RoutingKey(topic) and consumes with manual acknowledgements: a
// message is removed from the queue only after its handler acks it; a nack
// requeues it (unless NoRequeueOnNack). Delivery is at-least-once. Several
// subscribers of one queue compete for its messages; give each consumer group
// its own queue name to have every group receive every message.
//
// Several messages in flight: each subscription has its own AMQP channel
// with a QoS prefetch of Config.Prefetch. Messages are handed over on the
// Go channel in the queue's order, one after the other, without waiting for
// the previous one's ack: up to Prefetch of them can be held unacked at
// once, and each is acked or nacked on its own (multiple=false) as soon as
// its handler settles it, in whatever order that happens. A reader that
// handles one message at a time and acks it before reading the next sees
// the queue's order; bus.Consumer reads concurrently and keeps the order
// per partition key itself (size its Concurrency at or below Prefetch).
//
// Connection: NewSubscriber connects (and fails if it cannot). A lost
// connection or channel is re-established with backoff (ReconnectInitial up
// to ReconnectMax) and consuming resumes; the messages that were unacked on
// the lost channel are redelivered by the broker, so their acks, if they
// come later, are dropped (logged).
//
// Closing: the channel returned by Subscribe is this subscriber's own, sent
// on and closed by one goroutine, so it is closed exactly once and never
// sent on after. It closes when ctx is done — even if nobody reads it any
// more — or on Close. A message not handed over when it closes is nacked
// (requeued). Messages handed over before keep their AMQP channel open: their
// acks still reach the broker after ctx is done (a consumer finishing its
// handlers while it closes). Close stops waiting for them, closes the AMQP
// channels — the broker requeues whatever was not acked — and returns only
// after every channel returned by Subscribe is closed. Subscribe after Close
// returns ErrSubscriberClosed.
//
// Why not watermill-amqp's subscriber: it (v2.1.1) hands over one message
// and waits for its ack before the next, whatever the prefetch, so a
// concurrent consumer never gets a second message; it waits without
// watching ctx; and Subscribe concurrent with Close is a data race there.
type Subscriber struct {
	cfg     Config
	amqpCfg amqp091.Config
	topo    *topologyBuilder
	scrub   scrubber
	logger  watermill.LoggerAdapter

	mu      sync.RWMutex // Subscribe holds RLock; Close takes Lock to set closed
	closed  bool
	closing chan struct{}
	wg      sync.WaitGroup // one per Subscribe, Done once it stopped and its channel is closed

	connMu sync.Mutex
	conn   *amqp091.Connection // nil or closed: dial again
}

// ErrSubscriberClosed is returned by Subscribe after Close.
var ErrSubscriberClosed = errors.New("bus/amqp: subscriber closed")

var (
	_ message.Subscriber           = (*Subscriber)(nil)
	_ message.SubscribeInitializer = (*Subscriber)(nil)
)

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
	s := &Subscriber{
		cfg: cfg,
		amqpCfg: amqp091.Config{
			Heartbeat:       cfg.Heartbeat,
			TLSClientConfig: cfg.TLS,
			Properties:      amqp091.Table{"connection_name": cfg.ConnectionName},
			Dial:            amqp091.DefaultDial(cfg.DialTimeout),
		},
		topo:    &topologyBuilder{t: cfg.Topology, topicOf: map[string]string{}},
		scrub:   newScrubber(cfg.URL),
		logger:  logger.With(watermill.LogFields{"component": "bus/amqp.Subscriber", "url": RedactURL(cfg.URL)}),
		closing: make(chan struct{}),
	}
	if _, err := s.connection(); err != nil {
		return nil, fmt.Errorf("bus/amqp: subscriber for %s: %w", RedactURL(cfg.URL), err)
	}
	return s, nil
}

// connection returns the live connection, dialling a new one if there is
// none or it was lost.
func (s *Subscriber) connection() (*amqp091.Connection, error) {
	s.connMu.Lock()
	defer s.connMu.Unlock()
	if s.conn != nil && !s.conn.IsClosed() {
		return s.conn, nil
	}
	conn, err := amqp091.DialConfig(s.cfg.URL, s.amqpCfg)
	if err != nil {
		return nil, fmt.Errorf("bus/amqp: connect: %w", s.scrub.Error(err))
	}
	s.conn = conn
	return conn, nil
}

// channel opens a channel with the subscriber's prefetch.
func (s *Subscriber) channel() (*amqp091.Channel, error) {
	conn, err := s.connection()
	if err != nil {
		return nil, err
	}
	ch, err := conn.Channel()
	if err != nil {
		return nil, fmt.Errorf("bus/amqp: open channel: %w", s.scrub.Error(err))
	}
	if s.cfg.Prefetch > 0 {
		if err := ch.Qos(s.cfg.Prefetch, 0, false); err != nil {
			_ = ch.Close()
			return nil, fmt.Errorf("bus/amqp: set prefetch %d: %w", s.cfg.Prefetch, s.scrub.Error(err))
		}
	}
	return ch, nil
}

// declare declares topic's exchange and queue and returns the queue's name.
func (s *Subscriber) declare(topic string) (string, error) {
	ch, err := s.channel()
	if err != nil {
		return "", err
	}
	defer ch.Close()
	queue := s.topo.queueName(topic)
	if err := s.topo.BuildTopology(ch, queue, s.cfg.Topology.ExchangeName(topic), wamqp.Config{}, s.logger); err != nil {
		return "", s.scrub.Error(err)
	}
	return queue, nil
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
	queue, err := s.declare(topic)
	if err != nil {
		return nil, err
	}
	out := make(chan *message.Message)
	s.wg.Add(1) // under RLock: before Close's Wait
	go s.consume(ctx, topic, queue, out)
	return out, nil
}

// consume runs sessions on queue until ctx is done or the subscriber
// closes, reconnecting with backoff when one ends otherwise.
func (s *Subscriber) consume(ctx context.Context, topic, queue string, out chan<- *message.Message) {
	defer s.wg.Done()
	fields := watermill.LogFields{"topic": topic, "amqp_queue_name": queue}
	var sessions sync.WaitGroup // sessions still waiting for acks
	defer sessions.Wait()
	defer close(out)
	wait := s.cfg.ReconnectInitial
	for {
		handedOver, err := s.session(ctx, queue, out, &sessions, fields)
		select {
		case <-ctx.Done():
			return
		case <-s.closing:
			return
		default:
		}
		if handedOver {
			wait = s.cfg.ReconnectInitial
		}
		s.logger.Error("Consuming stopped, reconnecting", err, fields.Add(watermill.LogFields{"wait": wait.String()}))
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return
		case <-s.closing:
			t.Stop()
			return
		}
		wait = min(2*wait, s.cfg.ReconnectMax)
	}
}

// session consumes queue on one AMQP channel until ctx is done, the
// subscriber closes or the channel is lost. It hands messages over in
// order and settles each on its own when its ack or nack comes; the
// channel stays open, after session returns, until every message handed
// over is settled or the subscriber closes (sessions counts that).
func (s *Subscriber) session(ctx context.Context, queue string, out chan<- *message.Message, sessions *sync.WaitGroup, fields watermill.LogFields) (handedOver bool, err error) {
	ch, err := s.channel()
	if err != nil {
		return false, err
	}
	lost := ch.NotifyClose(make(chan *amqp091.Error, 1))
	tag := "tailrace-" + watermill.NewShortUUID()
	deliveries, err := ch.Consume(queue, tag, false, false, false, false, nil)
	if err != nil {
		_ = ch.Close()
		return false, fmt.Errorf("bus/amqp: consume %q: %w", queue, s.scrub.Error(err))
	}
	var settling sync.WaitGroup
	sessions.Add(1)
	defer func() {
		// Stop the deliveries, give back those already received, and keep
		// the channel for the messages handed over until they are settled.
		_ = ch.Cancel(tag, false)
		go func() {
			defer sessions.Done()
			for d := range deliveries {
				s.nack(d, fields)
			}
			settling.Wait()
			_ = ch.Close()
		}()
	}()
	for {
		select {
		case d, ok := <-deliveries:
			if !ok {
				return handedOver, errors.New("bus/amqp: deliveries stopped (channel or connection closed)")
			}
			msg, err := s.cfg.Marshaler.Unmarshal(d)
			if err != nil {
				s.logger.Error("Cannot unmarshal message, nacking it", err, fields)
				s.nack(d, fields)
				continue
			}
			mctx, cancel := context.WithCancel(ctx)
			msg.SetContext(mctx)
			select {
			case out <- msg:
				handedOver = true
				settling.Add(1)
				go s.settle(d, msg, cancel, &settling, fields)
			case <-ctx.Done():
				cancel()
				s.nack(d, fields)
				return handedOver, nil
			case <-s.closing:
				cancel()
				s.nack(d, fields)
				return handedOver, nil
			}
		case aerr := <-lost:
			return handedOver, fmt.Errorf("bus/amqp: channel closed: %w", s.scrub.Error(aerr))
		case <-ctx.Done():
			return handedOver, nil
		case <-s.closing:
			return handedOver, nil
		}
	}
}

// settle acks or nacks d when its message is, then cancels the message's
// context. On Close it gives up: closing the channel requeues d.
func (s *Subscriber) settle(d amqp091.Delivery, msg *message.Message, cancel context.CancelFunc, wg *sync.WaitGroup, fields watermill.LogFields) {
	defer wg.Done()
	defer cancel()
	select {
	case <-msg.Acked():
		if err := d.Ack(false); err != nil {
			s.logger.Info("Cannot ack message (its channel is gone; the broker redelivers it)",
				fields.Add(watermill.LogFields{"message_uuid": msg.UUID, "err": s.scrub.Error(err).Error()}))
		}
	case <-msg.Nacked():
		s.nack(d, fields.Add(watermill.LogFields{"message_uuid": msg.UUID}))
	case <-s.closing:
	}
}

func (s *Subscriber) nack(d amqp091.Delivery, fields watermill.LogFields) {
	if err := d.Nack(false, !s.cfg.NoRequeueOnNack); err != nil {
		s.logger.Info("Cannot nack message (its channel is gone; the broker redelivers it)",
			fields.Add(watermill.LogFields{"err": s.scrub.Error(err).Error()}))
	}
}

// SubscribeInitialize declares topic's exchange and queue without consuming,
// so messages published before the first Subscribe are kept.
func (s *Subscriber) SubscribeInitialize(topic string) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return ErrSubscriberClosed
	}
	_, err := s.declare(topic)
	return err
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
	s.wg.Wait()
	s.connMu.Lock()
	defer s.connMu.Unlock()
	if s.conn == nil || s.conn.IsClosed() {
		return nil
	}
	err := s.conn.Close()
	if errors.Is(err, amqp091.ErrClosed) {
		err = nil
	}
	return s.scrub.Error(err)
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
