package outbox_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"os"
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

// Work is the test command: Seq is its place in the order of its Key.
type Work struct {
	mediator.Command[struct{}]
	ID  string `json:"id"`
	Key string `json:"key"`
	Seq int    `json:"seq"`
	// FailFirst makes the first FailFirst attempts fail after the domain
	// insert (which must then roll back); Panic and Permanent fail for good.
	FailFirst int  `json:"fail_first,omitempty"`
	Panic     bool `json:"panic,omitempty"`
	Permanent bool `json:"permanent,omitempty"`
	// Block makes the handler wait for its context to end.
	Block bool `json:"block,omitempty"`
	// Unavailable makes the first Unavailable attempts fail with an error
	// marked tailrace.Unavailable (a dependency is down), after the domain
	// insert.
	Unavailable int `json:"unavailable,omitempty"`
}

func (Work) Kind() string           { return "test.work" }
func (w Work) PartitionKey() string { return w.Key }

func workerDBs() map[string]func(t *testing.T) (*sql.DB, outbox.Dialect) {
	return map[string]func(t *testing.T) (*sql.DB, outbox.Dialect){
		"postgres": func(t *testing.T) (*sql.DB, outbox.Dialect) { return testenv.NewPostgres(t).DB, outbox.PostgreSQL },
		"mysql":    func(t *testing.T) (*sql.DB, outbox.Dialect) { return testenv.NewMySQL(t).DB, outbox.MySQL },
		"sqlite":   func(t *testing.T) (*sql.DB, outbox.Dialect) { return testenv.NewSQLite(t).DB, outbox.SQLite },
	}
}

// workerRig is one database with a command table, a domain table the
// handler writes to, an Outbox that enqueues into the command table and a
// mediator running Work in the Transaction behavior (unless noTx).
type workerRig struct {
	db       *sql.DB
	d        outbox.Dialect
	cmds     string // command table
	domain   string // one row per committed handler run: (id, key, seq)
	ob       *outbox.Outbox
	m        *mediator.Mediator
	notifier *outbox.Notifier

	attempts sync.Map // id → *atomic.Int32
	mu       sync.Mutex
	last     map[string]int // key → last seq seen committed... checked in the handler
	errs     []string
	by       map[string]int // worker name → commands committed
	started  chan string    // ids of Block commands when they start
}

func newWorkerRig(t *testing.T, db *sql.DB, d outbox.Dialect, inTx bool) *workerRig {
	t.Helper()
	ctx := context.Background()
	g := &workerRig{db: db, d: d, cmds: testenv.UniqueName("wq"), domain: testenv.UniqueName("wd"),
		notifier: &outbox.Notifier{}, last: map[string]int{}, by: map[string]int{}, started: make(chan string, 100)}
	if err := outbox.InitializeSchema(ctx, db, d, g.cmds); err != nil {
		t.Fatal(err)
	}
	if _, err := db.ExecContext(ctx, `CREATE TABLE `+g.domain+` (id VARCHAR(64) NOT NULL, k VARCHAR(64) NOT NULL, seq INTEGER NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	ob, err := outbox.New(db, nil, outbox.Config{Dialect: d, Table: testenv.UniqueName("wo"), CommandTable: g.cmds, Notifier: g.notifier})
	if err != nil {
		t.Fatal(err)
	}
	g.ob = ob
	g.m = mediator.New()
	if inTx {
		tr, err := behaviors.NewTransaction(db, nil, behaviors.TransactionConfig{Notifier: g.notifier})
		if err != nil {
			t.Fatal(err)
		}
		g.m.Use(tr.Layer())
	}
	mediator.RegisterFunc(g.m, g.handle)
	return g
}

// handle is Work's handler: it checks the order of its key, writes its
// domain row (in the transaction, when there is one) and then fails as told.
func (g *workerRig) handle(ctx context.Context, w Work) (struct{}, error) {
	a, _ := g.attempts.LoadOrStore(w.ID, new(atomic.Int32))
	n := a.(*atomic.Int32).Add(1)
	if w.Block {
		g.started <- w.ID
		<-ctx.Done()
		return struct{}{}, ctx.Err()
	}
	if w.Panic {
		panic("test panic in " + w.ID)
	}
	if w.Permanent {
		return struct{}{}, tailrace.Permanent(errors.New("test permanent failure"))
	}
	var exec interface {
		ExecContext(context.Context, string, ...any) (sql.Result, error)
	} = g.db
	if tx, ok := outbox.TxFromContext(ctx); ok {
		exec = tx
	}
	q := `INSERT INTO ` + g.domain + ` (id, k, seq) VALUES (?, ?, ?)`
	if g.d == outbox.PostgreSQL {
		q = `INSERT INTO ` + g.domain + ` (id, k, seq) VALUES ($1, $2, $3)`
	}
	if _, err := exec.ExecContext(ctx, q, w.ID, w.Key, w.Seq); err != nil {
		return struct{}{}, err
	}
	if int(n) <= w.Unavailable {
		return struct{}{}, tailrace.Unavailable(fmt.Errorf("test outage, attempt %d of %s", n, w.ID))
	}
	if int(n) <= w.FailFirst {
		return struct{}{}, fmt.Errorf("test transient failure %d of %s", n, w.ID)
	}
	if w.Key != "" {
		g.mu.Lock()
		// The previous command of the key finished before this one
		// started: its seq was handled (or dead-lettered) already.
		if prev, ok := g.last[w.Key]; ok && prev > w.Seq {
			g.errs = append(g.errs, fmt.Sprintf("key %s: seq %d ran after %d", w.Key, w.Seq, prev))
		}
		g.last[w.Key] = w.Seq
		name := outbox.ConsumerFromContext(ctx)
		g.by[name]++
		g.mu.Unlock()
	}
	return struct{}{}, nil
}

func (g *workerRig) enqueue(t testing.TB, cmds ...Work) {
	t.Helper()
	for _, c := range cmds {
		if err := g.ob.Enqueue(context.Background(), c); err != nil {
			t.Fatal(err)
		}
	}
}

func (g *workerRig) count(t testing.TB, table string) int {
	t.Helper()
	var n int
	if err := g.db.QueryRowContext(context.Background(), `SELECT COUNT(*) FROM `+table).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// handled returns how many committed domain rows each id has.
func (g *workerRig) handled(t testing.TB) map[string]int {
	t.Helper()
	rows, err := g.db.QueryContext(context.Background(), `SELECT id FROM `+g.domain)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	out := map[string]int{}
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			t.Fatal(err)
		}
		out[id]++
	}
	return out
}

// waitLeased waits until a worker holds all 16 partitions, then a little
// longer for the claim that follows.
func (g *workerRig) waitLeased(t testing.TB) {
	t.Helper()
	waitUntil(t, 30*time.Second, "the partitions leased", func() bool {
		return g.count(t, g.cmds+"_leases") == 16
	})
	time.Sleep(300 * time.Millisecond)
}

func (g *workerRig) newWorker(t testing.TB, cfg outbox.WorkerConfig) *outbox.Worker {
	t.Helper()
	cfg.Dialect, cfg.Table = g.d, g.cmds
	if cfg.Notifier == nil {
		cfg.Notifier = g.notifier
	}
	if cfg.InitialInterval == 0 {
		cfg.InitialInterval = 20 * time.Millisecond
	}
	if cfg.LeaseTTL == 0 {
		cfg.LeaseTTL = 2 * time.Second
	}
	w, err := outbox.NewWorker(g.db, g.m, testLogger(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	outbox.HandleCommand[Work](w)
	return w
}

func testLogger() *slog.Logger {
	if os.Getenv("TAILRACE_RELAY_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// run runs w until the test ends.
func run(t testing.TB, w *outbox.Worker) {
	t.Helper()
	errc := make(chan error, 1)
	go func() { errc <- w.Run(context.Background()) }()
	t.Cleanup(func() {
		_ = w.Close()
		if err := <-errc; err != nil && !strings.Contains(err.Error(), "close timed out") {
			t.Errorf("worker Run: %v", err)
		}
	})
	select {
	case <-w.Running():
	case err := <-errc:
		t.Fatalf("worker Run: %v", err)
	}
}

func waitUntil(t testing.TB, d time.Duration, what string, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestWorker runs the worker's guarantees on each database: order per key
// under retries, exactly once with the Transaction behavior, dead letters
// that hold no other key, at least once without a transaction, N workers
// sharing partitions, and graceful close.
func TestWorker(t *testing.T) {
	for name, open := range workerDBs() {
		t.Run(name, func(t *testing.T) {
			t.Run("OrderRetriesExactlyOnce", func(t *testing.T) {
				db, d := open(t)
				g := newWorkerRig(t, db, d, true)
				const keys, per = 10, 20
				var cmds []Work
				for s := range per {
					for k := range keys {
						c := Work{ID: fmt.Sprintf("k%d-%d", k, s), Key: fmt.Sprintf("k%d", k), Seq: s}
						if (k+s)%7 == 0 {
							c.FailFirst = 2 // its domain insert must roll back twice
						}
						cmds = append(cmds, c)
					}
				}
				g.enqueue(t, cmds...)
				run(t, g.newWorker(t, outbox.WorkerConfig{Concurrency: 8}))
				waitUntil(t, 60*time.Second, "every command handled", func() bool { return g.count(t, g.cmds) == 0 })
				h := g.handled(t)
				for _, c := range cmds {
					if h[c.ID] != 1 {
						t.Errorf("%s committed %d times, want exactly 1", c.ID, h[c.ID])
					}
				}
				g.mu.Lock()
				defer g.mu.Unlock()
				if len(g.errs) > 0 {
					t.Errorf("order per key broken: %v", g.errs)
				}
				if n := g.count(t, g.cmds+"_dead"); n != 0 {
					t.Errorf("%d dead letters, want 0", n)
				}
			})

			t.Run("DeadLettersHoldNoOtherKey", func(t *testing.T) {
				db, d := open(t)
				g := newWorkerRig(t, db, d, true)
				g.enqueue(t,
					Work{ID: "panic", Key: "p", Seq: 0, Panic: true},
					Work{ID: "p1", Key: "p", Seq: 1},
					Work{ID: "perm", Key: "q", Seq: 0, Permanent: true},
					Work{ID: "q1", Key: "q", Seq: 1},
					Work{ID: "slow", Key: "r", Seq: 0, FailFirst: 100}, // exhausts MaxAttempts
					Work{ID: "other", Key: "s", Seq: 0},
				)
				run(t, g.newWorker(t, outbox.WorkerConfig{MaxAttempts: 3, InitialInterval: 10 * time.Millisecond, MaxInterval: 20 * time.Millisecond}))
				waitUntil(t, 60*time.Second, "the queue empty", func() bool { return g.count(t, g.cmds) == 0 })
				h := g.handled(t)
				for _, id := range []string{"p1", "q1", "other"} {
					if h[id] != 1 {
						t.Errorf("%s committed %d times, want 1", id, h[id])
					}
				}
				if h["slow"] != 0 {
					t.Errorf("the failing command's domain rows were committed %d times; its transaction must roll back", h["slow"])
				}
				dl, err := outbox.NewDeadLetters(db, d, g.cmds)
				if err != nil {
					t.Fatal(err)
				}
				list, err := dl.List(context.Background(), 0, 10)
				if err != nil {
					t.Fatal(err)
				}
				if len(list) != 3 {
					t.Fatalf("%d dead letters, want 3 (panic, permanent, attempts): %+v", len(list), list)
				}
				for _, l := range list {
					if strings.Contains(l.LastError, "panicked") && l.Attempts != 1 {
						t.Errorf("a panic is dead-lettered at once, got %d attempts", l.Attempts)
					}
				}
			})

			t.Run("AtLeastOnceWithoutTransaction", func(t *testing.T) {
				db, d := open(t)
				g := newWorkerRig(t, db, d, false)
				var cmds []Work
				for i := range 50 {
					cmds = append(cmds, Work{ID: fmt.Sprintf("n%d", i), Key: fmt.Sprintf("k%d", i%5), Seq: i})
				}
				g.enqueue(t, cmds...)
				run(t, g.newWorker(t, outbox.WorkerConfig{}))
				waitUntil(t, 60*time.Second, "the queue empty", func() bool { return g.count(t, g.cmds) == 0 })
				h := g.handled(t)
				for _, c := range cmds {
					if h[c.ID] != 1 {
						t.Errorf("%s handled %d times, want 1 (no crash)", c.ID, h[c.ID])
					}
				}
			})

			t.Run("WorkersSharePartitions", func(t *testing.T) {
				db, d := open(t)
				g := newWorkerRig(t, db, d, true)
				var cmds []Work
				for i := range 600 {
					cmds = append(cmds, Work{ID: fmt.Sprintf("s%d", i), Key: fmt.Sprintf("k%d", i%60), Seq: i / 60})
				}
				const n = 3
				for i := range n {
					run(t, g.newWorker(t, outbox.WorkerConfig{Name: fmt.Sprintf("w%d", i), Partitions: 12, Concurrency: 4}))
				}
				// Every worker takes its share of the 12 partitions first.
				waitUntil(t, 30*time.Second, "three workers holding leases", func() bool {
					var owners int
					if err := db.QueryRowContext(context.Background(), `SELECT COUNT(DISTINCT owner) FROM `+g.cmds+`_leases`).Scan(&owners); err != nil {
						t.Fatal(err)
					}
					return owners == n
				})
				g.enqueue(t, cmds...)
				waitUntil(t, 90*time.Second, "the queue empty", func() bool { return g.count(t, g.cmds) == 0 })
				h := g.handled(t)
				for _, c := range cmds {
					if h[c.ID] != 1 {
						t.Errorf("%s committed %d times, want 1", c.ID, h[c.ID])
					}
				}
				g.mu.Lock()
				workers := len(g.by)
				t.Logf("commands per worker: %v", g.by)
				g.mu.Unlock()
				if workers != n {
					t.Errorf("%d of %d workers ran commands; the partitions were not shared", workers, n)
				}
				g.mu.Lock()
				defer g.mu.Unlock()
				if len(g.errs) > 0 {
					t.Errorf("order per key broken: %v", g.errs)
				}
			})

			t.Run("GracefulClose", func(t *testing.T) {
				db, d := open(t)
				g := newWorkerRig(t, db, d, true)
				g.enqueue(t, Work{ID: "block", Key: "b", Seq: 0, Block: true}, Work{ID: "b1", Key: "b", Seq: 1})
				w := g.newWorker(t, outbox.WorkerConfig{CloseTimeout: 300 * time.Millisecond})
				errc := make(chan error, 1)
				go func() { errc <- w.Run(context.Background()) }()
				select {
				case <-g.started:
				case <-time.After(30 * time.Second):
					t.Fatal("the blocking command did not start")
				}
				err := w.Close()
				if err == nil || !strings.Contains(err.Error(), "timed out") {
					t.Errorf("Close: %v, want a close timeout", err)
				}
				<-errc
				if n := g.count(t, g.cmds); n != 2 {
					t.Fatalf("%d commands left after close, want 2 (the cancelled one and the one behind it)", n)
				}
				// The next run takes them over at once (the lease was released)
				// and does them; the cancelled attempt was not counted.
				var a int
				if err := db.QueryRowContext(context.Background(), `SELECT MAX(attempts) FROM `+g.cmds).Scan(&a); err != nil {
					t.Fatal(err)
				}
				if a != 0 {
					t.Errorf("a command cancelled by Close counted %d attempts, want 0", a)
				}
				if h := g.handled(t); h["b1"] != 0 {
					t.Errorf("the command behind the cancelled one ran")
				}
			})
		})
	}
}

// TestWorkerConfig: bad configuration is refused up front, every problem
// at once, in the worker's words; CommandTable must be valid and differ
// from Table.
func TestWorkerConfig(t *testing.T) {
	db := testenv.NewSQLite(t).DB
	m := mediator.New()
	_, err := outbox.NewWorker(db, m, nil, outbox.WorkerConfig{Table: "bad name", Concurrency: -1, LeaseTTL: time.Millisecond})
	if err == nil {
		t.Fatal("NewWorker accepted a bad config")
	}
	for _, want := range []string{"Dialect", "Table", "Concurrency", "WorkerConfig.LeaseTTL"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %s", err, want)
		}
	}
	if strings.Contains(err.Error(), "RelayConfig") {
		t.Errorf("error %q speaks of RelayConfig", err)
	}
	if _, err := outbox.NewWorker(nil, nil, nil, outbox.WorkerConfig{Dialect: outbox.SQLite, Table: "q"}); err == nil {
		t.Error("NewWorker accepted a nil db and mediator")
	}
	if _, err := outbox.New(db, nil, outbox.Config{Dialect: outbox.SQLite, Table: "same", CommandTable: "same"}); err == nil {
		t.Error("outbox.New accepted CommandTable == Table")
	}
	if _, err := outbox.New(db, nil, outbox.Config{Dialect: outbox.SQLite, CommandTable: "bad-name"}); err == nil {
		t.Error("outbox.New accepted an invalid CommandTable")
	}
	w, err := outbox.NewWorker(db, m, nil, outbox.WorkerConfig{Dialect: outbox.SQLite, Table: "q"})
	if err != nil {
		t.Fatal(err)
	}
	outbox.HandleCommand[Work](w)
	func() {
		defer func() {
			if recover() == nil {
				t.Error("a second registration of one kind did not panic")
			}
		}()
		outbox.HandleCommand[Work](w)
	}()
}

// TestWorkerWakeUp: with polling effectively off (PollInterval 1 h), a
// worker still runs a command at once when it is woken: by the in-process
// Notifier, and on PostgreSQL by LISTEN when the enqueuer's signals go
// through NotifyPostgres (a worker in another process).
func TestWorkerWakeUp(t *testing.T) {
	t.Run("notifier", func(t *testing.T) {
		db := testenv.NewSQLite(t).DB
		g := newWorkerRig(t, db, outbox.SQLite, true)
		run(t, g.newWorker(t, outbox.WorkerConfig{PollInterval: time.Hour}))
		g.waitLeased(t) // past the claim that follows taking the partitions
		g.enqueue(t, Work{ID: "n1", Key: "k", Seq: 0})
		waitUntil(t, 20*time.Second, "the command run after a Notifier signal", func() bool { return g.handled(t)["n1"] == 1 })
	})
	t.Run("listen", func(t *testing.T) {
		pg := testenv.NewPostgres(t)
		g := newWorkerRig(t, pg.DB, outbox.PostgreSQL, true)
		stop, err := outbox.NotifyPostgres(pg.DB, g.cmds, g.notifier, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer stop()
		other := &outbox.Notifier{} // the worker does not hear the enqueuer's Notifier
		run(t, g.newWorker(t, outbox.WorkerConfig{PollInterval: time.Hour, Notifier: other}))
		g.waitLeased(t)
		time.Sleep(time.Second) // LISTEN is up
		g.enqueue(t, Work{ID: "l1", Key: "k", Seq: 0})
		waitUntil(t, 20*time.Second, "the command run after a NOTIFY", func() bool { return g.handled(t)["l1"] == 1 })
	})
}

// TestWorkerOutageCostsNoAttempt: failures marked tailrace.Unavailable (a
// database or another service unreachable: the Transaction behavior marks
// BEGIN and COMMIT that fail for want of a connection) put the worker into
// outage mode and cost no attempt. Each command here fails that way twice,
// more than MaxAttempts allows, and still runs once, with no dead letter.
func TestWorkerOutageCostsNoAttempt(t *testing.T) {
	g := newWorkerRig(t, testenv.NewSQLite(t).DB, outbox.SQLite, true)
	w := g.newWorker(t, outbox.WorkerConfig{MaxAttempts: 1})
	run(t, w)
	var cmds []Work
	for i := range 3 {
		cmds = append(cmds, Work{ID: fmt.Sprintf("u%d", i), Key: "k", Seq: i, Unavailable: 2})
	}
	g.enqueue(t, cmds...)
	waitUntil(t, 60*time.Second, "every command handled", func() bool { return len(g.handled(t)) == len(cmds) })
	for id, n := range g.handled(t) {
		if n != 1 {
			t.Errorf("%s committed %d times", id, n)
		}
	}
	if n := g.count(t, g.cmds+"_dead"); n != 0 {
		t.Fatalf("%d commands dead-lettered during the outage", n)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.errs) > 0 {
		t.Fatal(g.errs)
	}
}
