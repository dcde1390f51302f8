package bench

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	wamqp "github.com/ThreeDotsLabs/watermill-amqp/v2/pkg/amqp"
	"github.com/ThreeDotsLabs/watermill/message"
	amqp091 "github.com/rabbitmq/amqp091-go"

	busamqp "github.com/tailrace/tailrace/bus/amqp"
)

// Consumer counts distinct messages (by Watermill message UUID) on one
// durable queue as fast as RabbitMQ delivers them (no-ack mode), so it
// never limits a contender, and records when each was first received.
type Consumer struct {
	Queue    string
	mu       sync.Mutex
	received map[string]time.Time
	dups     atomic.Int64
	n        atomic.Int64
	conn     *amqp091.Connection
	done     chan struct{}
}

// NewConsumer declares a durable queue with a unique name and consumes it.
func NewConsumer(amqpURL, prefix string) (*Consumer, error) {
	conn, err := amqp091.Dial(amqpURL)
	if err != nil {
		return nil, fmt.Errorf("bench: dial RabbitMQ: %s", busamqp.RedactURL(err.Error()))
	}
	ch, err := conn.Channel()
	if err != nil {
		_ = conn.Close()
		return nil, err
	}
	queue := UniqueName(prefix)
	if _, err := ch.QueueDeclare(queue, true, false, false, false, nil); err != nil {
		_ = conn.Close()
		return nil, err
	}
	deliveries, err := ch.Consume(queue, "", true, false, false, false, nil)
	if err != nil {
		_ = conn.Close()
		return nil, err
	}
	c := &Consumer{Queue: queue, received: map[string]time.Time{}, conn: conn, done: make(chan struct{})}
	go func() {
		defer close(c.done)
		for d := range deliveries {
			id, _ := d.Headers[wamqp.DefaultMessageUUIDHeaderKey].(string)
			if id == "" {
				id = d.MessageId
			}
			now := time.Now()
			c.mu.Lock()
			if _, seen := c.received[id]; seen {
				c.dups.Add(1)
			} else {
				c.received[id] = now
				c.n.Add(1)
			}
			c.mu.Unlock()
		}
	}()
	return c, nil
}

// N is the number of distinct messages received.
func (c *Consumer) N() int { return int(c.n.Load()) }

// Duplicates is the number of deliveries of an already received id.
func (c *Consumer) Duplicates() int { return int(c.dups.Load()) }

// ReceivedAt returns when id was first received.
func (c *Consumer) ReceivedAt(id string) (time.Time, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	t, ok := c.received[id]
	return t, ok
}

// WaitN waits until n distinct messages arrived or the deadline passed; it
// reports whether all arrived.
func (c *Consumer) WaitN(n int, deadline time.Time) bool {
	for c.N() < n {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(2 * time.Millisecond)
	}
	return true
}

// Close deletes the queue and closes the connection.
func (c *Consumer) Close() error {
	if ch, err := c.conn.Channel(); err == nil {
		_, _ = ch.QueueDelete(c.Queue, false, false, false)
	}
	err := c.conn.Close()
	select {
	case <-c.done:
	case <-time.After(5 * time.Second):
	}
	return err
}

// Publisher names the two AMQP publishers compared.
type Publisher string

const (
	// TailracePublisher is bus/amqp: pipelined publisher confirms (up to
	// MaxInFlight unconfirmed on one connection), mandatory publishing with
	// returns counted as failures.
	TailracePublisher Publisher = "bus/amqp"
	// WatermillPublisher is watermill-amqp v2 with ConfirmDelivery on and
	// a pool of 256 channels (each waits for its confirm before the next
	// message): the stock publisher.
	WatermillPublisher Publisher = "watermill-amqp"
)

// NewPublisher returns a publisher of kind p that sends each message to the
// default exchange with the topic as routing key (so topic = queue name),
// persistent, with the message UUID in watermill-amqp's header.
func NewPublisher(amqpURL string, p Publisher) (message.Publisher, error) {
	switch p {
	case TailracePublisher:
		return busamqp.NewPublisher(busamqp.Config{
			URL:            amqpURL,
			ConnectionName: "tailrace-bench",
			Topology: busamqp.Topology{
				ExchangeName: func(string) string { return "" },
			},
		}, watermill.NopLogger{})
	case WatermillPublisher:
		cfg := wamqp.NewDurableQueueConfig(amqpURL)
		cfg.Publish.ConfirmDelivery = true
		cfg.Publish.ChannelPoolSize = 256
		return wamqp.NewPublisher(cfg, watermill.NopLogger{})
	}
	return nil, fmt.Errorf("bench: unknown publisher %q", p)
}

// Payload returns the id and the JSON payload of message i: the same bytes
// for every contender.
func Payload(i int) (string, []byte) {
	id := fmt.Sprintf("m-%07d", i)
	return id, []byte(`{"id":"` + id + `","amount":42,"currency":"EUR","note":"benchmark payload"}`)
}

// rawJSON marshals to itself with the JSON marshaler.
type rawJSON []byte

func (r rawJSON) MarshalJSON() ([]byte, error) { return r, nil }

// closeCtx is a context bounded by d for cleanups.
func closeCtx(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d)
}
