package main

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	nc "github.com/nats-io/nats.go"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/tailrace/tailrace/bus"
	busamqp "github.com/tailrace/tailrace/bus/amqp"
	busnats "github.com/tailrace/tailrace/bus/nats"
	"github.com/tailrace/tailrace/internal/testenv"
)

// poisonedMsg is a message as a bus.Consumer poisons it.
func poisonedMsg(kind, payload string) *message.Message {
	m := message.NewMessage(watermill.NewUUID(), []byte(payload))
	m.Metadata.Set("kind", kind)
	m.Metadata.Set("correlation_id", "req-1")
	m.Metadata.Set(bus.MetaPoisonReason, "handler: card declined (attempt 5)")
	m.Metadata.Set(bus.MetaPoisonAttempts, "5")
	m.Metadata.Set(bus.MetaPoisonPermanent, "false")
	m.Metadata.Set(bus.MetaPoisonDestination, "orders.events")
	m.Metadata.Set(bus.MetaPoisonConsumer, "billing")
	m.Metadata.Set(bus.MetaPoisonedAt, time.Now().UTC().Format(time.RFC3339Nano))
	return m
}

type poisonList struct {
	Messages []poisonJSON `json:"messages"`
}

// checkPoisonCLI runs list and replay against a poison queue that holds a
// and b, and returns after a was replayed; destination receives it.
func checkPoisonCLI(t *testing.T, broker, prefix string, a, b *message.Message) {
	t.Helper()
	base := []string{"--broker", broker, "--prefix", prefix}
	list := func() poisonList {
		t.Helper()
		out := mustRun(t, append([]string{"poison", "list", "--json"}, base...)...)
		var l poisonList
		if err := json.Unmarshal([]byte(out), &l); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		return l
	}
	// list twice: reading leaves the messages in place, in order.
	for range 2 {
		l := list()
		if len(l.Messages) != 2 || l.Messages[0].UUID != a.UUID || l.Messages[1].UUID != b.UUID ||
			l.Messages[0].Reason != "handler: card declined (attempt 5)" || l.Messages[0].Destination != "orders.events" ||
			l.Messages[0].Payload != `{"order":"o-1"}` || l.Messages[0].Headers["correlation_id"] != "req-1" {
			t.Fatalf("list: %+v", l)
		}
	}
	out := mustRun(t, append([]string{"poison", "list"}, base...)...)
	for _, want := range []string{"message " + a.UUID, "reason:      handler: card declined", "correlation_id: req-1", `payload (15 bytes): {"order":"o-1"}`, "2 poisoned message(s) shown"} {
		if !strings.Contains(out, want) {
			t.Fatalf("list: want %q in\n%s", want, out)
		}
	}
	// replay a, and an id that is not there: exit 1 naming it.
	code, out, errs := runOutbox(t, "", append([]string{"poison", "replay", a.UUID, "no-such-uuid"}, base...)...)
	if code != 1 || !strings.Contains(out, "replayed 1 poisoned message(s)") || !strings.Contains(errs, "no-such-uuid") {
		t.Fatalf("replay: %d\n%s%s", code, out, errs)
	}
	if l := list(); len(l.Messages) != 1 || l.Messages[0].UUID != b.UUID {
		t.Fatalf("after replay: %+v", l)
	}
	if code, _, errs := runOutbox(t, "", append([]string{"poison", "replay"}, base...)...); code != 2 || !strings.Contains(errs, "replay needs") {
		t.Fatalf("replay without selector: %d %s", code, errs)
	}
}

func TestPoisonCLIRabbitMQ(t *testing.T) {
	url := testenv.AMQPURL(t)
	prefix := testenv.UniqueName("poison") + "."
	prefixed := func(s string) string { return prefix + s }
	poison, dest := bus.DefaultPoisonTopic, "orders.events"
	pub, err := busamqp.NewPublisher(busamqp.Config{URL: url, Topology: busamqp.Topology{
		ExchangeName: prefixed, QueueName: prefixed, DeclareQueues: true, Topics: []string{poison, dest}, Declare: busamqp.DeclareUpFront,
	}}, watermill.NopLogger{})
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	conn, err := amqp091.Dial(url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	t.Cleanup(func() {
		ch, err := conn.Channel()
		if err != nil {
			return
		}
		for _, n := range []string{poison, dest} {
			_, _ = ch.QueueDelete(prefixed(n), false, false, false)
			_ = ch.ExchangeDelete(prefixed(n), false, false)
		}
	})
	a, b := poisonedMsg("orders.placed", `{"order":"o-1"}`), poisonedMsg("orders.placed", `{"order":"o-2"}`)
	if err := pub.Publish(poison, a, b); err != nil {
		t.Fatal(err)
	}
	checkPoisonCLI(t, url, prefix, a, b)

	// The destination's queue has a, without the poison headers.
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	d, ok, err := ch.Get(prefixed(dest), true)
	if err != nil || !ok {
		t.Fatalf("destination queue: %v %v", ok, err)
	}
	if d.Headers["_watermill_message_uuid"] != a.UUID || d.Headers[bus.MetaPoisonReason] != nil || d.Headers["correlation_id"] != "req-1" ||
		string(d.Body) != `{"order":"o-1"}` {
		t.Fatalf("replayed message: %v %s", d.Headers, d.Body)
	}
}

func TestPoisonCLINATS(t *testing.T) {
	url := testenv.NATSURL(t)
	prefix := testenv.UniqueName("poison") + "."
	poison, dest := prefix+bus.DefaultPoisonTopic, prefix+"orders.events"
	pub, err := busnats.NewPublisher(busnats.Config{URL: url}, watermill.NopLogger{})
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	conn, err := nc.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	js, err := conn.JetStream()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = js.DeleteStream(busnats.StreamName(poison))
		_ = js.DeleteStream(busnats.StreamName(dest))
	})
	// The destination's stream exists (a consumer reads it).
	if err := pub.Publish(dest, message.NewMessage(watermill.NewUUID(), []byte("earlier"))); err != nil {
		t.Fatal(err)
	}
	a, b := poisonedMsg("orders.placed", `{"order":"o-1"}`), poisonedMsg("orders.placed", `{"order":"o-2"}`)
	if err := pub.Publish(poison, a, b); err != nil {
		t.Fatal(err)
	}
	checkPoisonCLI(t, url, prefix, a, b)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	raw, err := js.GetLastMsg(busnats.StreamName(dest), dest, nc.Context(ctx))
	if err != nil {
		t.Fatal(err)
	}
	if raw.Header.Get("_watermill_message_uuid") != a.UUID || raw.Header.Get(bus.MetaPoisonReason) != "" || string(raw.Data) != `{"order":"o-1"}` {
		t.Fatalf("replayed message: %v %s", raw.Header, raw.Data)
	}
}
