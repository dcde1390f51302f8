package outbox

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel/trace"

	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/internal/testenv"
)

// testBundle is one database with an outbox table and a domain table.
type testBundle struct {
	db *sql.DB
	d  Dialect
	ob *Outbox
}

func setup(t *testing.T, open func(t *testing.T) (*sql.DB, Dialect), cfg Config) *testBundle {
	t.Helper()
	db, d := open(t)
	ctx := context.Background()
	cfg.Dialect = d
	ob, err := New(db, nil, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := InitializeSchema(ctx, db, d, ob.Table()); err != nil {
		t.Fatal(err)
	}
	if _, err := db.ExecContext(ctx, `CREATE TABLE orders (id VARCHAR(64) PRIMARY KEY, amount INTEGER NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	return &testBundle{db: db, d: d, ob: ob}
}

func (b *testBundle) insertOrder(ctx context.Context, tx *sql.Tx, id string, amount int) error {
	_, err := tx.ExecContext(ctx, `INSERT INTO orders (id, amount) VALUES (`+placeholders(b.d, 1, 2)+`)`, id, amount)
	return err
}

func (b *testBundle) count(t *testing.T, table string) int {
	t.Helper()
	var n int
	if err := b.db.QueryRow(`SELECT COUNT(*) FROM ` + b.d.quote(table)).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// outboxRow is a staged row as the relay sees it.
type outboxRow struct {
	ID           int64
	UUID         string
	MessageID    string
	Kind         string
	PartitionKey string
	KeyHash      int64
	Payload      []byte
	Metadata     []byte
}

func (b *testBundle) rows(t *testing.T) []outboxRow {
	t.Helper()
	rs, err := b.db.Query(`SELECT id, uuid, message_id, kind, partition_key, key_hash, payload, metadata FROM ` +
		b.d.quote(b.ob.Table()) + ` ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	defer rs.Close()
	var out []outboxRow
	for rs.Next() {
		var r outboxRow
		if err := rs.Scan(&r.ID, &r.UUID, &r.MessageID, &r.Kind, &r.PartitionKey, &r.KeyHash, &r.Payload, &r.Metadata); err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	if err := rs.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// Test message types.

type orderPlaced struct {
	OrderID string `json:"order_id"`
	Amount  int    `json:"amount"`
}

func (orderPlaced) Kind() string           { return "orders.placed" }
func (e orderPlaced) PartitionKey() string { return e.OrderID }
func (orderPlaced) Domain() string         { return "orders" }

type auditLogged struct {
	Text string `json:"text"`
}

func (auditLogged) Kind() string { return "audit.logged" }

type noKind struct{ X int }

type big struct {
	Data string `json:"data"`
}

func (big) Kind() string { return "big" }

func TestStageTxCommitWritesRows(t *testing.T) {
	for name, open := range dialectDBs(t) {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			b := setup(t, open, Config{})
			ctx := WithCorrelationID(context.Background(), "corr-1")
			ctx = WithCausationID(ctx, "cause-1")
			ctx = WithTenant(ctx, "acme", "enterprise")

			tx, err := b.db.BeginTx(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			if err := b.insertOrder(ctx, tx, "order-1", 42); err != nil {
				t.Fatal(err)
			}
			at := time.Date(2026, 11, 23, 16, 0, 0, 5, time.UTC)
			err = b.ob.StageTx(ctx, tx,
				orderPlaced{OrderID: "order-1", Amount: 42},
				Message{Value: auditLogged{Text: "hi"}, Options: &StageOptions{
					MessageID: "audit-1", Topic: "audit", OccurredAt: at,
					Headers: map[string]string{"x-user": "ann"},
				}},
			)
			if err != nil {
				t.Fatal(err)
			}
			if err := tx.Commit(); err != nil {
				t.Fatal(err)
			}

			if n := b.count(t, "orders"); n != 1 {
				t.Fatalf("orders: %d rows, want 1", n)
			}
			rows := b.rows(t)
			if len(rows) != 2 {
				t.Fatalf("outbox: %d rows, want 2", len(rows))
			}

			r := rows[0]
			if r.Kind != "orders.placed" || r.PartitionKey != "order-1" || r.KeyHash != int64(keyHash("order-1")) {
				t.Errorf("row 0 columns: kind %q key %q hash %d", r.Kind, r.PartitionKey, r.KeyHash)
			}
			env := decodeEnvelope(t, r.Payload)
			if env.DestinationTopic != "orders.placed" || env.UUID != r.MessageID || r.UUID == r.MessageID {
				t.Errorf("row 0 envelope: topic %q uuid %q; message_id %q uuid %q", env.DestinationTopic, env.UUID, r.MessageID, r.UUID)
			}
			var ev orderPlaced
			if err := json.Unmarshal(env.Payload, &ev); err != nil || ev != (orderPlaced{"order-1", 42}) {
				t.Errorf("row 0 payload %s: %v", env.Payload, err)
			}
			want := map[string]string{
				tailrace.MetaKind: "orders.placed", tailrace.MetaPartitionKey: "order-1",
				tailrace.MetaDomain: "orders", tailrace.MetaTenant: "acme", tailrace.MetaTenantTier: "enterprise",
				tailrace.MetaCorrelationID: "corr-1", tailrace.MetaCausationID: "cause-1",
			}
			for k, v := range want {
				if env.Metadata[k] != v {
					t.Errorf("row 0 metadata[%q] = %q, want %q", k, env.Metadata[k], v)
				}
			}
			if _, err := time.Parse(time.RFC3339Nano, env.Metadata[tailrace.MetaOccurredAt]); err != nil {
				t.Errorf("row 0 occurred_at: %v", err)
			}
			var outer map[string]string
			if err := json.Unmarshal(r.Metadata, &outer); err != nil || len(outer) != 0 {
				t.Errorf("row 0 outer metadata %s (%v), want {}", r.Metadata, err)
			}

			r = rows[1]
			env = decodeEnvelope(t, r.Payload)
			if r.Kind != "audit.logged" || r.PartitionKey != "" || r.MessageID != "audit-1" || r.KeyHash != int64(keyHash("audit-1")) {
				t.Errorf("row 1 columns: %+v", r)
			}
			if env.DestinationTopic != "audit" || env.Metadata["x-user"] != "ann" ||
				env.Metadata[tailrace.MetaOccurredAt] != "2026-11-23T16:00:00.000000005Z" ||
				env.Metadata[tailrace.MetaCorrelationID] != "corr-1" {
				t.Errorf("row 1 envelope: %+v", env)
			}
			if _, ok := env.Metadata[tailrace.MetaPartitionKey]; ok {
				t.Errorf("row 1 has a partition key in metadata")
			}
		})
	}
}

func decodeEnvelope(t *testing.T, payload []byte) envelope {
	t.Helper()
	var e envelope
	if err := json.Unmarshal(payload, &e); err != nil {
		t.Fatalf("envelope %s: %v", payload, err)
	}
	return e
}

func TestStageRollbackLeavesNothing(t *testing.T) {
	for name, open := range dialectDBs(t) {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			b := setup(t, open, Config{})
			ctx := context.Background()
			tx, err := b.db.BeginTx(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			if err := b.insertOrder(ctx, tx, "o", 1); err != nil {
				t.Fatal(err)
			}
			if err := b.ob.Stage(ContextWithTx(ctx, tx), orderPlaced{OrderID: "o"}); err != nil {
				t.Fatal(err)
			}
			if err := tx.Rollback(); err != nil {
				t.Fatal(err)
			}
			if n, m := b.count(t, "orders"), b.count(t, b.ob.Table()); n != 0 || m != 0 {
				t.Fatalf("after rollback: %d orders, %d outbox rows", n, m)
			}
		})
	}
}

func TestStageRejectsBadMessagesWritingNothing(t *testing.T) {
	cases := []struct {
		name string
		msgs []any
		want error
	}{
		{"oversized", []any{auditLogged{"ok"}, big{Data: strings.Repeat("x", 2048)}}, ErrPayloadTooLarge},
		{"no kind", []any{auditLogged{"ok"}, noKind{1}}, ErrNoKind},
		{"nil", []any{nil}, ErrInvalidMessage},
		{"reserved header", []any{Message{Value: auditLogged{}, Options: &StageOptions{Headers: map[string]string{tailrace.MetaKind: "x"}}}}, ErrInvalidMessage},
		{"kind with space", []any{Message{Value: noKind{}, Options: &StageOptions{Kind: "a b"}}}, ErrInvalidMessage},
		{"long key", []any{Message{Value: auditLogged{}, Options: &StageOptions{PartitionKey: strings.Repeat("k", MaxFieldLen+1)}}}, ErrInvalidMessage},
	}
	for name, open := range dialectDBs(t) {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			b := setup(t, open, Config{MaxPayloadBytes: 1024})
			ctx := context.Background()
			tx, err := b.db.BeginTx(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer tx.Rollback()
			for _, c := range cases {
				err := b.ob.StageTx(ctx, tx, c.msgs...)
				if !errors.Is(err, c.want) {
					t.Errorf("%s: got %v, want %v", c.name, err, c.want)
				}
				if c.want == ErrPayloadTooLarge && err != nil && !strings.Contains(err.Error(), "the limit is 1024") {
					t.Errorf("%s: error does not give the limit: %v", c.name, err)
				}
			}
			// The transaction is still usable: the domain row and a good
			// message commit.
			if err := b.insertOrder(ctx, tx, "o", 1); err != nil {
				t.Fatal(err)
			}
			if err := b.ob.StageTx(ctx, tx, auditLogged{"fine"}); err != nil {
				t.Fatal(err)
			}
			if err := tx.Commit(); err != nil {
				t.Fatal(err)
			}
			if rows := b.rows(t); len(rows) != 1 || rows[0].Kind != "audit.logged" {
				t.Fatalf("outbox rows after rejected messages: %+v", rows)
			}
		})
	}
}

func TestStageNoTx(t *testing.T) {
	b := setup(t, func(t *testing.T) (*sql.DB, Dialect) { return dialectDBs(t)["sqlite"](t) }, Config{})
	if err := b.ob.Stage(context.Background(), auditLogged{}); !errors.Is(err, ErrNoTx) {
		t.Fatalf("Stage without tx: %v", err)
	}
	if err := b.ob.StageTx(context.Background(), nil, auditLogged{}); !errors.Is(err, ErrNoTx) {
		t.Fatalf("StageTx(nil): %v", err)
	}
	if n := b.count(t, b.ob.Table()); n != 0 {
		t.Fatalf("%d rows written", n)
	}
}

func TestNewValidatesConfig(t *testing.T) {
	_, err := New(nil, nil, Config{Table: `bad"name`, MaxPayloadBytes: -1})
	if err == nil {
		t.Fatal("bad config accepted")
	}
	for _, want := range []string{"Dialect is required", "invalid table name", "MaxPayloadBytes"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q: %v", want, err)
		}
	}
	if !errors.Is(err, ErrInvalidName) {
		t.Errorf("not ErrInvalidName: %v", err)
	}
	for _, name := range []string{"Outbox", "a;drop", strings.Repeat("a", MaxTableNameLen+1), "1abc", ""} {
		if name == "" {
			continue // empty means the default
		}
		if _, err := New(nil, nil, Config{Dialect: SQLite, Table: name}); !errors.Is(err, ErrInvalidName) {
			t.Errorf("table %q accepted: %v", name, err)
		}
	}
	ob, err := New(nil, nil, Config{Dialect: PostgreSQL})
	if err != nil || ob.Table() != DefaultTable {
		t.Fatalf("defaults: %v %v", ob, err)
	}
}

// TestStageOutOfOrderCommit: a long transaction takes a lower id than a
// short one that commits first. A reader that looks for unrelayed rows (as
// the relay does, by state rather than by offset) must still see the long
// one after it commits.
func TestStageOutOfOrderCommit(t *testing.T) {
	for name, open := range dialectDBs(t) {
		if name == "sqlite" {
			continue // one writer at a time: commits cannot interleave
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			if name == "postgres" {
				testenv.LongTransaction(t)
			}
			b := setup(t, open, Config{})
			ctx := context.Background()
			long, err := b.db.BeginTx(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer long.Rollback()
			if err := b.ob.StageTx(ctx, long, Message{Value: auditLogged{}, Options: &StageOptions{MessageID: "long"}}); err != nil {
				t.Fatal(err)
			}
			short, err := b.db.BeginTx(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			if err := b.ob.StageTx(ctx, short, Message{Value: auditLogged{}, Options: &StageOptions{MessageID: "short"}}); err != nil {
				t.Fatal(err)
			}
			if err := short.Commit(); err != nil {
				t.Fatal(err)
			}
			pending := func() []string {
				rs, err := b.db.Query(`SELECT message_id FROM ` + b.d.quote(b.ob.Table()) + ` WHERE relayed_at IS NULL AND claim_token IS NULL ORDER BY id`)
				if err != nil {
					t.Fatal(err)
				}
				defer rs.Close()
				var ids []string
				for rs.Next() {
					var s string
					if err := rs.Scan(&s); err != nil {
						t.Fatal(err)
					}
					ids = append(ids, s)
				}
				return ids
			}
			if got := pending(); len(got) != 1 || got[0] != "short" {
				t.Fatalf("before the long commit: %v", got)
			}
			// The reader "relays" what it saw (by primary key: a scan would
			// wait for the long transaction's row lock on MySQL).
			var shortID int64
			if err := b.db.QueryRow(`SELECT id FROM ` + b.d.quote(b.ob.Table()) + ` WHERE relayed_at IS NULL`).Scan(&shortID); err != nil {
				t.Fatal(err)
			}
			if _, err := b.db.Exec(`UPDATE `+b.d.quote(b.ob.Table())+` SET relayed_at = CURRENT_TIMESTAMP WHERE id = `+placeholders(b.d, 1, 1), shortID); err != nil {
				t.Fatal(err)
			}
			if err := long.Commit(); err != nil {
				t.Fatal(err)
			}
			rows := b.rows(t)
			if len(rows) != 2 || rows[0].MessageID != "long" {
				t.Fatalf("rows: %+v (the long transaction's row should have the lower id)", rows)
			}
			if got := pending(); len(got) != 1 || got[0] != "long" {
				t.Fatalf("after the long commit: %v, want [long]", got)
			}
		})
	}
}

func TestStageConcurrentLosesNothing(t *testing.T) {
	for name, open := range dialectDBs(t) {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			b := setup(t, open, Config{})
			workers, per := 20, 20
			var wg sync.WaitGroup
			errs := make(chan error, workers)
			for w := 0; w < workers; w++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := 0; i < per; i++ {
						err := withTx(b.db, func(ctx context.Context, tx *sql.Tx) error {
							return b.ob.StageTx(ctx, tx, auditLogged{"x"}, auditLogged{"y"})
						})
						if err != nil {
							errs <- err
							return
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			if n := b.count(t, b.ob.Table()); n != workers*per*2 {
				t.Fatalf("%d rows, want %d", n, workers*per*2)
			}
		})
	}
}

func withTx(db *sql.DB, fn func(ctx context.Context, tx *sql.Tx) error) error {
	ctx := context.Background()
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := fn(ctx, tx); err != nil {
		_ = tx.Rollback()
		return err
	}
	return tx.Commit()
}

func TestStageTraceparent(t *testing.T) {
	b := setup(t, func(t *testing.T) (*sql.DB, Dialect) { return dialectDBs(t)["sqlite"](t) }, Config{})
	tid, _ := trace.TraceIDFromHex("4bf92f3577b34da6a3ce929d0e0e4736")
	sid, _ := trace.SpanIDFromHex("00f067aa0ba902b7")
	ctx := trace.ContextWithSpanContext(context.Background(), trace.NewSpanContext(trace.SpanContextConfig{
		TraceID: tid, SpanID: sid, TraceFlags: trace.FlagsSampled,
	}))
	if err := withTx(b.db, func(_ context.Context, tx *sql.Tx) error {
		return b.ob.StageTx(ctx, tx, auditLogged{"traced"}, Message{Value: auditLogged{"untraced"}})
	}); err != nil {
		t.Fatal(err)
	}
	rows := b.rows(t)
	got := decodeEnvelope(t, rows[0].Payload).Metadata[tailrace.MetaTraceparent]
	if want := "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"; got != want {
		t.Fatalf("traceparent %q, want %q", got, want)
	}

	// No span, no header.
	if err := withTx(b.db, func(ctx context.Context, tx *sql.Tx) error { return b.ob.StageTx(ctx, tx, auditLogged{}) }); err != nil {
		t.Fatal(err)
	}
	if md := decodeEnvelope(t, b.rows(t)[2].Payload).Metadata; md[tailrace.MetaTraceparent] != "" {
		t.Fatalf("traceparent without a span: %q", md[tailrace.MetaTraceparent])
	}
}

// TestStageLargeBatchKeepsOrder: a call over maxRowsPerInsert is written
// with several INSERTs, still in argument order.
func TestStageLargeBatchKeepsOrder(t *testing.T) {
	for name, open := range dialectDBs(t) {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			b := setup(t, open, Config{})
			const n = 2*maxRowsPerInsert + 7
			msgs := make([]any, n)
			for i := range msgs {
				msgs[i] = Message{Value: auditLogged{"x"}, Options: &StageOptions{MessageID: fmt.Sprintf("m-%05d", i)}}
			}
			if err := withTx(b.db, func(ctx context.Context, tx *sql.Tx) error { return b.ob.StageTx(ctx, tx, msgs...) }); err != nil {
				t.Fatal(err)
			}
			rows := b.rows(t)
			if len(rows) != n {
				t.Fatalf("%d rows, want %d", len(rows), n)
			}
			for i, r := range rows {
				if want := fmt.Sprintf("m-%05d", i); r.MessageID != want {
					t.Fatalf("row %d is %s, want %s", i, r.MessageID, want)
				}
			}
		})
	}
}
