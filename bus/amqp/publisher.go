package amqp

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/tailrace/tailrace/internal/transport"
)

// Publisher publishes Watermill messages to RabbitMQ with publisher confirms
// always on and unroutable messages reported as failures.
//
// Guarantees: Publish returns nil only after the broker confirmed every
// message (basic.ack) and routed it to at least one queue. A message that no
// queue receives comes back as a basic.return (it is published with the
// mandatory flag) and Publish returns a *ReturnedError (ErrUnroutable); a
// basic.nack gives ErrNacked; a connection lost before the confirm gives
// ErrConnectionLost (the message may have been stored: at-least-once).
// Messages are persistent (delivery mode 2) with the default marshaler, and
// exchanges and queues are declared durable.
//
// Throughput: a Publish does not wait for one confirm before sending the next
// message. The messages of one call, and of concurrent calls, are pipelined on
// one channel, up to Config.MaxInFlight unconfirmed at a time.
//
// Order: the messages of one Publish call reach the exchange in order, and so
// do the calls of one goroutine. Concurrent calls interleave.
//
// The connection is re-established after it drops (exponential backoff
// with jitter from Config.ReconnectInitial, at most Config.ReconnectMax —
// 2 s by default — between attempts, each attempt logged). While it is down
// Publish fails fast with ErrNotConnected; the caller (the relay) retries.
// A broker that cannot be reached when the Publisher is built does not stop
// it being built (unless Config.FailFast): it connects in the background.
//
// Errors of the transport (ErrNotConnected, ErrConnectionLost, ErrBlocked,
// ErrPublishTimeout, ErrClosed, connection-level AMQP errors, network
// errors) are marked with tailrace.Unavailable: the outbox relay takes them
// for an outage and counts no attempt against the message. Errors about
// the message (ErrUnroutable, ErrNacked, a marshaling error, a channel
// error such as an exchange the broker refuses) are not.
//
// A Publisher is safe for concurrent use.
type Publisher struct {
	cfg    Config
	logger watermill.LoggerAdapter
	scrub  scrubber
	url    string // redacted
	topics map[string]bool

	mu      sync.RWMutex
	sess    *session
	closed  bool
	closing chan struct{}
	done    chan struct{} // closed when supervise returns
	active  sync.WaitGroup
}

var _ message.Publisher = (*Publisher)(nil)

// NewPublisher validates cfg, connects to the broker and declares
// Topology.Topics. The first connection is tried here, so an invalid URL,
// bad credentials, an unknown vhost or a topology the broker refuses are
// reported at once (with the password redacted). A broker that cannot be
// reached (refused, unresolvable, timed out) is not an error: the Publisher
// is returned, logs the failure, and connects in the background, Publish
// failing with ErrNotConnected meanwhile; set Config.FailFast to get the
// error instead. Later outages are handled by reconnecting. A nil logger
// logs nothing.
func NewPublisher(cfg Config, logger watermill.LoggerAdapter) (*Publisher, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if logger == nil {
		logger = watermill.NopLogger{}
	}
	p := &Publisher{
		cfg:     cfg,
		scrub:   newScrubber(cfg.URL),
		url:     RedactURL(cfg.URL),
		topics:  make(map[string]bool, len(cfg.Topology.Topics)),
		closing: make(chan struct{}),
		done:    make(chan struct{}),
	}
	p.logger = logger.With(watermill.LogFields{"component": "bus/amqp.Publisher", "url": p.url})
	for _, t := range cfg.Topology.Topics {
		p.topics[t] = true
	}
	s, err := p.connect()
	if err != nil {
		err = fmt.Errorf("bus/amqp: connect to %s: %w", p.url, err)
		if cfg.FailFast || !transportFailure(err) {
			return nil, err
		}
		p.logger.Error("Broker unreachable; connecting in the background", err, nil)
		go p.supervise(nil)
		return p, nil
	}
	p.sess = s
	go p.supervise(s)
	p.logger.Info("Connected", nil)
	return p, nil
}

// Connected reports whether the publisher holds a live connection now.
func (p *Publisher) Connected() bool {
	p.mu.RLock()
	s := p.sess
	p.mu.RUnlock()
	return s != nil && s.dead() == nil
}

// flight is one message sent and not yet settled.
type flight struct {
	uuid, messageID string
	exchange, key   string
	returned        *amqp091.Return
	result          chan error // buffered 1, receives exactly once
}

// session is one connection with its confirm-mode publishing channel.
type session struct {
	p     *Publisher
	conn  *amqp091.Connection
	ch    *amqp091.Channel
	send  chan struct{} // 1-slot lock: delivery tag + send are atomic
	slots chan struct{} // MaxInFlight semaphore

	mu      sync.Mutex
	pending map[uint64]*flight
	err     error // why the session died, set before done is closed
	done    chan struct{}
	blocked atomic.Bool

	topoMu   sync.Mutex
	topoCh   *amqp091.Channel
	declared sync.Map // topic -> struct{}
}

func (p *Publisher) connect() (*session, error) {
	conn, err := amqp091.DialConfig(p.cfg.URL, amqp091.Config{
		Heartbeat:       p.cfg.Heartbeat,
		TLSClientConfig: p.cfg.TLS,
		Properties:      amqp091.Table{"connection_name": p.cfg.ConnectionName},
		Dial:            p.dial,
	})
	if err != nil {
		return nil, p.scrub.Error(err)
	}
	ch, err := conn.Channel()
	if err == nil {
		err = ch.Confirm(false)
	}
	if err != nil {
		_ = conn.Close()
		return nil, p.scrub.Error(fmt.Errorf("open confirm channel: %w", err))
	}
	s := &session{
		p:       p,
		conn:    conn,
		ch:      ch,
		send:    make(chan struct{}, 1),
		slots:   make(chan struct{}, p.cfg.MaxInFlight),
		pending: make(map[uint64]*flight),
		done:    make(chan struct{}),
	}
	// Returns are unbuffered on purpose: the connection's reader hands a
	// basic.return over before it reads the basic.ack of the same message,
	// and dispatch handles both in one goroutine, so a return is always
	// recorded before the confirm it precedes.
	returns := ch.NotifyReturn(make(chan amqp091.Return))
	confirms := ch.NotifyPublish(make(chan amqp091.Confirmation, p.cfg.MaxInFlight+1))
	chClosed := ch.NotifyClose(make(chan *amqp091.Error, 1))
	blocked := conn.NotifyBlocked(make(chan amqp091.Blocking, 4))
	go s.dispatch(returns, confirms, chClosed, blocked)

	for _, topic := range p.cfg.Topology.Topics {
		if err := s.declare(topic); err != nil {
			s.kill(err)
			return nil, err
		}
	}
	return s, nil
}

// dial is amqp091.DefaultDial (a TCP connect bounded by DialTimeout, with a
// deadline for the handshake) with the connection wrapped so that
// concurrent publishes share write system calls (see coalescingConn). TLS,
// when configured, runs on top of it.
func (p *Publisher) dial(network, addr string) (net.Conn, error) {
	c, err := amqp091.DefaultDial(p.cfg.DialTimeout)(network, addr)
	if err != nil {
		return nil, err
	}
	return newCoalescingConn(c), nil
}

// dispatch settles flights: returns mark them unroutable, confirms complete
// them. It ends, failing every pending flight, when the channel closes.
func (s *session) dispatch(returns <-chan amqp091.Return, confirms <-chan amqp091.Confirmation, chClosed <-chan *amqp091.Error, blocked <-chan amqp091.Blocking) {
	for {
		select {
		case r, ok := <-returns:
			if !ok {
				returns = nil
				continue
			}
			s.markReturned(r)
		case b, ok := <-blocked:
			if !ok {
				blocked = nil
				continue
			}
			s.blocked.Store(b.Active)
			if b.Active {
				s.p.logger.Error("Broker blocked publishing", errors.New(b.Reason), nil)
			} else {
				s.p.logger.Info("Broker unblocked publishing", nil)
			}
		case c, ok := <-confirms:
			if !ok {
				// The connection's reader may still want to hand over a
				// blocked/unblocked notice until it shuts down: keep taking
				// them so closing the connection cannot wait on us.
				if blocked != nil {
					go func() {
						for range blocked {
						}
					}()
				}
				var reason error = ErrConnectionLost
				select {
				case e := <-chClosed:
					if e != nil {
						reason = fmt.Errorf("%w: %w", ErrConnectionLost, s.p.scrub.Error(e))
					}
				default:
				}
				s.kill(reason)
				return
			}
			s.confirm(c)
		}
	}
}

func (s *session) markReturned(r amqp091.Return) {
	s.mu.Lock()
	defer s.mu.Unlock()
	// The oldest unsettled flight with the same id, exchange and routing key.
	var best *flight
	var bestTag uint64
	for tag, f := range s.pending {
		if f.returned == nil && f.messageID == r.MessageId && f.exchange == r.Exchange && f.key == r.RoutingKey &&
			(best == nil || tag < bestTag) {
			best, bestTag = f, tag
		}
	}
	if best == nil {
		s.p.logger.Error("Returned message matches no pending publish", nil, watermill.LogFields{
			"message_id": r.MessageId, "exchange": r.Exchange, "routing_key": r.RoutingKey})
		return
	}
	best.returned = &r
}

func (s *session) confirm(c amqp091.Confirmation) {
	s.mu.Lock()
	f, ok := s.pending[c.DeliveryTag]
	delete(s.pending, c.DeliveryTag)
	s.mu.Unlock()
	if !ok {
		return
	}
	<-s.slots
	switch {
	case !c.Ack:
		f.result <- fmt.Errorf("%w: message %s to exchange %q", ErrNacked, f.uuid, f.exchange)
	case f.returned != nil:
		f.result <- &ReturnedError{
			MessageUUID: f.uuid,
			Exchange:    f.returned.Exchange,
			RoutingKey:  f.returned.RoutingKey,
			ReplyCode:   f.returned.ReplyCode,
			ReplyText:   f.returned.ReplyText,
		}
	default:
		f.result <- nil
	}
}

// kill ends the session once: it fails every pending flight with err and
// closes the connection, which makes the supervisor reconnect.
func (s *session) kill(err error) {
	s.mu.Lock()
	if s.err != nil {
		s.mu.Unlock()
		return
	}
	s.err = err
	pending := s.pending
	s.pending = make(map[uint64]*flight)
	close(s.done)
	s.mu.Unlock()
	for _, f := range pending {
		f.result <- err
	}
	_ = s.conn.Close()
}

// dead returns why the session died, or nil.
func (s *session) dead() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// declare makes sure topic's exchange (and queue) exist on this connection.
func (s *session) declare(topic string) error {
	if _, ok := s.declared.Load(topic); ok {
		return nil
	}
	s.topoMu.Lock()
	defer s.topoMu.Unlock()
	if _, ok := s.declared.Load(topic); ok {
		return nil
	}
	t := s.p.cfg.Topology
	if s.topoCh == nil || s.topoCh.IsClosed() {
		ch, err := s.conn.Channel()
		if err != nil {
			return fmt.Errorf("bus/amqp: open topology channel: %w", s.p.scrub.Error(err))
		}
		s.topoCh = ch
	}
	ch := s.topoCh
	exchange, key, queue := t.ExchangeName(topic), t.RoutingKey(topic), t.QueueName(topic)
	durable := !t.Transient
	var err error
	switch {
	case t.Declare == DeclareNever && exchange != "":
		err = ch.ExchangeDeclarePassive(exchange, t.ExchangeType, durable, false, false, false, nil)
		if err != nil {
			err = fmt.Errorf("bus/amqp: exchange %q for topic %q (Declare is never): %w", exchange, topic, err)
		}
	case t.Declare == DeclareNever:
	default:
		if exchange != "" {
			if err = ch.ExchangeDeclare(exchange, t.ExchangeType, durable, false, false, false, nil); err != nil {
				err = fmt.Errorf("bus/amqp: declare exchange %q for topic %q: %w", exchange, topic, err)
				break
			}
		}
		if !t.DeclareQueues {
			break
		}
		if _, err = ch.QueueDeclare(queue, durable, false, false, false, nil); err != nil {
			err = fmt.Errorf("bus/amqp: declare queue %q for topic %q: %w", queue, topic, err)
			break
		}
		if exchange != "" {
			if err = ch.QueueBind(queue, key, exchange, false, nil); err != nil {
				err = fmt.Errorf("bus/amqp: bind queue %q to exchange %q for topic %q: %w", queue, exchange, topic, err)
			}
		}
	}
	if err != nil {
		return s.p.scrub.Error(err)
	}
	s.declared.Store(topic, struct{}{})
	return nil
}

// supervise waits for the session to die and reconnects, until Close. A
// nil s (the first connection failed) starts with reconnecting.
func (p *Publisher) supervise(s *session) {
	defer close(p.done)
	for {
		if s != nil {
			select {
			case <-p.closing:
				return
			case <-s.done:
			}
			p.logger.Error("Connection lost, reconnecting", s.dead(), nil)
			p.mu.Lock()
			p.sess = nil
			p.mu.Unlock()
		}

		delay := p.cfg.ReconnectInitial
		for attempt := 1; ; attempt++ {
			// Full jitter over [delay/2, delay].
			wait := delay/2 + rand.N(delay/2+1)
			select {
			case <-p.closing:
				return
			case <-time.After(wait):
			}
			ns, err := p.connect()
			if err == nil {
				p.mu.Lock()
				if p.closed {
					p.mu.Unlock()
					ns.kill(ErrClosed)
					return
				}
				p.sess = ns
				p.mu.Unlock()
				s = ns
				p.logger.Info("Reconnected", watermill.LogFields{"attempt": attempt})
				break
			}
			p.logger.Error("Reconnect failed", err, watermill.LogFields{"attempt": attempt, "next_wait": min(delay*2, p.cfg.ReconnectMax).String()})
			delay = min(delay*2, p.cfg.ReconnectMax)
		}
	}
}

// Publish sends messages to topic's exchange and returns once the broker has
// confirmed and routed every one of them, or at the first failure (see the
// type's doc for the errors; failures of the transport are marked with
// tailrace.Unavailable). It gives up after Config.PublishTimeout, or when a
// message's context is done.
func (p *Publisher) Publish(topic string, messages ...*message.Message) error {
	return transport.Mark(p.publish(topic, messages...), transportFailure)
}

func (p *Publisher) publish(topic string, messages ...*message.Message) error {
	p.mu.RLock()
	if p.closed {
		p.mu.RUnlock()
		return ErrClosed
	}
	p.active.Add(1)
	s := p.sess
	p.mu.RUnlock()
	defer p.active.Done()

	if topic == "" {
		return errors.New("bus/amqp: empty topic")
	}
	if p.cfg.Topology.Declare == DeclareUpFront && !p.topics[topic] {
		return fmt.Errorf("%w: %q", ErrUndeclaredTopic, topic)
	}
	if len(messages) == 0 {
		return nil
	}
	if s == nil {
		return fmt.Errorf("%w to %s", ErrNotConnected, p.url)
	}
	if err := s.dead(); err != nil {
		return fmt.Errorf("%w to %s", ErrNotConnected, p.url)
	}
	if s.blocked.Load() {
		return ErrBlocked
	}

	t := p.cfg.Topology
	exchange, key := t.ExchangeName(topic), t.RoutingKey(topic)
	if exchange == "" {
		key = t.QueueName(topic)
	}
	pubs := make([]amqp091.Publishing, len(messages))
	for i, msg := range messages {
		pub, err := p.cfg.Marshaler.Marshal(msg)
		if err != nil {
			return fmt.Errorf("bus/amqp: marshal message %s: %w", msg.UUID, err)
		}
		if pub.MessageId == "" {
			pub.MessageId = msg.UUID
		}
		pubs[i] = pub
	}
	if err := s.declare(topic); err != nil {
		return err
	}

	timer := time.NewTimer(p.cfg.PublishTimeout)
	defer timer.Stop()
	timeout := func(what string, uuid string) error {
		return fmt.Errorf("%w after %v %s message %s", ErrPublishTimeout, p.cfg.PublishTimeout, what, uuid)
	}

	flights := make([]*flight, 0, len(messages))
	for i, msg := range messages {
		f := &flight{uuid: msg.UUID, messageID: pubs[i].MessageId, exchange: exchange, key: key, result: make(chan error, 1)}
		ctx := msg.Context()
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("bus/amqp: message %s: %w", msg.UUID, err)
		}
		// A free in-flight slot.
		select {
		case s.slots <- struct{}{}:
		case <-s.done:
			return fmt.Errorf("%w to %s", ErrNotConnected, p.url)
		case <-ctx.Done():
			return fmt.Errorf("bus/amqp: message %s: %w", msg.UUID, ctx.Err())
		case <-timer.C:
			return timeout("waiting for an in-flight slot for", msg.UUID)
		}
		// The send lock: the delivery tag is registered before the frame is
		// written, so its confirm always finds the flight.
		select {
		case s.send <- struct{}{}:
		case <-s.done:
			<-s.slots
			return fmt.Errorf("%w to %s", ErrNotConnected, p.url)
		case <-ctx.Done():
			<-s.slots
			return fmt.Errorf("bus/amqp: message %s: %w", msg.UUID, ctx.Err())
		case <-timer.C:
			<-s.slots
			return timeout("waiting to send", msg.UUID)
		}
		settled, err := s.publish(f, exchange, key, pubs[i])
		<-s.send
		if err != nil {
			if !settled {
				<-s.slots
			}
			return err
		}
		flights = append(flights, f)
	}

	for i, f := range flights {
		ctx := messages[i].Context()
		select {
		case err := <-f.result:
			if err != nil {
				return err
			}
		case <-ctx.Done():
			return fmt.Errorf("bus/amqp: message %s: %w", f.uuid, ctx.Err())
		case <-timer.C:
			return timeout("waiting for the confirm of", f.uuid)
		}
	}
	return nil
}

// publish registers f under the next delivery tag and sends the message. The
// caller holds the send lock and a slot. When sending fails, settled reports
// whether the flight was already settled by the dispatcher (which then
// released the slot, or the session died and slots no longer matter).
func (s *session) publish(f *flight, exchange, key string, pub amqp091.Publishing) (settled bool, err error) {
	s.mu.Lock()
	if s.err != nil {
		s.mu.Unlock()
		return false, fmt.Errorf("%w to %s", ErrNotConnected, s.p.url)
	}
	tag := s.ch.GetNextPublishSeqNo()
	s.pending[tag] = f
	s.mu.Unlock()

	err = s.ch.PublishWithContext(context.Background(), exchange, key, true, false, pub)
	if err == nil {
		return false, nil
	}
	s.mu.Lock()
	_, stillPending := s.pending[tag]
	delete(s.pending, tag)
	s.mu.Unlock()
	if !stillPending {
		if res := <-f.result; res != nil {
			return true, res
		}
	}
	return !stillPending, fmt.Errorf("bus/amqp: send message %s to exchange %q: %w", f.uuid, exchange, s.p.scrub.Error(err))
}

// Close stops accepting messages, waits for the Publish calls in progress
// (each bounded by PublishTimeout) and closes the connection. It is safe to
// call more than once.
func (p *Publisher) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	p.mu.Unlock()

	p.active.Wait()
	close(p.closing)
	<-p.done

	p.mu.Lock()
	s := p.sess
	p.sess = nil
	p.mu.Unlock()
	if s != nil {
		s.kill(ErrClosed)
	}
	p.logger.Info("Closed", nil)
	return nil
}
