package outbox_test

import (
	"context"
	"fmt"
	"time"

	"github.com/tailrace/tailrace/behaviors"
	"github.com/tailrace/tailrace/mediator"
	"github.com/tailrace/tailrace/outbox"
)

// ShipOrder is a command a service enqueues for its own worker.
type ShipOrder struct {
	mediator.Command[struct{}]
	OrderID string `json:"order_id"`
}

func (ShipOrder) Kind() string           { return "orders.ship" }
func (c ShipOrder) PartitionKey() string { return c.OrderID }

// Run enqueued commands with no broker: Enqueue writes them into a command
// table, and a Worker runs each through the mediator. Inside the
// Transaction behavior the command's row is deleted in the handler's own
// transaction, so the shipment row and the command's completion commit
// together: each command runs exactly once.
func ExampleWorker() {
	db, cleanup := openSQLite()
	defer cleanup()
	ctx := context.Background()
	if err := outbox.InitializeSchema(ctx, db, outbox.SQLite, "commands"); err != nil {
		panic(err)
	}
	if _, err := db.ExecContext(ctx, `CREATE TABLE shipments (order_id TEXT PRIMARY KEY)`); err != nil {
		panic(err)
	}
	notifier := &outbox.Notifier{}
	ob, err := outbox.New(db, nil, outbox.Config{Dialect: outbox.SQLite, CommandTable: "commands", Notifier: notifier})
	if err != nil {
		panic(err)
	}

	m := mediator.New()
	tr, err := behaviors.NewTransaction(db, nil, behaviors.TransactionConfig{Notifier: notifier})
	if err != nil {
		panic(err)
	}
	m.Use(tr.Layer())
	mediator.RegisterFunc(m, func(ctx context.Context, c ShipOrder) (struct{}, error) {
		tx, _ := outbox.TxFromContext(ctx)
		_, err := tx.ExecContext(ctx, `INSERT INTO shipments (order_id) VALUES (?)`, c.OrderID)
		return struct{}{}, err
	})

	w, err := outbox.NewWorker(db, m, nil, outbox.WorkerConfig{
		Dialect: outbox.SQLite, Table: "commands", Notifier: notifier, Concurrency: 4,
	})
	if err != nil {
		panic(err)
	}
	outbox.HandleCommand[ShipOrder](w)
	go func() { _ = w.Run(ctx) }()
	defer w.Close()

	for _, id := range []string{"o-1", "o-2", "o-3"} {
		if err := ob.Enqueue(ctx, ShipOrder{OrderID: id}); err != nil {
			panic(err)
		}
	}
	// Enqueue returned at once; wait for the worker.
	for {
		var left int
		_ = db.QueryRowContext(ctx, `SELECT COUNT(*) FROM commands`).Scan(&left)
		if left == 0 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	var shipped int
	_ = db.QueryRowContext(ctx, `SELECT COUNT(*) FROM shipments`).Scan(&shipped)
	fmt.Println("commands left: 0, shipments:", shipped)
	// Output:
	// commands left: 0, shipments: 3
}
