package bus_test

import (
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/behaviors"
	"github.com/tailrace/tailrace/bus"
	busamqp "github.com/tailrace/tailrace/bus/amqp"
	"github.com/tailrace/tailrace/bus/gochannel"
	"github.com/tailrace/tailrace/internal/testenv"
	"github.com/tailrace/tailrace/mediator"
	"github.com/tailrace/tailrace/outbox"
	"github.com/tailrace/tailrace/policy"
)

// syncBuffer is a log sink shared by every component of a test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// e2eTransport is the bus under test: one publisher (registered under two
// keys, so that commands are delivered twice) and its subscriber.
type e2eTransport struct {
	pub      message.Publisher
	sub      message.Subscriber
	cmdDest  string
	evtDest  string
	poison   message.Publisher
	shutdown func()
}

// eventSeen is what the event handler observed of the message it handled.
type eventSeen struct {
	sku, causation, correlation, rule, version string
}

// runAsyncScenario enqueues commands and checks that they and the events
// their handlers stage flow end to end: Enqueue → outbox → relay → routing
// publisher → bus → consumer → inbox → mediator → handler, exactly once each.
func runAsyncScenario(t *testing.T, db *sql.DB, d outbox.Dialect, tr e2eTransport, logs *syncBuffer) {
	ctx := context.Background()
	logger := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	notifier := &outbox.Notifier{}

	const table = "tailrace_outbox"
	if err := outbox.InitializeSchema(ctx, db, d, table); err != nil {
		t.Fatal(err)
	}
	ob, err := outbox.New(db, logger, outbox.Config{Dialect: d, Table: table, Notifier: notifier})
	if err != nil {
		t.Fatal(err)
	}
	store, err := outbox.NewInbox(db, logger, outbox.InboxConfig{Dialect: d})
	if err != nil {
		t.Fatal(err)
	}
	if err := outbox.InitializeInboxSchema(ctx, db, d, store.Table()); err != nil {
		t.Fatal(err)
	}
	if _, err := db.ExecContext(ctx, `CREATE TABLE stock (sku VARCHAR(64) NOT NULL, n INTEGER NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	insert := `INSERT INTO stock (sku, n) VALUES (?, ?)`
	if d == outbox.PostgreSQL {
		insert = `INSERT INTO stock (sku, n) VALUES ($1, $2)`
	}

	// The mediator: Transaction outside, Inbox inside, for commands and
	// the events consumers dispatch.
	txb, err := behaviors.NewTransaction(db, logger, behaviors.TransactionConfig{
		Notifier: notifier,
		Applies: func(info mediator.Info) bool {
			return info.Type == mediator.TypeCommand || info.Type == mediator.TypeNotification
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	ib, err := behaviors.NewInbox(store, logger, behaviors.InboxConfig{})
	if err != nil {
		t.Fatal(err)
	}
	m := mediator.New(mediator.WithLayers(txb.Layer(), ib.Layer()))
	var (
		mu       sync.Mutex
		cmdIDs   = map[string]string{} // sku → command message id
		cmdCorrs = map[string]string{} // sku → command correlation id
		events   []eventSeen
	)
	mediator.RegisterFunc(m, func(ctx context.Context, c ReserveStock) (struct{}, error) {
		tx, _ := outbox.TxFromContext(ctx)
		if _, err := tx.ExecContext(ctx, insert, c.SKU, c.N); err != nil {
			return struct{}{}, err
		}
		msg, _ := bus.MessageFromContext(ctx)
		mu.Lock()
		cmdIDs[c.SKU] = msg.UUID
		cmdCorrs[c.SKU] = msg.Metadata.Get(tailrace.MetaCorrelationID)
		mu.Unlock()
		return struct{}{}, ob.Stage(ctx, StockReserved{SKU: c.SKU})
	})
	mediator.RegisterNotificationFunc(m, func(ctx context.Context, e StockReserved) error {
		tx, _ := outbox.TxFromContext(ctx)
		if _, err := tx.ExecContext(ctx, insert, e.SKU, 0); err != nil {
			return err
		}
		msg, _ := bus.MessageFromContext(ctx)
		mu.Lock()
		events = append(events, eventSeen{e.SKU, msg.Metadata.Get(tailrace.MetaCausationID),
			msg.Metadata.Get(tailrace.MetaCorrelationID), msg.Metadata.Get(tailrace.MetaPolicyRule),
			msg.Metadata.Get(tailrace.MetaPolicyVersion)})
		mu.Unlock()
		return nil
	})

	// The consumer, subscribed to both destinations.
	consumer, err := bus.NewConsumer(m, logger, bus.ConsumerConfig{
		Name: "stock", PoisonPublisher: tr.poison, MaxAttempts: 10, InitialInterval: 10 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	bus.HandleCommand[ReserveStock](consumer)
	bus.HandleEvent[StockReserved](consumer)
	for _, dest := range []string{tr.cmdDest, tr.evtDest} {
		if err := consumer.Subscribe(dest, tr.sub); err != nil {
			t.Fatal(err)
		}
	}
	consumerDone := make(chan error, 1)
	go func() { consumerDone <- consumer.Run(ctx) }()
	select {
	case <-consumer.Running():
	case <-time.After(30 * time.Second):
		t.Fatal("consumer not running")
	}

	// The routing publisher: commands (MetaCommand) go twice to the
	// command destination — a second route on another key, to prove the
	// inbox — and events to the event destination.
	reg := bus.NewRegistry()
	reg.Register("bus", tr.pub)
	reg.Register("bus-replica", tr.pub)
	pol, err := policy.Parse("e2e.json", []byte(fmt.Sprintf(`{
  "Rules": [{"Name": "commands", "Priority": 10, "Match": {"%s": "true"},
             "Publishers": [{"Key": "bus", "Destination": %q}, {"Key": "bus-replica", "Destination": %q}]}],
  "Default": {"Publishers": [{"Key": "bus", "Destination": %q}]}
}`, tailrace.MetaCommand, tr.cmdDest, tr.cmdDest, tr.evtDest)), &policy.LoadOptions{KnownPublishers: reg.HasPublisher})
	if err != nil {
		t.Fatal(err)
	}
	rp, err := bus.NewRoutingPublisher(reg, policy.Static(pol), logger, bus.RoutingConfig{})
	if err != nil {
		t.Fatal(err)
	}
	relay, err := outbox.NewRelay(db, rp, logger, outbox.RelayConfig{
		Dialect: d, Table: table, Notifier: notifier, PollInterval: 100 * time.Millisecond,
		InitialInterval: 20 * time.Millisecond, Partitions: 4,
	})
	if err != nil {
		t.Fatal(err)
	}
	relayDone := make(chan error, 1)
	go func() { relayDone <- relay.Run(ctx) }()

	// Enqueue: each command in a transaction of its own, as a caller
	// outside the mediator does.
	const n = 20
	for i := range n {
		octx := outbox.WithCorrelationID(ctx, fmt.Sprintf("corr-%d", i))
		if err := ob.Enqueue(octx, ReserveStock{SKU: fmt.Sprintf("sku-%02d", i), N: 1}); err != nil {
			t.Fatal(err)
		}
	}

	deadline := time.Now().Add(60 * time.Second)
	for {
		var rows int
		if err := db.QueryRow(`SELECT COUNT(*) FROM stock`).Scan(&rows); err != nil {
			t.Fatal(err)
		}
		if rows >= 2*n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 60 s: %d of %d effects\nlogs:\n%s", rows, 2*n, tail(logs.String(), 4000))
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Let a late duplicate arrive, if any would.
	time.Sleep(300 * time.Millisecond)

	if err := relay.Close(); err != nil {
		t.Errorf("relay Close: %v", err)
	}
	if err := <-relayDone; err != nil {
		t.Errorf("relay Run: %v", err)
	}
	if err := consumer.Close(); err != nil {
		t.Errorf("consumer Close: %v", err)
	}
	if err := <-consumerDone; err != nil {
		t.Errorf("consumer Run: %v", err)
	}
	tr.shutdown()

	var rows, sum int
	if err := db.QueryRow(`SELECT COUNT(*), COALESCE(SUM(n), 0) FROM stock`).Scan(&rows, &sum); err != nil {
		t.Fatal(err)
	}
	if rows != 2*n || sum != n {
		t.Fatalf("stock: %d rows, sum %d; want %d rows (one per command, one per event), sum %d", rows, sum, 2*n, n)
	}
	// Each command arrived twice (two routes); the inbox dropped one.
	if got := ib.Skipped(); got != n {
		t.Errorf("inbox skipped %d deliveries, want %d (one per command)", got, n)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(events) != n {
		t.Fatalf("%d events handled, want %d", len(events), n)
	}
	for _, e := range events {
		if e.causation != cmdIDs[e.sku] || e.causation == "" {
			t.Errorf("event %s: causation %q, want the command's message id %q", e.sku, e.causation, cmdIDs[e.sku])
		}
		if e.correlation != cmdCorrs[e.sku] || !strings.HasPrefix(e.correlation, "corr-") {
			t.Errorf("event %s: correlation %q, want the command's %q", e.sku, e.correlation, cmdCorrs[e.sku])
		}
		if e.rule != "default" || e.version != pol.Version() {
			t.Errorf("event %s: policy stamps rule %q version %q; want default %s", e.sku, e.rule, e.version, pol.Version())
		}
	}
	var left int
	if err := db.QueryRow(`SELECT COUNT(*) FROM ` + table).Scan(&left); err != nil {
		t.Fatal(err)
	}
	if left != 0 {
		t.Errorf("%d rows left in the outbox", left)
	}
	if strings.Contains(logs.String(), "poison queue") {
		t.Errorf("something was poisoned:\n%s", tail(logs.String(), 4000))
	}
}

func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "…" + s[len(s)-n:]
}

// TestEndToEndEmbedded: async commands and events on the embedded default,
// SQLite and the in-process bus.
func TestEndToEndEmbedded(t *testing.T) {
	ps, err := gochannel.New(gochannel.Config{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	poison, err := gochannel.New(gochannel.Config{AllowNoSubscribers: true}, nil)
	if err != nil {
		t.Fatal(err)
	}
	logs := &syncBuffer{}
	runAsyncScenario(t, testenv.NewSQLite(t).DB, outbox.SQLite, e2eTransport{
		pub: ps, sub: ps, cmdDest: "stock.commands", evtDest: "stock.events", poison: poison,
		shutdown: func() { _ = ps.Close(); _ = poison.Close() },
	}, logs)
}

// TestEndToEndPostgresRabbitMQ: the same flow on PostgreSQL and RabbitMQ
// (publisher confirms, durable queues). The logs of every component are
// scanned for the broker password.
func TestEndToEndPostgresRabbitMQ(t *testing.T) {
	pg := testenv.NewPostgres(t)
	url := testenv.AMQPURL(t)
	prefix := testenv.UniqueName("tr_e2e")
	cmdDest, evtDest, poisonDest := prefix+".commands", prefix+".events", prefix+".poison"
	t.Cleanup(func() { deleteAMQP(t, url, cmdDest, evtDest, poisonDest) })

	logs := &syncBuffer{}
	wlog := watermill.NewSlogLogger(slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
	cfg := busamqp.Config{URL: url, Topology: busamqp.Topology{DeclareQueues: true}}
	pub, err := busamqp.NewPublisher(cfg, wlog)
	if err != nil {
		t.Fatal(err)
	}
	sub, err := busamqp.NewSubscriber(cfg, wlog)
	if err != nil {
		t.Fatal(err)
	}
	// The poison queue exists before anything is poisoned.
	if err := sub.SubscribeInitialize(poisonDest); err != nil {
		t.Fatal(err)
	}
	runAsyncScenario(t, pg.DB, outbox.PostgreSQL, e2eTransport{
		pub: pub, sub: sub, cmdDest: cmdDest, evtDest: evtDest,
		poison:   poisonPublisher{pub, poisonDest},
		shutdown: func() { _ = pub.Close(); _ = sub.Close() },
	}, logs)

	if pw := passwordOf(url); pw != "" && strings.Contains(logs.String(), ":"+pw+"@") {
		t.Error("the broker password appears in the logs")
	}
	if !strings.Contains(logs.String(), "commands") {
		t.Error("no log lines were captured; the secret scan proves nothing")
	}
}

// poisonPublisher sends poisoned messages to a fixed RabbitMQ destination,
// whatever topic the consumer names.
type poisonPublisher struct {
	message.Publisher
	topic string
}

func (p poisonPublisher) Publish(_ string, msgs ...*message.Message) error {
	return p.Publisher.Publish(p.topic, msgs...)
}

func passwordOf(raw string) string {
	at := strings.LastIndex(raw, "@")
	scheme := strings.Index(raw, "://")
	if at < 0 || scheme < 0 {
		return ""
	}
	userinfo := raw[scheme+3 : at]
	if i := strings.Index(userinfo, ":"); i >= 0 {
		return userinfo[i+1:]
	}
	return ""
}

func deleteAMQP(t *testing.T, url string, names ...string) {
	conn, err := amqp091.Dial(url)
	if err != nil {
		t.Logf("cleanup: %s", busamqp.RedactURL(err.Error()))
		return
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return
	}
	defer ch.Close()
	for _, n := range names {
		_, _ = ch.QueueDelete(n, false, false, false)
		_ = ch.ExchangeDelete(n, false, false)
	}
}
