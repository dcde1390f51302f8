// Package gochannel is the in-process transport of the tailrace bus: the
// embedded default, for a single-binary service, tests and the quick start.
// It needs no service.
//
// It is Watermill's GoChannel with defaults chosen for a relay in front of
// it, and one guarantee added: a message that no subscriber receives is a
// publish failure (ErrNoSubscribers), as an unroutable message is on
// RabbitMQ, instead of being dropped silently.
//
// Guarantees, with the defaults:
//   - Publish returns once every current subscriber of the topic has acked
//     the message: when the relay marks an outbox row sent, the handler has
//     run. A nack makes the PubSub redeliver the message to that subscriber
//     and Publish wait longer.
//   - Several messages in flight: a subscriber is handed up to MaxInFlight
//     messages before their acks (a concurrent bus.Consumer works on them
//     at once), in publish order, and each is settled on its own. Publishers
//     that publish concurrently (the relay does, across partition keys) are
//     therefore not serialised behind one another's handlers.
//   - Nothing survives the process: messages live in memory only. The outbox
//     is what makes them durable (a crash before the ack leaves the row to be
//     relayed again).
//   - Every subscriber of a topic receives every message (there are no
//     consumer groups); the order handed over is the publish order per
//     subscriber (a nacked message is handed over again before the ones not
//     yet handed over).
//
// Publisher and subscriber must be the same instance: New returns one
// *PubSub that is both.
//
// Why not Watermill's GoChannel: with BlockPublishUntilSubscriberAck it
// holds the topic's lock until the message is acked, so every subscriber
// gets one message at a time whatever the publishers do; without it, every
// message goes out on its own goroutine, in no order.
package gochannel

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
)

// ErrNoSubscribers: nothing subscribes to the topic, so the message would be
// lost. Not returned when Config.Persistent or Config.AllowNoSubscribers is
// set.
var ErrNoSubscribers = errors.New("bus/gochannel: no subscriber for topic")

// ErrClosed is returned by Publish and Subscribe after Close.
var ErrClosed = errors.New("bus/gochannel: closed")

// DefaultMaxInFlight is Config.MaxInFlight's default.
const DefaultMaxInFlight = 64

// Config configures a PubSub. The zero value is the recommended default.
type Config struct {
	// OutputBuffer is each subscription's channel buffer. Default 0
	// (unbuffered).
	OutputBuffer int64
	// MaxInFlight is how many messages a subscription holds handed over
	// and not yet acked; the next waits for a slot. Keep it at or above
	// the consumer's Concurrency. Default DefaultMaxInFlight (64); 1 hands
	// over one message at a time.
	MaxInFlight int
	// Persistent keeps every published message in memory and replays them
	// all to each new subscriber. Default false: meant for tests only, as
	// memory grows without bound.
	Persistent bool
	// NoWaitForAck makes Publish return as soon as the message is queued
	// for the subscribers, without waiting for their acks. Default false:
	// Publish waits for the acks.
	NoWaitForAck bool
	// AllowNoSubscribers drops a message published to a topic without
	// subscribers, as Watermill's GoChannel does, instead of failing with
	// ErrNoSubscribers. Default false.
	AllowNoSubscribers bool
	// PreserveContext passes the publisher's message context to
	// subscribers. Default false, like the network transports: the
	// message's context is a child of Subscribe's ctx, cancelled once the
	// message is acked or nacked.
	PreserveContext bool
}

func (c *Config) setDefaults() {
	if c.MaxInFlight == 0 {
		c.MaxInFlight = DefaultMaxInFlight
	}
}

// Validate reports every problem in c at once.
func (c Config) Validate() error {
	var errs []error
	if c.OutputBuffer < 0 {
		errs = append(errs, fmt.Errorf("bus/gochannel: OutputBuffer must not be negative, got %d", c.OutputBuffer))
	}
	if c.MaxInFlight < 0 {
		errs = append(errs, fmt.Errorf("bus/gochannel: MaxInFlight must not be negative, got %d", c.MaxInFlight))
	}
	return errors.Join(errs...)
}

// PubSub is an in-process publisher and subscriber. It is safe for
// concurrent use.
type PubSub struct {
	cfg    Config
	logger watermill.LoggerAdapter

	mu        sync.Mutex // guards topics, persisted, closed; held while a Publish queues
	topics    map[string][]*subscription
	persisted map[string][]*message.Message
	closed    bool
	closing   chan struct{}
	wg        sync.WaitGroup // one per subscription, until its channel is closed
}

var (
	_ message.Publisher            = (*PubSub)(nil)
	_ message.Subscriber           = (*PubSub)(nil)
	_ message.SubscribeInitializer = (*PubSub)(nil)
)

// New returns an in-process Pub/Sub. A nil logger logs nothing.
func New(cfg Config, logger watermill.LoggerAdapter) (*PubSub, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg.setDefaults()
	if logger == nil {
		logger = watermill.NopLogger{}
	}
	return &PubSub{
		cfg: cfg, logger: logger,
		topics: map[string][]*subscription{}, persisted: map[string][]*message.Message{},
		closing: make(chan struct{}),
	}, nil
}

// delivery is one published message on its way to one subscription.
type delivery struct {
	msg  *message.Message // the published copy; each hand-over copies it again
	done chan struct{}    // closed once acked, or once the subscription is gone
	once sync.Once
}

func (d *delivery) finish() { d.once.Do(func() { close(d.done) }) }

// Publish delivers messages to every current subscriber of topic (see the
// package doc for when it returns). It fails with ErrNoSubscribers when there
// is none, unless the config allows it.
func (p *PubSub) Publish(topic string, messages ...*message.Message) error {
	copies := make([]*message.Message, len(messages))
	for i, msg := range messages {
		if p.cfg.PreserveContext {
			copies[i] = msg.CopyWithContext()
		} else {
			copies[i] = msg.Copy()
		}
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return ErrClosed
	}
	subs := p.topics[topic]
	if len(subs) == 0 && !p.cfg.Persistent && !p.cfg.AllowNoSubscribers {
		p.mu.Unlock()
		return fmt.Errorf("%w %q", ErrNoSubscribers, topic)
	}
	if p.cfg.Persistent {
		p.persisted[topic] = append(p.persisted[topic], copies...)
	}
	var pending []*delivery
	for _, msg := range copies {
		for _, s := range subs {
			pending = append(pending, s.enqueue(msg))
		}
	}
	p.mu.Unlock()
	if p.cfg.NoWaitForAck {
		return nil
	}
	for _, d := range pending {
		select {
		case <-d.done:
		case <-p.closing:
			return nil
		}
	}
	return nil
}

// Subscribe returns the messages published to topic from now on (or, with
// Persistent, since the start). The channel closes when ctx is done or the
// PubSub is closed; messages not acked by then are dropped for this
// subscriber (a Publish waiting for them returns).
func (p *PubSub) Subscribe(ctx context.Context, topic string) (<-chan *message.Message, error) {
	s := &subscription{
		ps: p, topic: topic, ctx: ctx,
		out:   make(chan *message.Message, p.cfg.OutputBuffer),
		wake:  make(chan struct{}, 1),
		slots: make(chan struct{}, p.cfg.MaxInFlight),
		stop:  make(chan struct{}),
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, ErrClosed
	}
	p.topics[topic] = append(p.topics[topic], s)
	for _, msg := range p.persisted[topic] {
		s.enqueue(msg)
	}
	p.wg.Add(2)
	p.mu.Unlock()
	go s.run()
	go func() {
		defer p.wg.Done()
		select {
		case <-ctx.Done():
		case <-p.closing:
		}
		s.end()
	}()
	return s.out, nil
}

// SubscribeInitialize does nothing: topics need no set-up in memory.
func (p *PubSub) SubscribeInitialize(string) error { return nil }

// Close closes every subscription and returns once their channels are
// closed. Messages not yet acked are dropped; Publish calls waiting for them
// return nil. Publish and Subscribe after Close return ErrClosed.
func (p *PubSub) Close() error {
	p.mu.Lock()
	if !p.closed {
		p.closed = true
		close(p.closing)
	}
	p.mu.Unlock()
	p.wg.Wait()
	return nil
}

// subscription is one Subscribe call: a queue of deliveries, handed over in
// order by run, up to MaxInFlight unacked.
type subscription struct {
	ps    *PubSub
	topic string
	ctx   context.Context
	out   chan *message.Message

	mu    sync.Mutex
	queue []*delivery
	ended bool

	wake     chan struct{} // a delivery was queued
	slots    chan struct{} // one per message handed over and not yet settled
	stop     chan struct{} // closed by end
	stopOnce sync.Once
}

// enqueue appends msg to the subscription's queue and returns its delivery.
func (s *subscription) enqueue(msg *message.Message) *delivery {
	d := &delivery{msg: msg, done: make(chan struct{})}
	s.mu.Lock()
	if s.ended {
		s.mu.Unlock()
		d.finish()
		return d
	}
	s.queue = append(s.queue, d)
	s.mu.Unlock()
	s.signal()
	return d
}

// requeue puts a nacked delivery back at the front.
func (s *subscription) requeue(d *delivery) {
	s.mu.Lock()
	if s.ended {
		s.mu.Unlock()
		d.finish()
		return
	}
	s.queue = append([]*delivery{d}, s.queue...)
	s.mu.Unlock()
	s.signal()
}

func (s *subscription) signal() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// next returns the first queued delivery, waiting for one; nil once the
// subscription ends.
func (s *subscription) next() *delivery {
	for {
		s.mu.Lock()
		if len(s.queue) > 0 {
			d := s.queue[0]
			s.queue[0] = nil
			s.queue = s.queue[1:]
			s.mu.Unlock()
			return d
		}
		s.mu.Unlock()
		select {
		case <-s.wake:
		case <-s.stop:
			return nil
		}
	}
}

// run hands deliveries over in order; it is the only sender on out and
// closes it when the subscription ends.
func (s *subscription) run() {
	defer s.ps.wg.Done()
	defer close(s.out)
	for {
		select {
		case s.slots <- struct{}{}:
		case <-s.stop:
			return
		}
		d := s.next()
		if d == nil {
			return
		}
		msg := d.msg.Copy()
		parent := s.ctx
		if s.ps.cfg.PreserveContext {
			parent = d.msg.Context()
		}
		ctx, cancel := context.WithCancel(parent)
		msg.SetContext(ctx)
		select {
		case s.out <- msg:
			go s.settle(d, msg, cancel)
		case <-s.stop:
			cancel()
			d.finish()
			return
		}
	}
}

// settle waits for the ack or nack of one hand-over.
func (s *subscription) settle(d *delivery, msg *message.Message, cancel context.CancelFunc) {
	defer cancel()
	select {
	case <-msg.Acked():
		d.finish()
	case <-msg.Nacked():
		s.requeue(d)
	case <-s.stop:
		d.finish()
		return
	}
	<-s.slots
}

// end removes the subscription from its topic, stops run and drops what
// was not acked.
func (s *subscription) end() {
	p := s.ps
	p.mu.Lock()
	subs := p.topics[s.topic]
	for i, x := range subs {
		if x == s {
			p.topics[s.topic] = append(subs[:i:i], subs[i+1:]...)
			break
		}
	}
	if len(p.topics[s.topic]) == 0 {
		delete(p.topics, s.topic)
	}
	p.mu.Unlock()
	s.mu.Lock()
	s.ended = true
	queued := s.queue
	s.queue = nil
	s.mu.Unlock()
	s.stopOnce.Do(func() { close(s.stop) })
	for _, d := range queued {
		d.finish()
	}
}
