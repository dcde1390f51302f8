package outbox

import (
	"context"
	"database/sql"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
)

type nopPublisher struct{}

func (nopPublisher) Publish(string, ...*message.Message) error { return nil }
func (nopPublisher) Close() error                              { return nil }

// TestMigrate covers the schema versions on every dialect: a missing
// schema, concurrent runners, idempotence, a database from before versions
// were recorded, one newer than the code, and MigrationSQL applied by
// another tool.
func TestMigrate(t *testing.T) {
	for name, open := range dialectDBs(t) {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			db, d := open(t)
			ctx := context.Background()

			// Missing.
			st, err := CheckSchema(ctx, db, d, "mig_a")
			if !errors.Is(err, ErrSchemaMissing) || len(st.Missing) != 4 || st.Current != 0 ||
				!strings.Contains(err.Error(), "tailrace migrate up") {
				t.Fatalf("missing: %+v %v", st, err)
			}

			// Four runners at once: one applies, the others find it done.
			var wg sync.WaitGroup
			results := make([]MigrateResult, 4)
			errs := make([]error, 4)
			for i := range results {
				wg.Add(1)
				go func() {
					defer wg.Done()
					results[i], errs[i] = Migrate(ctx, db, d, "mig_a")
				}()
			}
			wg.Wait()
			appliedBy := 0
			for i, r := range results {
				if errs[i] != nil {
					t.Fatalf("runner %d: %v", i, errs[i])
				}
				if r.To != SchemaVersion {
					t.Fatalf("runner %d: %+v", i, r)
				}
				if len(r.Applied) > 0 {
					appliedBy++
				}
			}
			if appliedBy != 1 {
				t.Fatalf("%d runners applied version 1: %+v", appliedBy, results)
			}
			st, err = CheckSchema(ctx, db, d, "mig_a")
			if err != nil || st.Current != SchemaVersion || len(st.Applied) != 1 || st.Applied[0].AppliedAt.IsZero() {
				t.Fatalf("after migrate: %+v %v", st, err)
			}
			if r, err := Migrate(ctx, db, d, "mig_a"); err != nil || len(r.Applied) != 0 || r.From != SchemaVersion {
				t.Fatalf("again: %+v %v", r, err)
			}

			// Created before versions were recorded: older, still runs.
			for _, s := range migrations[0].stmts(d, "mig_b") {
				if _, err := db.ExecContext(ctx, s); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := CheckSchema(ctx, db, d, "mig_b"); !errors.Is(err, ErrSchemaOlder) || !strings.Contains(err.Error(), "version 0, older") {
				t.Fatalf("legacy: %v", err)
			}
			if err := checkSchemaAtStart(ctx, db, d, "mig_b", slog.New(slog.DiscardHandler)); err != nil {
				t.Fatalf("legacy at start: %v", err)
			}
			if r, err := Migrate(ctx, db, d, "mig_b"); err != nil || r.From != 0 || len(r.Applied) != 1 {
				t.Fatalf("upgrade legacy: %+v %v", r, err)
			}

			// Newer than the code: Migrate, CheckSchema and the relay refuse.
			if _, err := db.ExecContext(ctx, `INSERT INTO `+d.quote("mig_a_schema")+` (version) VALUES (99)`); err != nil {
				t.Fatal(err)
			}
			if _, err := CheckSchema(ctx, db, d, "mig_a"); !errors.Is(err, ErrSchemaNewer) || !strings.Contains(err.Error(), "version 99, newer than this code") {
				t.Fatalf("newer: %v", err)
			}
			if _, err := Migrate(ctx, db, d, "mig_a"); !errors.Is(err, ErrSchemaNewer) {
				t.Fatalf("migrate newer: %v", err)
			}
			relay, err := NewRelay(db, nopPublisher{}, nil, RelayConfig{Dialect: d, Table: "mig_a", DisableListen: true})
			if err != nil {
				t.Fatal(err)
			}
			runCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			var se *SchemaError
			if err := relay.Run(runCtx); !errors.As(err, &se) || !errors.Is(err, ErrSchemaNewer) || se.State.Current != 99 {
				t.Fatalf("relay on a newer schema: %v", err)
			}
			_ = relay.Close()

			// MigrationSQL applied as another tool would: current.
			for v := 1; v <= SchemaVersion; v++ {
				stmts, err := MigrationSQL(d, "mig_c", v)
				if err != nil {
					t.Fatal(err)
				}
				for _, s := range stmts {
					if _, err := db.ExecContext(ctx, s); err != nil {
						t.Fatal(err)
					}
				}
			}
			if st, err := CheckSchema(ctx, db, d, "mig_c"); err != nil || st.Current != SchemaVersion {
				t.Fatalf("by MigrationSQL: %+v %v", st, err)
			}
		})
	}
}

func TestMigrationSQLRejectsBadInput(t *testing.T) {
	if _, err := MigrationSQL(PostgreSQL, "t", 0); err == nil {
		t.Fatal("version 0 accepted")
	}
	if _, err := MigrationSQL(PostgreSQL, "t", SchemaVersion+1); err == nil {
		t.Fatal("unknown version accepted")
	}
	if _, err := MigrationSQL(MySQL, "bad name", 1); !errors.Is(err, ErrInvalidName) {
		t.Fatalf("bad name: %v", err)
	}
}

// TestCheckSchemaAtStartOutage: a database that cannot be reached when the
// relay starts is an outage to ride out, not a schema error.
func TestCheckSchemaAtStartOutage(t *testing.T) {
	db, err := sql.Open("pgx", "postgres://u@127.0.0.1:1/x?connect_timeout=2")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var logs strings.Builder
	logger := slog.New(slog.NewTextHandler(&logs, nil))
	if err := checkSchemaAtStart(context.Background(), db, PostgreSQL, "t", logger); err != nil {
		t.Fatalf("outage at start: %v", err)
	}
	if !strings.Contains(logs.String(), "cannot check the schema version at start") {
		t.Fatalf("not logged: %s", logs.String())
	}
	if _, err := CheckSchema(context.Background(), db, PostgreSQL, "t"); err == nil || errors.As(err, new(*SchemaError)) {
		t.Fatalf("CheckSchema on an unreachable database: %v", err)
	}
}
