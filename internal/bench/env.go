// Package bench is the harness behind cmd/tailrace-bench: it measures
// tailrace's relay side by side with Watermill's stock forwarder on the
// same PostgreSQL server, the same RabbitMQ broker, the same payloads and
// the same counting consumer.
//
// Every measurement runs in its own PostgreSQL schema and on its own
// uniquely named RabbitMQ queue, both removed when it ends; every wait is
// bounded in time; only the local (loopback) services are used.
package bench

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"fmt"
	"net/url"
	"os"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // registers the "pgx" driver
)

// Defaults for the local services; TAILRACE_POSTGRES_URL and
// TAILRACE_AMQP_URL override them, as in the tests.
const (
	DefaultPostgresURL = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"
	DefaultAMQPURL     = "amqp://guest:guest@127.0.0.1:5672/"
)

// Env names the services a run uses.
type Env struct {
	PostgresURL string
	AMQPURL     string
}

// EnvFromOS reads TAILRACE_POSTGRES_URL and TAILRACE_AMQP_URL, defaulting
// to the local services.
func EnvFromOS() Env {
	e := Env{PostgresURL: DefaultPostgresURL, AMQPURL: DefaultAMQPURL}
	if v := os.Getenv("TAILRACE_POSTGRES_URL"); v != "" {
		e.PostgresURL = v
	}
	if v := os.Getenv("TAILRACE_AMQP_URL"); v != "" {
		e.AMQPURL = v
	}
	return e
}

// UniqueName returns prefix + "_" + 12 random hex digits: a valid,
// unquoted PostgreSQL identifier and RabbitMQ name.
func UniqueName(prefix string) string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return prefix + "_" + hex.EncodeToString(b[:])
}

// Schema is one PostgreSQL schema of one measurement.
type Schema struct {
	Name string
	// URL connects with search_path set to the schema.
	URL string
	// DB is a pool of 8 connections on URL.
	DB   *sql.DB
	base string
}

// NewSchema creates a fresh schema on the server of e.PostgresURL.
func (e Env) NewSchema(ctx context.Context) (*Schema, error) {
	name := UniqueName("bench")
	admin, err := sql.Open("pgx", e.PostgresURL)
	if err != nil {
		return nil, err
	}
	defer admin.Close()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if _, err := admin.ExecContext(ctx, "CREATE SCHEMA "+name); err != nil {
		return nil, fmt.Errorf("bench: create schema: %w", err)
	}
	u, err := url.Parse(e.PostgresURL)
	if err != nil {
		return nil, err
	}
	q := u.Query()
	q.Set("search_path", name)
	u.RawQuery = q.Encode()
	s := &Schema{Name: name, URL: u.String(), base: e.PostgresURL}
	s.DB, err = s.Open(8)
	if err != nil {
		_ = s.Drop()
		return nil, err
	}
	return s, nil
}

// Open returns another pool on the schema (a second "process").
func (s *Schema) Open(conns int) (*sql.DB, error) {
	db, err := sql.Open("pgx", s.URL)
	if err != nil {
		return nil, err
	}
	db.SetMaxOpenConns(conns)
	db.SetMaxIdleConns(conns)
	return db, nil
}

// Drop closes the pool and drops the schema with everything in it.
func (s *Schema) Drop() error {
	if s.DB != nil {
		_ = s.DB.Close()
	}
	admin, err := sql.Open("pgx", s.base)
	if err != nil {
		return err
	}
	defer admin.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	_, err = admin.ExecContext(ctx, "DROP SCHEMA IF EXISTS "+s.Name+" CASCADE")
	return err
}
