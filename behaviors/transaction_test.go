package behaviors_test

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/behaviors"
	"github.com/tailrace/tailrace/internal/testenv"
	"github.com/tailrace/tailrace/mediator"
	"github.com/tailrace/tailrace/outbox"
)

// Commands, queries and events of the tests.

type PlaceOrder struct {
	mediator.Command[string]
	ID      string
	Amount  int
	Lines   int  // nested AddLine commands to send
	Fail    bool // return an error after writing and staging
	Panic   bool // panic after writing and staging
	FailSub bool // the last nested AddLine fails
}

func (PlaceOrder) Kind() string { return "orders.place" }

type AddLine struct {
	mediator.Command[struct{}]
	Order string
	N     int
	Fail  bool
}

func (AddLine) Kind() string { return "orders.add_line" }

type CountOrders struct {
	mediator.Query[int]
}

func (CountOrders) Kind() string { return "orders.count" }

type OrderPlaced struct {
	ID     string `json:"id"`
	Amount int    `json:"amount"`
}

func (OrderPlaced) Kind() string           { return "orders.placed" }
func (e OrderPlaced) PartitionKey() string { return e.ID }
func (OrderPlaced) Domain() string         { return "orders" }
func (e OrderPlaced) OutboxOptions() outbox.StageOptions {
	return outbox.StageOptions{Headers: map[string]string{"source": "test"}}
}

type LineAdded struct {
	Order string `json:"order"`
	N     int    `json:"n"`
}

func (LineAdded) Kind() string           { return "orders.line_added" }
func (e LineAdded) PartitionKey() string { return e.Order }

type txBundle struct {
	db       *sql.DB
	d        outbox.Dialect
	ob       *outbox.Outbox
	m        *mediator.Mediator
	notifier *outbox.Notifier
	// txs records, per order id, the transactions the handlers saw.
	mu  sync.Mutex
	txs map[string][]*sql.Tx
}

type opener func(t testing.TB) (*sql.DB, outbox.Dialect)

func dialects() map[string]opener {
	return map[string]opener{
		"postgres": func(t testing.TB) (*sql.DB, outbox.Dialect) { return testenv.NewPostgres(t).DB, outbox.PostgreSQL },
		"mysql":    func(t testing.TB) (*sql.DB, outbox.Dialect) { return testenv.NewMySQL(t).DB, outbox.MySQL },
		"sqlite":   func(t testing.TB) (*sql.DB, outbox.Dialect) { return testenv.NewSQLite(t).DB, outbox.SQLite },
	}
}

// ph returns the n-th bind marker of d.
func ph(d outbox.Dialect, n int) string {
	if d == outbox.PostgreSQL {
		return fmt.Sprintf("$%d", n)
	}
	return "?"
}

func setupTx(t testing.TB, open opener, cfg behaviors.TransactionConfig, outer ...mediator.Layer) *txBundle {
	t.Helper()
	db, d := open(t)
	ctx := context.Background()
	b := &txBundle{db: db, d: d, notifier: &outbox.Notifier{}, txs: map[string][]*sql.Tx{}}
	var err error
	if b.ob, err = outbox.New(db, nil, outbox.Config{Dialect: d, Notifier: b.notifier}); err != nil {
		t.Fatal(err)
	}
	if err := outbox.InitializeSchema(ctx, db, d, b.ob.Table()); err != nil {
		t.Fatal(err)
	}
	for _, ddl := range []string{
		`CREATE TABLE orders (id VARCHAR(64) PRIMARY KEY, amount INTEGER NOT NULL)`,
		`CREATE TABLE order_lines (order_id VARCHAR(64) NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (order_id, n))`,
	} {
		if _, err := db.ExecContext(ctx, ddl); err != nil {
			t.Fatal(err)
		}
	}
	if cfg.Notifier == nil {
		cfg.Notifier = b.notifier
	}
	tb, err := behaviors.NewTransaction(db, nil, cfg)
	if err != nil {
		t.Fatal(err)
	}
	b.m = mediator.New()
	b.m.Use(tb.Layer())
	b.m.Use(outer...)

	mediator.RegisterFunc(b.m, func(ctx context.Context, c PlaceOrder) (string, error) {
		tx, ok := outbox.TxFromContext(ctx)
		if !ok {
			return "", errors.New("no transaction in the handler's context")
		}
		b.see(c.ID, tx)
		if _, err := tx.ExecContext(ctx, `INSERT INTO orders (id, amount) VALUES (`+ph(d, 1)+`, `+ph(d, 2)+`)`, c.ID, c.Amount); err != nil {
			return "", err
		}
		if err := b.ob.Stage(ctx, OrderPlaced{ID: c.ID, Amount: c.Amount}); err != nil {
			return "", err
		}
		for i := 1; i <= c.Lines; i++ {
			if _, err := mediator.Send(ctx, b.m, AddLine{Order: c.ID, N: i, Fail: c.FailSub && i == c.Lines}); err != nil {
				return "", fmt.Errorf("line %d: %w", i, err)
			}
		}
		if c.Fail {
			return "", errors.New("handler failed")
		}
		if c.Panic {
			panic("handler panicked")
		}
		return c.ID, nil
	})
	mediator.RegisterFunc(b.m, func(ctx context.Context, c AddLine) (struct{}, error) {
		tx, ok := outbox.TxFromContext(ctx)
		if !ok {
			return struct{}{}, errors.New("no transaction in the nested handler's context")
		}
		b.see(c.Order, tx)
		if _, err := tx.ExecContext(ctx, `INSERT INTO order_lines (order_id, n) VALUES (`+ph(d, 1)+`, `+ph(d, 2)+`)`, c.Order, c.N); err != nil {
			return struct{}{}, err
		}
		if err := b.ob.Stage(ctx, LineAdded{Order: c.Order, N: c.N}); err != nil {
			return struct{}{}, err
		}
		if c.Fail {
			return struct{}{}, errors.New("line failed")
		}
		return struct{}{}, nil
	})
	mediator.RegisterFunc(b.m, func(ctx context.Context, q CountOrders) (int, error) {
		if _, ok := outbox.TxFromContext(ctx); ok {
			return 0, errors.New("a query runs in a transaction")
		}
		var n int
		err := b.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM orders`).Scan(&n)
		return n, err
	})
	return b
}

func (b *txBundle) see(order string, tx *sql.Tx) {
	b.mu.Lock()
	b.txs[order] = append(b.txs[order], tx)
	b.mu.Unlock()
}

func (b *txBundle) count(t testing.TB, table string) int {
	t.Helper()
	var n int
	if err := b.db.QueryRow(`SELECT COUNT(*) FROM ` + table).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

func (b *txBundle) counts(t testing.TB) (orders, lines, staged int) {
	return b.count(t, "orders"), b.count(t, "order_lines"), b.count(t, outbox.DefaultTable)
}

func TestTransactionCommitLeavesRowsAndMessages(t *testing.T) {
	for name, open := range dialects() {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			b := setupTx(t, open, behaviors.TransactionConfig{})
			wake, stop := b.notifier.Subscribe()
			defer stop()

			id, err := mediator.Send(context.Background(), b.m, PlaceOrder{ID: "o-1", Amount: 42})
			if err != nil || id != "o-1" {
				t.Fatalf("Send: %q, %v", id, err)
			}
			if o, l, s := b.counts(t); o != 1 || l != 0 || s != 1 {
				t.Fatalf("orders %d, lines %d, outbox %d; want 1, 0, 1", o, l, s)
			}
			select {
			case <-wake:
			default:
				t.Error("no notification after commit")
			}

			var kind, key, msgID string
			var hash int64
			var payload []byte
			err = b.db.QueryRow(`SELECT kind, partition_key, key_hash, message_id, payload FROM `+outbox.DefaultTable).
				Scan(&kind, &key, &hash, &msgID, &payload)
			if err != nil {
				t.Fatal(err)
			}
			var env struct {
				DestinationTopic string            `json:"destination_topic"`
				UUID             string            `json:"uuid"`
				Payload          []byte            `json:"payload"`
				Metadata         map[string]string `json:"metadata"`
			}
			if err := json.Unmarshal(payload, &env); err != nil {
				t.Fatal(err)
			}
			if kind != "orders.placed" || key != "o-1" || hash <= 0 || env.UUID != msgID || env.DestinationTopic != "orders.placed" {
				t.Errorf("row: kind %q key %q hash %d id %q; envelope %+v", kind, key, hash, msgID, env)
			}
			if env.Metadata[tailrace.MetaDomain] != "orders" || env.Metadata["source"] != "test" || env.Metadata[tailrace.MetaCorrelationID] == "" {
				t.Errorf("metadata: %v", env.Metadata)
			}
			if string(env.Payload) != `{"id":"o-1","amount":42}` {
				t.Errorf("payload %s", env.Payload)
			}
		})
	}
}

func TestTransactionErrorAndPanicLeaveNothing(t *testing.T) {
	recoverLayer := mediator.Layer{Order: behaviors.OrderRecover, Behavior: mediator.BehaviorFunc(
		func(ctx context.Context, req any, info mediator.Info, next mediator.Next) (res any, err error) {
			defer func() {
				if v := recover(); v != nil {
					err = fmt.Errorf("recovered: %v", v)
				}
			}()
			return next(ctx, req)
		})}
	for name, open := range dialects() {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			b := setupTx(t, open, behaviors.TransactionConfig{})
			wake, stop := b.notifier.Subscribe()
			defer stop()
			ctx := context.Background()

			if _, err := mediator.Send(ctx, b.m, PlaceOrder{ID: "err", Lines: 2, Fail: true}); err == nil || !strings.Contains(err.Error(), "handler failed") {
				t.Fatalf("error: %v", err)
			}
			if _, err := mediator.Send(ctx, b.m, PlaceOrder{ID: "sub", Lines: 2, FailSub: true}); err == nil || !strings.Contains(err.Error(), "line failed") {
				t.Fatalf("nested error: %v", err)
			}
			func() {
				defer func() {
					if v := recover(); v != "handler panicked" {
						t.Fatalf("panic not re-raised: %v", v)
					}
				}()
				_, _ = mediator.Send(ctx, b.m, PlaceOrder{ID: "panic", Lines: 1, Panic: true})
				t.Fatal("Send returned after a panic")
			}()
			if o, l, s := b.counts(t); o != 0 || l != 0 || s != 0 {
				t.Fatalf("after error and panic: orders %d, lines %d, outbox %d", o, l, s)
			}

			// With a recovering behavior outside, the panic becomes an error
			// and still leaves nothing.
			b.m.Use(recoverLayer)
			if _, err := mediator.Send(ctx, b.m, PlaceOrder{ID: "panic2", Panic: true}); err == nil || !strings.Contains(err.Error(), "recovered") {
				t.Fatalf("recovered panic: %v", err)
			}
			if o, l, s := b.counts(t); o != 0 || l != 0 || s != 0 {
				t.Fatalf("after recovered panic: orders %d, lines %d, outbox %d", o, l, s)
			}
			select {
			case <-wake:
				t.Error("notified although nothing committed")
			default:
			}
			// The pool is not left with a connection stuck in a transaction.
			if _, err := mediator.Send(ctx, b.m, PlaceOrder{ID: "after", Amount: 1}); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestTransactionNestedSendJoins(t *testing.T) {
	for name, open := range dialects() {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			b := setupTx(t, open, behaviors.TransactionConfig{})
			if _, err := mediator.Send(context.Background(), b.m, PlaceOrder{ID: "n", Lines: 3}); err != nil {
				t.Fatal(err)
			}
			txs := b.txs["n"]
			if len(txs) != 4 {
				t.Fatalf("handlers saw %d transactions, want 4", len(txs))
			}
			for i, tx := range txs[1:] {
				if tx != txs[0] {
					t.Errorf("nested Send %d ran in another transaction", i+1)
				}
			}
			if o, l, s := b.counts(t); o != 1 || l != 3 || s != 4 {
				t.Fatalf("orders %d, lines %d, outbox %d; want 1, 3, 4", o, l, s)
			}
			// Staged in order, in one transaction: ids ascend in send order.
			rs, err := b.db.Query(`SELECT kind FROM ` + outbox.DefaultTable + ` ORDER BY id`)
			if err != nil {
				t.Fatal(err)
			}
			defer rs.Close()
			var kinds []string
			for rs.Next() {
				var k string
				_ = rs.Scan(&k)
				kinds = append(kinds, k)
			}
			if strings.Join(kinds, ",") != "orders.placed,orders.line_added,orders.line_added,orders.line_added" {
				t.Errorf("kinds in id order: %v", kinds)
			}
		})
	}
}

func TestTransactionQueriesPassThrough(t *testing.T) {
	b := setupTx(t, dialects()["sqlite"], behaviors.TransactionConfig{})
	if n, err := mediator.Send(context.Background(), b.m, CountOrders{}); err != nil || n != 0 {
		t.Fatalf("query: %d, %v", n, err)
	}

	// A predicate that wraps nothing: the command handler has no tx.
	b2 := setupTx(t, dialects()["sqlite"], behaviors.TransactionConfig{Applies: func(mediator.Info) bool { return false }})
	if _, err := mediator.Send(context.Background(), b2.m, PlaceOrder{ID: "x"}); err == nil || !strings.Contains(err.Error(), "no transaction") {
		t.Fatalf("command outside the predicate: %v", err)
	}
}

func TestTransactionIsolation(t *testing.T) {
	b := setupTx(t, dialects()["postgres"], behaviors.TransactionConfig{Isolation: sql.LevelSerializable})
	var level string
	mediator.RegisterFunc(b.m, func(ctx context.Context, c probe) (struct{}, error) {
		tx, _ := outbox.TxFromContext(ctx)
		return struct{}{}, tx.QueryRowContext(ctx, `SHOW transaction_isolation`).Scan(&level)
	})
	if _, err := mediator.Send(context.Background(), b.m, probe{}); err != nil {
		t.Fatal(err)
	}
	if level != "serializable" {
		t.Fatalf("isolation %q, want serializable", level)
	}
}

type probe struct{ mediator.Command[struct{}] }

func (probe) Kind() string { return "test.probe" }

func TestTransactionConfigValidate(t *testing.T) {
	if _, err := behaviors.NewTransaction(nil, nil, behaviors.TransactionConfig{Isolation: 99}); err == nil ||
		!strings.Contains(err.Error(), "*sql.DB") || !strings.Contains(err.Error(), "Isolation") {
		t.Fatalf("bad config: %v", err)
	}
}

// TestTransactionConcurrentLosesNothing: many goroutines send commands at
// once; every committed command leaves exactly its row and its message.
func TestTransactionConcurrentLosesNothing(t *testing.T) {
	for name, open := range dialects() {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			workers, per := 50, 100
			if name == "sqlite" || testing.Short() {
				workers, per = 10, 50 // one writer at a time
			}
			b := setupTx(t, open, behaviors.TransactionConfig{})
			var wg sync.WaitGroup
			var failed atomic.Int64
			var firstErr atomic.Value
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			for w := 0; w < workers; w++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := 0; i < per; i++ {
						id := fmt.Sprintf("w%d-%d", w, i)
						if _, err := mediator.Send(ctx, b.m, PlaceOrder{ID: id, Amount: i}); err != nil {
							failed.Add(1)
							firstErr.CompareAndSwap(nil, err)
						}
					}
				}()
			}
			wg.Wait()
			if n := failed.Load(); n > 0 {
				t.Fatalf("%d commands failed, first: %v", n, firstErr.Load())
			}
			want := workers * per
			o, _, s := b.counts(t)
			if o != want || s != want {
				t.Fatalf("orders %d, outbox %d; want %d each", o, s, want)
			}
			var distinct int
			if err := b.db.QueryRow(`SELECT COUNT(DISTINCT partition_key) FROM ` + outbox.DefaultTable).Scan(&distinct); err != nil {
				t.Fatal(err)
			}
			if distinct != want {
				t.Fatalf("%d distinct partition keys, want %d", distinct, want)
			}
		})
	}
}

// A context that ends while the handler runs rolls the transaction back and
// the error says why.
func TestTransactionCancelledContext(t *testing.T) {
	b := setupTx(t, dialects()["postgres"], behaviors.TransactionConfig{})
	ctx, cancel := context.WithCancel(context.Background())
	mediator.RegisterFunc(b.m, func(ctx context.Context, c probe) (struct{}, error) {
		tx, _ := outbox.TxFromContext(ctx)
		if _, err := tx.ExecContext(ctx, `INSERT INTO orders (id, amount) VALUES ('c', 1)`); err != nil {
			return struct{}{}, err
		}
		cancel()
		time.Sleep(50 * time.Millisecond) // database/sql rolls back in the background
		return struct{}{}, nil
	})
	_, err := mediator.Send(ctx, b.m, probe{})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Send: %v, want context.Canceled", err)
	}
	if o, _, _ := b.counts(t); o != 0 {
		t.Fatalf("%d orders after a cancelled command", o)
	}
}

// On SQLite opened with _txlock=immediate, handlers that read before they
// write run concurrently without SQLITE_BUSY (see Transaction's doc).
func TestTransactionSQLiteReadThenWrite(t *testing.T) {
	path := testenv.NewSQLite(t).Path
	b := setupTx(t, func(t testing.TB) (*sql.DB, outbox.Dialect) {
		db, err := sql.Open("sqlite", "file:"+path+"?_pragma=journal_mode(WAL)&_pragma=busy_timeout(10000)&_txlock=immediate")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = db.Close() })
		return db, outbox.SQLite
	}, behaviors.TransactionConfig{})
	mediator.RegisterFunc(b.m, func(ctx context.Context, c readThenWrite) (struct{}, error) {
		tx, _ := outbox.TxFromContext(ctx)
		var n int
		if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM orders`).Scan(&n); err != nil {
			return struct{}{}, err
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO orders (id, amount) VALUES (?, ?)`, c.ID, n); err != nil {
			return struct{}{}, err
		}
		return struct{}{}, b.ob.Stage(ctx, OrderPlaced{ID: c.ID, Amount: n})
	})
	var wg sync.WaitGroup
	errs := make(chan error, 200)
	for w := 0; w < 10; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 20; i++ {
				if _, err := mediator.Send(context.Background(), b.m, readThenWrite{ID: fmt.Sprintf("%d-%d", w, i)}); err != nil {
					errs <- err
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if o, _, s := b.counts(t); o != 200 || s != 200 {
		t.Fatalf("orders %d, outbox %d; want 200 each", o, s)
	}
}

type readThenWrite struct {
	mediator.Command[struct{}]
	ID string
}

func (readThenWrite) Kind() string { return "test.read_then_write" }

// An unreachable database is an outage, not a failure of the request: the
// error of BEGIN is marked tailrace.Unavailable (an outbox.Worker then
// counts no attempt), while the handler's own errors are not.
func TestTransactionUnreachableDatabaseIsUnavailable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close() // nothing listens there now
	db, err := sql.Open("pgx", "postgres://u@"+addr+"/x?connect_timeout=2")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	tb, err := behaviors.NewTransaction(db, nil, behaviors.TransactionConfig{})
	if err != nil {
		t.Fatal(err)
	}
	m := mediator.New()
	m.Use(tb.Layer())
	mediator.RegisterFunc(m, func(ctx context.Context, c PlaceOrder) (string, error) { return c.ID, nil })
	_, err = mediator.Send(context.Background(), m, PlaceOrder{ID: "x"})
	if err == nil || !tailrace.IsUnavailable(err) {
		t.Fatalf("Send with the database down: %v (unavailable %v); want an error marked Unavailable", err, tailrace.IsUnavailable(err))
	}

	b := setupTx(t, dialects()["sqlite"], behaviors.TransactionConfig{})
	_, err = mediator.Send(context.Background(), b.m, PlaceOrder{ID: "dup"})
	if err != nil {
		t.Fatal(err)
	}
	_, err = mediator.Send(context.Background(), b.m, PlaceOrder{ID: "dup"}) // primary key violation
	if err == nil || tailrace.IsUnavailable(err) {
		t.Fatalf("a handler's own SQL error: %v (unavailable %v); want a failure of the request", err, tailrace.IsUnavailable(err))
	}
}
