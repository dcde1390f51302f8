package testenv

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestPostgresIsolated(t *testing.T) {
	a := NewPostgres(t)
	b := NewPostgres(t)
	ctx := context.Background()
	if _, err := a.DB.ExecContext(ctx, "CREATE TABLE x (id int)"); err != nil {
		t.Fatal(err)
	}
	// The same table name in another schema must not collide.
	if _, err := b.DB.ExecContext(ctx, "CREATE TABLE x (id int)"); err != nil {
		t.Fatal(err)
	}
	var schema string
	if err := a.DB.QueryRowContext(ctx, "SELECT current_schema()").Scan(&schema); err != nil {
		t.Fatal(err)
	}
	if schema != a.Schema {
		t.Fatalf("current_schema() = %q, want %q", schema, a.Schema)
	}
}

func TestMySQLIsolated(t *testing.T) {
	m := NewMySQL(t)
	var db string
	if err := m.DB.QueryRowContext(context.Background(), "SELECT DATABASE()").Scan(&db); err != nil {
		t.Fatal(err)
	}
	if db != m.Database {
		t.Fatalf("DATABASE() = %q, want %q", db, m.Database)
	}
}

func TestSQLite(t *testing.T) {
	s := NewSQLite(t)
	var mode string
	if err := s.DB.QueryRow("PRAGMA journal_mode").Scan(&mode); err != nil {
		t.Fatal(err)
	}
	if mode != "wal" {
		t.Fatalf("journal_mode = %q, want wal", mode)
	}
}

func TestBrokersReachable(t *testing.T) {
	_ = AMQPURL(t)
	_ = NATSURL(t)
	_ = RedisAddr(t)
}

// TestSkipLog checks that a skipped service test is recorded in
// $TAILRACE_SKIP_LOG, which `make test` summarises at the end.
func TestSkipLog(t *testing.T) {
	log := filepath.Join(t.TempDir(), "skips")
	t.Setenv(SkipLogEnv, log)
	t.Setenv("TAILRACE_REQUIRE_SERVICES", "")
	t.Run("absent", func(t *testing.T) {
		unavailable(t, "PostgreSQL", "127.0.0.1:1", errors.New("connection refused"))
	})
	data, err := os.ReadFile(log)
	if err != nil {
		t.Fatal(err)
	}
	if got := string(data); got != "PostgreSQL\t127.0.0.1:1\tTestSkipLog/absent\n" {
		t.Fatalf("skip log: %q", got)
	}
}
