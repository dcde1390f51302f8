package outbox_test

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/tailrace/tailrace/internal/testenv"
	"github.com/tailrace/tailrace/outbox"
)

// TestChaosLongTransaction holds one transaction with staged messages open
// (at least 3 s; 10 s at full scale) while other transactions commit many messages
// after it. On PostgreSQL and MariaDB the early transaction's rows are
// invisible until it commits, though their ids are older: a relay that
// tracked a high-water mark of ids would skip them for good. Ledger: the
// others are delivered while it is open (not held back), its messages
// after it commits, none lost or duplicated.
func TestChaosLongTransaction(t *testing.T) {
	n, hold := 1000, 3*time.Second
	if chaosFull() {
		n, hold = 10000, 10*time.Second
	}
	if d, err := time.ParseDuration(os.Getenv("TAILRACE_CHAOS_HOLD")); err == nil && d > 0 {
		hold = d
	}
	dbs := map[string]func(t *testing.T) (*sql.DB, outbox.Dialect){
		"postgres": func(t *testing.T) (*sql.DB, outbox.Dialect) {
			testenv.LongTransaction(t)
			return testenv.NewPostgres(t).DB, outbox.PostgreSQL
		},
		"mariadb": func(t *testing.T) (*sql.DB, outbox.Dialect) { return testenv.NewMySQL(t).DB, outbox.MySQL },
	}
	for name, open := range dbs {
		t.Run(name, func(t *testing.T) {
			db, d := open(t)
			url := testenv.AMQPURL(t)
			q := newChaosQueue(t, url)
			ob, table := chaosOutboxOn(t, db, d, 0)
			startChaosRelay(t, db, chaosPublisher(t, url), outbox.RelayConfig{Dialect: d, Table: table})
			ctx := context.Background()
			long, err := db.BeginTx(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer func() { _ = long.Rollback() }()
			want, early := map[string]bool{}, map[string]bool{}
			var vals []any
			for i := range 10 {
				id := fmt.Sprintf("e-%06d", i)
				want[id], early[id] = true, true
				vals = append(vals, chaosStage(id, q.name, ""))
			}
			if err := ob.StageTx(ctx, long, vals...); err != nil {
				t.Fatal(err)
			}
			began := time.Now()
			for start := 0; start < n; start += 50 {
				tx, err := db.BeginTx(ctx, nil)
				if err != nil {
					t.Fatal(err)
				}
				vals = vals[:0]
				for i := start; i < min(start+50, n); i++ {
					id := fmt.Sprintf("m-%06d", i)
					want[id] = true
					vals = append(vals, chaosStage(id, q.name, ""))
				}
				if err := ob.StageTx(ctx, tx, vals...); err != nil {
					t.Fatal(err)
				}
				if err := tx.Commit(); err != nil {
					t.Fatal(err)
				}
			}
			// The later commits must all arrive while the long transaction
			// is still open. It stays open at least hold, and longer if the
			// machine is slow (a loaded CI runner), up to 30 s: held back
			// means the relay stopped making progress, not that it was slow.
			deadline := began.Add(max(hold, 30*time.Second))
			for q.distinct() < n && time.Now().Before(deadline) {
				time.Sleep(20 * time.Millisecond)
			}
			duringHold := q.distinct()
			heldBack := duringHold < n
			allIn := time.Since(began)
			time.Sleep(max(0, hold-time.Since(began)))
			earlyBefore := 0
			q.mu.Lock()
			for id := range early {
				earlyBefore += q.got[id]
			}
			q.mu.Unlock()
			if err := long.Commit(); err != nil {
				t.Fatal(err)
			}
			committed := time.Now()
			deadline = time.Now().Add(20 * time.Second)
			for q.distinct() < len(want) && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
			after := time.Since(committed)
			time.Sleep(200 * time.Millisecond)
			lost, dup, unexpected := q.ledger(want)
			left := countRows(t, db, table)
			t.Logf("CHAOS LEDGER long-running transaction (%s, held %s): later commits %d, delivered while it was open %d (all in %s), early messages delivered before its commit %d, after it %s; lost %d, duplicated %d, unexpected %d, stuck %d",
				name, time.Since(began).Round(time.Millisecond), n, duringHold, allIn.Round(time.Millisecond), earlyBefore, after.Round(time.Millisecond), lost, dup, unexpected, left)
			if heldBack || earlyBefore != 0 || lost != 0 || dup != 0 || unexpected != 0 || left != 0 {
				t.Fatal("ledger mismatch")
			}
		})
	}
}
