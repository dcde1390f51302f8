package bus_test

import (
	"context"
	"database/sql"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	_ "modernc.org/sqlite"

	"github.com/tailrace/tailrace/behaviors"
	"github.com/tailrace/tailrace/bus"
	"github.com/tailrace/tailrace/bus/gochannel"
	"github.com/tailrace/tailrace/mediator"
	"github.com/tailrace/tailrace/outbox"
	"github.com/tailrace/tailrace/policy"
)

type PackParcel struct {
	mediator.Command[struct{}]
	Parcel string `json:"parcel"`
}

func (PackParcel) Kind() string { return "parcels.pack" }

// An asynchronous command on the embedded default (SQLite and the
// in-process bus): Enqueue stages it in the outbox and returns; the relay
// forwards it through the routing publisher to the bus; the consumer
// decodes it by kind and sends it through the mediator, where Transaction
// and Inbox make its effects happen once.
func ExampleConsumer() {
	dir, _ := os.MkdirTemp("", "tailrace-example")
	defer os.RemoveAll(dir)
	db, _ := sql.Open("sqlite", "file:"+filepath.Join(dir, "app.db")+"?_pragma=journal_mode(WAL)&_pragma=busy_timeout(5000)")
	defer db.Close()
	ctx := context.Background()
	_ = outbox.InitializeSchema(ctx, db, outbox.SQLite, outbox.DefaultTable)
	_ = outbox.InitializeInboxSchema(ctx, db, outbox.SQLite, outbox.DefaultInboxTable)
	notifier := &outbox.Notifier{}

	// Handlers, behind Transaction (outside) and Inbox (inside).
	store, _ := outbox.NewInbox(db, nil, outbox.InboxConfig{Dialect: outbox.SQLite})
	tx, _ := behaviors.NewTransaction(db, nil, behaviors.TransactionConfig{Notifier: notifier})
	inbox, _ := behaviors.NewInbox(store, nil, behaviors.InboxConfig{})
	m := mediator.New(mediator.WithLayers(tx.Layer(), inbox.Layer()))
	packed := make(chan string, 1)
	mediator.RegisterFunc(m, func(ctx context.Context, c PackParcel) (struct{}, error) {
		packed <- c.Parcel
		return struct{}{}, nil
	})

	// The bus and a consumer of the "parcels" destination.
	local, _ := gochannel.New(gochannel.Config{}, nil)
	defer local.Close()
	poison, _ := gochannel.New(gochannel.Config{AllowNoSubscribers: true}, nil)
	consumer, _ := bus.NewConsumer(m, nil, bus.ConsumerConfig{Name: "parcels", PoisonPublisher: poison})
	bus.HandleCommand[PackParcel](consumer)
	_ = consumer.Subscribe("parcels", local)
	go func() { _ = consumer.Run(ctx) }()
	defer consumer.Close()
	<-consumer.Running()

	// The relay, publishing through the routing policy.
	reg := bus.NewRegistry()
	reg.Register("local", local)
	pol, _ := policy.Parse("routing.json", []byte(`{"Default": {"Publishers": [{"Key": "local", "Destination": "parcels"}]}}`), nil)
	rp, _ := bus.NewRoutingPublisher(reg, policy.Static(pol), nil, bus.RoutingConfig{})
	relay, _ := outbox.NewRelay(db, rp, slog.New(slog.DiscardHandler), outbox.RelayConfig{Dialect: outbox.SQLite, Table: outbox.DefaultTable, Notifier: notifier})
	go func() { _ = relay.Run(ctx) }()
	defer relay.Close()

	// The caller enqueues and moves on.
	ob, _ := outbox.New(db, nil, outbox.Config{Dialect: outbox.SQLite, Notifier: notifier})
	if err := ob.Enqueue(ctx, PackParcel{Parcel: "p-7"}); err != nil {
		fmt.Println(err)
	}
	select {
	case p := <-packed:
		fmt.Println("packed", p)
	case <-time.After(10 * time.Second):
		fmt.Println("timeout")
	}
	// Output:
	// packed p-7
}
