package outbox

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"testing"

	"github.com/tailrace/tailrace"
)

type deposit struct {
	Account string `json:"account"`
	Cents   int    `json:"cents"`
}

// A command named by registration (no Kind method), as mediator.WithKind
// does; Config.KindOf supplies the name.
func kindByRegistration(v any) (string, error) {
	if _, ok := v.(deposit); ok {
		return "bank.deposit", nil
	}
	return kindMethod(v)
}

func TestEnqueue(t *testing.T) {
	for name, open := range dialectDBs(t) {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			n := &Notifier{}
			b := setup(t, open, Config{KindOf: kindByRegistration, Notifier: n})
			wake, stop := n.Subscribe()
			defer stop()
			ctx := context.Background()

			// No transaction in the context: a short one of its own.
			cmd := Message{Value: deposit{"acc-1", 10000}, Options: &StageOptions{PartitionKey: "acc-1"}}
			if err := b.ob.Enqueue(ctx, cmd); err != nil {
				t.Fatal(err)
			}
			select {
			case <-wake:
			default:
				t.Error("no notification after Enqueue's own commit")
			}
			rows := b.rows(t)
			if len(rows) != 1 || rows[0].Kind != "bank.deposit" || rows[0].PartitionKey != "acc-1" {
				t.Fatalf("rows: %+v", rows)
			}
			env := decodeEnvelope(t, rows[0].Payload)
			if env.Metadata[tailrace.MetaCommand] != "true" || env.Metadata[tailrace.MetaKind] != "bank.deposit" || env.DestinationTopic != "bank.deposit" {
				t.Errorf("envelope: %+v", env)
			}
			var got deposit
			if err := json.Unmarshal(env.Payload, &got); err != nil || got != (deposit{"acc-1", 10000}) {
				t.Errorf("payload %s: %v", env.Payload, err)
			}

			// Inside a transaction: joins it, so a rollback removes it.
			tx, err := b.db.BeginTx(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			if err := b.ob.Enqueue(ContextWithTx(ctx, tx), deposit{"acc-2", 1}); err != nil {
				t.Fatal(err)
			}
			if err := tx.Rollback(); err != nil {
				t.Fatal(err)
			}
			if n := b.count(t, b.ob.Table()); n != 1 {
				t.Fatalf("%d rows after a rolled back Enqueue, want 1", n)
			}

			// A bad command opens no transaction and writes nothing.
			if err := b.ob.Enqueue(ctx, noKind{}); !errors.Is(err, ErrNoKind) {
				t.Fatalf("Enqueue without kind: %v", err)
			}
		})
	}
}

func TestEnqueueWithoutDB(t *testing.T) {
	ob, err := New(nil, nil, Config{Dialect: SQLite})
	if err != nil {
		t.Fatal(err)
	}
	if err := ob.Enqueue(context.Background(), auditLogged{}); !errors.Is(err, ErrNoTx) {
		t.Fatalf("Enqueue without db or tx: %v", err)
	}
	if err := ob.EnqueueTx(context.Background(), (*sql.Tx)(nil), auditLogged{}); !errors.Is(err, ErrNoTx) {
		t.Fatalf("EnqueueTx(nil): %v", err)
	}
}
