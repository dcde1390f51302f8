package nats

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	wnats "github.com/ThreeDotsLabs/watermill-nats/v2/pkg/nats"
	"github.com/ThreeDotsLabs/watermill/message"
	nc "github.com/nats-io/nats.go"

	"github.com/tailrace/tailrace/bus/internal/closing"
	"github.com/tailrace/tailrace/bus/internal/secret"
)

// ErrClosed is returned by Subscribe after Close.
var ErrClosed = errors.New("bus/nats: subscriber closed")

// Subscriber consumes from JetStream; see the package doc for its
// guarantees.
//
// It is written directly on nats.go's JetStream API, with watermill-nats's
// message format (NATSMarshaler) and subject naming, instead of delegating
// to watermill-nats's Subscriber: that one (v2.1.3) closes the channel
// returned by Subscribe as soon as the NATS subscriptions are unsubscribed,
// but nats.go's Unsubscribe does not wait for a message callback in
// progress, so the close races with that callback's send — a data race,
// and a possible "send on closed channel" panic.
//
// Messages are handed over on the channel in delivery order without waiting
// for the previous one's ack: up to MaxAckPending are in flight at once (the
// server stops pushing beyond it), each settled on its own when its handler
// settles it: Ack sends an AckSync (it returns once the server has the ack),
// Nack sends a Nak (immediate redelivery, after messages already handed
// over). The message's context is a child
// of Subscribe's ctx and is cancelled once the ack or nack is sent, or the
// message is given up. A message neither acked nor nacked within AckWait is
// given up here; the server redelivers it.
//
// Closing, guaranteed:
//   - The channel returned by Subscribe is closed exactly once, after every
//     message callback that could send on it has returned: nothing is ever
//     sent on a closed channel. It closes when ctx is done (messages not yet
//     acked are given up at once) or on Close.
//   - Close stops delivery, then waits up to CloseTimeout for the messages
//     already handed over to be acked or nacked — those acks still reach the
//     server, and the messages' contexts stay live meanwhile. Messages still
//     unacked after CloseTimeout are given up (contexts cancelled; the server
//     redelivers them after AckWait). Close returns only after every channel
//     returned by Subscribe is closed, then drains the connection. So Close
//     takes at most about CloseTimeout, plus one ack round trip in progress.
//   - Close may be called more than once and concurrently; every call returns
//     after the channels are closed. Subscribe after Close returns ErrClosed.
//
// Handlers must not wait for Close to return before acking the message they
// hold: Close would wait CloseTimeout for that ack.
type Subscriber struct {
	conn   *nc.Conn
	js     nc.JetStreamContext
	inbox  string // the connection's inbox prefix, for deliver subjects
	cfg    Config
	prov   *provisioner
	scrub  secret.Scrubber
	logger watermill.LoggerAdapter

	mu          sync.Mutex // guards closed and the outputs.Add that must precede outputs.Wait
	closed      bool
	closing     chan struct{}  // closed by Close: stop delivering
	abandon     chan struct{}  // closed CloseTimeout after Close: stop waiting for acks
	closeErr    error          // written before done is closed
	done        chan struct{}  // closed when Close has finished
	outputs     sync.WaitGroup // one per Subscribe; Done once its channel is closed
	unmarshaler wnats.NATSMarshaler
}

var (
	_ message.Subscriber           = (*Subscriber)(nil)
	_ message.SubscribeInitializer = (*Subscriber)(nil)
)

// NewSubscriber validates cfg and connects. A nil logger logs nothing.
func NewSubscriber(cfg Config, logger watermill.LoggerAdapter) (*Subscriber, error) {
	conn, scrub, logger, err := open(&cfg, logger, "bus/nats.Subscriber", false)
	if err != nil {
		return nil, err
	}
	js, err := conn.JetStream(nc.MaxWait(cfg.PublishTimeout))
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("bus/nats: %w", scrub.Error(err))
	}
	return &Subscriber{
		conn:    conn,
		js:      js,
		inbox:   inboxPrefix(conn),
		cfg:     cfg,
		prov:    &provisioner{js: js, off: cfg.NoProvision},
		scrub:   scrub,
		logger:  logger,
		closing: make(chan struct{}),
		abandon: make(chan struct{}),
		done:    make(chan struct{}),
	}, nil
}

// Subscribe makes sure topic's stream exists (unless NoProvision), opens
// Config.Subscribers subscriptions on it and returns the messages delivered
// to this subscriber. The channel closes when ctx is done or the subscriber
// is closed; see Subscriber for the guarantees.
//
// With a ConsumerGroup, Subscribe first creates the group's durable consumer
// (ConsumerName) when it does not exist yet, and checks it when it does: a
// consumer this subscriber cannot use fails with an error wrapping
// ErrConsumerMismatch. The subscriptions are bound to that consumer, so
// neither their end nor Close deletes it.
func (s *Subscriber) Subscribe(ctx context.Context, topic string) (<-chan *message.Message, error) {
	if s.isClosed() {
		return nil, ErrClosed
	}
	opts, err := s.setUp(topic)
	if err != nil {
		if s.isClosed() { // the connection was closed under the set-up
			return nil, ErrClosed
		}
		return nil, s.scrub.Error(err)
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, ErrClosed
	}
	s.outputs.Add(1)
	s.mu.Unlock()

	o := &output{s: s, ctx: ctx, ch: make(chan *message.Message), stop: make(chan struct{})}
	// Subject and queue group as watermill-nats's DefaultSubjectCalculator:
	// the topic, and the consumer group.
	for i := range s.cfg.Subscribers {
		fields := watermill.LogFields{"topic": topic, "subscriber_num": i}
		sub, err := s.js.QueueSubscribe(topic, s.cfg.ConsumerGroup, func(m *nc.Msg) { o.handle(m, fields) }, opts...)
		if err != nil {
			o.shutdown() // the subscriptions opened so far
			return nil, fmt.Errorf("bus/nats: subscribe to %q: %w", topic, s.scrub.Error(err))
		}
		o.subs = append(o.subs, sub)
	}
	go o.run()
	return o.ch, nil
}

// setUp makes sure topic's stream and, with a ConsumerGroup, the group's
// durable consumer exist, and returns the options to subscribe with.
func (s *Subscriber) setUp(topic string) ([]nc.SubOpt, error) {
	if err := s.prov.ensure(topic); err != nil {
		return nil, err
	}
	// nats.go acks a message itself when the callback returns unless
	// ManualAck is set: a message given up (not handed over, or not acked
	// in time) would be acked, that is lost, instead of redelivered.
	opts := []nc.SubOpt{nc.ManualAck()}
	group := s.cfg.ConsumerGroup
	if group == "" {
		// An ephemeral consumer on the stream capturing the subject, created
		// by nats.go, which deletes it when the subscription ends.
		return append(opts, nc.BindStream(""), nc.DeliverAll(), nc.AckExplicit(), nc.AckWait(s.cfg.AckWait),
			nc.MaxAckPending(s.cfg.MaxAckPending)), nil
	}
	stream, err := s.js.StreamNameBySubject(topic)
	if err != nil {
		return nil, fmt.Errorf("bus/nats: find the stream of topic %q: %w", topic, err)
	}
	g := &groupConsumer{stream: stream, name: ConsumerName(group, topic), group: group, topic: topic, ackWait: s.cfg.AckWait,
		maxAckPending: s.cfg.MaxAckPending}
	if err := g.ensure(s.js, s.inbox); err != nil {
		return nil, err
	}
	return append(opts, nc.Bind(g.stream, g.name)), nil
}

func (s *Subscriber) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// SubscribeInitialize creates topic's stream, so messages published before
// the first Subscribe are kept.
func (s *Subscriber) SubscribeInitialize(topic string) error {
	return s.scrub.Error(s.prov.ensure(topic))
}

// Close stops the subscriptions, waits up to CloseTimeout for in-flight
// messages, returns once every channel returned by Subscribe is closed, and
// drains the connection. See Subscriber.
func (s *Subscriber) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		<-s.done
		return s.closeErr
	}
	s.closed = true
	close(s.closing)
	s.mu.Unlock()
	defer close(s.done)

	closing.Wait(&s.outputs, s.cfg.CloseTimeout, func() {
		s.logger.Info("Messages not acked within CloseTimeout are given up; the server redelivers them after AckWait",
			watermill.LogFields{"close_timeout": s.cfg.CloseTimeout.String()})
		close(s.abandon)
	})
	if err := s.conn.Drain(); err != nil && !errors.Is(err, nc.ErrConnectionClosed) {
		s.closeErr = fmt.Errorf("bus/nats: drain connection: %w", s.scrub.Error(err))
	}
	return s.closeErr
}

// output is one Subscribe call: its NATS subscriptions and its channel.
//
// A message callback holds mu.RLock from its check of closed until it
// returns, that is for the hand-over; shutdown sets closed and closes ch
// under mu.Lock, so ch is closed only after every callback that could send
// on it has returned, and a callback that starts later sees closed and
// sends nothing. The waits for acks run on their own goroutines (settling),
// which shutdown waits for before unsubscribing. stop, closed before shutdown takes
// the lock, ends the hand-overs at once; the waits for acks end with the
// ack or nack, AckWait, the subscriber's abandon (CloseTimeout after Close)
// or ctx.
//
// The NATS subscriptions are unsubscribed last: nats.go deletes the
// ephemeral consumer it created (no ConsumerGroup) when its subscription is
// unsubscribed, and the acks sent while Close waits must reach that
// consumer. A consumer group's durable consumer is bound, not created by
// nats.go, and outlives the subscriptions.
type output struct {
	s    *Subscriber
	ctx  context.Context
	subs []*nc.Subscription
	ch   chan *message.Message
	stop chan struct{}

	mu       sync.RWMutex
	closed   bool
	settling sync.WaitGroup // one per message handed over, until settled or given up
}

// run shuts the output down when its ctx is done or the subscriber closes.
func (o *output) run() {
	select {
	case <-o.s.closing:
	case <-o.ctx.Done():
	}
	o.shutdown()
}

func (o *output) shutdown() {
	close(o.stop)
	o.mu.Lock()
	o.closed = true
	close(o.ch)
	o.mu.Unlock()
	o.settling.Wait() // the acks must reach the consumer before it is unsubscribed
	for _, sub := range o.subs {
		if err := sub.Unsubscribe(); err != nil && !errors.Is(err, nc.ErrConnectionClosed) && !errors.Is(err, nc.ErrBadSubscription) {
			o.s.logger.Error("Cannot unsubscribe", o.s.scrub.Error(err), watermill.LogFields{"subject": sub.Subject})
		}
	}
	// UNSUB is sent asynchronously: wait until the server has processed it
	// (a PING/PONG round trip), so that once this returns the server no
	// longer pushes to these subscriptions. Otherwise a message published
	// just after Close returned could still be pushed here, be given up
	// unacked, and reach the group's next member only after AckWait.
	if err := o.s.conn.FlushTimeout(o.s.cfg.ConnectTimeout); err != nil && !errors.Is(err, nc.ErrConnectionClosed) {
		o.s.logger.Info("Cannot confirm the unsubscribe with the server", watermill.LogFields{"err": o.s.scrub.Error(err).Error()})
	}
	o.s.outputs.Done()
}

// handle runs on nats.go's delivery goroutine of one subscription: it hands
// m over, in delivery order, and leaves the wait for its ack or nack to
// settle.
func (o *output) handle(m *nc.Msg, fields watermill.LogFields) {
	o.mu.RLock()
	defer o.mu.RUnlock()
	if o.closed {
		return // not acked: redelivered
	}
	s := o.s
	ackWait := time.NewTimer(s.cfg.AckWait) // the server's AckWait runs from delivery
	msg, err := s.unmarshaler.Unmarshal(m)
	if err != nil {
		s.logger.Error("Cannot unmarshal message", err, fields)
		return
	}
	fields = fields.Add(watermill.LogFields{"message_uuid": msg.UUID})
	ctx, cancel := context.WithCancel(o.ctx)
	msg.SetContext(ctx)
	giveUp := func() {
		cancel()
		ackWait.Stop()
	}

	select { // do not hand over once closing, even if a receiver is ready
	case <-o.stop:
		giveUp()
		return
	default:
	}
	select {
	case o.ch <- msg:
		// Settled on its own goroutine: the next message is handed over
		// without waiting for this one's ack (up to MaxAckPending).
		o.settling.Add(1) // under mu.RLock: before shutdown's Wait
		go o.settle(m, msg, ctx, cancel, ackWait, fields)
	case <-o.stop:
		s.logger.Trace("Closing, message not handed over", fields)
		giveUp()
	case <-ctx.Done():
		s.logger.Trace("Context done, message not handed over", fields)
		giveUp()
	}
}

// settle waits for the ack or nack of one message handed over and sends it
// to the server.
// ctx is the context the message was handed over with (the reader may
// replace the message's own).
func (o *output) settle(m *nc.Msg, msg *message.Message, ctx context.Context, cancel context.CancelFunc, ackWait *time.Timer, fields watermill.LogFields) {
	defer o.settling.Done()
	defer cancel()
	defer ackWait.Stop()
	s := o.s
	select {
	case <-msg.Acked():
		if m.Reply == "" {
			return
		}
		if err := m.AckSync(); err != nil {
			s.logger.Error("Cannot ack message", s.scrub.Error(err), fields)
			return
		}
		s.logger.Trace("Message acked", fields)
	case <-msg.Nacked():
		if m.Reply == "" {
			return
		}
		if err := m.Nak(); err != nil {
			s.logger.Error("Cannot nak message", s.scrub.Error(err), fields)
			return
		}
		s.logger.Trace("Message nacked", fields)
	case <-ackWait.C:
		s.logger.Info("Message not acked within AckWait, given up; the server redelivers it", fields)
	case <-s.abandon:
		s.logger.Trace("Closed, message given up before its ack", fields)
	case <-ctx.Done():
		s.logger.Trace("Context done, message given up before its ack", fields)
	}
}
