package bench

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/tailrace/tailrace/behaviors"
	"github.com/tailrace/tailrace/bus"
	busamqp "github.com/tailrace/tailrace/bus/amqp"
	"github.com/tailrace/tailrace/mediator"
	"github.com/tailrace/tailrace/outbox"
)

// ConsumeResult is one end-to-end run: staged events relayed to RabbitMQ
// and handled by a bus.Consumer (Transaction ▸ Inbox, one domain insert per
// event).
type ConsumeResult struct {
	Variant     string `json:"variant"`
	Events      int    `json:"events"`
	Keys        int    `json:"keys"`
	Concurrency int    `json:"concurrency"`
	// Prefilled: the relay ran first; Seconds is the consumer's alone.
	Prefilled bool `json:"prefilled,omitempty"`
	Prefetch  int  `json:"prefetch"`
	// Handled is the distinct events whose handler committed.
	Handled   int     `json:"handled"`
	Seconds   float64 `json:"seconds"`
	PerSecond float64 `json:"handled_per_s"`
	// RelaySeconds is when the outbox was empty (every event confirmed by
	// the broker), from the same start.
	RelaySeconds float64 `json:"relay_seconds"`
	Capped       bool    `json:"capped,omitempty"`
	// Checked in the domain table after the run. Lost is -1 when the run
	// was capped (the events not handled yet are not lost).
	Lost       int `json:"lost"`
	Twice      int `json:"handled_twice"`
	OutOfOrder int `json:"out_of_order"`
	// Redelivered is the deliveries the Inbox skipped as already handled.
	Redelivered int64 `json:"redelivered"`
	Poisoned    int64 `json:"poisoned"`
}

// consumeEvent is the event of the end-to-end run.
type consumeEvent struct {
	mediator.Notification
	Key string `json:"key"`
	Seq int    `json:"seq"`
}

func (consumeEvent) Kind() string { return "bench.event" }

// Consume stages n events over keys partition keys (1,000 per
// transaction, seq increasing per key in commit order), then starts a
// relay (bus/amqp publisher) and a bus.Consumer on RabbitMQ and times until
// every event's handler has committed. The consumer uses the defaults
// except for concurrency and prefetch when they are non-zero; its pool
// has as many connections as its Concurrency. After the run the domain
// table is checked: every event once, and per key in seq order.
//
// With prefill the relay runs first, alone, until the outbox is empty (all
// events in RabbitMQ); only then does the consumer start and the clock run:
// the consumer's own rate, without the relay beside it on a loaded machine.
func Consume(ctx context.Context, e Env, variant string, n, keys, concurrency, prefetch int, prefill bool, limit time.Duration) (ConsumeResult, error) {
	res := ConsumeResult{Variant: variant, Events: n, Keys: keys, Prefilled: prefill}
	s, err := e.NewSchema(ctx)
	if err != nil {
		return res, err
	}
	defer s.Drop()
	queue := UniqueName("bench_consume")
	defer deleteQueue(e.AMQPURL, queue)

	const table = "outbox_bench"
	if err := outbox.InitializeSchema(ctx, s.DB, outbox.PostgreSQL, table); err != nil {
		return res, err
	}
	// A bigserial id records the order of the inserts: a key's next
	// handler starts only after the previous one committed, so per key
	// the ids follow seq.
	if _, err := s.DB.ExecContext(ctx, `CREATE TABLE effects (id BIGSERIAL PRIMARY KEY, message_id TEXT NOT NULL, k TEXT NOT NULL, seq INTEGER NOT NULL)`); err != nil {
		return res, err
	}
	ob, err := outbox.New(s.DB, nil, outbox.Config{Dialect: outbox.PostgreSQL, Table: table})
	if err != nil {
		return res, err
	}
	for start := 0; start < n; start += stageBatch {
		tx, err := s.DB.BeginTx(ctx, nil)
		if err != nil {
			return res, err
		}
		var vals []any
		for i := start; i < min(start+stageBatch, n); i++ {
			key := fmt.Sprintf("k%d", i%keys)
			vals = append(vals, outbox.Message{Value: consumeEvent{Key: key, Seq: i / keys}, Options: &outbox.StageOptions{
				Topic: queue, PartitionKey: key,
			}})
		}
		if err := ob.StageTx(ctx, tx, vals...); err != nil {
			_ = tx.Rollback()
			return res, err
		}
		if err := tx.Commit(); err != nil {
			return res, err
		}
	}

	// The consumer side: its own pool, Transaction ▸ Inbox with defaults.
	cfg := bus.ConsumerConfig{Name: "bench", Concurrency: concurrency}
	amqpCfg := busamqp.Config{URL: e.AMQPURL, ConnectionName: "tailrace-bench-consumer", Prefetch: prefetch,
		Topology: busamqp.Topology{ExchangeName: func(string) string { return "" }}}
	res.Concurrency, res.Prefetch = concurrency, prefetch
	if res.Concurrency == 0 {
		res.Concurrency = bus.DefaultConsumerConcurrency
	}
	if res.Prefetch == 0 {
		res.Prefetch = busamqp.DefaultPrefetch
	}
	cdb, err := s.Open(res.Concurrency)
	if err != nil {
		return res, err
	}
	defer cdb.Close()
	store, err := outbox.NewInbox(cdb, nil, outbox.InboxConfig{Dialect: outbox.PostgreSQL})
	if err != nil {
		return res, err
	}
	if err := outbox.InitializeInboxSchema(ctx, cdb, outbox.PostgreSQL, store.Table()); err != nil {
		return res, err
	}
	txb, err := behaviors.NewTransaction(cdb, nil, behaviors.TransactionConfig{})
	if err != nil {
		return res, err
	}
	ib, err := behaviors.NewInbox(store, nil, behaviors.InboxConfig{})
	if err != nil {
		return res, err
	}
	m := mediator.New(mediator.WithLayers(txb.Layer(), ib.Layer()))
	mediator.RegisterNotificationFunc(m, func(ctx context.Context, ev consumeEvent) error {
		tx, ok := outbox.TxFromContext(ctx)
		if !ok {
			return outbox.ErrNoTx
		}
		_, err := tx.ExecContext(ctx, `INSERT INTO effects (message_id, k, seq) VALUES ($1, $2, $3)`,
			outbox.MessageIDFromContext(ctx), ev.Key, ev.Seq)
		return err
	})
	var (
		mu      sync.Mutex
		handled = make(map[string]bool, n)
		count   atomic.Int64
		all     = make(chan struct{})
	)
	countHandled := func(h message.HandlerFunc) message.HandlerFunc {
		return func(msg *message.Message) ([]*message.Message, error) {
			out, err := h(msg)
			if err == nil {
				mu.Lock()
				if !handled[msg.UUID] {
					handled[msg.UUID] = true
					if count.Add(1) == int64(n) {
						close(all)
					}
				}
				mu.Unlock()
			}
			return out, err
		}
	}
	poison := &countingPublisher{}
	cfg.PoisonPublisher = poison
	cfg.Middlewares = []message.HandlerMiddleware{countHandled}
	c, err := bus.NewConsumer(m, quietLogger(), cfg)
	if err != nil {
		return res, err
	}
	bus.HandleEvent[consumeEvent](c)
	sub, err := busamqp.NewSubscriber(amqpCfg, watermill.NopLogger{})
	if err != nil {
		return res, err
	}
	defer sub.Close()
	if err := sub.SubscribeInitialize(queue); err != nil {
		return res, err
	}
	if err := c.Subscribe(queue, sub); err != nil {
		return res, err
	}

	// The relay, with its own pool, as another process would have.
	rdb, err := s.Open(8)
	if err != nil {
		return res, err
	}
	defer rdb.Close()
	pub, err := NewPublisher(e.AMQPURL, TailracePublisher)
	if err != nil {
		return res, err
	}
	defer pub.Close()
	relay, err := outbox.NewRelay(rdb, pub, quietLogger(), outbox.RelayConfig{Dialect: outbox.PostgreSQL, Table: table, LeaseTTL: 3 * time.Second})
	if err != nil {
		return res, err
	}

	startConsumer := func() (chan error, error) {
		consumerDone := make(chan error, 1)
		go func() { consumerDone <- c.Run(context.Background()) }()
		select {
		case <-c.Running():
			return consumerDone, nil
		case err := <-consumerDone:
			return nil, fmt.Errorf("bench: consumer: %w", err)
		}
	}
	var consumerDone chan error
	if !prefill {
		if consumerDone, err = startConsumer(); err != nil {
			return res, err
		}
	}
	start := time.Now()
	go func() { _ = relay.Run(context.Background()) }()
	if prefill {
		for {
			var left int
			if err := s.DB.QueryRowContext(ctx, `SELECT COUNT(*) FROM `+table).Scan(&left); err != nil {
				return res, err
			}
			if left == 0 {
				break
			}
			if time.Since(start) > limit {
				return res, fmt.Errorf("bench: the relay did not drain %d events within %s", n, limit)
			}
			time.Sleep(50 * time.Millisecond)
		}
		res.RelaySeconds = time.Since(start).Seconds()
		if consumerDone, err = startConsumer(); err != nil {
			return res, err
		}
		start = time.Now()
	}
	relayDone := make(chan time.Duration, 1)
	stopWatch := make(chan struct{})
	go func() { // when the outbox is empty
		for {
			var left int
			if err := s.DB.QueryRow(`SELECT COUNT(*) FROM ` + table).Scan(&left); err == nil && left == 0 {
				relayDone <- time.Since(start)
				return
			}
			select {
			case <-stopWatch:
				return
			case <-time.After(50 * time.Millisecond):
			}
		}
	}()
	select {
	case <-all:
	case <-time.After(limit):
		res.Capped = true
	case <-ctx.Done():
		res.Capped = true
	}
	el := time.Since(start)
	close(stopWatch)
	select {
	case d := <-relayDone:
		if !prefill {
			res.RelaySeconds = d.Seconds()
		}
	default:
	}
	_ = c.Close()
	<-consumerDone
	_ = relay.Close()

	res.Handled = int(count.Load())
	res.Seconds = el.Seconds()
	res.PerSecond = float64(res.Handled) / el.Seconds()
	res.Redelivered = ib.Skipped()
	res.Poisoned = poison.n.Load()
	cctx, cancel := closeCtx(60 * time.Second)
	defer cancel()
	var rows, distinct int
	if err := s.DB.QueryRowContext(cctx, `SELECT COUNT(*), COUNT(DISTINCT message_id) FROM effects`).Scan(&rows, &distinct); err != nil {
		return res, err
	}
	res.Lost, res.Twice = n-distinct, rows-distinct
	if res.Capped {
		res.Lost = -1
	}
	if err := s.DB.QueryRowContext(cctx, `SELECT COUNT(*) FROM (
		SELECT seq, LAG(seq) OVER (PARTITION BY k ORDER BY id) AS prev FROM effects) x
		WHERE prev IS NOT NULL AND prev >= seq`).Scan(&res.OutOfOrder); err != nil {
		return res, err
	}
	return res, nil
}

// countingPublisher is the poison queue of the run: it counts.
type countingPublisher struct{ n atomic.Int64 }

func (p *countingPublisher) Publish(_ string, msgs ...*message.Message) error {
	p.n.Add(int64(len(msgs)))
	return nil
}

func (p *countingPublisher) Close() error { return nil }

// deleteQueue removes a queue of a run.
func deleteQueue(amqpURL, queue string) {
	conn, err := amqp091.Dial(amqpURL)
	if err != nil {
		return
	}
	defer conn.Close()
	if ch, err := conn.Channel(); err == nil {
		_, _ = ch.QueueDelete(queue, false, false, false)
	}
}
