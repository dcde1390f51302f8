package sqlbus_test

import (
	"context"
	"database/sql"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/pubsub/tests"

	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/bus/sqlbus"
	"github.com/tailrace/tailrace/internal/testenv"
)

func TestValidateTopic(t *testing.T) {
	for _, bad := range []string{"", `x"; DROP TABLE y; --`, "has space", strings.Repeat("a", sqlbus.MaxTopicLen+1)} {
		if err := sqlbus.ValidateTopic(bad); !errors.Is(err, sqlbus.ErrInvalidTopic) {
			t.Errorf("ValidateTopic(%q) = %v", bad, err)
		}
	}
	if err := sqlbus.ValidateTopic(strings.Repeat("a", sqlbus.MaxTopicLen)); err != nil {
		t.Errorf("longest topic refused: %v", err)
	}
}

func TestExplicitSchemaAndTransactionalPublish(t *testing.T) {
	testenv.WatermillSQLConsumer(t)
	pg := testenv.NewPostgres(t)
	ctx := context.Background()
	cfg := sqlbus.Config{}
	if err := sqlbus.InitializeSchema(ctx, pg.DB, cfg, "orders"); err != nil {
		t.Fatal(err)
	}

	// Without InitializeSchema, a topic whose tables do not exist fails.
	pub, err := sqlbus.NewPublisher(pg.DB, cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := pub.Publish("missing", message.NewMessage(watermill.NewUUID(), nil)); err == nil {
		t.Fatal("Publish to a topic without tables succeeded")
	} else if tailrace.IsUnavailable(err) {
		t.Fatalf("a missing table taken for an outage: %v", err)
	}

	// Inside a transaction: visible only after commit.
	tx, err := pg.DB.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sqlbus.NewPublisher(tx, sqlbus.Config{InitializeSchema: true}, nil); err == nil {
		t.Fatal("InitializeSchema on a transaction was accepted")
	}
	txPub, err := sqlbus.NewPublisher(tx, cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	rolledBack := message.NewMessage(watermill.NewUUID(), []byte("no"))
	if err := txPub.Publish("orders", rolledBack); err != nil {
		t.Fatal(err)
	}
	if err := tx.Rollback(); err != nil {
		t.Fatal(err)
	}
	committed := message.NewMessage(watermill.NewUUID(), []byte("yes"))
	if err := pub.Publish("orders", committed); err != nil {
		t.Fatal(err)
	}

	sub, err := sqlbus.NewSubscriber(pg.DB, cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	msgs, err := sub.Subscribe(sctx, "orders")
	if err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-msgs:
		m.Ack()
		if m.UUID != committed.UUID {
			t.Fatalf("got %s (%q), want only the committed message", m.UUID, m.Payload)
		}
	case <-sctx.Done():
		t.Fatal("no message")
	}
}

func TestUniversalPubSub(t *testing.T) {
	testenv.WatermillSQLConsumer(t)
	pg := testenv.NewPostgres(t)
	open := func(t *testing.T) *sql.DB {
		db, err := sql.Open("pgx", pg.URL)
		if err != nil {
			t.Fatal(err)
		}
		db.SetMaxOpenConns(4)
		t.Cleanup(func() { _ = db.Close() })
		return db
	}
	constructor := func(t *testing.T, group string) (message.Publisher, message.Subscriber) {
		db := open(t)
		cfg := sqlbus.Config{ConsumerGroup: group, PollInterval: 20 * time.Millisecond, ResendInterval: 50 * time.Millisecond}
		pub, err := sqlbus.NewPublisher(db, cfg, nil)
		if err != nil {
			t.Fatal(err)
		}
		sub, err := sqlbus.NewSubscriber(db, cfg, nil)
		if err != nil {
			t.Fatal(err)
		}
		return pub, sub
	}
	tests.TestPubSub(t,
		tests.Features{
			ConsumerGroups:      true,
			ExactlyOnceDelivery: false,
			GuaranteedOrder:     true,
			Persistent:          true,
			ForceShort:          true,
			GenerateTopicFunc: func(tctx tests.TestContext) string {
				// Short enough for PostgreSQL identifiers.
				return "t_" + strings.ReplaceAll(string(tctx.TestID), "-", "")[:24]
			},
		},
		func(t *testing.T) (message.Publisher, message.Subscriber) { return constructor(t, "test") },
		constructor,
	)
}

// A database that cannot be reached is an outage: Publish's error is
// marked tailrace.Unavailable.
func TestPublishToUnreachableDatabaseIsUnavailable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close()
	db, err := sql.Open("pgx", "postgres://postgres@"+addr+"/test?sslmode=disable&connect_timeout=2")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	pub, err := sqlbus.NewPublisher(db, sqlbus.Config{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = pub.Publish("orders", message.NewMessage(watermill.NewUUID(), nil))
	if err == nil || !tailrace.IsUnavailable(err) {
		t.Fatalf("Publish to an unreachable database: %v; want a failure marked unavailable", err)
	}
}
