package main

import (
	"bytes"
	"context"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/tailrace/tailrace/bus"
	"github.com/tailrace/tailrace/internal/testenv"
)

// want is the sample's output after its first line about the store and bus:
// the sections and lines of the Stratara sample's expected output.
const want = `
--- Publisher enqueues 3 commands (returns immediately, doesn't wait for handlers) ---
  Enqueued — outbox has 3 pending

--- Wait for outbox-drain + command-worker to catch up ---
  Outbox now has 0 pending

--- Read-side: query the repository synchronously ---
  Balance: $175.00

--- Enqueue Withdraw $40, wait, query again ---
  Balance: $135.00

Done.
`

func runSample(t *testing.T, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out bytes.Buffer
	start := time.Now()
	if err := run(ctx, &out, args); err != nil {
		t.Fatalf("run %q: %v\noutput:\n%s", args, err, out.String())
	}
	t.Logf("run %q took %v", args, time.Since(start).Round(time.Millisecond))
	return out.String()
}

// TestEmbedded runs the quick start: SQLite in a temporary directory and the
// outbox.Worker, no service needed.
func TestEmbedded(t *testing.T) {
	got := runSample(t)
	exp := "=== tailrace Outbox + Worker ===\n  store: SQLite (temporary file), bus: none (outbox.Worker)\n" + want
	if got != exp {
		t.Errorf("output differs\n--- got\n%s--- want\n%s", got, exp)
	}
}

// TestPostgresWorker runs the worker on PostgreSQL (a schema of its own),
// with no broker.
func TestPostgresWorker(t *testing.T) {
	pg := testenv.NewPostgres(t)
	got := runSample(t, "-postgres", pg.URL)
	exp := "=== tailrace Outbox + Worker ===\n  store: PostgreSQL, bus: none (outbox.Worker)\n" + want
	if got != exp {
		t.Errorf("output differs\n--- got\n%s--- want\n%s", got, exp)
	}
}

// TestServices runs the same flow on PostgreSQL (a schema of its own) and
// RabbitMQ (exchange and queue names of its own).
func TestServices(t *testing.T) {
	pg := testenv.NewPostgres(t)
	amqpURL := testenv.AMQPURL(t)
	prefix := testenv.UniqueName("outbox_worker") + "."
	t.Cleanup(func() { deleteAMQP(t, amqpURL, prefix+commandsTopic, prefix+bus.DefaultPoisonTopic) })

	got := runSample(t, "-postgres", pg.URL, "-amqp", amqpURL, "-amqp-prefix", prefix)
	exp := "=== tailrace Outbox + Worker ===\n  store: PostgreSQL, bus: RabbitMQ\n" + want
	if got != exp {
		t.Errorf("output differs\n--- got\n%s--- want\n%s", got, exp)
	}
}

// deleteAMQP removes the exchanges and the queues named names.
func deleteAMQP(t *testing.T, url string, names ...string) {
	conn, err := amqp091.Dial(url)
	if err != nil {
		t.Logf("cleanup: %v", err)
		return
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Logf("cleanup: %v", err)
		return
	}
	defer ch.Close()
	for _, name := range names {
		if _, err := ch.QueueDelete(name, false, false, false); err != nil {
			t.Logf("cleanup: delete queue %s: %v", name, err)
		}
		if err := ch.ExchangeDelete(name, false, false); err != nil {
			t.Logf("cleanup: delete exchange %s: %v", name, err)
		}
	}
}
