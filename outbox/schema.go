package outbox

import (
	"context"
	"database/sql"
	"fmt"
	"hash/fnv"
	"strings"
)

// Dialect is the SQL dialect of the database that holds the outbox. Use one
// of PostgreSQL, MySQL (also MariaDB) and SQLite; the set is closed because
// each dialect is tested against a real server.
type Dialect interface {
	// Name is "postgres", "mysql" or "sqlite".
	Name() string

	// quote returns ident quoted for this dialect. ident must have passed
	// ValidateTableName (plus a fixed suffix).
	quote(ident string) string
	// outboxDDL returns the statements that create the outbox table and its
	// indexes (and triggers) if they do not exist.
	outboxDDL(table string) []string
	// deadDDL returns the statements that create the dead-letter table.
	deadDDL(table string) []string
}

// The dialects tailrace supports.
var (
	// PostgreSQL 13 or later, through the pgx stdlib driver. Relays LISTEN
	// on the channel named after the outbox table; run NotifyPostgres in
	// processes that stage messages so relays in other processes wake up on
	// commit. (There is deliberately no NOTIFY trigger: PostgreSQL
	// serializes the commits of transactions that NOTIFY, which cost about
	// 40% of the staging commit rate here.)
	PostgreSQL Dialect = postgresDialect{}
	// MySQL 8 or MariaDB 10.6 or later, through go-sql-driver/mysql with
	// parseTime=true.
	MySQL Dialect = mysqlDialect{}
	// SQLite through modernc.org/sqlite (pure Go, no cgo): the embedded
	// default. Open it with WAL journal mode, a busy timeout and
	// _txlock=immediate (BEGIN IMMEDIATE), e.g.
	// "file:app.db?_pragma=journal_mode(WAL)&_pragma=busy_timeout(5000)&_txlock=immediate":
	// without the last, a handler that reads before it writes fails with
	// SQLITE_BUSY under concurrent writers.
	SQLite Dialect = sqliteDialect{}
)

// Names of the objects derived from an outbox table name. Each suffix is at
// most 8 bytes; see MaxTableNameLen.
const (
	suffixDead    = "_dead"
	suffixLeases  = "_leases"
	suffixRelays  = "_relays"
	suffixPending = "_pending"
	suffixClaimed = "_claimed"
	suffixRelayed = "_relayed"
	suffixDeadAt  = "_dead_at"
)

// keyHash is the 31-bit FNV-1a hash of a partition key, stored in the
// key_hash column. Relays own partitions key_hash % partitions, so all
// messages of one key go through one relay at a time, in order. Messages
// without a key hash their message id, which spreads them evenly.
func keyHash(key string) int32 {
	h := fnv.New32a()
	_, _ = h.Write([]byte(key))
	return int32(h.Sum32() & 0x7fffffff)
}

// SchemaSQL returns the statements that create the outbox table named table
// and everything the relay needs next to it (dead letters, relay leases), at
// SchemaVersion, with the statements that record the versions in
// <table>_schema, in order: every version's MigrationSQL. Every statement is
// idempotent (IF NOT EXISTS, insert-or-ignore). The name is validated first.
// Migration tools that keep one file per version take MigrationSQL instead.
func SchemaSQL(d Dialect, table string) ([]string, error) {
	var stmts []string
	for v := 1; v <= SchemaVersion; v++ {
		s, err := MigrationSQL(d, table, v)
		if err != nil {
			return nil, err
		}
		stmts = append(stmts, s...)
	}
	return stmts, nil
}

// InitializeSchema creates the outbox table named table and its companions
// if they do not exist, or upgrades them to SchemaVersion: it is Migrate,
// with the same lock, so replicas may all run it at start-up. It must run
// on a *sql.DB, not inside the caller's transaction: DDL commits implicitly
// on MySQL, which is why watermill-sql refuses to initialize a schema on a
// transaction. Run it at start-up, run `tailrace migrate up`, or take the
// statements from MigrationSQL into your migrations.
func InitializeSchema(ctx context.Context, db *sql.DB, d Dialect, table string) error {
	_, err := Migrate(ctx, db, d, table)
	return err
}

// ---------------------------------------------------------------- PostgreSQL

type postgresDialect struct{}

func (postgresDialect) Name() string { return "postgres" }

func (postgresDialect) quote(ident string) string { return `"` + ident + `"` }

func (d postgresDialect) outboxDDL(table string) []string {
	t := d.quote(table)
	return []string{
		`CREATE TABLE IF NOT EXISTS ` + t + ` (
	id              BIGSERIAL PRIMARY KEY,
	uuid            TEXT        NOT NULL,
	message_id      TEXT        NOT NULL,
	kind            TEXT        NOT NULL DEFAULT '',
	partition_key   TEXT        NOT NULL DEFAULT '',
	key_hash        INTEGER     NOT NULL,
	payload         BYTEA       NOT NULL,
	metadata        JSONB       NOT NULL DEFAULT '{}',
	attempts        INTEGER     NOT NULL DEFAULT 0,
	next_attempt_at TIMESTAMPTZ,
	last_error      TEXT,
	claim_token     BIGINT,
	created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
	relayed_at      TIMESTAMPTZ
)`,
		// Unclaimed rows in commit-id order: what a relay claims next.
		`CREATE INDEX IF NOT EXISTS ` + d.quote(table+suffixPending) + ` ON ` + t + ` (id) WHERE claim_token IS NULL`,
		// Claimed but not yet relayed: what a relay taking over a partition resets.
		`CREATE INDEX IF NOT EXISTS ` + d.quote(table+suffixClaimed) + ` ON ` + t + ` (key_hash) WHERE claim_token IS NOT NULL AND relayed_at IS NULL`,
		// Relayed rows kept for a retention period: what cleanup prunes.
		`CREATE INDEX IF NOT EXISTS ` + d.quote(table+suffixRelayed) + ` ON ` + t + ` (relayed_at) WHERE relayed_at IS NOT NULL`,
	}
}

func (d postgresDialect) deadDDL(table string) []string {
	return []string{
		`CREATE TABLE IF NOT EXISTS ` + d.quote(table+suffixDead) + ` (
	id            BIGINT      PRIMARY KEY,
	uuid          TEXT        NOT NULL,
	message_id    TEXT        NOT NULL,
	kind          TEXT        NOT NULL DEFAULT '',
	partition_key TEXT        NOT NULL DEFAULT '',
	key_hash      INTEGER     NOT NULL,
	payload       BYTEA       NOT NULL,
	metadata      JSONB       NOT NULL DEFAULT '{}',
	attempts      INTEGER     NOT NULL,
	last_error    TEXT        NOT NULL,
	created_at    TIMESTAMPTZ NOT NULL,
	dead_at       TIMESTAMPTZ NOT NULL DEFAULT now()
)`,
		`CREATE INDEX IF NOT EXISTS ` + d.quote(table+suffixDeadAt) + ` ON ` + d.quote(table+suffixDead) + ` (dead_at)`,
	}
}

// --------------------------------------------------------------------- MySQL

type mysqlDialect struct{}

func (mysqlDialect) Name() string { return "mysql" }

func (mysqlDialect) quote(ident string) string { return "`" + ident + "`" }

func (d mysqlDialect) outboxDDL(table string) []string {
	return []string{
		`CREATE TABLE IF NOT EXISTS ` + d.quote(table) + ` (
	id              BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
	uuid            VARCHAR(64)  NOT NULL,
	message_id      VARCHAR(255) NOT NULL,
	kind            VARCHAR(255) NOT NULL DEFAULT '',
	partition_key   VARCHAR(255) NOT NULL DEFAULT '',
	key_hash        INT          NOT NULL,
	payload         LONGBLOB     NOT NULL,
	metadata        JSON         NOT NULL,
	attempts        INT          NOT NULL DEFAULT 0,
	next_attempt_at DATETIME(6)  NULL,
	last_error      TEXT         NULL,
	claim_token     BIGINT       NULL,
	created_at      DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
	relayed_at      DATETIME(6)  NULL,
	KEY ` + d.quote(table+suffixPending) + ` (claim_token, id),
	KEY ` + d.quote(table+suffixRelayed) + ` (relayed_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin`,
	}
}

func (d mysqlDialect) deadDDL(table string) []string {
	return []string{
		`CREATE TABLE IF NOT EXISTS ` + d.quote(table+suffixDead) + ` (
	id            BIGINT       NOT NULL PRIMARY KEY,
	uuid          VARCHAR(64)  NOT NULL,
	message_id    VARCHAR(255) NOT NULL,
	kind          VARCHAR(255) NOT NULL DEFAULT '',
	partition_key VARCHAR(255) NOT NULL DEFAULT '',
	key_hash      INT          NOT NULL,
	payload       LONGBLOB     NOT NULL,
	metadata      JSON         NOT NULL,
	attempts      INT          NOT NULL,
	last_error    TEXT         NOT NULL,
	created_at    DATETIME(6)  NOT NULL,
	dead_at       DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
	KEY ` + d.quote(table+suffixDeadAt) + ` (dead_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin`,
	}
}

// -------------------------------------------------------------------- SQLite

type sqliteDialect struct{}

func (sqliteDialect) Name() string { return "sqlite" }

func (sqliteDialect) quote(ident string) string { return `"` + ident + `"` }

// sqliteNow is SQLite's current time as RFC 3339 UTC text with milliseconds;
// such strings sort in time order.
const sqliteNow = `(strftime('%Y-%m-%dT%H:%M:%fZ','now'))`

func (d sqliteDialect) outboxDDL(table string) []string {
	t := d.quote(table)
	return []string{
		`CREATE TABLE IF NOT EXISTS ` + t + ` (
	id              INTEGER PRIMARY KEY AUTOINCREMENT,
	uuid            TEXT    NOT NULL,
	message_id      TEXT    NOT NULL,
	kind            TEXT    NOT NULL DEFAULT '',
	partition_key   TEXT    NOT NULL DEFAULT '',
	key_hash        INTEGER NOT NULL,
	payload         BLOB    NOT NULL,
	metadata        TEXT    NOT NULL DEFAULT '{}',
	attempts        INTEGER NOT NULL DEFAULT 0,
	next_attempt_at TEXT,
	last_error      TEXT,
	claim_token     INTEGER,
	created_at      TEXT    NOT NULL DEFAULT ` + sqliteNow + `,
	relayed_at      TEXT
)`,
		`CREATE INDEX IF NOT EXISTS ` + d.quote(table+suffixPending) + ` ON ` + t + ` (id) WHERE claim_token IS NULL`,
		`CREATE INDEX IF NOT EXISTS ` + d.quote(table+suffixClaimed) + ` ON ` + t + ` (key_hash) WHERE claim_token IS NOT NULL AND relayed_at IS NULL`,
		`CREATE INDEX IF NOT EXISTS ` + d.quote(table+suffixRelayed) + ` ON ` + t + ` (relayed_at) WHERE relayed_at IS NOT NULL`,
	}
}

func (d sqliteDialect) deadDDL(table string) []string {
	return []string{
		`CREATE TABLE IF NOT EXISTS ` + d.quote(table+suffixDead) + ` (
	id            INTEGER PRIMARY KEY,
	uuid          TEXT    NOT NULL,
	message_id    TEXT    NOT NULL,
	kind          TEXT    NOT NULL DEFAULT '',
	partition_key TEXT    NOT NULL DEFAULT '',
	key_hash      INTEGER NOT NULL,
	payload       BLOB    NOT NULL,
	metadata      TEXT    NOT NULL DEFAULT '{}',
	attempts      INTEGER NOT NULL,
	last_error    TEXT    NOT NULL,
	created_at    TEXT    NOT NULL,
	dead_at       TEXT    NOT NULL DEFAULT ` + sqliteNow + `
)`,
		`CREATE INDEX IF NOT EXISTS ` + d.quote(table+suffixDeadAt) + ` ON ` + d.quote(table+suffixDead) + ` (dead_at)`,
	}
}

// placeholders returns n bind markers for d starting at the 1-based position
// start: "$3, $4" on PostgreSQL, "?, ?" elsewhere.
func placeholders(d Dialect, start, n int) string {
	var b strings.Builder
	for i := 0; i < n; i++ {
		if i > 0 {
			b.WriteString(", ")
		}
		if d.Name() == "postgres" {
			fmt.Fprintf(&b, "$%d", start+i)
		} else {
			b.WriteByte('?')
		}
	}
	return b.String()
}
