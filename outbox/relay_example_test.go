package outbox_test

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/ThreeDotsLabs/watermill/pubsub/gochannel"

	"github.com/tailrace/tailrace/outbox"
)

// ShipmentBooked is the event of the relay example.
type ShipmentBooked struct {
	ShipmentID string `json:"shipment_id"`
	Step       int    `json:"step"`
}

func (ShipmentBooked) Kind() string           { return "shipments.booked" }
func (e ShipmentBooked) PartitionKey() string { return e.ShipmentID }

// Run a relay: staged messages go to the publisher (here Watermill's
// in-process GoChannel; in production watermill-amqp with publisher
// confirms, or tailrace's routing publisher), in commit order per partition
// key, and their rows are deleted once the publisher confirmed them.
func ExampleNewRelay() {
	dir, _ := os.MkdirTemp("", "tailrace-relay-example")
	defer os.RemoveAll(dir)
	db, err := sql.Open("sqlite", "file:"+filepath.Join(dir, "app.db")+
		"?_pragma=journal_mode(WAL)&_pragma=busy_timeout(10000)&_txlock=immediate")
	if err != nil {
		panic(err)
	}
	defer db.Close()
	ctx := context.Background()
	if err := outbox.InitializeSchema(ctx, db, outbox.SQLite, outbox.DefaultTable); err != nil {
		panic(err)
	}

	notifier := &outbox.Notifier{} // the Transaction behavior signals it after each commit
	ob, err := outbox.New(db, nil, outbox.Config{Dialect: outbox.SQLite, Notifier: notifier})
	if err != nil {
		panic(err)
	}
	// BlockPublishUntilSubscriberAck keeps the order: without it Watermill's
	// GoChannel hands each message to its subscriber from a goroutine of its
	// own, and two messages of one key can overtake each other.
	broker := gochannel.NewGoChannel(gochannel.Config{BlockPublishUntilSubscriberAck: true}, nil)
	received, err := broker.Subscribe(ctx, "shipments.booked")
	if err != nil {
		panic(err)
	}

	relay, err := outbox.NewRelay(db, broker, nil, outbox.RelayConfig{
		Dialect:  outbox.SQLite,
		Table:    outbox.DefaultTable,
		Notifier: notifier,
	})
	if err != nil {
		panic(err)
	}
	go func() { _ = relay.Run(ctx) }()
	defer relay.Close()

	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		panic(err)
	}
	for step := 1; step <= 3; step++ {
		if err := ob.StageTx(ctx, tx, ShipmentBooked{ShipmentID: "s-1", Step: step}); err != nil {
			panic(err)
		}
	}
	if err := tx.Commit(); err != nil {
		panic(err)
	}
	notifier.Notify()

	for i := 0; i < 3; i++ {
		select {
		case m := <-received:
			fmt.Printf("%s %s\n", m.Metadata.Get("kind"), m.Payload)
			m.Ack()
		case <-time.After(10 * time.Second):
			fmt.Println("timed out")
			return
		}
	}
	// Output:
	// shipments.booked {"shipment_id":"s-1","step":1}
	// shipments.booked {"shipment_id":"s-1","step":2}
	// shipments.booked {"shipment_id":"s-1","step":3}
}
