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
//     the message (BlockPublishUntilSubscriberAck): when the relay marks an
//     outbox row sent, the handler has run. A nack makes GoChannel redeliver
//     the message and Publish wait longer.
//   - Nothing survives the process: messages live in memory only. The outbox
//     is what makes them durable (a crash before the ack leaves the row to be
//     relayed again).
//   - Every subscriber of a topic receives every message (there are no
//     consumer groups); order is the publish order per subscriber.
//
// Publisher and subscriber must be the same instance: New returns one
// *PubSub that is both.
package gochannel

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/pubsub/gochannel"
)

// ErrNoSubscribers: nothing subscribes to the topic, so the message would be
// lost. Not returned when Config.Persistent or Config.AllowNoSubscribers is
// set.
var ErrNoSubscribers = errors.New("bus/gochannel: no subscriber for topic")

// Config configures a PubSub. The zero value is the recommended default.
type Config struct {
	// OutputBuffer is each subscription's channel buffer. Default 0
	// (unbuffered).
	OutputBuffer int64
	// Persistent keeps every published message in memory and replays them
	// all to each new subscriber. Default false: meant for tests only, as
	// memory grows without bound.
	Persistent bool
	// NoWaitForAck makes Publish return as soon as the message is handed to
	// the subscribers' channels, without waiting for their acks. Default
	// false: Publish waits for the acks.
	NoWaitForAck bool
	// AllowNoSubscribers drops a message published to a topic without
	// subscribers, as Watermill's GoChannel does, instead of failing with
	// ErrNoSubscribers. Default false.
	AllowNoSubscribers bool
	// PreserveContext passes the publisher's message context to
	// subscribers. Default false, like the network transports.
	PreserveContext bool
}

// Validate reports every problem in c at once.
func (c Config) Validate() error {
	if c.OutputBuffer < 0 {
		return fmt.Errorf("bus/gochannel: OutputBuffer must not be negative, got %d", c.OutputBuffer)
	}
	return nil
}

// PubSub is an in-process publisher and subscriber. It is safe for
// concurrent use.
type PubSub struct {
	cfg Config
	gc  *gochannel.GoChannel

	mu   sync.Mutex
	subs map[string]int // active subscriptions by topic
	wg   sync.WaitGroup

	closeOnce sync.Once
	closing   chan struct{}
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
	if logger == nil {
		logger = watermill.NopLogger{}
	}
	gc := gochannel.NewGoChannel(gochannel.Config{
		OutputChannelBuffer:            cfg.OutputBuffer,
		Persistent:                     cfg.Persistent,
		BlockPublishUntilSubscriberAck: !cfg.NoWaitForAck,
		PreserveContext:                cfg.PreserveContext,
	}, logger)
	return &PubSub{cfg: cfg, gc: gc, subs: map[string]int{}, closing: make(chan struct{})}, nil
}

// Publish delivers messages to every current subscriber of topic (see the
// package doc for when it returns). It fails with ErrNoSubscribers when there
// is none, unless the config allows it.
func (p *PubSub) Publish(topic string, messages ...*message.Message) error {
	if !p.cfg.Persistent && !p.cfg.AllowNoSubscribers {
		p.mu.Lock()
		n := p.subs[topic]
		p.mu.Unlock()
		if n == 0 {
			return fmt.Errorf("%w %q", ErrNoSubscribers, topic)
		}
	}
	return p.gc.Publish(topic, messages...)
}

// Subscribe returns the messages published to topic from now on (or, with
// Persistent, since the start). The channel closes when ctx is done or the
// PubSub is closed.
func (p *PubSub) Subscribe(ctx context.Context, topic string) (<-chan *message.Message, error) {
	in, err := p.gc.Subscribe(ctx, topic)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	p.subs[topic]++
	p.mu.Unlock()
	// GoChannel ends the subscription when ctx is done or on Close.
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		select {
		case <-ctx.Done():
		case <-p.closing:
		}
		p.mu.Lock()
		if p.subs[topic]--; p.subs[topic] <= 0 {
			delete(p.subs, topic)
		}
		p.mu.Unlock()
	}()
	return in, nil
}

// SubscribeInitialize does nothing: topics need no set-up in memory.
func (p *PubSub) SubscribeInitialize(string) error { return nil }

// Close closes every subscription. Messages not yet acked are lost.
func (p *PubSub) Close() error {
	err := p.gc.Close()
	p.closeOnce.Do(func() { close(p.closing) })
	p.wg.Wait()
	return err
}
