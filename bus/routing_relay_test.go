package bus_test

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/tailrace/tailrace/bus"
	"github.com/tailrace/tailrace/bus/gochannel"
	"github.com/tailrace/tailrace/internal/testenv"
	"github.com/tailrace/tailrace/outbox"
	"github.com/tailrace/tailrace/policy"
)

type relayedEvent struct {
	ID string `json:"id"`
}

func (relayedEvent) Kind() string { return "orders.placed" }

type unroutedEvent struct{}

func (unroutedEvent) Kind() string { return "nobody.routes.this" }

// TestRoutingThroughRelay: the real relay retries a message whose second
// route fails three times (one message in four); the healthy route receives each message exactly
// once. A message no rule routes is dead-lettered after one attempt.
func TestRoutingThroughRelay(t *testing.T) {
	db := testenv.NewSQLite(t).DB
	ctx := context.Background()
	const table = "tailrace_outbox"
	if err := outbox.InitializeSchema(ctx, db, outbox.SQLite, table); err != nil {
		t.Fatal(err)
	}
	notifier := &outbox.Notifier{}
	ob, err := outbox.New(db, nil, outbox.Config{Dialect: outbox.SQLite, Notifier: notifier})
	if err != nil {
		t.Fatal(err)
	}

	ps, err := gochannel.New(gochannel.Config{NoWaitForAck: true, OutputBuffer: 256}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ps.Close()
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		mu   sync.Mutex
		got  = map[string]map[string]int{} // destination → uuid → copies
		seen = make(chan struct{}, 1024)
	)
	for _, dest := range []string{"orders", "orders-audit"} {
		ch, err := ps.Subscribe(sctx, dest)
		if err != nil {
			t.Fatal(err)
		}
		got[dest] = map[string]int{}
		go func() {
			for m := range ch {
				m.Ack()
				mu.Lock()
				got[dest][m.UUID]++
				mu.Unlock()
				seen <- struct{}{}
			}
		}()
	}
	reg := bus.NewRegistry()
	reg.Register("good", ps)
	// The audit route fails the first 3 attempts of one message in four.
	// (Fewer than 8 in all: the relay takes 8 different messages failing in
	// a row for a broker outage and slows down to probing one at a time.)
	bad := newFlaky(ps, 3, errors.New("broker down"))
	bad.only = func(m *message.Message) bool { return m.Metadata.Get("x-fail") == "yes" }
	reg.Register("bad", bad)
	pol, err := policy.Parse("p.json", []byte(`{"Rules": [
	  {"Name": "orders", "Priority": 10, "Match": {"Event": "orders.*"},
	   "Publishers": [{"Key": "good", "Destination": "orders"}, {"Key": "bad", "Destination": "orders-audit"}]}]}`),
		&policy.LoadOptions{KnownPublishers: reg.HasPublisher})
	if err != nil {
		t.Fatal(err)
	}
	rp, err := bus.NewRoutingPublisher(reg, policy.Static(pol), nil, bus.RoutingConfig{})
	if err != nil {
		t.Fatal(err)
	}
	relay, err := outbox.NewRelay(db, rp, slog.New(slog.DiscardHandler), outbox.RelayConfig{
		Dialect: outbox.SQLite, Table: table, Notifier: notifier, PollInterval: 50 * time.Millisecond,
		InitialInterval: 10 * time.Millisecond, MaxInterval: 50 * time.Millisecond, MaxAttempts: 10,
	})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- relay.Run(ctx) }()
	defer func() {
		_ = relay.Close()
		if err := <-done; err != nil {
			t.Errorf("relay: %v", err)
		}
	}()

	const n = 20
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := range n {
		msg := outbox.Message{Value: relayedEvent{ID: "o"}, Options: &outbox.StageOptions{
			Headers: map[string]string{"x-fail": map[bool]string{true: "yes", false: "no"}[i%4 == 0]},
		}}
		if err := ob.StageTx(ctx, tx, msg); err != nil {
			t.Fatal(err)
		}
	}
	if err := ob.StageTx(ctx, tx, unroutedEvent{}); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	notifier.Notify()

	deadline := time.After(30 * time.Second)
	for {
		var left int
		if err := db.QueryRow(`SELECT COUNT(*) FROM ` + table).Scan(&left); err != nil {
			t.Fatal(err)
		}
		if left == 0 {
			break
		}
		select {
		case <-deadline:
			t.Fatalf("%d rows still in the outbox after 30 s", left)
		case <-time.After(20 * time.Millisecond):
		}
	}
	// Let any stray copy arrive.
	time.Sleep(200 * time.Millisecond)
	mu.Lock()
	defer mu.Unlock()
	for dest, byID := range got {
		if len(byID) != n {
			t.Errorf("%s: %d distinct messages, want %d", dest, len(byID), n)
		}
		for id, c := range byID {
			if c != 1 {
				t.Errorf("%s: message %s arrived %d times, want once", dest, id, c)
			}
		}
	}
	if rp.Tracked() != 0 {
		t.Errorf("Tracked() = %d after every message was delivered", rp.Tracked())
	}

	dl, err := outbox.NewDeadLetters(db, outbox.SQLite, table)
	if err != nil {
		t.Fatal(err)
	}
	dead, err := dl.List(ctx, 0, 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(dead) != 1 || dead[0].Kind != "nobody.routes.this" || dead[0].Attempts != 1 {
		t.Fatalf("dead letters %+v; want the unrouted message, after 1 attempt", dead)
	}
	if !strings.Contains(dead[0].LastError, policy.ErrNoRoute.Error()) {
		t.Errorf("dead letter error %q does not say why", dead[0].LastError)
	}
}
