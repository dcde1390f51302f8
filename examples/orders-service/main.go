// Command orders-service is what a team would ship with tailrace: an HTTP
// service that creates and cancels orders.
//
// A command handler writes the order to PostgreSQL and stages an event in the
// same transaction; the relay drains the outbox through the routing policy in
// policy.json: every event to RabbitMQ (enterprise tenants' to a destination
// of their own) and, through a Continue rule, to NATS JetStream for an audit
// trail. A consumer takes the RabbitMQ events back into the mediator, where
// Transaction and Inbox record each one once; an audit consumer records the
// NATS copies, claiming each message id in the inbox itself.
//
// The three roles run in one process by default, or separately (-roles api,
// -roles relay,consumer, ...) on the same database and brokers. Each role
// builds only what it uses: -roles api needs PostgreSQL alone and takes
// orders while the brokers are down; a relay starts while they are down
// and delivers once they are back. It logs JSON
// with log/slog, serves /healthz and /metrics (OpenTelemetry metrics through
// a Prometheus exporter), reloads the policy when its file changes
// and shuts down gracefully on SIGINT or SIGTERM. It is assembled by Wire
// (wire.go, generated into wire_gen.go).
//
// From the repository root, with PostgreSQL, RabbitMQ and NATS running
// locally (or TAILRACE_POSTGRES_URL, TAILRACE_AMQP_URL and TAILRACE_NATS_URL
// set):
//
//	go run ./examples/orders-service -addr 127.0.0.1:8080
//	curl -s -X POST localhost:8080/orders -H 'X-Tenant-Tier: enterprise' -d '{"customer":"ada","amount_cents":1250}'
//	curl -s localhost:8080/orders/ID
//	curl -s -X POST localhost:8080/orders/ID/cancel
//	curl -s localhost:8080/healthz
//	curl -s localhost:8080/metrics | grep '^tailrace_outbox'
package main

import (
	"context"
	"database/sql"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	_ "github.com/jackc/pgx/v5/stdlib" // registers the "pgx" driver
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "orders-service:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	cfg, err := parseConfig(args)
	if err != nil {
		return err
	}
	level, _ := cfg.level()
	logger := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	db, err := sql.Open("pgx", cfg.PostgresURL)
	if err != nil {
		return err
	}
	defer db.Close()
	if err := initSchema(ctx, db); err != nil {
		return err
	}
	app, cleanup, err := initApp(cfg, logger, db)
	if err != nil {
		return err
	}
	defer cleanup()
	return app.Run(ctx)
}
