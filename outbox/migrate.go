package outbox

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"time"
)

// SchemaVersion is the version of the outbox schema this code works with.
// Each version adds to the one before (new tables, columns with defaults,
// indexes); a version's statements never change once released.
//
// The version is recorded per outbox table in <table>_schema, one row per
// applied version. Migrate (and InitializeSchema, which calls it) applies
// the versions a database lacks; MigrationSQL hands a version's statements
// to other migration tools; CheckSchema tells a database that is older or
// newer than the code, and Relay.Run refuses to start on one that is newer
// or misses a table.
const SchemaVersion = 1

// suffixSchema names the table that records applied schema versions.
const suffixSchema = "_schema"

// migration is one schema version.
type migration struct {
	version     int
	description string
	stmts       func(d Dialect, table string) []string
}

// migrations lists every version in order; migrations[i].version == i+1.
var migrations = []migration{
	{1, "the outbox table, dead letters, relay leases and heartbeats", func(d Dialect, table string) []string {
		var s []string
		s = append(s, d.outboxDDL(table)...)
		s = append(s, d.deadDDL(table)...)
		return append(s, relayDDL(d, table)...)
	}},
}

// Errors of CheckSchema, wrapped in a *SchemaError.
var (
	// ErrSchemaNewer: the database records a schema version this code does
	// not know: it was migrated by a newer tailrace. Upgrade this service,
	// or roll the database back.
	ErrSchemaNewer = errors.New("outbox: the database schema is newer than this code")
	// ErrSchemaOlder: the database lacks versions this code has. Run
	// `tailrace migrate up` (or Migrate, InitializeSchema).
	ErrSchemaOlder = errors.New("outbox: the database schema is older than this code")
	// ErrSchemaMissing: tables the outbox needs do not exist.
	ErrSchemaMissing = errors.New("outbox: the outbox schema is missing")
)

// SchemaState is what CheckSchema found.
type SchemaState struct {
	Table string `json:"table"`
	// Current is the highest version recorded in the database; 0 when none
	// is (a database created before versions were recorded, by
	// SchemaSQL of an older release, or not at all: see Missing).
	Current int `json:"current"`
	// Latest is SchemaVersion, the version of this code.
	Latest int `json:"latest"`
	// Applied lists the recorded versions with when they were applied.
	Applied []AppliedVersion `json:"applied"`
	// Missing names the required tables that do not exist.
	Missing []string `json:"missing,omitempty"`
}

// AppliedVersion is one row of <table>_schema.
type AppliedVersion struct {
	Version   int       `json:"version"`
	AppliedAt time.Time `json:"applied_at"`
}

// SchemaError is returned by CheckSchema when the database does not match
// the code; it wraps ErrSchemaNewer, ErrSchemaOlder or ErrSchemaMissing.
type SchemaError struct {
	State SchemaState
	Err   error
}

func (e *SchemaError) Error() string {
	s := e.State
	switch {
	case errors.Is(e.Err, ErrSchemaMissing):
		return fmt.Sprintf("outbox: schema of %q: missing %s: create it with `tailrace migrate up` or outbox.InitializeSchema (or apply `tailrace migrate sql`)",
			s.Table, strings.Join(s.Missing, ", "))
	case errors.Is(e.Err, ErrSchemaNewer):
		return fmt.Sprintf("outbox: schema of %q is at version %d, newer than this code (version %d): upgrade tailrace in this service, or roll the database back",
			s.Table, s.Current, s.Latest)
	default:
		return fmt.Sprintf("outbox: schema of %q is at version %d, older than this code (version %d): run `tailrace migrate up` (or outbox.Migrate)",
			s.Table, s.Current, s.Latest)
	}
}

func (e *SchemaError) Unwrap() error { return e.Err }

// MigrationSQL returns the statements of schema version (1..SchemaVersion)
// for the outbox table named table, ending with the ones that record the
// version, for users who run their migrations with golang-migrate, goose,
// Atlas or by hand: apply the versions in order, each once. Every statement
// is idempotent.
func MigrationSQL(d Dialect, table string, version int) ([]string, error) {
	if d == nil {
		return nil, fmt.Errorf("outbox: nil Dialect; use outbox.PostgreSQL, outbox.MySQL or outbox.SQLite")
	}
	if err := ValidateTableName(table); err != nil {
		return nil, err
	}
	if version < 1 || version > SchemaVersion {
		return nil, fmt.Errorf("outbox: no schema version %d (this code has 1 to %d)", version, SchemaVersion)
	}
	stmts := migrations[version-1].stmts(d, table)
	return append(stmts, recordVersionSQL(d, table, version)...), nil
}

// MigrationDescription says what schema version (1..SchemaVersion) adds.
func MigrationDescription(version int) string {
	if version < 1 || version > SchemaVersion {
		return ""
	}
	return migrations[version-1].description
}

// versionDDL creates the version table.
func versionDDL(d Dialect, table string) string {
	t := d.quote(table + suffixSchema)
	switch d.Name() {
	case "postgres":
		return `CREATE TABLE IF NOT EXISTS ` + t + ` (
	version    INTEGER     PRIMARY KEY,
	applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)`
	case "mysql":
		return `CREATE TABLE IF NOT EXISTS ` + t + ` (
	version    INT         NOT NULL PRIMARY KEY,
	applied_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
) ENGINE=InnoDB`
	default:
		return `CREATE TABLE IF NOT EXISTS ` + t + ` (
	version    INTEGER PRIMARY KEY,
	applied_at TEXT    NOT NULL DEFAULT ` + sqliteNow + `
)`
	}
}

// recordVersionSQL creates the version table if needed and records version.
func recordVersionSQL(d Dialect, table string, version int) []string {
	t := d.quote(table + suffixSchema)
	v := strconv.Itoa(version)
	var ins string
	switch d.Name() {
	case "postgres":
		ins = `INSERT INTO ` + t + ` (version) VALUES (` + v + `) ON CONFLICT (version) DO NOTHING`
	case "mysql":
		ins = `INSERT IGNORE INTO ` + t + ` (version) VALUES (` + v + `)`
	default:
		ins = `INSERT OR IGNORE INTO ` + t + ` (version) VALUES (` + v + `)`
	}
	return []string{versionDDL(d, table), ins}
}

// MigrateResult says what Migrate did.
type MigrateResult struct {
	// From is the version the database was at (0: none recorded), To the
	// version it is at now.
	From, To int
	// Applied lists the versions applied by this call (none when another
	// runner got there first or the database was current).
	Applied []int
}

// Migrate brings the schema of the outbox table named table up to
// SchemaVersion: it applies, in order, every version the database has not
// recorded, and records each. It is idempotent, and safe to run from
// several processes at once (every replica at start-up, a deploy job):
// runners serialize on a lock — pg_advisory_lock on PostgreSQL, GET_LOCK on
// MySQL/MariaDB, the write lock of a transaction on SQLite — and the second
// finds the versions recorded. A database newer than the code returns a
// *SchemaError wrapping ErrSchemaNewer and changes nothing.
//
// Like InitializeSchema it must run on a *sql.DB, not in a transaction.
func Migrate(ctx context.Context, db *sql.DB, d Dialect, table string) (MigrateResult, error) {
	if d == nil {
		return MigrateResult{}, fmt.Errorf("outbox: nil Dialect; use outbox.PostgreSQL, outbox.MySQL or outbox.SQLite")
	}
	if err := ValidateTableName(table); err != nil {
		return MigrateResult{}, err
	}
	wrap := func(err error) error { return fmt.Errorf("outbox: migrate %q: %w", table, err) }
	conn, err := db.Conn(ctx)
	if err != nil {
		return MigrateResult{}, wrap(err)
	}
	defer conn.Close()
	unlock, err := migrationLock(ctx, conn, d, table)
	if err != nil {
		return MigrateResult{}, wrap(err)
	}
	res, err := migrateLocked(ctx, conn, d, table)
	if uerr := unlock(err); uerr != nil && err == nil {
		err = uerr
	}
	if err != nil {
		var se *SchemaError
		if errors.As(err, &se) {
			return res, err
		}
		return res, wrap(err)
	}
	return res, nil
}

// migrateLocked is Migrate under the lock.
func migrateLocked(ctx context.Context, conn *sql.Conn, d Dialect, table string) (MigrateResult, error) {
	var res MigrateResult
	applied, err := appliedVersions(ctx, conn, d, table)
	if err != nil {
		return res, err
	}
	if n := len(applied); n > 0 {
		res.From = applied[n-1].Version
	}
	res.To = res.From
	if res.From > SchemaVersion {
		st := SchemaState{Table: table, Current: res.From, Latest: SchemaVersion, Applied: applied}
		return res, &SchemaError{State: st, Err: ErrSchemaNewer}
	}
	for v := 1; v <= SchemaVersion; v++ {
		if slices.ContainsFunc(applied, func(a AppliedVersion) bool { return a.Version == v }) {
			continue
		}
		stmts, _ := MigrationSQL(d, table, v)
		for _, s := range stmts {
			if _, err := conn.ExecContext(ctx, s); err != nil {
				return res, fmt.Errorf("version %d: %w\nstatement: %s", v, err, s)
			}
		}
		res.Applied = append(res.Applied, v)
		res.To = max(res.To, v)
	}
	return res, nil
}

// migrationLock takes the lock concurrent migrations of table serialize on;
// unlock releases it, told whether the migration failed. On SQLite the lock
// is a BEGIN IMMEDIATE transaction around the whole migration (DDL is
// transactional there): unlock commits it, or rolls it back on failure.
// MySQL commits DDL implicitly, so a failed version is left half-applied
// there; every statement is idempotent, and the next run completes it.
func migrationLock(ctx context.Context, conn *sql.Conn, d Dialect, table string) (unlock func(failed error) error, err error) {
	name := "tailrace_migrate:" + table
	switch d.Name() {
	case "postgres":
		// Per database: the same table name in two schemas shares the
		// lock, which only makes them wait for each other briefly.
		h := fnv.New64a()
		_, _ = h.Write([]byte(name))
		key := int64(h.Sum64())
		if _, err := conn.ExecContext(ctx, `SELECT pg_advisory_lock($1)`, key); err != nil {
			return nil, fmt.Errorf("take the migration lock: %w", err)
		}
		return func(error) error {
			_, err := conn.ExecContext(context.WithoutCancel(ctx), `SELECT pg_advisory_unlock($1)`, key)
			return err
		}, nil
	case "mysql":
		// GET_LOCK names are server-wide and at most 64 characters.
		var db string
		_ = conn.QueryRowContext(ctx, `SELECT COALESCE(DATABASE(), '')`).Scan(&db)
		h := fnv.New64a()
		_, _ = h.Write([]byte(db + "." + name))
		lock := fmt.Sprintf("tailrace_migrate_%x", h.Sum64())
		var got sql.NullInt64
		if err := conn.QueryRowContext(ctx, `SELECT GET_LOCK(?, 120)`, lock).Scan(&got); err != nil {
			return nil, fmt.Errorf("take the migration lock: %w", err)
		}
		if !got.Valid || got.Int64 != 1 {
			return nil, errors.New("take the migration lock: timed out after 120 s (another migration runs?)")
		}
		return func(error) error {
			_, err := conn.ExecContext(context.WithoutCancel(ctx), `SELECT RELEASE_LOCK(?)`, lock)
			return err
		}, nil
	}
	// SQLite: the write lock, taken before the versions are read.
	if _, err := conn.ExecContext(ctx, `BEGIN IMMEDIATE`); err != nil {
		return nil, fmt.Errorf("take the write lock: %w", err)
	}
	return func(failed error) error {
		if failed != nil {
			_, err := conn.ExecContext(context.WithoutCancel(ctx), `ROLLBACK`)
			return err
		}
		_, err := conn.ExecContext(context.WithoutCancel(ctx), `COMMIT`)
		return err
	}, nil
}

// queryer is what appliedVersions and tableExists read through.
type queryer interface {
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
}

// appliedVersions reads <table>_schema, by version; none when the table
// does not exist.
func appliedVersions(ctx context.Context, q queryer, d Dialect, table string) ([]AppliedVersion, error) {
	if ok, err := tableExists(ctx, q, d, table+suffixSchema); err != nil || !ok {
		return nil, err
	}
	rows, err := q.QueryContext(ctx, `SELECT version, applied_at FROM `+d.quote(table+suffixSchema)+` ORDER BY version`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []AppliedVersion
	for rows.Next() {
		var a AppliedVersion
		var at any
		if err := rows.Scan(&a.Version, &at); err != nil {
			return nil, err
		}
		a.AppliedAt = asTime(at)
		out = append(out, a)
	}
	return out, rows.Err()
}

// tableExists reports whether name exists, by selecting nothing from it.
// Any error but "no such table" (an unreachable database) is returned.
func tableExists(ctx context.Context, q queryer, d Dialect, name string) (bool, error) {
	rows, err := q.QueryContext(ctx, `SELECT 1 FROM `+d.quote(name)+` WHERE 1 = 0`)
	if err != nil {
		if isNoSuchTable(err) {
			return false, nil
		}
		return false, err
	}
	_ = rows.Close()
	return true, nil
}

// isNoSuchTable reports whether err says a table does not exist:
// SQLSTATE 42P01 on PostgreSQL, error 1146 on MySQL/MariaDB, "no such
// table" on SQLite.
func isNoSuchTable(err error) bool {
	msg := err.Error()
	return strings.Contains(msg, "42P01") || strings.Contains(msg, "Error 1146") || strings.Contains(msg, "no such table")
}

// CheckSchema compares the schema of the outbox table named table with
// this code. It returns the state and, when they do not match, a
// *SchemaError wrapping ErrSchemaMissing (a required table does not
// exist), ErrSchemaNewer or ErrSchemaOlder. A database whose tables exist
// but that records no version (created before versions were recorded)
// counts as older.
func CheckSchema(ctx context.Context, db *sql.DB, d Dialect, table string) (SchemaState, error) {
	st := SchemaState{Table: table, Latest: SchemaVersion, Applied: []AppliedVersion{}}
	if d == nil {
		return st, fmt.Errorf("outbox: nil Dialect; use outbox.PostgreSQL, outbox.MySQL or outbox.SQLite")
	}
	if err := ValidateTableName(table); err != nil {
		return st, err
	}
	applied, err := appliedVersions(ctx, db, d, table)
	if err != nil {
		return st, fmt.Errorf("outbox: read the schema version of %q: %w", table, err)
	}
	if len(applied) > 0 {
		st.Applied = applied
		st.Current = applied[len(applied)-1].Version
	}
	for _, name := range []string{table, table + suffixDead, table + suffixLeases, table + suffixRelays} {
		ok, err := tableExists(ctx, db, d, name)
		if err != nil {
			return st, fmt.Errorf("outbox: check the schema of %q: %w", table, err)
		}
		if !ok {
			st.Missing = append(st.Missing, name)
		}
	}
	switch {
	case st.Current > SchemaVersion:
		return st, &SchemaError{State: st, Err: ErrSchemaNewer}
	case len(st.Missing) > 0:
		return st, &SchemaError{State: st, Err: ErrSchemaMissing}
	case st.Current < SchemaVersion:
		return st, &SchemaError{State: st, Err: ErrSchemaOlder}
	}
	return st, nil
}

// checkSchemaAtStart is the check Relay.Run makes: a newer or missing
// schema stops the relay with a clear error; an older one is logged at
// WARN and the relay runs (every version so far only adds, and a database
// created before versions were recorded has everything version 1 needs).
//
// A database that cannot be read (within 15 s) is an outage, not a schema
// problem: it is logged and the relay starts, to ride it out as it does any
// outage.
func checkSchemaAtStart(ctx context.Context, db *sql.DB, d Dialect, table string, logger *slog.Logger) error {
	// Bounded: a database that does not answer is an outage, for the relay
	// to ride out, not a reason to hang before it starts.
	cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	_, err := CheckSchema(cctx, db, d, table)
	var se *SchemaError
	switch {
	case err == nil:
		return nil
	case errors.Is(err, ErrSchemaOlder):
		logger.WarnContext(ctx, err.Error())
		return nil
	case errors.As(err, &se):
		return err
	}
	logger.WarnContext(ctx, "outbox relay: cannot check the schema version at start; starting anyway", "error", err.Error())
	return nil
}
