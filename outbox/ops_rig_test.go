package outbox

import (
	"context"
	"database/sql"
	"errors"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/internal/testenv"
)

// Test rig of the operations tests (health, admin, metrics): one database
// with a fresh outbox table, a way to open a second pool on it (a relay
// whose connection is cut), and relays over an in-memory publisher.

type opsRig struct {
	db    *sql.DB
	d     Dialect
	table string
	ob    *Outbox
	open  func(t *testing.T) *sql.DB // a second, independent pool
}

// opsDBs are the databases the operations tests run on: SQLite always,
// PostgreSQL when reachable (MySQL shares PostgreSQL's code paths except
// for the replay lock, which has its own test).
func opsDBs() map[string]func(t *testing.T) *opsRig {
	return map[string]func(t *testing.T) *opsRig{
		"sqlite": func(t *testing.T) *opsRig {
			s := testenv.NewSQLite(t)
			return newOpsRig(t, s.DB, SQLite, func(t *testing.T) *sql.DB { return opsOpen(t, "sqlite", s.DSN) })
		},
		"postgres": func(t *testing.T) *opsRig {
			p := testenv.NewPostgres(t)
			return newOpsRig(t, p.DB, PostgreSQL, func(t *testing.T) *sql.DB { return opsOpen(t, "pgx", p.URL) })
		},
	}
}

func opsOpen(t *testing.T, driver, dsn string) *sql.DB {
	db, err := sql.Open(driver, dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })
	return db
}

func newOpsRig(t *testing.T, db *sql.DB, d Dialect, open func(t *testing.T) *sql.DB) *opsRig {
	t.Helper()
	table := testenv.UniqueName("ops")
	if err := InitializeSchema(context.Background(), db, d, table); err != nil {
		t.Fatal(err)
	}
	ob, err := New(db, nil, Config{Dialect: d, Table: table})
	if err != nil {
		t.Fatal(err)
	}
	return &opsRig{db: db, d: d, table: table, ob: ob, open: open}
}

// stage stages n messages of kind in one committed transaction.
func (g *opsRig) stage(t *testing.T, ctx context.Context, kind string, n int) {
	t.Helper()
	tx, err := g.db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	msgs := make([]any, n)
	for i := range msgs {
		msgs[i] = Message{Value: map[string]int{"i": i}, Options: &StageOptions{Kind: kind, Topic: "ops_dest"}}
	}
	if err := g.ob.StageTx(ctx, tx, msgs...); err != nil {
		_ = tx.Rollback()
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
}

// startRelay runs a relay on db (the rig's pool when nil) until the test
// ends or stop is called; stop returns Run's error.
func (g *opsRig) startRelay(t *testing.T, db *sql.DB, pub message.Publisher, cfg RelayConfig) (r *Relay, stop func() error) {
	t.Helper()
	if db == nil {
		db = g.db
	}
	cfg.Dialect, cfg.Table = g.d, g.table
	if cfg.PollInterval == 0 {
		cfg.PollInterval = 20 * time.Millisecond
	}
	if cfg.LeaseTTL == 0 {
		cfg.LeaseTTL = time.Second
	}
	if cfg.CloseTimeout == 0 {
		cfg.CloseTimeout = 2 * time.Second
	}
	if cfg.InitialInterval == 0 {
		cfg.InitialInterval = 10 * time.Millisecond
	}
	cfg.DisableListen = true
	r, err := NewRelay(db, pub, slog.New(slog.DiscardHandler), cfg)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- r.Run(context.Background()) }()
	var once sync.Once
	var runErr error
	stop = func() error {
		once.Do(func() {
			_ = r.Close()
			select {
			case runErr = <-done:
			case <-time.After(30 * time.Second):
				runErr = errors.New("relay did not stop within 30s")
			}
		})
		return runErr
	}
	t.Cleanup(func() { _ = stop() })
	select {
	case <-r.Running():
	case <-time.After(20 * time.Second):
		t.Fatal("relay did not start")
	}
	return r, stop
}

// memPub is an in-memory publisher: it records messages, fails those whose
// kind is in failKinds (permanently), and blocks while blocked is set.
type memPub struct {
	mu        sync.Mutex
	msgs      []*message.Message
	failKinds map[string]bool
	gate      chan struct{} // when non-nil, Publish waits for it to close
}

func (p *memPub) Publish(_ string, msgs ...*message.Message) error {
	p.mu.Lock()
	gate := p.gate
	p.mu.Unlock()
	if gate != nil {
		<-gate
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, m := range msgs {
		if p.failKinds[m.Metadata.Get(tailrace.MetaKind)] {
			return tailrace.Permanent(errors.New("memPub: kind " + m.Metadata.Get(tailrace.MetaKind) + " refused"))
		}
	}
	p.msgs = append(p.msgs, msgs...)
	return nil
}

func (p *memPub) Close() error { return nil }

func (p *memPub) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.msgs)
}

// block makes Publish wait until the returned func is called.
func (p *memPub) block() (release func()) {
	gate := make(chan struct{})
	p.mu.Lock()
	p.gate = gate
	p.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			p.mu.Lock()
			p.gate = nil
			p.mu.Unlock()
			close(gate)
		})
	}
}

// opsEventually polls cond every 20 ms until it holds or 20 s pass.
func opsEventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for: %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
