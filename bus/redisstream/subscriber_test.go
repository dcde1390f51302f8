package redisstream_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/redis/go-redis/v9"

	"github.com/tailrace/tailrace/bus/redisstream"
	"github.com/tailrace/tailrace/internal/testenv"
)

// publishN appends n messages to topic and returns their UUIDs in order.
func publishN(t *testing.T, url, topic string, n int) []string {
	t.Helper()
	pub, err := redisstream.NewPublisher(redisstream.Config{URL: url}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	var ids []string
	for range n {
		m := message.NewMessage(watermill.NewUUID(), []byte("x"))
		if err := pub.Publish(topic, m); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, m.UUID)
	}
	return ids
}

func receive(t *testing.T, msgs <-chan *message.Message) *message.Message {
	t.Helper()
	select {
	case m, ok := <-msgs:
		if !ok {
			t.Fatal("channel closed")
		}
		return m
	case <-time.After(10 * time.Second):
		t.Fatal("no message within 10s")
	}
	return nil
}

// nothingFor checks that no message arrives for a while: a negative check,
// so a loaded machine can only make it pass, never fail wrongly.
func nothingFor(t *testing.T, msgs <-chan *message.Message, d time.Duration) {
	t.Helper()
	select {
	case m := <-msgs:
		t.Fatalf("unexpected message %s", m.UUID)
	case <-time.After(d):
	}
}

// pendingCount is the number of entries of group pending on topic.
func pendingCount(t *testing.T, topic, group string) int64 {
	t.Helper()
	cl := redis.NewClient(&redis.Options{Addr: testenv.RedisAddr(t)})
	defer cl.Close()
	p, err := cl.XPending(context.Background(), topic, group).Result()
	if err != nil {
		t.Fatal(err)
	}
	return p.Count
}

func waitPending(t *testing.T, topic, group string, want int64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := pendingCount(t, topic, group)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("pending entries: %d, want %d", got, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Up to MaxInFlight entries are handed over before any ack, in stream
// order; the next one waits for room in the window; acks settled out of
// order each XACK their own entry.
func TestSeveralInFlightSettledOutOfOrder(t *testing.T) {
	prefix := testenv.UniqueName("tr")
	url := setup(t, prefix)
	topic := prefix + ".window"
	ids := publishN(t, url, topic, 5)
	sub, err := redisstream.NewSubscriber(redisstream.Config{URL: url, ConsumerGroup: "g", MaxInFlight: 3}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	msgs, err := sub.Subscribe(ctx, topic)
	if err != nil {
		t.Fatal(err)
	}
	var held []*message.Message
	for i := range 3 {
		m := receive(t, msgs)
		if m.UUID != ids[i] {
			t.Fatalf("message %d: got %s, want %s (stream order)", i, m.UUID, ids[i])
		}
		held = append(held, m)
	}
	nothingFor(t, msgs, 300*time.Millisecond) // the window is full
	waitPending(t, topic, "g", 3)

	held[2].Ack() // the last first: its XACK frees the room for the 4th
	m := receive(t, msgs)
	if m.UUID != ids[3] {
		t.Fatalf("got %s, want %s", m.UUID, ids[3])
	}
	waitPending(t, topic, "g", 3) // the 1st, 2nd and 4th; the 3rd acked
	nothingFor(t, msgs, 300*time.Millisecond)
	held[0].Ack()
	m2 := receive(t, msgs)
	if m2.UUID != ids[4] {
		t.Fatalf("got %s, want %s", m2.UUID, ids[4])
	}
	m2.Ack()
	m.Ack()
	held[1].Ack()
	waitPending(t, topic, "g", 0)
	nothingFor(t, msgs, 300*time.Millisecond)
}

// A nacked entry is handed over again while the entries acked beside it
// are not; it stays pending until acked.
func TestNackedEntryComesAgain(t *testing.T) {
	prefix := testenv.UniqueName("tr")
	url := setup(t, prefix)
	topic := prefix + ".nack"
	ids := publishN(t, url, topic, 3)
	sub, err := redisstream.NewSubscriber(redisstream.Config{URL: url, ConsumerGroup: "g"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	msgs, err := sub.Subscribe(ctx, topic)
	if err != nil {
		t.Fatal(err)
	}
	var got []*message.Message
	for range 3 {
		got = append(got, receive(t, msgs))
	}
	got[1].Nack()
	got[0].Ack()
	got[2].Ack()
	again := receive(t, msgs)
	if again.UUID != ids[1] {
		t.Fatalf("after the nack got %s, want %s", again.UUID, ids[1])
	}
	nothingFor(t, msgs, 300*time.Millisecond) // the acked ones do not come again
	waitPending(t, topic, "g", 1)
	again.Ack()
	waitPending(t, topic, "g", 0)
	nothingFor(t, msgs, 300*time.Millisecond)
}

// Entries handed over and not acked when a subscriber closes stay pending;
// a subscriber with the same Consumer name gets them first on restart.
func TestPendingEntriesFirstOnRestart(t *testing.T) {
	prefix := testenv.UniqueName("tr")
	url := setup(t, prefix)
	topic := prefix + ".restart"
	ids := publishN(t, url, topic, 2)
	cfg := redisstream.Config{URL: url, ConsumerGroup: "g", Consumer: "c1", MaxInFlight: 1, CloseTimeout: 100 * time.Millisecond}
	sub, err := redisstream.NewSubscriber(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	msgs, err := sub.Subscribe(context.Background(), topic)
	if err != nil {
		t.Fatal(err)
	}
	if m := receive(t, msgs); m.UUID != ids[0] {
		t.Fatalf("got %s, want %s", m.UUID, ids[0])
	}
	if err := sub.Close(); err != nil { // not acked: given up after CloseTimeout
		t.Fatal(err)
	}
	more := publishN(t, url, topic, 1)
	sub2, err := redisstream.NewSubscriber(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer sub2.Close()
	msgs2, err := sub2.Subscribe(context.Background(), topic)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{ids[0], ids[1], more[0]} {
		m := receive(t, msgs2)
		if m.UUID != want {
			t.Fatalf("got %s, want %s", m.UUID, want)
		}
		m.Ack()
	}
	waitPending(t, topic, "g", 0)
}

// Close waits for a message already handed over: its ack, sent while Close
// waits, reaches the server; its context stays live meanwhile.
func TestCloseWaitsForInFlightAck(t *testing.T) {
	prefix := testenv.UniqueName("tr")
	url := setup(t, prefix)
	topic := prefix + ".close"
	publishN(t, url, topic, 1)
	sub, err := redisstream.NewSubscriber(redisstream.Config{URL: url, ConsumerGroup: "g", CloseTimeout: 10 * time.Second}, nil)
	if err != nil {
		t.Fatal(err)
	}
	msgs, err := sub.Subscribe(context.Background(), topic)
	if err != nil {
		t.Fatal(err)
	}
	m := receive(t, msgs)
	closed := make(chan error, 1)
	go func() { closed <- sub.Close() }()
	select {
	case _, ok := <-msgs: // the channel closes while the message is held
		if ok {
			t.Fatal("message after Close")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("channel not closed after Close")
	}
	select {
	case err := <-closed:
		t.Fatalf("Close returned (%v) before the in-flight message was acked", err)
	case <-time.After(200 * time.Millisecond):
	}
	if m.Context().Err() != nil {
		t.Fatal("the in-flight message's context was cancelled before CloseTimeout")
	}
	m.Ack()
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
	waitPending(t, topic, "g", 0)
}

func TestValidate(t *testing.T) {
	if err := (redisstream.Config{URL: "redis://127.0.0.1:6379/0"}).Validate(); err != nil {
		t.Fatalf("defaults: %v", err)
	}
	err := (redisstream.Config{URL: "redis://127.0.0.1:6379/0", MaxInFlight: -1, CloseTimeout: -time.Second}).Validate()
	if err == nil || !strings.Contains(err.Error(), "MaxInFlight") || !strings.Contains(err.Error(), "CloseTimeout") {
		t.Fatalf("Validate: %v; want MaxInFlight and CloseTimeout reported", err)
	}
}

// Members of the group idle with no pending entry are deleted; the
// subscriber's own member stays.
func TestIdleConsumersDeleted(t *testing.T) {
	defer redisstream.SetConsumerHousekeeping(20*time.Millisecond, 200*time.Millisecond)()
	prefix := testenv.UniqueName("tr")
	url := setup(t, prefix)
	topic := prefix + ".idle"
	cl := redis.NewClient(&redis.Options{Addr: testenv.RedisAddr(t)})
	defer cl.Close()
	ctx := context.Background()
	if err := cl.XGroupCreateMkStream(ctx, topic, "g", "0").Err(); err != nil {
		t.Fatal(err)
	}
	if err := cl.XGroupCreateConsumer(ctx, topic, "g", "old").Err(); err != nil {
		t.Fatal(err)
	}
	sub, err := redisstream.NewSubscriber(redisstream.Config{URL: url, ConsumerGroup: "g", Consumer: "me"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	if _, err := sub.Subscribe(ctx, topic); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		cs, err := cl.XInfoConsumers(ctx, topic, "g").Result()
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, c := range cs {
			names = append(names, c.Name)
		}
		if len(names) == 1 && names[0] == "me" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("consumers %v, want only [me]", names)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
