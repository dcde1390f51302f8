// Command outbox-worker is tailrace's version of the Stratara "Outbox +
// Worker" sample: commands stop running in the caller's goroutine.
//
// A publisher enqueues Deposit and Withdraw commands into the outbox table and
// returns at once; the relay drains the outbox to the bus; a command worker
// consumes the bus and dispatches each command through the mediator, where the
// Transaction behavior runs its handler in a database transaction; the read
// side queries the balance.
//
// With no flags it needs nothing installed: the database is a SQLite file in
// a temporary directory and the bus is in-process.
//
//	go run ./examples/outbox-worker
//
// The same flow runs on PostgreSQL and RabbitMQ with -postgres and -amqp, or
// with -services, which takes their addresses from TAILRACE_POSTGRES_URL and
// TAILRACE_AMQP_URL (default: the local services on 127.0.0.1).
//
//	go run ./examples/outbox-worker -services
package main

import (
	"context"
	"database/sql"
	_ "embed"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	_ "github.com/jackc/pgx/v5/stdlib" // registers the "pgx" driver
	_ "modernc.org/sqlite"             // registers the "sqlite" driver

	"github.com/tailrace/tailrace/behaviors"
	"github.com/tailrace/tailrace/bus"
	"github.com/tailrace/tailrace/bus/amqp"
	"github.com/tailrace/tailrace/mediator"
	"github.com/tailrace/tailrace/outbox"
	"github.com/tailrace/tailrace/policy"
)

// policyJSON routes the bank's commands to the publisher registered under the
// key "commands": the in-process bus by default, RabbitMQ with -amqp. Check it
// with: go run ./cmd/tailrace policy explain examples/outbox-worker/policy.json ...
//
//go:embed policy.json
var policyJSON []byte

// commandsTopic is where the policy sends the bank's commands and where the
// worker consumes them (with -amqp).
const commandsTopic = "bank.commands"

// commandTable is the table Enqueue writes commands into when there is no
// broker, and the outbox.Worker runs them from.
const commandTable = "bank_commands"

// Defaults of -services, the addresses of the local services.
const (
	defaultPostgresURL = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"
	defaultAMQPURL     = "amqp://guest:guest@127.0.0.1:5672/"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, os.Stdout, os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "outbox-worker:", err)
		os.Exit(1)
	}
}

type options struct {
	postgres   string
	amqp       string
	amqpPrefix string
	verbose    bool
}

func parseFlags(args []string) (options, error) {
	var o options
	fs := flag.NewFlagSet("outbox-worker", flag.ContinueOnError)
	services := fs.Bool("services", false, "use PostgreSQL and RabbitMQ at $TAILRACE_POSTGRES_URL and $TAILRACE_AMQP_URL (default: the local services)")
	fs.StringVar(&o.postgres, "postgres", "", "PostgreSQL URL (default: a SQLite file in a temporary directory)")
	fs.StringVar(&o.amqp, "amqp", "", "RabbitMQ URL (default: the in-process bus)")
	fs.StringVar(&o.amqpPrefix, "amqp-prefix", "", "prefix of the RabbitMQ exchange and queue names")
	fs.BoolVar(&o.verbose, "v", false, "log at debug level to stderr")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if *services {
		if o.postgres == "" {
			o.postgres = envOr("TAILRACE_POSTGRES_URL", defaultPostgresURL)
		}
		if o.amqp == "" {
			o.amqp = envOr("TAILRACE_AMQP_URL", defaultAMQPURL)
		}
	}
	return o, nil
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

// run is the whole sample; main calls it with os.Stdout, the test with a
// buffer.
func run(ctx context.Context, w io.Writer, args []string) (err error) {
	opts, err := parseFlags(args)
	if err != nil {
		return err
	}
	level := slog.LevelWarn
	if opts.verbose {
		level = slog.LevelDebug
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	// The store: the service's own database, holding the accounts and the
	// outbox table.
	db, dialect, storeName, closeDB, err := openStore(opts)
	if err != nil {
		return err
	}
	defer closeDB()
	if err := outbox.InitializeSchema(ctx, db, dialect, outbox.DefaultTable); err != nil {
		return err
	}
	if err := outbox.InitializeInboxSchema(ctx, db, dialect, outbox.DefaultInboxTable); err != nil {
		return err
	}
	b := &bank{db: db}
	if err := b.schema(ctx); err != nil {
		return err
	}

	// The mediator: handlers plus behaviors in a stated order (lower Order
	// is outer): Logging → Recover → Transaction → Inbox → handler. Inbox
	// records the id of the message being consumed in the handler's
	// transaction, so a command delivered twice is applied once.
	notifier := &outbox.Notifier{}
	logging, err := behaviors.NewLogging(logger, behaviors.LoggingConfig{})
	if err != nil {
		return err
	}
	recoverer, err := behaviors.NewRecover(behaviors.RecoverConfig{})
	if err != nil {
		return err
	}
	transaction, err := behaviors.NewTransaction(db, logger, behaviors.TransactionConfig{Notifier: notifier})
	if err != nil {
		return err
	}
	inboxStore, err := outbox.NewInbox(db, logger, outbox.InboxConfig{Dialect: dialect})
	if err != nil {
		return err
	}
	inbox, err := behaviors.NewInbox(inboxStore, logger, behaviors.InboxConfig{})
	if err != nil {
		return err
	}
	m := mediator.New()
	m.Use(logging.Layer(), recoverer.Layer(), transaction.Layer(), inbox.Layer())
	b.register(m)

	// Each run uses an account of its own, so that a database shared with
	// earlier runs (-services) does not change what it prints. done counts
	// the commands on it whose transaction committed: the sample waits for
	// the worker with it.
	account := "acct-" + watermill.NewShortUUID()
	var done atomic.Int64
	m.Use(mediator.Layer{Order: behaviors.OrderLogging - 1, Scope: mediator.Commands(), Behavior: countCommitted(account, &done)})

	// The outbox: Enqueue stages a command in a short transaction of its own
	// and signals the notifier after commit. Without a broker (the
	// default) commands go into a command table of their own, which an
	// outbox.Worker runs straight from the database; with -amqp they go
	// into the outbox table, and the relay publishes them to RabbitMQ.
	viaBroker := opts.amqp != ""
	cfg := outbox.Config{Dialect: dialect, Notifier: notifier}
	if !viaBroker {
		if err := outbox.InitializeSchema(ctx, db, dialect, commandTable); err != nil {
			return err
		}
		cfg.CommandTable = commandTable
	}
	ob, err := outbox.New(db, logger, cfg)
	if err != nil {
		return err
	}

	busName := "none (outbox.Worker)"
	if viaBroker {
		busName = "RabbitMQ"
	}
	fmt.Fprintln(w, "=== tailrace Outbox + Worker ===")
	fmt.Fprintf(w, "  store: %s, bus: %s\n", storeName, busName)

	fmt.Fprintln(w)
	fmt.Fprintln(w, "--- Publisher enqueues 3 commands (returns immediately, doesn't wait for handlers) ---")
	for _, cmd := range []any{
		Deposit{Account: account, Cents: 100_00},
		Deposit{Account: account, Cents: 100_00},
		Withdraw{Account: account, Cents: 25_00},
	} {
		if err := ob.Enqueue(ctx, cmd); err != nil {
			return err
		}
	}
	pending, err := countPending(ctx, db, ob.CommandTable(), account)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "  Enqueued — outbox has %d pending\n", pending)

	// The worker side starts only now, so that the count above is the same
	// on every run; in a service it runs from start-up.
	var stop func() error
	if viaBroker {
		stop, err = startBroker(ctx, opts, db, dialect, ob, notifier, m, logger)
	} else {
		stop, err = startCommandWorker(ctx, db, dialect, notifier, m, logger)
	}
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, stop()) }()

	fmt.Fprintln(w)
	fmt.Fprintln(w, "--- Wait for outbox-drain + command-worker to catch up ---")
	if err := waitUntil(ctx, func() (bool, error) {
		n, err := countPending(ctx, db, ob.CommandTable(), account)
		return n == 0 && done.Load() == 3, err
	}); err != nil {
		return err
	}
	fmt.Fprintln(w, "  Outbox now has 0 pending")

	fmt.Fprintln(w)
	fmt.Fprintln(w, "--- Read-side: query the repository synchronously ---")
	balance, err := mediator.Send(ctx, m, GetBalance{Account: account})
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "  Balance: %s\n", dollars(balance))

	fmt.Fprintln(w)
	fmt.Fprintln(w, "--- Enqueue Withdraw $40, wait, query again ---")
	if err := ob.Enqueue(ctx, Withdraw{Account: account, Cents: 40_00}); err != nil {
		return err
	}
	if err := waitUntil(ctx, func() (bool, error) { return done.Load() == 4, nil }); err != nil {
		return err
	}
	if balance, err = mediator.Send(ctx, m, GetBalance{Account: account}); err != nil {
		return err
	}
	fmt.Fprintf(w, "  Balance: %s\n", dollars(balance))

	fmt.Fprintln(w)
	fmt.Fprintln(w, "Done.")
	return nil
}

// startBroker runs the broker path: the relay drains the outbox table to
// RabbitMQ through the routing policy, and a bus consumer (worker.go) runs
// the commands it receives. stop closes both.
func startBroker(ctx context.Context, opts options, db *sql.DB, dialect outbox.Dialect, ob *outbox.Outbox, notifier *outbox.Notifier,
	m *mediator.Mediator, logger *slog.Logger) (stop func() error, err error) {
	var closers []func() error
	// stopAll, not the named result: "return nil, err" sets stop to nil
	// before the deferred clean-up runs.
	stopAll := func() error {
		var errs []error
		for i := len(closers) - 1; i >= 0; i-- {
			errs = append(errs, closers[i]())
		}
		return errors.Join(errs...)
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, stopAll())
		}
	}()

	// The bus: the publishers the policy may name, by key, and the
	// subscriber the command worker consumes from.
	wlogger := watermill.NewSlogLogger(logger)
	pub, sub, closeSub, err := openBus(opts, wlogger)
	if err != nil {
		return nil, err
	}
	closers = append(closers, closeSub)
	publishers := bus.NewRegistry()
	closers = append(closers, publishers.Close)
	publishers.Register("commands", pub)
	pol, err := policy.Parse("policy.json", policyJSON, &policy.LoadOptions{KnownPublishers: publishers.HasPublisher})
	if err != nil {
		return nil, err
	}
	routing, err := bus.NewRoutingPublisher(publishers, policy.Static(pol), logger, bus.RoutingConfig{})
	if err != nil {
		return nil, err
	}
	closers = append(closers, routing.Close)

	// The command worker: consumes the commands and sends each through the
	// mediator.
	stopWorker, err := startWorker(ctx, m, sub, pub, logger)
	if err != nil {
		return nil, err
	}
	closers = append(closers, stopWorker)

	// The relay: drains the outbox to the routing publisher, woken by the
	// notifier on every commit (and polling as a fallback).
	relay, err := outbox.NewRelay(db, routing, logger, outbox.RelayConfig{
		Dialect: dialect, Table: ob.Table(), Notifier: notifier,
		PollInterval: 100 * time.Millisecond, CloseTimeout: 5 * time.Second,
	})
	if err != nil {
		return nil, err
	}
	relayDone := make(chan error, 1)
	go func() { relayDone <- relay.Run(ctx) }()
	closers = append(closers, func() error { return errors.Join(relay.Close(), <-relayDone) })
	return stopAll, nil
}

// countCommitted is a behavior that counts the commands on account
// dispatched successfully. It sits outside Transaction, so when next returns
// nil the command's transaction has committed.
func countCommitted(account string, n *atomic.Int64) mediator.BehaviorFunc {
	return func(ctx context.Context, req any, info mediator.Info, next mediator.Next) (any, error) {
		res, err := next(ctx, req)
		if k, ok := req.(outbox.PartitionKeyer); ok && k.PartitionKey() == account && err == nil {
			n.Add(1)
		}
		return res, err
	}
}

// openStore opens PostgreSQL at opts.postgres, or a SQLite file in a new
// temporary directory, removed by the returned func.
func openStore(opts options) (db *sql.DB, d outbox.Dialect, name string, closeDB func(), err error) {
	if opts.postgres != "" {
		db, err := sql.Open("pgx", opts.postgres)
		if err != nil {
			return nil, nil, "", nil, err
		}
		return db, outbox.PostgreSQL, "PostgreSQL", func() { _ = db.Close() }, nil
	}
	dir, err := os.MkdirTemp("", "tailrace-outbox-worker-")
	if err != nil {
		return nil, nil, "", nil, err
	}
	// WAL, a busy timeout and immediate transactions, as the Transaction
	// behavior asks for on SQLite.
	dsn := "file:" + filepath.Join(dir, "bank.db") + "?_pragma=journal_mode(WAL)&_pragma=busy_timeout(10000)&_txlock=immediate"
	db, err = sql.Open("sqlite", dsn)
	if err != nil {
		_ = os.RemoveAll(dir)
		return nil, nil, "", nil, err
	}
	return db, outbox.SQLite, "SQLite (temporary file)", func() { _ = db.Close(); _ = os.RemoveAll(dir) }, nil
}

// openBus returns RabbitMQ's publisher and subscriber at opts.amqp. The
// publisher is closed by the registry it is registered in, the subscriber
// by closeSub.
func openBus(opts options, logger watermill.LoggerAdapter) (pub message.Publisher, sub message.Subscriber, closeSub func() error, err error) {
	prefixed := func(topic string) string { return opts.amqpPrefix + topic }
	cfg := amqp.Config{URL: opts.amqp, Topology: amqp.Topology{ExchangeName: prefixed, QueueName: prefixed}}
	p, err := amqp.NewPublisher(cfg, logger)
	if err != nil {
		return nil, nil, nil, err
	}
	s, err := amqp.NewSubscriber(cfg, logger)
	if err != nil {
		return nil, nil, nil, errors.Join(err, p.Close())
	}
	return p, s, s.Close, nil
}

// countPending returns the number of outbox rows of account (their
// partition key) not yet relayed.
func countPending(ctx context.Context, db *sql.DB, table, account string) (int, error) {
	var n int
	// table passed outbox.ValidateTableName (lower-case letters, digits and
	// underscores): safe to splice.
	err := db.QueryRowContext(ctx, `SELECT COUNT(*) FROM `+table+` WHERE relayed_at IS NULL AND partition_key = $1`, account).Scan(&n)
	return n, err
}

// waitUntil polls cond until it holds, for at most 10 s.
func waitUntil(ctx context.Context, cond func() (bool, error)) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for {
		ok, err := cond()
		if err != nil || ok {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for the worker: %w", context.Cause(ctx))
		case <-time.After(10 * time.Millisecond):
		}
	}
}
