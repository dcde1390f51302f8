package behaviors_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
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

type creditAccount struct {
	mediator.Command[int]
	Account string
	Amount  int
	Fail    bool
	Nested  bool // send a nested creditAccount of 1 from the handler
}

func (creditAccount) Kind() string { return "accounts.credit" }

type accountCredited struct {
	mediator.Notification
	Account string
}

func (accountCredited) Kind() string { return "accounts.credited" }

type inboxBundle struct {
	db    *sql.DB
	d     outbox.Dialect
	m     *mediator.Mediator
	inbox *behaviors.Inbox
	calls atomic.Int64  // handler runs, committed or not
	hold  chan struct{} // when set, handlers wait on it after writing
}

func inboxDBs() map[string]func(t *testing.T) (*sql.DB, outbox.Dialect) {
	return map[string]func(t *testing.T) (*sql.DB, outbox.Dialect){
		"postgres": func(t *testing.T) (*sql.DB, outbox.Dialect) { return testenv.NewPostgres(t).DB, outbox.PostgreSQL },
		"mysql":    func(t *testing.T) (*sql.DB, outbox.Dialect) { return testenv.NewMySQL(t).DB, outbox.MySQL },
		"sqlite":   func(t *testing.T) (*sql.DB, outbox.Dialect) { return testenv.NewSQLite(t).DB, outbox.SQLite },
	}
}

func setupInbox(t *testing.T, open func(t *testing.T) (*sql.DB, outbox.Dialect)) *inboxBundle {
	t.Helper()
	db, d := open(t)
	ctx := context.Background()
	store, err := outbox.NewInbox(db, nil, outbox.InboxConfig{Dialect: d})
	if err != nil {
		t.Fatal(err)
	}
	if err := outbox.InitializeInboxSchema(ctx, db, d, store.Table()); err != nil {
		t.Fatal(err)
	}
	if _, err := db.ExecContext(ctx, `CREATE TABLE ledger (account VARCHAR(64) NOT NULL, amount INTEGER NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	txb, err := behaviors.NewTransaction(db, nil, behaviors.TransactionConfig{
		// Consumers dispatch events too: they need the transaction.
		Applies: func(info mediator.Info) bool {
			return info.Type == mediator.TypeCommand || info.Type == mediator.TypeNotification
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	ib, err := behaviors.NewInbox(store, nil, behaviors.InboxConfig{})
	if err != nil {
		t.Fatal(err)
	}
	b := &inboxBundle{db: db, d: d, m: mediator.New(), inbox: ib}
	b.m.Use(txb.Layer(), ib.Layer())
	insert := `INSERT INTO ledger (account, amount) VALUES (?, ?)`
	if d == outbox.PostgreSQL {
		insert = `INSERT INTO ledger (account, amount) VALUES ($1, $2)`
	}
	mediator.RegisterFunc(b.m, func(ctx context.Context, c creditAccount) (int, error) {
		b.calls.Add(1)
		tx, ok := outbox.TxFromContext(ctx)
		if !ok {
			return 0, errors.New("no tx")
		}
		if _, err := tx.ExecContext(ctx, insert, c.Account, c.Amount); err != nil {
			return 0, err
		}
		if b.hold != nil {
			<-b.hold
		}
		if c.Nested {
			if _, err := mediator.Send(ctx, b.m, creditAccount{Account: c.Account, Amount: 1}); err != nil {
				return 0, err
			}
		}
		if c.Fail {
			return 0, errors.New("handler failed")
		}
		return c.Amount, nil
	})
	mediator.RegisterNotificationFunc(b.m, func(ctx context.Context, e accountCredited) error {
		b.calls.Add(1)
		tx, _ := outbox.TxFromContext(ctx)
		_, err := tx.ExecContext(ctx, insert, e.Account, 0)
		return err
	})
	return b
}

func (b *inboxBundle) ledger(t *testing.T) (rows, sum int) {
	t.Helper()
	if err := b.db.QueryRow(`SELECT COUNT(*), COALESCE(SUM(amount), 0) FROM ledger`).Scan(&rows, &sum); err != nil {
		t.Fatal(err)
	}
	return rows, sum
}

func delivery(id string) context.Context {
	return outbox.WithConsumer(outbox.WithMessageID(context.Background(), id), "ledger")
}

func TestInboxBehaviorDeduplicates(t *testing.T) {
	for name, open := range inboxDBs() {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			b := setupInbox(t, open)
			// A failed first delivery leaves nothing, not even the id.
			if _, err := mediator.Send(delivery("m1"), b.m, creditAccount{Account: "a", Amount: 10, Fail: true}); err == nil {
				t.Fatal("want the handler's error")
			}
			for i := range 3 {
				got, err := mediator.Send(delivery("m1"), b.m, creditAccount{Account: "a", Amount: 10})
				if err != nil {
					t.Fatal(err)
				}
				if want := map[bool]int{true: 10, false: 0}[i == 0]; got != want {
					t.Fatalf("delivery %d: response %d, want %d", i+1, got, want)
				}
			}
			// Events too.
			for range 3 {
				if err := mediator.Publish(delivery("e1"), b.m, accountCredited{Account: "a"}); err != nil {
					t.Fatal(err)
				}
			}
			rows, sum := b.ledger(t)
			if rows != 2 || sum != 10 {
				t.Fatalf("ledger: %d rows, sum %d; want 2 rows, sum 10", rows, sum)
			}
			if b.inbox.Skipped() != 4 {
				t.Fatalf("Skipped() = %d, want 4", b.inbox.Skipped())
			}
			// Without a message id (not from a consumer) nothing is
			// deduplicated.
			for range 2 {
				if _, err := mediator.Send(context.Background(), b.m, creditAccount{Account: "b", Amount: 1}); err != nil {
					t.Fatal(err)
				}
			}
			if rows, _ := b.ledger(t); rows != 4 {
				t.Fatalf("ledger: %d rows, want 4", rows)
			}
		})
	}
}

// 100 messages each delivered 3 times, concurrently: exactly 100 effects.
func TestInboxBehavior100x3(t *testing.T) {
	for name, open := range inboxDBs() {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			b := setupInbox(t, open)
			retry, err := behaviors.NewRetry(behaviors.RetryConfig{MaxAttempts: 20, InitialInterval: 5 * time.Millisecond})
			if err != nil {
				t.Fatal(err)
			}
			b.m.Use(retry.Layer())
			var wg sync.WaitGroup
			for w := range 3 {
				wg.Go(func() {
					for i := range 100 {
						n := (i + 31*w) % 100
						if _, err := mediator.Send(delivery(fmt.Sprintf("msg-%d", n)), b.m, creditAccount{Account: "x", Amount: 1}); err != nil {
							t.Error(err)
						}
					}
				})
			}
			wg.Wait()
			rows, sum := b.ledger(t)
			if rows != 100 || sum != 100 {
				t.Fatalf("ledger: %d rows, sum %d; want 100 and 100", rows, sum)
			}
			if b.inbox.Skipped() != 200 {
				t.Fatalf("Skipped() = %d, want 200", b.inbox.Skipped())
			}
		})
	}
}

// Two deliveries of one message at once: one effect.
func TestInboxBehaviorConcurrentDuplicates(t *testing.T) {
	for name, open := range inboxDBs() {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			b := setupInbox(t, open)
			b.hold = make(chan struct{})
			errs := make(chan error, 2)
			for range 2 {
				go func() {
					_, err := mediator.Send(delivery("dup"), b.m, creditAccount{Account: "d", Amount: 5})
					errs <- err
				}()
			}
			// One handler runs and waits; the other delivery waits on the
			// claim and never reaches the handler.
			time.Sleep(300 * time.Millisecond)
			if n := b.calls.Load(); n != 1 {
				t.Fatalf("%d handlers running, want 1", n)
			}
			close(b.hold)
			for range 2 {
				if err := <-errs; err != nil {
					t.Fatal(err)
				}
			}
			if rows, sum := b.ledger(t); rows != 1 || sum != 5 {
				t.Fatalf("ledger: %d rows, sum %d; want 1 row, sum 5", rows, sum)
			}
			if b.calls.Load() != 1 {
				t.Fatalf("the handler ran %d times, want 1", b.calls.Load())
			}
		})
	}
}

func TestInboxBehaviorNestedDispatchRuns(t *testing.T) {
	b := setupInbox(t, inboxDBs()["sqlite"])
	if _, err := mediator.Send(delivery("n1"), b.m, creditAccount{Account: "n", Amount: 10, Nested: true}); err != nil {
		t.Fatal(err)
	}
	if rows, sum := b.ledger(t); rows != 2 || sum != 11 {
		t.Fatalf("ledger: %d rows, sum %d; want the nested command's row too", rows, sum)
	}
}

// Transaction and Inbox with their defaults cover the same types, so a
// consumer's commands and events work with zero configuration; a
// Transaction that leaves out a type the Inbox wraps is refused when the
// mediator is built, not at every message.
func TestInboxAndTransactionDefaultsAgree(t *testing.T) {
	db := testenv.NewSQLite(t).DB
	store, err := outbox.NewInbox(db, nil, outbox.InboxConfig{Dialect: outbox.SQLite})
	if err != nil {
		t.Fatal(err)
	}
	if err := outbox.InitializeInboxSchema(context.Background(), db, outbox.SQLite, store.Table()); err != nil {
		t.Fatal(err)
	}
	ib, err := behaviors.NewInbox(store, nil, behaviors.InboxConfig{})
	if err != nil {
		t.Fatal(err)
	}
	txb, err := behaviors.NewTransaction(db, nil, behaviors.TransactionConfig{})
	if err != nil {
		t.Fatal(err)
	}
	var handled atomic.Int64
	m, err := mediator.Build(mediator.Config{}, []mediator.Layer{txb.Layer(), ib.Layer()}, []mediator.Registration{
		mediator.Handle(mediator.HandlerFunc[creditAccount, int](func(ctx context.Context, c creditAccount) (int, error) {
			handled.Add(1)
			return 1, nil
		})),
		mediator.HandleNotification(mediator.NotificationHandlerFunc[accountCredited](func(ctx context.Context, e accountCredited) error {
			if _, ok := outbox.TxFromContext(ctx); !ok {
				return errors.New("no transaction")
			}
			handled.Add(1)
			return nil
		})),
	})
	if err != nil {
		t.Fatalf("defaults refused: %v", err)
	}
	for range 2 { // the second delivery of each is a duplicate
		if _, err := mediator.Send(delivery("c1"), m, creditAccount{}); err != nil {
			t.Fatal(err)
		}
		if err := mediator.Publish(delivery("e1"), m, accountCredited{Account: "a"}); err != nil {
			t.Fatal(err)
		}
	}
	if n := handled.Load(); n != 2 {
		t.Fatalf("handled %d times, want 2 (a command and an event, once each)", n)
	}

	// Commands only in the transaction: the event type is refused at Build,
	// at registration, and by a Use that adds the Inbox after it.
	cmdOnly, err := behaviors.NewTransaction(db, nil, behaviors.TransactionConfig{
		Applies: func(info mediator.Info) bool { return info.Type == mediator.TypeCommand },
	})
	if err != nil {
		t.Fatal(err)
	}
	onEvent := mediator.NotificationHandlerFunc[accountCredited](func(context.Context, accountCredited) error { return nil })
	_, err = mediator.Build(mediator.Config{}, []mediator.Layer{cmdOnly.Layer(), ib.Layer()}, []mediator.Registration{mediator.HandleNotification(onEvent)})
	if !errors.Is(err, behaviors.ErrInboxNoTx) || !strings.Contains(err.Error(), "accounts.credited") {
		t.Fatalf("Build with a commands-only transaction: %v; want ErrInboxNoTx naming the event", err)
	}
	m = mediator.New(mediator.WithLayers(cmdOnly.Layer(), ib.Layer()))
	if err := mediator.RegisterNotificationSafely(m, onEvent); !errors.Is(err, behaviors.ErrInboxNoTx) {
		t.Fatalf("RegisterNotificationSafely: %v; want ErrInboxNoTx", err)
	}
	m = mediator.New(mediator.WithLayers(cmdOnly.Layer()))
	mediator.RegisterNotification(m, onEvent)
	if err := m.UseSafely(ib.Layer()); !errors.Is(err, behaviors.ErrInboxNoTx) {
		t.Fatalf("UseSafely: %v; want ErrInboxNoTx", err)
	}
}

func TestInboxBehaviorNeedsTransaction(t *testing.T) {
	db := testenv.NewSQLite(t).DB
	store, err := outbox.NewInbox(db, nil, outbox.InboxConfig{Dialect: outbox.SQLite})
	if err != nil {
		t.Fatal(err)
	}
	ib, err := behaviors.NewInbox(store, nil, behaviors.InboxConfig{})
	if err != nil {
		t.Fatal(err)
	}
	// Inbox's Layer refuses the pipeline when the type is registered.
	m := mediator.New(mediator.WithLayers(ib.Layer()))
	err = mediator.RegisterSafely(m, mediator.HandlerFunc[creditAccount, int](func(ctx context.Context, c creditAccount) (int, error) { return 1, nil }))
	if !errors.Is(err, behaviors.ErrInboxNoTx) || !strings.Contains(err.Error(), "accounts.credit") {
		t.Fatalf("register without a transaction: %v; want ErrInboxNoTx naming the kind", err)
	}
	// Without the Layer's check (a Layer built by hand), each dispatch
	// fails, permanently.
	m = mediator.New(mediator.WithLayers(mediator.Layer{Order: behaviors.OrderInbox, Behavior: ib}))
	mediator.RegisterFunc(m, func(ctx context.Context, c creditAccount) (int, error) { return 1, nil })
	_, err = mediator.Send(delivery("x"), m, creditAccount{})
	if !errors.Is(err, behaviors.ErrInboxNoTx) || !tailrace.IsPermanent(err) {
		t.Fatalf("err = %v; want permanent ErrInboxNoTx", err)
	}
	if !strings.Contains(err.Error(), "accounts.credit") {
		t.Errorf("error %q does not name the kind", err)
	}
	if _, err := behaviors.NewInbox(nil, nil, behaviors.InboxConfig{Consumer: strings.Repeat("c", 300)}); err == nil ||
		!strings.Contains(err.Error(), "Consumer") || !strings.Contains(err.Error(), "outbox.Inbox") {
		t.Fatalf("NewInbox errors: %v", err)
	}
}
