package outbox_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	wsql "github.com/ThreeDotsLabs/watermill-sql/v3/pkg/sql"
	"github.com/ThreeDotsLabs/watermill/components/forwarder"
	"github.com/ThreeDotsLabs/watermill/pubsub/gochannel"
	_ "modernc.org/sqlite"

	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/outbox"
)

// OrderPlaced is an event. Its Kind names it on the wire; PartitionKey keeps
// the events of one order in commit order.
type OrderPlaced struct {
	OrderID string `json:"order_id"`
	Amount  int    `json:"amount"`
}

func (OrderPlaced) Kind() string           { return "orders.placed" }
func (e OrderPlaced) PartitionKey() string { return e.OrderID }

// openSQLite opens a fresh SQLite file with the outbox table and an orders
// table; the examples run anywhere, no server needed.
func openSQLite() (db *sql.DB, cleanup func()) {
	dir, err := os.MkdirTemp("", "tailrace-example")
	if err != nil {
		panic(err)
	}
	dsn := "file:" + filepath.Join(dir, "app.db") +
		"?_pragma=journal_mode(WAL)&_pragma=busy_timeout(10000)&_txlock=immediate"
	db, err = sql.Open("sqlite", dsn)
	if err != nil {
		panic(err)
	}
	ctx := context.Background()
	if err := outbox.InitializeSchema(ctx, db, outbox.SQLite, outbox.DefaultTable); err != nil {
		panic(err)
	}
	if _, err := db.ExecContext(ctx, `CREATE TABLE orders (id TEXT PRIMARY KEY, amount INTEGER NOT NULL)`); err != nil {
		panic(err)
	}
	return db, func() { _ = db.Close(); _ = os.RemoveAll(dir) }
}

// Stage a message in the same transaction as the domain row: both commit,
// or neither does.
func ExampleOutbox_StageTx() {
	db, cleanup := openSQLite()
	defer cleanup()
	ob, err := outbox.New(db, nil, outbox.Config{Dialect: outbox.SQLite})
	if err != nil {
		panic(err)
	}
	ctx := context.Background()

	placeOrder := func(id string, amount int, fail bool) error {
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		defer tx.Rollback() // a no-op after Commit
		if _, err := tx.ExecContext(ctx, `INSERT INTO orders (id, amount) VALUES (?, ?)`, id, amount); err != nil {
			return err
		}
		if err := ob.StageTx(ctx, tx, OrderPlaced{OrderID: id, Amount: amount}); err != nil {
			return err
		}
		if fail {
			return errors.New("something went wrong after staging")
		}
		return tx.Commit()
	}

	fmt.Println(placeOrder("order-1", 42, false))
	fmt.Println(placeOrder("order-2", 7, true))

	var orders, staged int
	_ = db.QueryRow(`SELECT COUNT(*) FROM orders`).Scan(&orders)
	var kind, key string
	_ = db.QueryRow(`SELECT COUNT(*), MAX(kind), MAX(partition_key) FROM tailrace_outbox`).Scan(&staged, &kind, &key)
	fmt.Println(orders, "order,", staged, "staged message:", kind, key)
	// Output:
	// <nil>
	// something went wrong after staging
	// 1 order, 1 staged message: orders.placed order-1
}

// Bad input fails at Stage, inside the caller's transaction, before any SQL:
// an oversized payload can never reach the relay.
func ExampleErrPayloadTooLarge() {
	db, cleanup := openSQLite()
	defer cleanup()
	ob, _ := outbox.New(db, nil, outbox.Config{Dialect: outbox.SQLite, MaxPayloadBytes: 16})
	ctx := context.Background()

	tx, _ := db.BeginTx(ctx, nil)
	defer tx.Rollback()
	err := ob.StageTx(ctx, tx, outbox.Message{
		Value:   OrderPlaced{OrderID: "order-1", Amount: 42},
		Options: &outbox.StageOptions{MessageID: "m-1"},
	})
	fmt.Println(errors.Is(err, outbox.ErrPayloadTooLarge))
	fmt.Println(err)
	fmt.Println(ob.Stage(ctx, OrderPlaced{})) // no transaction in ctx
	// Output:
	// true
	// outbox: payload too large: message 0 (kind "orders.placed", id m-1) is 34 bytes, the limit is 16 (Config.MaxPayloadBytes)
	// outbox: no transaction in the context; run inside the Transaction behavior, use StageTx, or put one there with ContextWithTx
}

// What is staged is Watermill's forwarder envelope, so Watermill's stock
// forwarder can publish it: here it reads the SQLite outbox with the
// watermill-sql subscriber and publishes to an in-process Go channel, where
// the original message arrives with its metadata. (tailrace's relay does the
// same job faster, in order per key and with dead letters.)
func Example_forwarder() {
	db, cleanup := openSQLite()
	defer cleanup()
	ob, _ := outbox.New(db, nil, outbox.Config{Dialect: outbox.SQLite})
	ctx := outbox.WithCorrelationID(context.Background(), "req-7")

	tx, _ := db.BeginTx(ctx, nil)
	_ = ob.StageTx(ctx, tx, OrderPlaced{OrderID: "order-1", Amount: 42})
	_ = tx.Commit()

	logger := watermill.NopLogger{}
	sub, _ := wsql.NewSubscriber(db, wsql.SubscriberConfig{
		SchemaAdapter:    ob.SchemaAdapter(),
		OffsetsAdapter:   outbox.SQLiteOffsetsAdapter{},
		InitializeSchema: true,
		PollInterval:     150 * time.Millisecond,
	}, logger)
	broker := gochannel.NewGoChannel(gochannel.Config{}, logger)
	received, _ := broker.Subscribe(ctx, "orders.placed")

	fwd, _ := forwarder.NewForwarder(sub, broker, logger, forwarder.Config{ForwarderTopic: ob.Table()})
	go func() { _ = fwd.Run(ctx) }()
	defer fwd.Close()

	select {
	case msg := <-received:
		msg.Ack()
		fmt.Println(string(msg.Payload))
		for _, k := range []string{tailrace.MetaKind, tailrace.MetaPartitionKey, tailrace.MetaCorrelationID} {
			fmt.Printf("%s=%s\n", k, msg.Metadata.Get(k))
		}
	case <-time.After(10 * time.Second):
		fmt.Println("timed out")
	}
	// Output:
	// {"order_id":"order-1","amount":42}
	// kind=orders.placed
	// partition_key=order-1
	// correlation_id=req-7
}

// Deposit is a command executed later by a worker.
type Deposit struct {
	Account string `json:"account"`
	Cents   int    `json:"cents"`
}

func (Deposit) Kind() string           { return "bank.deposit" }
func (d Deposit) PartitionKey() string { return d.Account }

// Enqueue stages a command for a worker and returns once it is durably
// staged. Without a transaction in the context it commits one of its own and
// wakes the relay through the Notifier.
func ExampleOutbox_Enqueue() {
	db, cleanup := openSQLite()
	defer cleanup()
	wake := &outbox.Notifier{}
	signal, stop := wake.Subscribe()
	defer stop()
	ob, _ := outbox.New(db, nil, outbox.Config{Dialect: outbox.SQLite, Notifier: wake})

	for _, cents := range []int{10000, 10000, -2500} {
		if err := ob.Enqueue(context.Background(), Deposit{Account: "acc-1", Cents: cents}); err != nil {
			panic(err)
		}
	}
	<-signal

	var n int
	_ = db.QueryRow(`SELECT COUNT(*) FROM tailrace_outbox WHERE kind = 'bank.deposit' AND partition_key = 'acc-1'`).Scan(&n)
	fmt.Println("enqueued:", n)
	// Output:
	// enqueued: 3
}
