package wireexample_test

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/bus"
	"github.com/tailrace/tailrace/bus/gochannel"
	"github.com/tailrace/tailrace/bus/internal/wireexample"
	"github.com/tailrace/tailrace/internal/testenv"
	"github.com/tailrace/tailrace/outbox"
	"github.com/tailrace/tailrace/policy"
)

type orderPlaced struct {
	ID string `json:"id"`
}

func (orderPlaced) Kind() string { return "orders.placed" }

// writePolicy writes a routing policy sending "orders.*" to the destination
// "orders" of the publisher registered as key, and returns its directory.
func writePolicy(t *testing.T, key string) string {
	t.Helper()
	dir := t.TempDir()
	src := `{"Rules": [{"Name": "orders", "Priority": 10, "Match": {"Event": "orders.*"},
	  "Publishers": [{"Key": "` + key + `", "Destination": "orders"}]}]}`
	require.NoError(t, os.WriteFile(filepath.Join(dir, "routing.json"), []byte(src), 0o644))
	return dir
}

// TestWire stages a message and receives it through the relay and the
// routing publisher that bus.ProviderSet, policy.ProviderSet and
// outbox.ProviderSet assemble.
func TestWire(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	db := testenv.NewSQLite(t).DB
	require.NoError(t, outbox.InitializeSchema(ctx, db, outbox.SQLite, outbox.DefaultTable))

	local, err := gochannel.New(gochannel.Config{}, watermill.NopLogger{})
	require.NoError(t, err)
	defer local.Close()
	received, err := local.Subscribe(ctx, "orders")
	require.NoError(t, err)
	reg := bus.NewRegistry()
	reg.Register("local", local)

	p, cleanup, err := wireexample.NewPipeline(db, slog.New(slog.DiscardHandler), reg,
		policy.WatcherConfig{Paths: []string{writePolicy(t, "local")}, Load: &policy.LoadOptions{KnownPublishers: reg.HasPublisher}},
		bus.RoutingConfig{},
		outbox.RelayConfig{Dialect: outbox.SQLite, Table: outbox.DefaultTable, PollInterval: 50 * time.Millisecond})
	require.NoError(t, err)
	relayDone := make(chan error, 1)
	go func() { relayDone <- p.Relay.Run(ctx) }()

	ob, err := outbox.New(db, nil, outbox.Config{Dialect: outbox.SQLite})
	require.NoError(t, err)
	tx, err := db.BeginTx(ctx, nil)
	require.NoError(t, err)
	require.NoError(t, ob.StageTx(ctx, tx, orderPlaced{ID: "o-1"}))
	require.NoError(t, tx.Commit())

	select {
	case m := <-received:
		assert.Equal(t, "orders.placed", m.Metadata.Get(tailrace.MetaKind))
		assert.Equal(t, "orders", m.Metadata.Get(tailrace.MetaPolicyRule))
		assert.JSONEq(t, `{"id":"o-1"}`, string(m.Payload))
		m.Ack()
	case <-ctx.Done():
		t.Fatal("nothing was routed")
	}

	// The cleanup closes the relay, then the routing publisher.
	cleanup()
	select {
	case err := <-relayDone:
		assert.NoError(t, err)
	case <-time.After(20 * time.Second):
		t.Fatal("the cleanup did not stop the relay")
	}
	err = p.Routing.Publish("orders", message.NewMessage(watermill.NewUUID(), nil))
	assert.True(t, errors.Is(err, bus.ErrRoutingClosed), "%v", err)
}

// A policy naming a publisher the registry does not have is the injector's
// error, and so is a bad routing config (the generated code closes the
// watcher it opened).
func TestWireErrors(t *testing.T) {
	db := testenv.NewSQLite(t).DB
	logger := slog.New(slog.DiscardHandler)
	local, err := gochannel.New(gochannel.Config{}, watermill.NopLogger{})
	require.NoError(t, err)
	defer local.Close()
	reg := bus.NewRegistry()
	reg.Register("local", local)
	relayCfg := outbox.RelayConfig{Dialect: outbox.SQLite, Table: outbox.DefaultTable}

	_, _, err = wireexample.NewPipeline(db, logger, reg,
		policy.WatcherConfig{Paths: []string{writePolicy(t, "rabbitmq")}, Load: &policy.LoadOptions{KnownPublishers: reg.HasPublisher}},
		bus.RoutingConfig{}, relayCfg)
	assert.ErrorContains(t, err, "rabbitmq")

	_, _, err = wireexample.NewPipeline(db, logger, reg,
		policy.WatcherConfig{Paths: []string{writePolicy(t, "local")}},
		bus.RoutingConfig{Concurrency: -1}, relayCfg)
	assert.ErrorContains(t, err, "Concurrency")
}
