package wireexample_test

import (
	"context"
	"database/sql"
	"encoding/json"
	"log/slog"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/pubsub/gochannel"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tailrace/tailrace/internal/testenv"
	"github.com/tailrace/tailrace/mediator"
	"github.com/tailrace/tailrace/outbox"
	"github.com/tailrace/tailrace/outbox/internal/wireexample"
)

// TestWire runs the App the injector assembles from outbox.ProviderSet and
// behaviors.ProviderSet, on SQLite and on PostgreSQL.
func TestWire(t *testing.T) {
	for name, open := range map[string]func(t *testing.T) (*sql.DB, outbox.Dialect){
		"sqlite":   func(t *testing.T) (*sql.DB, outbox.Dialect) { return testenv.NewSQLite(t).DB, outbox.SQLite },
		"postgres": func(t *testing.T) (*sql.DB, outbox.Dialect) { return testenv.NewPostgres(t).DB, outbox.PostgreSQL },
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			db, dialect := open(t)
			exercise(t, db, dialect)
		})
	}
}

func exercise(t *testing.T, db *sql.DB, dialect outbox.Dialect) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	require.NoError(t, outbox.InitializeSchema(ctx, db, dialect, outbox.DefaultTable))
	require.NoError(t, outbox.InitializeInboxSchema(ctx, db, dialect, outbox.DefaultInboxTable))

	broker := gochannel.NewGoChannel(gochannel.Config{}, nil)
	defer broker.Close()
	received, err := broker.Subscribe(ctx, OrderPlacedKind)
	require.NoError(t, err)

	app, cleanup, err := wireexample.NewApp(db, slog.New(slog.DiscardHandler), broker,
		wireexample.Settings{Dialect: dialect, PollInterval: 100 * time.Millisecond})
	require.NoError(t, err)
	relayDone := make(chan error, 1)
	go func() { relayDone <- app.Relay.Run(ctx) }()

	// The command stages its event in the Transaction behavior's
	// transaction (Stage fails with ErrNoTx without one); the relay
	// publishes it after the commit.
	id, err := mediator.Send(ctx, app.Mediator, wireexample.PlaceOrder{ID: "o-1"})
	require.NoError(t, err)
	assert.Equal(t, "o-1", id)
	var msg struct{ uuid, kind string }
	var event wireexample.OrderPlaced
	select {
	case m := <-received:
		msg.uuid, msg.kind = m.UUID, m.Metadata.Get("kind")
		require.NoError(t, json.Unmarshal(m.Payload, &event))
		m.Ack()
	case <-ctx.Done():
		t.Fatal("the relay published nothing")
	}
	assert.Equal(t, OrderPlacedKind, msg.kind)
	assert.Equal(t, "o-1", event.ID)

	// Delivered twice under one message id, the event is handled once: the
	// Inbox behavior claimed the id in the Transaction behavior's
	// transaction.
	cctx := outbox.WithConsumer(outbox.WithMessageID(ctx, msg.uuid), "shipping")
	for range 2 {
		require.NoError(t, mediator.Publish(cctx, app.Mediator, event))
	}
	assert.Equal(t, []string{"o-1"}, app.Shipping.Shipped())
	done, err := app.Inbox.Processed(ctx, "shipping", msg.uuid)
	require.NoError(t, err)
	assert.True(t, done)

	// The cleanup closes the relay: Run returns.
	cleanup()
	select {
	case err := <-relayDone:
		assert.NoError(t, err)
	case <-time.After(20 * time.Second):
		t.Fatal("the cleanup did not stop the relay")
	}
}

// OrderPlacedKind is the destination the relay publishes OrderPlaced to.
var OrderPlacedKind = wireexample.OrderPlaced{}.Kind()

// The cleanup is safe when the relay never ran, and a bad configuration is
// the injector's error.
func TestWireCleanupAndErrors(t *testing.T) {
	db := testenv.NewSQLite(t).DB
	broker := gochannel.NewGoChannel(gochannel.Config{}, nil)
	defer broker.Close()

	app, cleanup, err := wireexample.NewApp(db, nil, broker, wireexample.Settings{Dialect: outbox.SQLite})
	require.NoError(t, err)
	require.NotNil(t, app.Relay)
	done := make(chan struct{})
	go func() { cleanup(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the cleanup of a relay that never ran hangs")
	}

	_, _, err = wireexample.NewApp(db, nil, broker, wireexample.Settings{})
	assert.ErrorContains(t, err, "Dialect")
	_, _, err = wireexample.NewApp(db, nil, nil, wireexample.Settings{Dialect: outbox.SQLite})
	assert.ErrorContains(t, err, "publisher is nil")
}
