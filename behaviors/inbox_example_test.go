package behaviors_test

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"path/filepath"

	_ "modernc.org/sqlite"

	"github.com/tailrace/tailrace/behaviors"
	"github.com/tailrace/tailrace/mediator"
	"github.com/tailrace/tailrace/outbox"
)

type ShipParcel struct {
	mediator.Command[struct{}]
	Parcel string
}

func (ShipParcel) Kind() string { return "parcels.ship" }

// The Inbox behavior sits just inside Transaction: the message id is
// recorded in the handler's transaction, so a message consumed three times
// is shipped once. Bus consumers put the id in the context; here we do it by
// hand.
func ExampleInbox() {
	dir, _ := os.MkdirTemp("", "tailrace-example")
	defer os.RemoveAll(dir)
	db, _ := sql.Open("sqlite", "file:"+filepath.Join(dir, "app.db")+"?_pragma=journal_mode(WAL)&_pragma=busy_timeout(5000)")
	defer db.Close()
	ctx := context.Background()

	store, _ := outbox.NewInbox(db, nil, outbox.InboxConfig{Dialect: outbox.SQLite})
	_ = outbox.InitializeInboxSchema(ctx, db, outbox.SQLite, store.Table())
	_, _ = db.Exec(`CREATE TABLE shipments (parcel TEXT)`)

	tx, _ := behaviors.NewTransaction(db, nil, behaviors.TransactionConfig{})
	inbox, _ := behaviors.NewInbox(store, nil, behaviors.InboxConfig{})
	m := mediator.New(mediator.WithLayers(
		tx.Layer(),    // OrderTransaction (600): outside
		inbox.Layer(), // OrderInbox (650): inside, in the transaction
	))
	mediator.RegisterFunc(m, func(ctx context.Context, c ShipParcel) (struct{}, error) {
		tx, _ := outbox.TxFromContext(ctx)
		_, err := tx.ExecContext(ctx, `INSERT INTO shipments (parcel) VALUES (?)`, c.Parcel)
		return struct{}{}, err
	})

	delivery := outbox.WithConsumer(outbox.WithMessageID(ctx, "msg-42"), "shipping")
	for range 3 {
		if _, err := mediator.Send(delivery, m, ShipParcel{Parcel: "p-1"}); err != nil {
			fmt.Println(err)
		}
	}
	var n int
	_ = db.QueryRow(`SELECT COUNT(*) FROM shipments`).Scan(&n)
	fmt.Println("shipments:", n, "duplicates skipped:", inbox.Skipped())
	// Output:
	// shipments: 1 duplicates skipped: 2
}
