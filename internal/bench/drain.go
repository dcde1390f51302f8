package bench

import (
	"context"
	"database/sql"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	wsql "github.com/ThreeDotsLabs/watermill-sql/v3/pkg/sql"
	"github.com/ThreeDotsLabs/watermill/components/forwarder"
	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/tailrace/tailrace/outbox"
)

// stageBatch is how many messages share one staging transaction.
const stageBatch = 1000

// DrainResult is one drain of a pre-staged backlog.
type DrainResult struct {
	Contender string  `json:"contender"`
	Publisher string  `json:"publisher"`
	Relays    int     `json:"relays,omitempty"`
	Backlog   int     `json:"backlog"`
	Drained   int     `json:"drained"`
	Seconds   float64 `json:"seconds"`
	MsgPerSec float64 `json:"msg_per_s"`
	// Capped is set when the time cap ended the drain before the backlog
	// was empty: MsgPerSec is then over what was drained.
	Capped     bool `json:"capped,omitempty"`
	Duplicates int  `json:"duplicates"`
	// Left is the rows left in tailrace's outbox after the drain (-1: not
	// counted; the stock forwarder never deletes rows).
	Left int `json:"left"`
}

// Contender names.
const (
	StockForwarder = "watermill forwarder"
	TailraceRelay  = "tailrace relay"
)

// DrainStock stages n messages as Watermill's outbox recipe does
// (watermill-sql publisher on the transaction, wrapped by
// forwarder.NewPublisher) and drains them with the stock watermill-sql
// subscriber and forwarder.NewForwarder into pub. The drain stops after
// limit.
func DrainStock(ctx context.Context, e Env, pubKind Publisher, n int, limit time.Duration) (DrainResult, error) {
	res := DrainResult{Contender: StockForwarder, Publisher: string(pubKind), Backlog: n, Left: -1}
	r, err := newStockRig(ctx, e, pubKind, "bench_stock", 0)
	if err != nil {
		return res, err
	}
	defer r.close()
	s, cons, pub, sub, topic := r.schema, r.cons, r.pub, r.sub, r.topic
	for start := 0; start < n; start += stageBatch {
		var msgs []*message.Message
		for i := start; i < min(start+stageBatch, n); i++ {
			id, payload := Payload(i)
			msgs = append(msgs, message.NewMessage(id, payload))
		}
		if err := stageStock(ctx, s.DB, topic, cons.Queue, msgs...); err != nil {
			return res, err
		}
	}
	fwd, err := forwarder.NewForwarder(sub, pub, watermill.NopLogger{}, forwarder.Config{ForwarderTopic: topic})
	if err != nil {
		return res, err
	}
	start := time.Now()
	go func() { _ = fwd.Run(context.Background()) }()
	res.Capped = !cons.WaitN(n, start.Add(limit))
	el := time.Since(start)
	_ = fwd.Close()
	res.fill(cons, el)
	return res, nil
}

// stockRig is what every stock-forwarder measurement sets up: its own
// schema, a counting consumer, the output publisher and the stock
// watermill-sql subscriber on the forwarder topic, initialized.
type stockRig struct {
	schema *Schema
	cons   *Consumer
	pub    message.Publisher
	sub    *wsql.Subscriber
	topic  string
}

func newStockRig(ctx context.Context, e Env, pubKind Publisher, queuePrefix string, poll time.Duration) (_ *stockRig, err error) {
	r := &stockRig{}
	defer func() {
		if err != nil {
			r.close()
		}
	}()
	if r.schema, err = e.NewSchema(ctx); err != nil {
		return nil, err
	}
	if r.cons, err = NewConsumer(e.AMQPURL, queuePrefix); err != nil {
		return nil, err
	}
	if r.pub, err = NewPublisher(e.AMQPURL, pubKind); err != nil {
		return nil, err
	}
	r.topic = "fwd_" + r.schema.Name
	if r.sub, err = newStockSubscriber(r.schema.DB, poll); err != nil {
		return nil, err
	}
	if err = r.sub.SubscribeInitialize(r.topic); err != nil {
		return nil, err
	}
	return r, nil
}

// close releases what newStockRig set up, in reverse order.
func (r *stockRig) close() {
	if r.pub != nil {
		_ = r.pub.Close()
	}
	if r.cons != nil {
		_ = r.cons.Close()
	}
	if r.schema != nil {
		_ = r.schema.Drop()
	}
}

func newStockSubscriber(db *sql.DB, poll time.Duration) (*wsql.Subscriber, error) {
	return wsql.NewSubscriber(db, wsql.SubscriberConfig{
		SchemaAdapter:    wsql.DefaultPostgreSQLSchema{},
		OffsetsAdapter:   wsql.DefaultPostgreSQLOffsetsAdapter{},
		InitializeSchema: true,
		PollInterval:     poll,
	}, watermill.NopLogger{})
}

// stageStock commits msgs in one transaction through Watermill's recipe.
func stageStock(ctx context.Context, db *sql.DB, fwdTopic, dest string, msgs ...*message.Message) error {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := stageStockTx(tx, fwdTopic, dest, msgs...); err != nil {
		_ = tx.Rollback()
		return err
	}
	return tx.Commit()
}

// stageStockTx stages msgs for dest on tx: a watermill-sql publisher on the
// transaction wrapped by forwarder.NewPublisher (Watermill's outbox recipe).
func stageStockTx(tx *sql.Tx, fwdTopic, dest string, msgs ...*message.Message) error {
	p, err := wsql.NewPublisher(tx, wsql.PublisherConfig{SchemaAdapter: wsql.DefaultPostgreSQLSchema{}}, watermill.NopLogger{})
	if err != nil {
		return err
	}
	fp := forwarder.NewPublisher(p, forwarder.PublisherConfig{ForwarderTopic: fwdTopic})
	return fp.Publish(dest, msgs...)
}

// DrainTailrace stages n messages with outbox.StageTx (1,000 per
// transaction, 1,000 partition keys) and drains them with relays relays,
// each with its own pool and publisher of kind pubKind, as separate
// processes would have.
func DrainTailrace(ctx context.Context, e Env, pubKind Publisher, n, relays int, limit time.Duration) (DrainResult, error) {
	res := DrainResult{Contender: TailraceRelay, Publisher: string(pubKind), Relays: relays, Backlog: n, Left: -1}
	s, err := e.NewSchema(ctx)
	if err != nil {
		return res, err
	}
	defer s.Drop()
	cons, err := NewConsumer(e.AMQPURL, "bench_tailrace")
	if err != nil {
		return res, err
	}
	defer cons.Close()
	table := "outbox_bench"
	if err := outbox.InitializeSchema(ctx, s.DB, outbox.PostgreSQL, table); err != nil {
		return res, err
	}
	ob, err := outbox.New(s.DB, nil, outbox.Config{Dialect: outbox.PostgreSQL, Table: table})
	if err != nil {
		return res, err
	}
	if err := stageTailrace(ctx, s.DB, ob, cons.Queue, 0, n); err != nil {
		return res, err
	}
	var rs []*outbox.Relay
	for i := 0; i < relays; i++ {
		db, err := s.Open(8)
		if err != nil {
			return res, err
		}
		defer db.Close()
		pub, err := NewPublisher(e.AMQPURL, pubKind)
		if err != nil {
			return res, err
		}
		defer pub.Close()
		rl, err := outbox.NewRelay(db, pub, quietLogger(), outbox.RelayConfig{
			Dialect: outbox.PostgreSQL, Table: table, LeaseTTL: 3 * time.Second,
		})
		if err != nil {
			return res, err
		}
		rs = append(rs, rl)
	}
	start := time.Now()
	for _, rl := range rs {
		go func() { _ = rl.Run(context.Background()) }()
	}
	res.Capped = !cons.WaitN(n, start.Add(limit))
	el := time.Since(start)
	for _, rl := range rs {
		_ = rl.Close()
	}
	res.fill(cons, el)
	cctx, cancel := closeCtx(30 * time.Second)
	defer cancel()
	if err := s.DB.QueryRowContext(cctx, `SELECT COUNT(*) FROM `+table).Scan(&res.Left); err != nil {
		return res, err
	}
	return res, nil
}

// stageTailrace stages messages [from, to) into ob, stageBatch per
// transaction.
func stageTailrace(ctx context.Context, db *sql.DB, ob *outbox.Outbox, dest string, from, to int) error {
	for start := from; start < to; start += stageBatch {
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		var vals []any
		for i := start; i < min(start+stageBatch, to); i++ {
			id, payload := Payload(i)
			vals = append(vals, outbox.Message{Value: rawJSON(payload), Options: &outbox.StageOptions{
				Kind: "bench", Topic: dest, MessageID: id, PartitionKey: fmt.Sprintf("k%d", i%1000),
			}})
		}
		if err := ob.StageTx(ctx, tx, vals...); err != nil {
			_ = tx.Rollback()
			return err
		}
		if err := tx.Commit(); err != nil {
			return err
		}
	}
	return nil
}

func (r *DrainResult) fill(c *Consumer, el time.Duration) {
	r.Drained = c.N()
	r.Seconds = el.Seconds()
	if el > 0 {
		r.MsgPerSec = float64(r.Drained) / el.Seconds()
	}
	r.Duplicates = c.Duplicates()
}

func quietLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}
