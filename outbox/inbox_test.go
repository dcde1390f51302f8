package outbox

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
)

type inboxBundle struct {
	db *sql.DB
	d  Dialect
	in *Inbox
}

func setupInbox(t *testing.T, open func(t *testing.T) (*sql.DB, Dialect), cfg InboxConfig) *inboxBundle {
	t.Helper()
	db, d := open(t)
	cfg.Dialect = d
	in, err := NewInbox(db, nil, cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := InitializeInboxSchema(ctx, db, d, in.Table()); err != nil {
		t.Fatal(err)
	}
	// Idempotent.
	if err := InitializeInboxSchema(ctx, db, d, in.Table()); err != nil {
		t.Fatal(err)
	}
	if _, err := db.ExecContext(ctx, `CREATE TABLE effects (id VARCHAR(255) NOT NULL, n INTEGER NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	return &inboxBundle{db: db, d: d, in: in}
}

// handle is a consumer handling one delivery: claim, then the effect, in one
// transaction.
func (b *inboxBundle) handle(ctx context.Context, consumer, id string, fail bool) (handled bool, err error) {
	tx, err := b.db.BeginTx(ctx, nil)
	if err != nil {
		return false, err
	}
	defer func() {
		if err != nil {
			_ = tx.Rollback()
		}
	}()
	first, err := b.in.ClaimTx(ctx, tx, consumer, id)
	if err != nil {
		return false, err
	}
	if first {
		if _, err := tx.ExecContext(ctx, `INSERT INTO effects (id, n) VALUES (`+placeholders(b.d, 1, 2)+`)`, id, 1); err != nil {
			return false, err
		}
	}
	if fail {
		return false, errors.New("handler failed")
	}
	return first, tx.Commit()
}

func (b *inboxBundle) effects(t *testing.T) int {
	t.Helper()
	var n int
	if err := b.db.QueryRow(`SELECT COUNT(*) FROM effects`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

func TestInboxClaimOncePerConsumer(t *testing.T) {
	for name, open := range dialectDBs(t) {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			b := setupInbox(t, open, InboxConfig{})
			ctx := context.Background()
			// A failed attempt records nothing.
			if _, err := b.handle(ctx, "c1", "m1", true); err == nil {
				t.Fatal("want the handler's error")
			}
			if ok, _ := b.in.Processed(ctx, "c1", "m1"); ok {
				t.Fatal("a rolled back claim is recorded")
			}
			for i, want := range []bool{true, false, false} {
				got, err := b.handle(ctx, "c1", "m1", false)
				if err != nil {
					t.Fatal(err)
				}
				if got != want {
					t.Fatalf("delivery %d: handled = %v, want %v", i+1, got, want)
				}
			}
			// Another consumer of the same message handles it too.
			if got, err := b.handle(ctx, "c2", "m1", false); err != nil || !got {
				t.Fatalf("consumer c2: handled = %v, %v; want true", got, err)
			}
			if n := b.effects(t); n != 2 {
				t.Fatalf("%d effects, want 2", n)
			}
			if ok, err := b.in.Processed(ctx, "c1", "m1"); err != nil || !ok {
				t.Fatalf("Processed = %v, %v", ok, err)
			}
		})
	}
}

// TestInboxRedeliveredThreeTimes: 100 messages each delivered 3 times, by 3
// concurrent workers, give exactly 100 effects.
func TestInboxRedeliveredThreeTimes(t *testing.T) {
	for name, open := range dialectDBs(t) {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			b := setupInbox(t, open, InboxConfig{})
			ctx := context.Background()
			var handled atomic.Int64
			var wg sync.WaitGroup
			for w := range 3 {
				wg.Go(func() {
					for i := range 100 {
						id := fmt.Sprintf("msg-%03d", (i+w*37)%100)
						for attempt := 0; ; attempt++ {
							ok, err := b.handle(ctx, "orders", id, false)
							if err != nil && attempt < 20 && retryable(err) {
								time.Sleep(time.Duration(attempt+1) * 5 * time.Millisecond)
								continue
							}
							if err != nil {
								t.Error(err)
							}
							if ok {
								handled.Add(1)
							}
							break
						}
					}
				})
			}
			wg.Wait()
			if n := b.effects(t); n != 100 {
				t.Fatalf("%d effects, want 100", n)
			}
			if n := handled.Load(); n != 100 {
				t.Fatalf("handler ran %d times, want 100", n)
			}
		})
	}
}

// retryable: a deadlock or busy error the consumer's retry would absorb.
func retryable(err error) bool {
	s := err.Error()
	return strings.Contains(s, "Deadlock") || strings.Contains(s, "SQLITE_BUSY") || strings.Contains(s, "database is locked")
}

// TestInboxConcurrentDuplicates: two deliveries of one message in flight at
// once; the second waits on the first one's claim and produces no effect.
func TestInboxConcurrentDuplicates(t *testing.T) {
	for name, open := range dialectDBs(t) {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			b := setupInbox(t, open, InboxConfig{})
			ctx := context.Background()

			// First delivery: claim and hold the transaction open.
			tx1, err := b.db.BeginTx(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			first, err := b.in.ClaimTx(ctx, tx1, "c", "dup")
			if err != nil || !first {
				t.Fatalf("first claim = %v, %v", first, err)
			}
			// Second delivery, concurrently: it must block on the claim.
			done := make(chan bool, 1)
			errc := make(chan error, 1)
			go func() {
				ok, err := b.handle(ctx, "c", "dup", false)
				if err != nil {
					errc <- err
					return
				}
				done <- ok
			}()
			select {
			case ok := <-done:
				t.Fatalf("second delivery finished (handled=%v) while the first was uncommitted", ok)
			case err := <-errc:
				t.Fatalf("second delivery: %v", err)
			case <-time.After(300 * time.Millisecond):
			}
			if _, err := tx1.ExecContext(ctx, `INSERT INTO effects (id, n) VALUES (`+placeholders(b.d, 1, 2)+`)`, "dup", 1); err != nil {
				t.Fatal(err)
			}
			if err := tx1.Commit(); err != nil {
				t.Fatal(err)
			}
			select {
			case ok := <-done:
				if ok {
					t.Fatal("the second delivery ran the handler too")
				}
			case err := <-errc:
				t.Fatalf("second delivery: %v", err)
			case <-time.After(10 * time.Second):
				t.Fatal("second delivery still blocked after the first committed")
			}
			if n := b.effects(t); n != 1 {
				t.Fatalf("%d effects, want 1", n)
			}
		})
	}
}

// A concurrent duplicate of a delivery that rolls back runs the handler.
func TestInboxConcurrentDuplicateAfterRollback(t *testing.T) {
	for name, open := range dialectDBs(t) {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			b := setupInbox(t, open, InboxConfig{})
			ctx := context.Background()
			tx1, err := b.db.BeginTx(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			if first, err := b.in.ClaimTx(ctx, tx1, "c", "rb"); err != nil || !first {
				t.Fatalf("first claim = %v, %v", first, err)
			}
			res := make(chan error, 1)
			var ok bool
			go func() {
				var err error
				ok, err = b.handle(ctx, "c", "rb", false)
				res <- err
			}()
			time.Sleep(200 * time.Millisecond)
			if err := tx1.Rollback(); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-res:
				if err != nil || !ok {
					t.Fatalf("second delivery = %v, %v; want handled", ok, err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("second delivery still blocked after the first rolled back")
			}
			if n := b.effects(t); n != 1 {
				t.Fatalf("%d effects, want 1", n)
			}
		})
	}
}

func TestInboxCleanupInBatches(t *testing.T) {
	for name, open := range dialectDBs(t) {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			b := setupInbox(t, open, InboxConfig{CleanupBatch: 7, Retention: time.Hour})
			ctx := context.Background()
			for i := range 30 {
				if _, err := b.handle(ctx, "c", fmt.Sprintf("old-%d", i), false); err != nil {
					t.Fatal(err)
				}
			}
			// Nothing is older than the retention.
			if n, err := b.in.Cleanup(ctx); err != nil || n != 0 {
				t.Fatalf("Cleanup = %d, %v; want 0", n, err)
			}
			// The cutoff is computed per batch statement, so leave the new id a
			// wide margin: a loaded machine can take tens of milliseconds
			// between the statements of one cleanup.
			time.Sleep(time.Second)
			if _, err := b.handle(ctx, "c", "new", false); err != nil {
				t.Fatal(err)
			}
			n, err := b.in.cleanupOlderThan(ctx, 500*time.Millisecond)
			if err != nil || n != 30 {
				t.Fatalf("cleanup = %d, %v; want 30", n, err)
			}
			if ok, _ := b.in.Processed(ctx, "c", "new"); !ok {
				t.Fatal("cleanup deleted a recent id")
			}
			// An expired id is handled again.
			if got, err := b.handle(ctx, "c", "old-3", false); err != nil || !got {
				t.Fatalf("expired id: handled = %v, %v; want true", got, err)
			}
		})
	}
}

func TestInboxRunCleanupStops(t *testing.T) {
	b := setupInbox(t, dialectDBs(t)["sqlite"], InboxConfig{CleanupInterval: 5 * time.Millisecond})
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := b.in.RunCleanup(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestInboxConfigAndInput(t *testing.T) {
	_, err := NewInbox(nil, nil, InboxConfig{Table: "Bad-Name", Retention: -1, CleanupBatch: -1, CleanupInterval: -1})
	if err == nil {
		t.Fatal("want errors")
	}
	for _, s := range []string{"Dialect", "Table", "Retention", "CleanupBatch", "CleanupInterval"} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error %q does not name %s", err, s)
		}
	}
	if !errors.Is(err, ErrInvalidName) {
		t.Errorf("error %v does not wrap ErrInvalidName", err)
	}
	if _, err := InboxSchemaSQL(PostgreSQL, `x"; DROP TABLE y; --`); !errors.Is(err, ErrInvalidName) {
		t.Fatalf("InboxSchemaSQL accepted an injection: %v", err)
	}
	in, err := NewInbox(nil, nil, InboxConfig{Dialect: SQLite})
	if err != nil {
		t.Fatal(err)
	}
	if in.Table() != DefaultInboxTable || in.Retention() != DefaultInboxRetention {
		t.Fatalf("defaults: %q %v", in.Table(), in.Retention())
	}
	if _, err := in.Claim(context.Background(), "c", "m"); !errors.Is(err, ErrNoTx) {
		t.Fatalf("Claim without a tx: %v", err)
	}
	if _, err := in.ClaimTx(context.Background(), &sql.Tx{}, "c", ""); !errors.Is(err, ErrInvalidMessage) {
		t.Fatalf("empty id: %v", err)
	}
	if _, err := in.ClaimTx(context.Background(), &sql.Tx{}, "c", strings.Repeat("x", 256)); !errors.Is(err, ErrInvalidMessage) {
		t.Fatalf("long id: %v", err)
	}
	ctx := WithConsumer(WithMessageID(context.Background(), "id-1"), "cons")
	if MessageIDFromContext(ctx) != "id-1" || ConsumerFromContext(ctx) != "cons" {
		t.Fatal("context helpers")
	}
}
