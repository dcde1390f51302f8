package bus_test

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/behaviors"
	"github.com/tailrace/tailrace/bus"
	"github.com/tailrace/tailrace/bus/gochannel"
	"github.com/tailrace/tailrace/internal/testenv"
	"github.com/tailrace/tailrace/mediator"
	"github.com/tailrace/tailrace/outbox"
)

type ReserveStock struct {
	mediator.Command[struct{}]
	SKU  string `json:"sku"`
	N    int    `json:"n"`
	Fail int    `json:"fail"` // fail this many attempts first
	Boom bool   `json:"boom"` // panic
}

func (ReserveStock) Kind() string { return "stock.reserve" }

type StockReserved struct {
	mediator.Notification
	SKU string `json:"sku"`
}

func (StockReserved) Kind() string { return "stock.reserved" }

// seen is what a handler observed.
type seen struct {
	kind, messageID, consumer, correlation, causation, tenant string
}

type consumerBundle struct {
	db     *sql.DB
	d      outbox.Dialect
	m      *mediator.Mediator
	inbox  *behaviors.Inbox
	ps     *gochannel.PubSub
	poison <-chan *message.Message
	calls  atomic.Int64
	mu     sync.Mutex
	seen   []seen
	tries  map[string]int
}

func newConsumerBundle(t *testing.T, db *sql.DB, d outbox.Dialect) *consumerBundle {
	t.Helper()
	ctx := context.Background()
	store, err := outbox.NewInbox(db, nil, outbox.InboxConfig{Dialect: d})
	if err != nil {
		t.Fatal(err)
	}
	if err := outbox.InitializeInboxSchema(ctx, db, d, store.Table()); err != nil {
		t.Fatal(err)
	}
	if _, err := db.ExecContext(ctx, `CREATE TABLE stock (sku VARCHAR(64) NOT NULL, n INTEGER NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	// Defaults: Transaction and Inbox both cover commands and events.
	txb, err := behaviors.NewTransaction(db, nil, behaviors.TransactionConfig{})
	if err != nil {
		t.Fatal(err)
	}
	ib, err := behaviors.NewInbox(store, nil, behaviors.InboxConfig{})
	if err != nil {
		t.Fatal(err)
	}
	b := &consumerBundle{db: db, d: d, m: mediator.New(mediator.WithLayers(txb.Layer(), ib.Layer())), inbox: ib, tries: map[string]int{}}
	insert := `INSERT INTO stock (sku, n) VALUES (?, ?)`
	if d == outbox.PostgreSQL {
		insert = `INSERT INTO stock (sku, n) VALUES ($1, $2)`
	}
	record := func(ctx context.Context, kind string) {
		tenant, _ := outbox.TenantFromContext(ctx)
		b.mu.Lock()
		b.seen = append(b.seen, seen{kind, outbox.MessageIDFromContext(ctx), outbox.ConsumerFromContext(ctx),
			outbox.CorrelationIDFromContext(ctx), outbox.CausationIDFromContext(ctx), tenant})
		b.mu.Unlock()
	}
	mediator.RegisterFunc(b.m, func(ctx context.Context, c ReserveStock) (struct{}, error) {
		b.calls.Add(1)
		record(ctx, c.Kind())
		if c.Boom {
			panic("boom")
		}
		b.mu.Lock()
		b.tries[c.SKU]++
		try := b.tries[c.SKU]
		b.mu.Unlock()
		if try <= c.Fail {
			return struct{}{}, fmt.Errorf("attempt %d fails", try)
		}
		tx, _ := outbox.TxFromContext(ctx)
		_, err := tx.ExecContext(ctx, insert, c.SKU, c.N)
		return struct{}{}, err
	})
	mediator.RegisterNotificationFunc(b.m, func(ctx context.Context, e StockReserved) error {
		b.calls.Add(1)
		record(ctx, e.Kind())
		tx, _ := outbox.TxFromContext(ctx)
		_, err := tx.ExecContext(ctx, insert, e.SKU, 0)
		return err
	})

	b.ps, err = gochannel.New(gochannel.Config{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.ps.Close() })
	pctx, cancel := context.WithCancel(ctx)
	t.Cleanup(cancel)
	b.poison, err = b.ps.Subscribe(pctx, "poison")
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// consumer starts a consumer of "stock" named name.
func (b *consumerBundle) consumer(t *testing.T, name string, cfg bus.ConsumerConfig) *bus.Consumer {
	t.Helper()
	cfg.Name = name
	cfg.PoisonPublisher = b.ps
	cfg.PoisonTopic = "poison"
	if cfg.InitialInterval == 0 {
		cfg.InitialInterval = 5 * time.Millisecond
	}
	c, err := bus.NewConsumer(b.m, nil, cfg)
	if err != nil {
		t.Fatal(err)
	}
	bus.HandleCommand[ReserveStock](c)
	bus.HandleEvent[StockReserved](c)
	if err := c.Subscribe("stock", b.ps); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- c.Run(context.Background()) }()
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	select {
	case <-c.Running():
	case <-time.After(10 * time.Second):
		t.Fatal("consumer not running")
	}
	return c
}

func (b *consumerBundle) stock(t *testing.T) (rows, sum int) {
	t.Helper()
	if err := b.db.QueryRow(`SELECT COUNT(*), COALESCE(SUM(n), 0) FROM stock`).Scan(&rows, &sum); err != nil {
		t.Fatal(err)
	}
	return rows, sum
}

func stockMsg(t testing.TB, v interface{ Kind() string }) *message.Message {
	t.Helper()
	payload, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	m := message.NewMessage(watermill.NewUUID(), payload)
	m.Metadata.Set(tailrace.MetaKind, v.Kind())
	return m
}

func (b *consumerBundle) nextPoison(t *testing.T) *message.Message {
	t.Helper()
	select {
	case m := <-b.poison:
		m.Ack()
		return m
	case <-time.After(10 * time.Second):
		t.Fatal("nothing reached the poison queue")
		return nil
	}
}

func TestConsumerDispatchesCommandsAndEvents(t *testing.T) {
	b := newConsumerBundle(t, testenv.NewSQLite(t).DB, outbox.SQLite)
	b.consumer(t, "stock-svc", bus.ConsumerConfig{})

	cmd := stockMsg(t, ReserveStock{SKU: "a", N: 3})
	cmd.Metadata.Set(tailrace.MetaCorrelationID, "corr-1")
	cmd.Metadata.Set(tailrace.MetaTenant, "acme")
	ev := stockMsg(t, StockReserved{SKU: "a"})
	// GoChannel's Publish returns once the consumer acknowledged.
	if err := b.ps.Publish("stock", cmd, ev); err != nil {
		t.Fatal(err)
	}
	if rows, sum := b.stock(t); rows != 2 || sum != 3 {
		t.Fatalf("stock: %d rows, sum %d; want 2 rows, sum 3", rows, sum)
	}
	want := []seen{
		{"stock.reserve", cmd.UUID, "stock-svc", "corr-1", cmd.UUID, "acme"},
		{"stock.reserved", ev.UUID, "stock-svc", ev.UUID, ev.UUID, ""},
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	// Two messages without a partition key run concurrently: any order.
	slices.SortFunc(b.seen, func(x, y seen) int { return strings.Compare(x.kind, y.kind) })
	if fmt.Sprint(b.seen) != fmt.Sprint(want) {
		t.Fatalf("handlers saw\n%v\nwant\n%v", b.seen, want)
	}
}

func TestConsumerUnknownKindGoesToPoisonAtOnce(t *testing.T) {
	b := newConsumerBundle(t, testenv.NewSQLite(t).DB, outbox.SQLite)
	b.consumer(t, "stock-svc", bus.ConsumerConfig{MaxAttempts: 5, InitialInterval: time.Second})

	unknown := message.NewMessage(watermill.NewUUID(), []byte(`{}`))
	unknown.Metadata.Set(tailrace.MetaKind, "stock.mystery")
	next := stockMsg(t, ReserveStock{SKU: "after", N: 1})
	start := time.Now()
	go func() { _ = b.ps.Publish("stock", unknown, next) }()
	p := b.nextPoison(t)
	if p.UUID != unknown.UUID {
		t.Fatalf("poisoned %s, want %s", p.UUID, unknown.UUID)
	}
	if d := time.Since(start); d > 900*time.Millisecond {
		t.Errorf("poisoned after %v: the unknown kind was retried", d)
	}
	checkPoison(t, p, "1", "true", "stock.mystery")
	// The message behind it is not blocked.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if rows, _ := b.stock(t); rows == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the message after the poisoned one was not handled")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func checkPoison(t *testing.T, p *message.Message, attempts, permanent, reason string) {
	t.Helper()
	md := p.Metadata
	if md.Get(bus.MetaPoisonAttempts) != attempts || md.Get(bus.MetaPoisonPermanent) != permanent ||
		!strings.Contains(md.Get(bus.MetaPoisonReason), reason) || md.Get(bus.MetaPoisonDestination) != "stock" ||
		md.Get(bus.MetaPoisonConsumer) != "stock-svc" || md.Get(bus.MetaPoisonedAt) == "" ||
		md.Get("reason_poisoned") == "" {
		t.Fatalf("poison metadata %v; want attempts %s, permanent %s, reason containing %q", md, attempts, permanent, reason)
	}
}

func TestConsumerRetriesThenPoisons(t *testing.T) {
	b := newConsumerBundle(t, testenv.NewSQLite(t).DB, outbox.SQLite)
	b.consumer(t, "stock-svc", bus.ConsumerConfig{MaxAttempts: 3})

	// Fails twice, succeeds on the third attempt: handled, once.
	if err := b.ps.Publish("stock", stockMsg(t, ReserveStock{SKU: "flaky", N: 1, Fail: 2})); err != nil {
		t.Fatal(err)
	}
	if rows, _ := b.stock(t); rows != 1 {
		t.Fatalf("stock rows %d, want 1", rows)
	}
	// Fails more often than MaxAttempts: poisoned after 3 attempts.
	go func() { _ = b.ps.Publish("stock", stockMsg(t, ReserveStock{SKU: "hopeless", N: 1, Fail: 100})) }()
	checkPoison(t, b.nextPoison(t), "3", "false", "attempt 3 fails")
	// A panic is permanent.
	go func() { _ = b.ps.Publish("stock", stockMsg(t, ReserveStock{SKU: "p", Boom: true})) }()
	checkPoison(t, b.nextPoison(t), "1", "true", "boom")
	// So is a payload that does not decode.
	bad := message.NewMessage(watermill.NewUUID(), []byte(`{"n": "three"}`))
	bad.Metadata.Set(tailrace.MetaKind, "stock.reserve")
	go func() { _ = b.ps.Publish("stock", bad) }()
	p := b.nextPoison(t)
	checkPoison(t, p, "1", "true", "cannot decode")
}

// TestConsumerInbox100x3: 100 messages, each delivered to three consumers of
// the same name at once (so three times, concurrently), give exactly 100
// effects, on each database.
func TestConsumerInbox100x3(t *testing.T) {
	dbs := map[string]func(t *testing.T) (*sql.DB, outbox.Dialect){
		"postgres": func(t *testing.T) (*sql.DB, outbox.Dialect) { return testenv.NewPostgres(t).DB, outbox.PostgreSQL },
		"mysql":    func(t *testing.T) (*sql.DB, outbox.Dialect) { return testenv.NewMySQL(t).DB, outbox.MySQL },
		"sqlite":   func(t *testing.T) (*sql.DB, outbox.Dialect) { return testenv.NewSQLite(t).DB, outbox.SQLite },
	}
	for name, open := range dbs {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			db, d := open(t)
			b := newConsumerBundle(t, db, d)
			for range 3 {
				b.consumer(t, "stock-svc", bus.ConsumerConfig{MaxAttempts: 20})
			}
			var msgs []*message.Message
			for i := range 100 {
				msgs = append(msgs, stockMsg(t, ReserveStock{SKU: fmt.Sprintf("sku-%d", i), N: 1}))
			}
			var wg sync.WaitGroup
			for i := range 4 {
				wg.Go(func() {
					for _, m := range msgs[i*25 : (i+1)*25] {
						if err := b.ps.Publish("stock", m); err != nil {
							t.Error(err)
						}
					}
				})
			}
			wg.Wait()
			if rows, sum := b.stock(t); rows != 100 || sum != 100 {
				t.Fatalf("stock: %d rows, sum %d; want 100 and 100", rows, sum)
			}
			if n := b.inbox.Skipped(); n != 200 {
				t.Fatalf("inbox skipped %d deliveries, want 200", n)
			}
			select {
			case p := <-b.poison:
				t.Fatalf("poisoned: %v", p.Metadata)
			default:
			}
		})
	}
}

func TestConsumerConfigAndRegistration(t *testing.T) {
	_, err := bus.NewConsumer(nil, nil, bus.ConsumerConfig{MaxAttempts: -1, Multiplier: 0.5, Jitter: 1, InitialInterval: time.Minute, MaxInterval: time.Second})
	if err == nil {
		t.Fatal("want errors")
	}
	for _, s := range []string{"Mediator", "MaxAttempts", "Multiplier", "Jitter", "MaxInterval", "PoisonPublisher"} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error %q does not name %s", err, s)
		}
	}
	ps, _ := gochannel.New(gochannel.Config{}, nil)
	defer ps.Close()
	c, err := bus.NewConsumer(mediator.New(), nil, bus.ConsumerConfig{PoisonPublisher: ps})
	if err != nil {
		t.Fatal(err)
	}
	bus.HandleCommand[ReserveStock](c)
	bus.HandleCommand[*ReserveStock](c, bus.WithKind("stock.reserve.v2"))
	mustPanic(t, bus.ErrDuplicateKind, func() { bus.HandleCommand[ReserveStock](c) })
	type noKind struct{ mediator.Notification }
	mustPanic(t, nil, func() { bus.HandleEvent[noKind](c) })
	bus.HandleEvent[noKind](c, bus.WithKind("no.kind"))
	if got := len(c.Kinds()); got != 3 {
		t.Fatalf("%d kinds, want 3", got)
	}
	if err := c.Subscribe("x", ps); err != nil {
		t.Fatal(err)
	}
	if err := c.Subscribe("x", ps); err == nil {
		t.Fatal("a second subscription to x was accepted")
	}
}

func mustPanic(t *testing.T, want error, f func()) {
	t.Helper()
	defer func() {
		v := recover()
		if v == nil {
			t.Fatal("no panic")
		}
		if want != nil {
			err, _ := v.(error)
			if !errors.Is(err, want) {
				t.Fatalf("panic %v, want %v", v, want)
			}
		}
	}()
	f()
}

func TestConsumerLifecycle(t *testing.T) {
	ps, _ := gochannel.New(gochannel.Config{}, nil)
	defer ps.Close()
	newC := func() *bus.Consumer {
		c, err := bus.NewConsumer(mediator.New(), nil, bus.ConsumerConfig{PoisonPublisher: ps, CloseTimeout: 5 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Subscribe("x", ps); err != nil {
			t.Fatal(err)
		}
		return c
	}

	// Close before Run returns at once and Run then refuses to start.
	c := newC()
	start := time.Now()
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("Close before Run took %v", d)
	}
	if err := c.Run(context.Background()); !errors.Is(err, bus.ErrConsumerClosed) {
		t.Fatalf("Run after Close: %v", err)
	}

	// Run, a second Run, Close twice, no registration while running.
	c = newC()
	done := make(chan error, 1)
	go func() { done <- c.Run(context.Background()) }()
	<-c.Running()
	if err := c.Run(context.Background()); !errors.Is(err, bus.ErrConsumerRunning) {
		t.Fatalf("second Run: %v", err)
	}
	if err := c.Subscribe("y", ps); !errors.Is(err, bus.ErrConsumerRunning) {
		t.Fatalf("Subscribe while running: %v", err)
	}
	mustPanic(t, bus.ErrConsumerRunning, func() { bus.HandleCommand[ReserveStock](c) })
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}

	// Cancelling Run's context stops it too.
	c = newC()
	ctx, cancel := context.WithCancel(context.Background())
	go func() { done <- c.Run(ctx) }()
	select {
	case <-c.Running():
	case err := <-done:
		t.Fatalf("Run returned before running: %v", err)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after its context was cancelled")
	}
	_ = c.Close()
}

// A command kind the consumer decodes but the mediator has no handler for
// is poisoned at once: retrying cannot register one.
func TestConsumerNoMediatorHandlerIsPermanent(t *testing.T) {
	ps, _ := gochannel.New(gochannel.Config{}, nil)
	defer ps.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	poison, _ := ps.Subscribe(ctx, "poison")
	c, err := bus.NewConsumer(mediator.New(), nil, bus.ConsumerConfig{
		PoisonPublisher: ps, PoisonTopic: "poison", MaxAttempts: 5, InitialInterval: 10 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	bus.HandleCommand[ReserveStock](c)
	if err := c.Subscribe("stock", ps); err != nil {
		t.Fatal(err)
	}
	go func() { _ = c.Run(ctx) }()
	defer c.Close()
	<-c.Running()
	go func() { _ = ps.Publish("stock", stockMsg(t, ReserveStock{SKU: "x"})) }()
	select {
	case p := <-poison:
		p.Ack()
		if p.Metadata.Get(bus.MetaPoisonAttempts) != "1" || !strings.Contains(p.Metadata.Get(bus.MetaPoisonReason), "no handler") {
			t.Fatalf("poison metadata %v", p.Metadata)
		}
	case <-time.After(8 * time.Second): // before the first retry was due
		t.Fatal("not poisoned at once")
	}
}
