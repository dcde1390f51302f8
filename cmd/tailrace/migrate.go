package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/tailrace/tailrace/outbox"
)

func init() { addCommand(newMigrateCmd) }

// migrateFlags are the flags of the migrate subcommands that connect.
type migrateFlags struct {
	db      string
	table   string
	json    bool
	timeout time.Duration
}

func (f *migrateFlags) register(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.db, "db", os.Getenv("TAILRACE_DB"),
		"database: postgres://… URL, PostgreSQL key=value DSN, MySQL DSN, or SQLite file (as for tailrace outbox); default $TAILRACE_DB")
	cmd.Flags().StringVar(&f.table, "table", outbox.DefaultTable, "outbox table")
	cmd.Flags().BoolVar(&f.json, "json", false, "print machine-readable JSON")
	cmd.Flags().DurationVar(&f.timeout, "timeout", 5*time.Minute, "give up after this long (including waiting for another migration's lock)")
}

func newMigrateCmd(e *env) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "migrate",
		Short: "Create or upgrade the outbox schema; print its SQL for other migration tools",
		Long: fmt.Sprintf(`Manage the schema of one outbox table (default tailrace_outbox): the table,
its dead letters, relay leases and heartbeats. This build's schema version
is %d; each version applied is recorded in <table>_schema.

  up        apply the versions the database lacks (idempotent; concurrent
            runners serialize on a lock)
  status    which version the database is at, and whether it matches
  validate  exit 1 unless the database is exactly at this build's version
  sql       print a version's statements, for golang-migrate, goose, Atlas

Exit status: 0 success, 1 the database does not match or the operation
failed, 2 usage error.`, outbox.SchemaVersion),
		Args: cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				return fmt.Errorf("unknown command %q for %q", args[0], cmd.CommandPath())
			}
			return fmt.Errorf("%s needs a subcommand: up, status, validate or sql", cmd.CommandPath())
		},
	}
	cmd.AddCommand(newMigrateUpCmd(e), newMigrateStatusCmd(e, false), newMigrateStatusCmd(e, true), newMigrateSQLCmd(e))
	return cmd
}

func newMigrateUpCmd(e *env) *cobra.Command {
	var f migrateFlags
	cmd := &cobra.Command{
		Use:   "up",
		Short: "Apply the schema versions the database lacks",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := context.WithTimeout(context.Background(), f.timeout)
			defer cancel()
			db, t, err := openDB(ctx, f.db)
			if err != nil {
				return err
			}
			defer db.Close()
			res, err := outbox.Migrate(ctx, db, t.dialect, f.table)
			if err != nil {
				return outboxFail(err)
			}
			if f.json {
				return writeJSON(e, map[string]any{"table": f.table, "from": res.From, "to": res.To, "applied": append([]int{}, res.Applied...)})
			}
			if len(res.Applied) == 0 {
				fmt.Fprintf(e.stdout, "%s: schema already at version %d; nothing to do\n", f.table, res.To)
				return nil
			}
			for _, v := range res.Applied {
				fmt.Fprintf(e.stdout, "%s: applied version %d: %s\n", f.table, v, outbox.MigrationDescription(v))
			}
			fmt.Fprintf(e.stdout, "%s: schema at version %d (was %d)\n", f.table, res.To, res.From)
			return nil
		},
	}
	f.register(cmd)
	return cmd
}

func newMigrateStatusCmd(e *env, validate bool) *cobra.Command {
	var f migrateFlags
	use, short := "status", "Show the schema version of the database and whether it matches this build"
	if validate {
		use, short = "validate", "Exit 1 unless the database schema is exactly this build's version"
	}
	cmd := &cobra.Command{
		Use:   use,
		Short: short,
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := context.WithTimeout(context.Background(), f.timeout)
			defer cancel()
			db, t, err := openDB(ctx, f.db)
			if err != nil {
				return err
			}
			defer db.Close()
			st, cerr := outbox.CheckSchema(ctx, db, t.dialect, f.table)
			var se *outbox.SchemaError
			if cerr != nil && !errors.As(cerr, &se) {
				return outboxFail(cerr)
			}
			state := "current"
			switch {
			case errors.Is(cerr, outbox.ErrSchemaMissing):
				state = "missing"
			case errors.Is(cerr, outbox.ErrSchemaNewer):
				state = "newer"
			case errors.Is(cerr, outbox.ErrSchemaOlder):
				state = "older"
			}
			if f.json {
				if err := writeJSON(e, struct {
					outbox.SchemaState
					State string `json:"state"`
				}{st, state}); err != nil {
					return err
				}
			} else {
				fmt.Fprintf(e.stdout, "%s: database at schema version %d, this build %d: %s\n", f.table, st.Current, st.Latest, state)
				for _, a := range st.Applied {
					fmt.Fprintf(e.stdout, "  version %d applied %s\n", a.Version, a.AppliedAt.UTC().Format(time.RFC3339))
				}
				if len(st.Missing) > 0 {
					fmt.Fprintf(e.stdout, "  missing: %s\n", strings.Join(st.Missing, ", "))
				}
			}
			// status reports; it fails only when the code cannot run on
			// the database (newer, missing). validate wants an exact match.
			if cerr != nil && (validate || !errors.Is(cerr, outbox.ErrSchemaOlder)) {
				return &exitError{code: exitInvalid, err: cerr}
			}
			return nil
		},
	}
	f.register(cmd)
	return cmd
}

func newMigrateSQLCmd(e *env) *cobra.Command {
	var dialect, table string
	var version int
	var all bool
	cmd := &cobra.Command{
		Use:   "sql --dialect postgres|mysql|sqlite [--version N | --all] [--table T]",
		Short: "Print the statements of a schema version, for another migration tool",
		Long: `Print the statements of one schema version (default: this build's latest)
for the outbox table, each ending with a semicolon, including the ones that
record the version in <table>_schema, so that the library's schema check and
'tailrace migrate status' see it. Put each version in its own migration of
your tool (golang-migrate: NNN_tailrace_outbox_vN.up.sql; goose: a file with
-- +goose Up above the statements; Atlas: a versioned migration file) and
apply them in order. --all prints versions 1 to the latest. Every statement
is idempotent. Needs no database.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var d outbox.Dialect
			switch strings.ToLower(dialect) {
			case "postgres", "postgresql", "pgx":
				d = outbox.PostgreSQL
			case "mysql", "mariadb":
				d = outbox.MySQL
			case "sqlite", "sqlite3":
				d = outbox.SQLite
			default:
				return fmt.Errorf("--dialect %q: want postgres, mysql or sqlite", dialect)
			}
			from, to := version, version
			if version == 0 {
				from, to = outbox.SchemaVersion, outbox.SchemaVersion
			}
			if all {
				from = 1
			}
			if from < 1 || to > outbox.SchemaVersion {
				return fmt.Errorf("--version %d: this build has versions 1 to %d", version, outbox.SchemaVersion)
			}
			var b strings.Builder
			for v := from; v <= to; v++ {
				stmts, err := outbox.MigrationSQL(d, table, v)
				if err != nil {
					return err
				}
				fmt.Fprintf(&b, "-- tailrace outbox %q, %s, schema version %d: %s\n", table, d.Name(), v, outbox.MigrationDescription(v))
				for _, s := range stmts {
					b.WriteString(s + ";\n\n")
				}
			}
			_, err := fmt.Fprint(e.stdout, strings.TrimSuffix(b.String(), "\n"))
			return err
		},
	}
	cmd.Flags().StringVar(&dialect, "dialect", "", "postgres, mysql (also MariaDB) or sqlite")
	cmd.Flags().StringVar(&table, "table", outbox.DefaultTable, "outbox table")
	cmd.Flags().IntVar(&version, "version", 0, "schema version (default: "+strconv.Itoa(outbox.SchemaVersion)+", this build's)")
	cmd.Flags().BoolVar(&all, "all", false, "every version from 1 to --version (or the latest)")
	_ = cmd.MarkFlagRequired("dialect")
	return cmd
}
