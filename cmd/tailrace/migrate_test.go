package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"strings"
	"testing"

	"github.com/tailrace/tailrace/internal/testenv"
	"github.com/tailrace/tailrace/outbox"
)

// TestMigrateCLI runs tailrace migrate on every dialect: status of a
// missing schema, up (twice), validate, the SQL of `migrate sql` applied as
// another tool would, and a database newer than the code.
func TestMigrateCLI(t *testing.T) {
	dbs := map[string]func(t *testing.T) (*sql.DB, string, string){
		"sqlite": func(t *testing.T) (*sql.DB, string, string) {
			s := testenv.NewSQLite(t)
			if err := s.DB.Ping(); err != nil { // creates the file
				t.Fatal(err)
			}
			return s.DB, s.Path, "sqlite"
		},
		"postgres": func(t *testing.T) (*sql.DB, string, string) {
			p := testenv.NewPostgres(t)
			return p.DB, p.URL, "postgres"
		},
		"mysql": func(t *testing.T) (*sql.DB, string, string) {
			m := testenv.NewMySQL(t)
			return m.DB, m.DSN, "mysql"
		},
	}
	for name, open := range dbs {
		t.Run(name, func(t *testing.T) {
			db, url, dialect := open(t)
			ctx := context.Background()
			t.Setenv("TAILRACE_DB", "")
			run := func(in string, args ...string) (int, string, string) {
				return runOutbox(t, in, append(args, "--db", url)...)
			}
			if code, out, errs := run("", "migrate", "status"); code != 1 || !strings.Contains(out, "database at schema version 0, this build 1: missing") ||
				!strings.Contains(errs, "tailrace migrate up") {
				t.Fatalf("status of nothing: %d\n%s%s", code, out, errs)
			}
			if code, _, errs := run("", "outbox", "status"); code != 1 || !strings.Contains(errs, "`tailrace migrate status` tells") {
				t.Fatalf("outbox status without a schema: %d %s", code, errs)
			}
			if code, out, errs := run("", "migrate", "up"); code != 0 || !strings.Contains(out, "applied version 1") || !strings.Contains(out, "schema at version 1 (was 0)") {
				t.Fatalf("up: %d\n%s%s", code, out, errs)
			}
			if code, out, _ := run("", "migrate", "up", "--json"); code != 0 || !strings.Contains(out, `"applied": []`) {
				t.Fatalf("up again: %d\n%s", code, out)
			}
			if code, out, errs := run("", "migrate", "validate"); code != 0 || !strings.Contains(out, ": current") {
				t.Fatalf("validate: %d\n%s%s", code, out, errs)
			}
			// outbox commands work on the migrated table.
			if code, _, errs := run("", "outbox", "status"); code != 0 {
				t.Fatalf("outbox status after migrate up: %s", errs)
			}

			// migrate sql, applied statement by statement as a migration
			// tool would, for another table: validate passes.
			code, sqlText, errs := runOutbox(t, "", "migrate", "sql", "--dialect", dialect, "--table", "other_outbox")
			if code != 0 {
				t.Fatalf("sql: %s", errs)
			}
			for _, stmt := range strings.Split(sqlText, ";\n") {
				if stmt = strings.TrimSpace(stmt); stmt == "" || strings.HasPrefix(stmt, "--") && !strings.Contains(stmt, "\n") {
					continue
				}
				if _, err := db.ExecContext(ctx, stmt); err != nil {
					t.Fatalf("%v\n%s", err, stmt)
				}
			}
			if code, out, errs := run("", "migrate", "validate", "--table", "other_outbox"); code != 0 {
				t.Fatalf("validate after migrate sql: %d\n%s%s", code, out, errs)
			}

			// Newer than this build.
			q := `"`
			if dialect == "mysql" {
				q = "`"
			}
			if _, err := db.ExecContext(ctx, `INSERT INTO `+q+`tailrace_outbox_schema`+q+` (version) VALUES (7)`); err != nil {
				t.Fatal(err)
			}
			code, out, errs := run("", "migrate", "status", "--json")
			var st struct {
				Current int    `json:"current"`
				Latest  int    `json:"latest"`
				State   string `json:"state"`
			}
			if err := json.Unmarshal([]byte(out), &st); err != nil || code != 1 || st.Current != 7 || st.Latest != outbox.SchemaVersion || st.State != "newer" ||
				!strings.Contains(errs, "newer than this code") {
				t.Fatalf("status of a newer schema: %d %v\n%s%s", code, err, out, errs)
			}
			if code, _, errs := run("", "migrate", "up"); code != 1 || !strings.Contains(errs, "version 7, newer than this code") {
				t.Fatalf("up on a newer schema: %d %s", code, errs)
			}
		})
	}
}

func TestMigrateSQLUsage(t *testing.T) {
	if code, _, errs := runArgs(t, "migrate", "sql", "--dialect", "oracle"); code != 2 || !strings.Contains(errs, "want postgres, mysql or sqlite") {
		t.Fatalf("%d %s", code, errs)
	}
	if code, _, errs := runArgs(t, "migrate", "sql", "--dialect", "mysql", "--version", "9"); code != 2 || !strings.Contains(errs, "versions 1 to") {
		t.Fatalf("%d %s", code, errs)
	}
	code, out, _ := runArgs(t, "migrate", "sql", "--dialect", "mysql", "--table", "orders_outbox")
	if code != 0 || !strings.Contains(out, "CREATE TABLE IF NOT EXISTS `orders_outbox`") || !strings.Contains(out, "INSERT IGNORE INTO `orders_outbox_schema` (version) VALUES (1);") {
		t.Fatalf("%d\n%s", code, out)
	}
}
