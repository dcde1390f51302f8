package outbox

import (
	"context"
	"database/sql"
	"errors"
	"testing"

	"github.com/tailrace/tailrace/internal/testenv"
)

// dialectDBs returns a fresh database per dialect; service-backed ones skip
// or fail as testenv decides.
func dialectDBs(t *testing.T) map[string]func(t *testing.T) (*sql.DB, Dialect) {
	return map[string]func(t *testing.T) (*sql.DB, Dialect){
		"postgres": func(t *testing.T) (*sql.DB, Dialect) { return testenv.NewPostgres(t).DB, PostgreSQL },
		"mysql":    func(t *testing.T) (*sql.DB, Dialect) { return testenv.NewMySQL(t).DB, MySQL },
		"sqlite":   func(t *testing.T) (*sql.DB, Dialect) { return testenv.NewSQLite(t).DB, SQLite },
	}
}

func TestInitializeSchemaIdempotent(t *testing.T) {
	for name, open := range dialectDBs(t) {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			db, d := open(t)
			ctx := context.Background()
			for i := 0; i < 2; i++ {
				if err := InitializeSchema(ctx, db, d, "tailrace_outbox"); err != nil {
					t.Fatalf("run %d: %v", i+1, err)
				}
			}
			for _, tbl := range []string{"tailrace_outbox", "tailrace_outbox_dead", "tailrace_outbox_leases", "tailrace_outbox_relays"} {
				if _, err := db.ExecContext(ctx, "SELECT COUNT(*) FROM "+d.quote(tbl)); err != nil {
					t.Errorf("table %s: %v", tbl, err)
				}
			}
		})
	}
}

func TestSchemaSQLRejectsBadInput(t *testing.T) {
	if _, err := SchemaSQL(nil, "outbox"); err == nil {
		t.Fatal("nil dialect accepted")
	}
	for _, d := range []Dialect{PostgreSQL, MySQL, SQLite} {
		if _, err := SchemaSQL(d, `x"; DROP TABLE y; --`); !errors.Is(err, ErrInvalidName) {
			t.Fatalf("%s: injection name accepted: %v", d.Name(), err)
		}
	}
}

func TestKeyHashStable(t *testing.T) {
	// key_hash is persisted: it must never change between releases.
	cases := map[string]int32{"": 0x011c9dc5, "order-1": 0x2b7fcd6d}
	for k, want := range cases {
		if got := keyHash(k); got != want {
			t.Errorf("keyHash(%q) = %#x, want %#x", k, got, want)
		}
		if keyHash(k) < 0 {
			t.Errorf("keyHash(%q) negative", k)
		}
	}
	if keyHash("a") == keyHash("b") {
		t.Error("keyHash collides on a/b")
	}
}
