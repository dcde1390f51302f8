package outbox_test

import (
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tailrace/tailrace/behaviors"
	"github.com/tailrace/tailrace/internal/testenv"
	"github.com/tailrace/tailrace/mediator"
	"github.com/tailrace/tailrace/outbox"
)

// The kill -9 ledger of the worker: worker processes (this test binary
// re-executed with TAILRACE_WORKER_CHILD=1 running TestWorkerChildProcess)
// run commands whose handler inserts one ledger row in the Transaction
// behavior's transaction, and are SIGKILLed again and again while they
// work. A killed worker's partitions move to the others when its leases
// expire. The ledger must show every command exactly once (nothing lost,
// nothing handled twice: the row's removal commits with the ledger row) and
// per-key order kept.

const (
	envWChild   = "TAILRACE_WORKER_CHILD"
	envWDialect = "TAILRACE_WORKER_CHILD_DIALECT"
	envWDB      = "TAILRACE_WORKER_CHILD_DB"
	envWTable   = "TAILRACE_WORKER_CHILD_TABLE"
	envWLedger  = "TAILRACE_WORKER_CHILD_LEDGER"
	wChildReady = "worker child: running"
)

// Ledgered is the command of the kill -9 test.
type Ledgered struct {
	mediator.Command[struct{}]
	ID  string `json:"id"`
	Key string `json:"key"`
	Seq int    `json:"seq"`
}

func (Ledgered) Kind() string           { return "test.ledgered" }
func (l Ledgered) PartitionKey() string { return l.Key }

// TestWorkerChildProcess is the worker process of the kill -9 tests; it
// skips unless started by them.
func TestWorkerChildProcess(t *testing.T) {
	if os.Getenv(envWChild) != "1" {
		t.Skip("the worker process of TestWorkerKill9; not a test of its own")
	}
	driver, d := "pgx", outbox.PostgreSQL
	if os.Getenv(envWDialect) == "mysql" {
		driver, d = "mysql", outbox.MySQL
	}
	db, err := sql.Open(driver, os.Getenv(envWDB))
	if err != nil {
		t.Fatal(err)
	}
	db.SetMaxOpenConns(24)
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	ledger := os.Getenv(envWLedger)
	ins := `INSERT INTO ` + ledger + ` (id, k, seq) VALUES (?, ?, ?)`
	if d == outbox.PostgreSQL {
		ins = `INSERT INTO ` + ledger + ` (id, k, seq) VALUES ($1, $2, $3)`
	}
	tr, err := behaviors.NewTransaction(db, logger, behaviors.TransactionConfig{})
	if err != nil {
		t.Fatal(err)
	}
	m := mediator.New()
	m.Use(tr.Layer())
	mediator.RegisterFunc(m, func(ctx context.Context, c Ledgered) (struct{}, error) {
		tx, _ := outbox.TxFromContext(ctx)
		_, err := tx.ExecContext(ctx, ins, c.ID, c.Key, c.Seq)
		return struct{}{}, err
	})
	w, err := outbox.NewWorker(db, m, logger, outbox.WorkerConfig{
		Dialect: d, Table: os.Getenv(envWTable), Concurrency: 16,
		LeaseTTL: time.Second, PollInterval: 200 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	outbox.HandleCommand[Ledgered](w)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	go func() {
		<-w.Running()
		fmt.Fprintln(os.Stderr, wChildReady)
	}()
	if err := w.Run(ctx); err != nil {
		t.Fatal(err)
	}
}

type wChild struct {
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan struct{}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

func startWorkerChild(t *testing.T, dialect, dsn, table, ledger string) *wChild {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestWorkerChildProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), envWChild+"=1", envWDialect+"="+dialect, envWDB+"="+dsn,
		envWTable+"="+table, envWLedger+"="+ledger, "GORACE=exitcode=0")
	c := &wChild{cmd: cmd, out: &syncBuffer{}, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = c.out, c.out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = cmd.Wait(); close(c.done) }()
	t.Cleanup(func() {
		select {
		case <-c.done:
		default:
			_ = cmd.Process.Kill() // our own child, by PID
			<-c.done
		}
		if out := c.out.String(); strings.Contains(out, "DATA RACE") && strings.Contains(out, "tailrace/tailrace/outbox") {
			t.Errorf("a worker process reported a data race:\n%s", out[:min(len(out), 4000)])
		}
	})
	return c
}

func (c *wChild) kill9() {
	_ = c.cmd.Process.Signal(syscall.SIGKILL) // our own child, by PID
	<-c.done
}

func TestWorkerKill9(t *testing.T) {
	t.Run("postgres", func(t *testing.T) {
		pg := testenv.NewPostgres(t)
		workerKill9(t, pg.DB, outbox.PostgreSQL, "postgres", pg.URL)
	})
	t.Run("mysql", func(t *testing.T) {
		my := testenv.NewMySQL(t)
		workerKill9(t, my.DB, outbox.MySQL, "mysql", my.DSN)
	})
}

func workerKill9(t *testing.T, db *sql.DB, d outbox.Dialect, dialect, dsn string) {
	total, kills := 3000, 4
	if os.Getenv("TAILRACE_RELAY_FULL") == "1" {
		total, kills = 20000, 10
	}
	const keys = 100
	ctx := context.Background()
	table, ledger := testenv.UniqueName("wk"), testenv.UniqueName("wl")
	if err := outbox.InitializeSchema(ctx, db, d, table); err != nil {
		t.Fatal(err)
	}
	serial := "BIGSERIAL PRIMARY KEY"
	if d == outbox.MySQL {
		serial = "BIGINT AUTO_INCREMENT PRIMARY KEY"
	}
	if _, err := db.ExecContext(ctx, `CREATE TABLE `+ledger+` (n `+serial+`, id VARCHAR(64) NOT NULL, k VARCHAR(64) NOT NULL, seq INTEGER NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	ob, err := outbox.New(db, nil, outbox.Config{Dialect: d, Table: testenv.UniqueName("wo"), CommandTable: table})
	if err != nil {
		t.Fatal(err)
	}
	// Stage in transactions of 100.
	for i := 0; i < total; i += 100 {
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		for j := i; j < min(i+100, total); j++ {
			if err := ob.EnqueueTx(ctx, tx, Ledgered{ID: fmt.Sprintf("c%d", j), Key: fmt.Sprintf("k%d", j%keys), Seq: j / keys}); err != nil {
				t.Fatal(err)
			}
		}
		if err := tx.Commit(); err != nil {
			t.Fatal(err)
		}
	}
	count := func(q string) int {
		var n int
		if err := db.QueryRowContext(ctx, q).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	const slots = 2
	children := make([]*wChild, slots)
	for i := range slots {
		children[i] = startWorkerChild(t, dialect, dsn, table, ledger)
	}
	began := time.Now()
	var events []string
	for k := 0; k < kills; k++ {
		target := (k + 1) * total / (kills + 2)
		deadline := time.Now().Add(90 * time.Second)
		for count(`SELECT COUNT(*) FROM `+ledger) < target {
			if time.Now().After(deadline) {
				t.Fatalf("the workers did not reach %d handled (kill %d): %d", target, k, count(`SELECT COUNT(*) FROM `+ledger))
			}
			time.Sleep(5 * time.Millisecond)
		}
		i := rand.IntN(slots)
		children[i].kill9()
		events = append(events, fmt.Sprintf("worker %d at %d handled", i, count(`SELECT COUNT(*) FROM `+ledger)))
		children[i] = startWorkerChild(t, dialect, dsn, table, ledger)
	}
	deadline := time.Now().Add(120 * time.Second)
	for count(`SELECT COUNT(*) FROM `+table) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the command table did not drain: %d left", count(`SELECT COUNT(*) FROM `+table))
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("%d commands, %d kill -9 in %s: %s", total, kills, time.Since(began).Round(time.Millisecond), strings.Join(events, "; "))
	for _, c := range children {
		_ = c.cmd.Process.Signal(syscall.SIGTERM) // our own child, by PID
		select {
		case <-c.done:
		case <-time.After(30 * time.Second):
			t.Errorf("a worker did not exit after SIGTERM")
		}
	}

	// The ledger: every command exactly once, in order per key.
	rows, err := db.QueryContext(ctx, `SELECT id, k, seq FROM `+ledger+` ORDER BY n`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	seen := map[string]int{}
	last := map[string]int{}
	var dup, disorder int
	for rows.Next() {
		var id, k string
		var seq int
		if err := rows.Scan(&id, &k, &seq); err != nil {
			t.Fatal(err)
		}
		seen[id]++
		if seen[id] > 1 {
			dup++
		}
		if p, ok := last[k]; ok && seq < p {
			disorder++
		}
		last[k] = seq
	}
	lost := 0
	for j := range total {
		if seen[fmt.Sprintf("c%d", j)] == 0 {
			lost++
		}
	}
	dead := count(`SELECT COUNT(*) FROM ` + table + `_dead`)
	t.Logf("ledger: %d handled, %d lost, %d handled twice, %d out of order per key, %d dead letters", len(seen), lost, dup, disorder, dead)
	if lost+dup+disorder+dead > 0 {
		t.Errorf("ledger broken: %d lost, %d duplicates, %d out of order, %d dead letters", lost, dup, disorder, dead)
	}
}
