// Package testenv gives tests isolated access to the local services
// (PostgreSQL, MariaDB/MySQL, RabbitMQ, NATS, Redis) and decides what happens
// when one is missing.
//
// Every helper reads its address from an environment variable
// (TAILRACE_POSTGRES_URL, TAILRACE_MYSQL_DSN, TAILRACE_AMQP_URL,
// TAILRACE_NATS_URL, TAILRACE_REDIS_ADDR) and defaults to the local service
// on loopback. When the service cannot be reached the test is skipped with a
// loud reason, unless TAILRACE_REQUIRE_SERVICES=1 is set (CI sets it), in
// which case the test fails: a service test never silently turns into a skip
// in CI.
//
// Each helper hands out something of the test's own — a PostgreSQL schema, a
// MySQL database, a unique name prefix — and removes it when the test ends, so
// tests can run in parallel and be rerun.
package testenv

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"
	_ "github.com/jackc/pgx/v5/stdlib" // registers the "pgx" driver
	_ "modernc.org/sqlite"             // registers the "sqlite" driver
)

// Defaults for the local services.
const (
	DefaultPostgresURL = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"
	DefaultMySQLDSN    = "root@tcp(127.0.0.1:3306)/test"
	DefaultAMQPURL     = "amqp://guest:guest@127.0.0.1:5672/"
	DefaultNATSURL     = "nats://127.0.0.1:4222"
	DefaultRedisAddr   = "127.0.0.1:6379"
)

// RequireServices reports whether TAILRACE_REQUIRE_SERVICES asks for service
// tests to fail rather than skip when a service is unreachable.
func RequireServices() bool {
	v := os.Getenv("TAILRACE_REQUIRE_SERVICES")
	return v != "" && v != "0" && !strings.EqualFold(v, "false")
}

// unavailable skips or fails the test, depending on RequireServices.
func unavailable(t testing.TB, service, addr string, err error) {
	t.Helper()
	msg := fmt.Sprintf("testenv: %s is not reachable at %s: %v", service, addr, err)
	if RequireServices() {
		t.Fatalf("%s (TAILRACE_REQUIRE_SERVICES is set, so this fails instead of skipping)", msg)
	}
	recordSkip(t, service, addr)
	t.Skipf("SKIPPING: %s (start the service or set its TAILRACE_* variable; see docs/testing.md)", msg)
}

// SkipLogEnv names the file that unavailable appends one line to per
// skipped test ("service<TAB>address<TAB>test"), so that `make test` can end
// with a summary: go test shows a skip message only with -v.
const SkipLogEnv = "TAILRACE_SKIP_LOG"

// recordSkip appends the skip to the file named by $TAILRACE_SKIP_LOG, if
// set. Lines are short single writes with O_APPEND, so the test binaries
// that go test runs in parallel do not interleave them.
func recordSkip(t testing.TB, service, addr string) {
	path := os.Getenv(SkipLogEnv)
	if path == "" {
		return
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		t.Logf("testenv: record the skip in %s: %v", path, err)
		return
	}
	defer f.Close()
	if _, err := fmt.Fprintf(f, "%s\t%s\t%s\n", service, addr, t.Name()); err != nil {
		t.Logf("testenv: record the skip in %s: %v", path, err)
	}
}

func env(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

// UniqueName returns prefix followed by an underscore and 12 random hex digits,
// lower case, usable as a schema, database, queue, stream or table name.
func UniqueName(prefix string) string {
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	return prefix + "_" + hex.EncodeToString(b[:])
}

var nonIdent = regexp.MustCompile(`[^a-z0-9_]+`)

// nameFor derives a short identifier from the test's name.
func nameFor(t testing.TB, prefix string) string {
	n := strings.ToLower(t.Name())
	n = nonIdent.ReplaceAllString(n, "_")
	if len(n) > 20 {
		n = n[len(n)-20:]
	}
	n = strings.Trim(n, "_")
	return UniqueName(prefix + "_" + n)
}

// dialCheck fails fast when nothing listens at host:port.
func dialCheck(hostport string) error {
	c, err := net.DialTimeout("tcp", hostport, 2*time.Second)
	if err != nil {
		return err
	}
	return c.Close()
}

// PostgresURL returns the base PostgreSQL URL (no per-test schema), skipping or
// failing the test when the server is unreachable.
func PostgresURL(t testing.TB) string {
	t.Helper()
	raw := env("TAILRACE_POSTGRES_URL", DefaultPostgresURL)
	u, err := url.Parse(raw)
	if err != nil {
		t.Fatalf("testenv: TAILRACE_POSTGRES_URL is not a URL: %v", err)
	}
	if err := dialCheck(u.Host); err != nil {
		unavailable(t, "PostgreSQL", u.Host, err)
	}
	return raw
}

// Postgres is an isolated PostgreSQL schema for one test.
type Postgres struct {
	// URL connects with search_path set to Schema, so unqualified names
	// resolve inside the test's schema.
	URL string
	// Schema is the name of the test's own schema.
	Schema string
	// DB is a pool on URL, closed when the test ends.
	DB *sql.DB
}

// NewPostgres creates a fresh schema, returns a pool whose search_path is that
// schema, and drops the schema (CASCADE) when the test ends. The pool is kept
// small (8 connections) so parallel tests stay within max_connections.
func NewPostgres(t testing.TB) *Postgres {
	t.Helper()
	return newPostgres(t, nil)
}

// NewPostgresGenericPlans is NewPostgres with plan_cache_mode set to
// force_generic_plan on every connection of the pool: each prepared statement
// runs with a plan built without looking at its parameter values, from the
// table statistics at the time it was prepared. That is the plan PostgreSQL
// switches to on its own after five executions of a statement pgx keeps in its
// per-connection cache, so a statement that is only fast with a custom plan
// shows up here at once instead of after a service has idled for a while.
func NewPostgresGenericPlans(t testing.TB) *Postgres {
	t.Helper()
	return newPostgres(t, map[string]string{"plan_cache_mode": "force_generic_plan"})
}

// newPostgres creates the schema; params are run-time parameters set on every
// connection of the returned pool.
func newPostgres(t testing.TB, params map[string]string) *Postgres {
	t.Helper()
	base := PostgresURL(t)
	schema := nameFor(t, "t")

	admin, err := sql.Open("pgx", base)
	if err != nil {
		t.Fatalf("testenv: open PostgreSQL: %v", err)
	}
	defer admin.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := admin.ExecContext(ctx, "CREATE SCHEMA "+schema); err != nil {
		unavailable(t, "PostgreSQL", base, err)
	}
	t.Cleanup(func() {
		adm, err := sql.Open("pgx", base)
		if err != nil {
			t.Errorf("testenv: reopen PostgreSQL for cleanup: %v", err)
			return
		}
		defer adm.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if _, err := adm.ExecContext(ctx, "DROP SCHEMA IF EXISTS "+schema+" CASCADE"); err != nil {
			t.Logf("testenv: drop schema %s: %v", schema, err)
		}
	})

	u, _ := url.Parse(base)
	q := u.Query()
	q.Set("search_path", schema)
	for k, v := range params {
		q.Set(k, v) // pgx sends unknown URL parameters as run-time parameters
	}
	u.RawQuery = q.Encode()
	db, err := sql.Open("pgx", u.String())
	if err != nil {
		t.Fatalf("testenv: open PostgreSQL schema pool: %v", err)
	}
	db.SetMaxOpenConns(8)
	db.SetMaxIdleConns(8)
	t.Cleanup(func() { _ = db.Close() })
	return &Postgres{URL: u.String(), Schema: schema, DB: db}
}

// MySQL is an isolated MariaDB/MySQL database for one test.
type MySQL struct {
	// DSN is a go-sql-driver/mysql DSN for the test's database, with
	// parseTime=true.
	DSN string
	// Database is the name of the test's own database.
	Database string
	// DB is a pool on DSN, closed when the test ends.
	DB *sql.DB
}

// NewMySQL creates a fresh database, returns a pool on it and drops the
// database when the test ends.
func NewMySQL(t testing.TB) *MySQL {
	t.Helper()
	raw := env("TAILRACE_MYSQL_DSN", DefaultMySQLDSN)
	cfg, err := mysql.ParseDSN(raw)
	if err != nil {
		t.Fatalf("testenv: TAILRACE_MYSQL_DSN is not a DSN: %v", err)
	}
	if err := dialCheck(cfg.Addr); err != nil {
		unavailable(t, "MariaDB/MySQL", cfg.Addr, err)
	}
	name := nameFor(t, "t")
	admin, err := sql.Open("mysql", cfg.FormatDSN())
	if err != nil {
		t.Fatalf("testenv: open MySQL: %v", err)
	}
	defer admin.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := admin.ExecContext(ctx, "CREATE DATABASE "+name); err != nil {
		unavailable(t, "MariaDB/MySQL", cfg.Addr, err)
	}
	t.Cleanup(func() {
		adm, err := sql.Open("mysql", cfg.FormatDSN())
		if err != nil {
			t.Errorf("testenv: reopen MySQL for cleanup: %v", err)
			return
		}
		defer adm.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if _, err := adm.ExecContext(ctx, "DROP DATABASE IF EXISTS "+name); err != nil {
			t.Logf("testenv: drop database %s: %v", name, err)
		}
	})
	cfg.DBName = name
	cfg.ParseTime = true
	dsn := cfg.FormatDSN()
	db, err := sql.Open("mysql", dsn)
	if err != nil {
		t.Fatalf("testenv: open MySQL database pool: %v", err)
	}
	db.SetMaxOpenConns(8)
	db.SetMaxIdleConns(8)
	t.Cleanup(func() { _ = db.Close() })
	return &MySQL{DSN: dsn, Database: name, DB: db}
}

// SQLite is a fresh SQLite database file in the test's temporary directory.
type SQLite struct {
	// Path is the database file.
	Path string
	// DSN opens Path with the modernc.org/sqlite driver ("sqlite"), WAL
	// journal, a 30 s busy timeout (concurrent writers queue for SQLite's
	// one write lock, slowly on a loaded CI machine) and BEGIN IMMEDIATE
	// (_txlock=immediate):
	// a transaction that reads before it writes would otherwise fail with
	// SQLITE_BUSY under concurrent writers instead of waiting.
	DSN string
	// DB is a pool on DSN, closed when the test ends.
	DB *sql.DB
}

// NewSQLite opens a new SQLite database in t.TempDir(). SQLite needs no
// service, so this never skips.
func NewSQLite(t testing.TB) *SQLite {
	t.Helper()
	path := filepath.Join(t.TempDir(), "tailrace.db")
	dsn := "file:" + path + "?_pragma=journal_mode(WAL)&_pragma=busy_timeout(30000)&_pragma=foreign_keys(1)&_txlock=immediate"
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		t.Fatalf("testenv: open SQLite: %v", err)
	}
	t.Cleanup(func() { _ = db.Close() })
	// Put the fresh file in WAL mode on one connection now: connections
	// that open a fresh file at the same moment race to switch its journal
	// mode, and the loser's pragma fails with SQLITE_BUSY without waiting
	// for the busy timeout.
	if err := db.Ping(); err != nil {
		t.Fatalf("testenv: open SQLite: %v", err)
	}
	return &SQLite{Path: path, DSN: dsn, DB: db}
}

// AMQPURL returns the RabbitMQ URL, skipping or failing the test when the
// broker is unreachable. Tests isolate themselves with names from UniqueName.
func AMQPURL(t testing.TB) string {
	t.Helper()
	raw := env("TAILRACE_AMQP_URL", DefaultAMQPURL)
	u, err := url.Parse(raw)
	if err != nil {
		t.Fatalf("testenv: TAILRACE_AMQP_URL is not a URL: %v", err)
	}
	if err := dialCheck(u.Host); err != nil {
		unavailable(t, "RabbitMQ", u.Host, err)
	}
	return raw
}

// NATSURL returns the NATS (JetStream) URL, skipping or failing the test when
// the server is unreachable. Tests isolate themselves with stream and subject
// names from UniqueName.
func NATSURL(t testing.TB) string {
	t.Helper()
	raw := env("TAILRACE_NATS_URL", DefaultNATSURL)
	u, err := url.Parse(raw)
	if err != nil {
		t.Fatalf("testenv: TAILRACE_NATS_URL is not a URL: %v", err)
	}
	if err := dialCheck(u.Host); err != nil {
		unavailable(t, "NATS", u.Host, err)
	}
	return raw
}

// RedisAddr returns the Redis host:port, skipping or failing the test when
// the server is unreachable. Tests isolate themselves with key prefixes from
// UniqueName.
func RedisAddr(t testing.TB) string {
	t.Helper()
	addr := env("TAILRACE_REDIS_ADDR", DefaultRedisAddr)
	if err := dialCheck(addr); err != nil {
		unavailable(t, "Redis", addr, err)
	}
	return addr
}

// snapshotLockKey is the PostgreSQL advisory lock behind LongTransaction and
// WatermillSQLConsumer.
const snapshotLockKey = 0x7461696c72616365 // "tailrace"

// LongTransaction marks a test that keeps a PostgreSQL transaction open for
// seconds (out-of-order commits, a long-running transaction). Until the test
// ends it holds an advisory lock that WatermillSQLConsumer tests share, so
// the two kinds never overlap, across packages too: watermill-sql's
// PostgreSQL subscriber reads only messages whose transaction is older than
// the oldest transaction still open anywhere in the cluster
// (pg_snapshot_xmin), so while such a transaction is open it delivers
// nothing new, and a test reading through it times out.
func LongTransaction(t testing.TB) { snapshotLock(t, "pg_advisory_lock") }

// WatermillSQLConsumer marks a test that consumes through watermill-sql's
// PostgreSQL subscriber (bus/sqlbus): it shares the lock LongTransaction
// tests hold exclusively, until the test ends. See LongTransaction.
func WatermillSQLConsumer(t testing.TB) { snapshotLock(t, "pg_advisory_lock_shared") }

func snapshotLock(t testing.TB, fn string) {
	t.Helper()
	db, err := sql.Open("pgx", PostgresURL(t))
	if err != nil {
		t.Fatalf("testenv: open PostgreSQL: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	conn, err := db.Conn(ctx)
	if err == nil {
		_, err = conn.ExecContext(ctx, "SELECT "+fn+"($1)", int64(snapshotLockKey))
	}
	if err != nil {
		_ = db.Close()
		t.Fatalf("testenv: %s: %v", fn, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, _ = conn.ExecContext(ctx, "SELECT pg_advisory_unlock_all()")
		_ = conn.Close()
		_ = db.Close() // ends the session, which releases the lock in any case
	})
}
