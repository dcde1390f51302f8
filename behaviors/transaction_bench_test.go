package behaviors_test

import (
	"context"
	"fmt"
	"runtime"
	"sync/atomic"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/tailrace/tailrace/behaviors"
	"github.com/tailrace/tailrace/internal/testenv"
	"github.com/tailrace/tailrace/mediator"
	"github.com/tailrace/tailrace/outbox"
)

type benchPlace struct {
	mediator.Command[struct{}]
	ID string
}

func (benchPlace) Kind() string { return "bench.place" }

type benchPlaced struct {
	ID     string `json:"id"`
	Amount int    `json:"amount"`
}

func (benchPlaced) Kind() string           { return "bench.placed" }
func (e benchPlaced) PartitionKey() string { return e.ID }

// BenchmarkTransactionPostgres compares, in one run, commands that insert one
// domain row on PostgreSQL with 8 parallel senders:
//
//   - plain: BEGIN; INSERT; COMMIT by hand;
//   - plain_2inserts: the same with a second INSERT of a ~200-byte row into
//     another table: the round trip any outbox adds, without tailrace;
//   - behavior: mediator.Send through the Transaction behavior, the handler
//     inserting the row and staging one message with outbox.Stage, with
//     outbox.NotifyPostgres forwarding the commit signal to relays in other
//     processes (the recommended set-up);
//   - behavior_tx_notify: the same, but the NOTIFY is sent inside the
//     transaction (what a NOTIFY trigger on the outbox table would do) —
//     kept to show why tailrace has no such trigger: PostgreSQL serializes
//     the commits of transactions that sent a NOTIFY;
//   - pgx_plain and pgx_pipelined_row: the floor of any outbox that writes
//     a row, without database/sql: pgx itself sends BEGIN, the domain
//     INSERT and COMMIT; the second also sends an outbox row of the size
//     Stage writes, pipelined with the COMMIT in the same round trip. Their
//     ratio shows what the row itself costs the server once no round trip
//     is added.
//
// The variants run interleaved, in rounds, so that drift in the machine's
// load hits them alike. Each reports commits/s. Run it with
//
//	go test ./behaviors/ -run '^$' -bench TransactionPostgres -benchtime 1s
func BenchmarkTransactionPostgres(b *testing.B) {
	const senders, rounds = 8, 5
	db := testenv.NewPostgres(b).DB
	ctx := context.Background()
	for _, ddl := range []string{
		`CREATE TABLE orders (id TEXT PRIMARY KEY, amount INTEGER NOT NULL)`,
		`CREATE TABLE side (id BIGSERIAL PRIMARY KEY, ref TEXT NOT NULL, payload BYTEA NOT NULL)`,
	} {
		if _, err := db.ExecContext(ctx, ddl); err != nil {
			b.Fatal(err)
		}
	}
	sidePayload := make([]byte, 200)
	newMediator := func(table string, notifyInTx bool) *mediator.Mediator {
		ob, err := outbox.New(db, nil, outbox.Config{Dialect: outbox.PostgreSQL, Table: table})
		if err != nil {
			b.Fatal(err)
		}
		if err := outbox.InitializeSchema(ctx, db, outbox.PostgreSQL, table); err != nil {
			b.Fatal(err)
		}
		notifier := &outbox.Notifier{}
		if !notifyInTx {
			stop, err := outbox.NotifyPostgres(db, table, notifier, nil)
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(stop)
		}
		tb, err := behaviors.NewTransaction(db, nil, behaviors.TransactionConfig{Notifier: notifier})
		if err != nil {
			b.Fatal(err)
		}
		m := mediator.New()
		m.Use(tb.Layer())
		mediator.RegisterFunc(m, func(ctx context.Context, c benchPlace) (struct{}, error) {
			tx, _ := outbox.TxFromContext(ctx)
			if _, err := tx.ExecContext(ctx, `INSERT INTO orders (id, amount) VALUES ($1, $2)`, c.ID, 1); err != nil {
				return struct{}{}, err
			}
			if notifyInTx {
				if _, err := tx.ExecContext(ctx, `SELECT pg_notify($1, '')`, table); err != nil {
					return struct{}{}, err
				}
			}
			return struct{}{}, ob.Stage(ctx, benchPlaced{ID: c.ID, Amount: 1})
		})
		return m
	}
	recommended := newMediator("bench_outbox", false)
	txNotify := newMediator("bench_outbox_txn", true)

	var seq atomic.Int64
	parallel := func(b *testing.B, op func(id string) error) {
		b.SetParallelism((senders + runtime.GOMAXPROCS(0) - 1) / runtime.GOMAXPROCS(0))
		b.ResetTimer()
		b.RunParallel(func(p *testing.PB) {
			for p.Next() {
				if err := op(fmt.Sprintf("o-%d", seq.Add(1))); err != nil {
					b.Error(err)
					return
				}
			}
		})
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "commits/s")
	}
	plain := func(id string) error {
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO orders (id, amount) VALUES ($1, $2)`, id, 1); err != nil {
			_ = tx.Rollback()
			return err
		}
		return tx.Commit()
	}
	plain2 := func(id string) error {
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO orders (id, amount) VALUES ($1, $2)`, id, 1); err != nil {
			_ = tx.Rollback()
			return err
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO side (ref, payload) VALUES ($1, $2)`, id, sidePayload); err != nil {
			_ = tx.Rollback()
			return err
		}
		return tx.Commit()
	}
	// An envelope of the size Stage writes for benchPlaced.
	if err := outbox.InitializeSchema(ctx, db, outbox.PostgreSQL, "bench_outbox_raw"); err != nil {
		b.Fatal(err)
	}
	envelope := []byte(`{"destination_topic":"bench.placed","uuid":"5a0c5b3e-6d0e-4c0e-9f1e-1b2c3d4e5f60",` +
		`"payload":"eyJpZCI6Im8tMSIsImFtb3VudCI6MX0=","metadata":{"tailrace_kind":"bench.placed",` +
		`"tailrace_occurred_at":"2026-12-02T12:00:00.123456Z","tailrace_correlation_id":"5a0c5b3e-6d0e-4c0e-9f1e-1b2c3d4e5f61",` +
		`"tailrace_partition_key":"o-1"}}`)
	rowSQL := `INSERT INTO "bench_outbox_raw" (uuid, message_id, kind, partition_key, key_hash, payload, metadata) VALUES ($1,$2,$3,$4,$5,$6,$7)`
	rawPgx := func(withRow bool) func(id string) error {
		return func(id string) error {
			conn, err := db.Conn(ctx)
			if err != nil {
				return err
			}
			defer conn.Close()
			return conn.Raw(func(dc any) error {
				c := dc.(*stdlib.Conn).Conn()
				if _, err := c.Exec(ctx, "begin"); err != nil {
					return err
				}
				if _, err := c.Exec(ctx, `INSERT INTO orders (id, amount) VALUES ($1, $2)`, id, 1); err != nil {
					_, _ = c.Exec(ctx, "rollback")
					return err
				}
				var batch pgx.Batch
				if withRow {
					batch.Queue(rowSQL, id, id, "bench.placed", id, 12345, envelope, "{}")
				}
				batch.Queue("commit")
				if err := c.SendBatch(ctx, &batch).Close(); err != nil {
					_, _ = c.Exec(ctx, "rollback")
					return err
				}
				return nil
			})
		}
	}
	send := func(m *mediator.Mediator) func(id string) error {
		return func(id string) error {
			_, err := mediator.Send(ctx, m, benchPlace{ID: id})
			return err
		}
	}

	for r := 0; r < rounds; r++ {
		b.Run("plain", func(b *testing.B) { parallel(b, plain) })
		b.Run("plain_2inserts", func(b *testing.B) { parallel(b, plain2) })
		b.Run("behavior", func(b *testing.B) { parallel(b, send(recommended)) })
		b.Run("behavior_tx_notify", func(b *testing.B) { parallel(b, send(txNotify)) })
		b.Run("pgx_plain", func(b *testing.B) { parallel(b, rawPgx(false)) })
		b.Run("pgx_pipelined_row", func(b *testing.B) { parallel(b, rawPgx(true)) })
	}
}
