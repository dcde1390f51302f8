package nats_test

import (
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	nc "github.com/nats-io/nats.go"

	busnats "github.com/tailrace/tailrace/bus/nats"
	"github.com/tailrace/tailrace/internal/testenv"
)

// collector acks and records every message received on a channel.
type collector struct {
	mu   sync.Mutex
	seen map[string]int
	done chan struct{} // closed when the channel is closed
}

func collect(ch <-chan *message.Message) *collector {
	c := &collector{seen: map[string]int{}, done: make(chan struct{})}
	go func() {
		defer close(c.done)
		for msg := range ch {
			c.mu.Lock()
			c.seen[msg.UUID]++
			c.mu.Unlock()
			msg.Ack()
		}
	}()
	return c
}

func (c *collector) has(id string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.seen[id] > 0
}

// missing returns the ids not received yet.
func (c *collector) missing(ids []string) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	for _, id := range ids {
		if c.seen[id] == 0 {
			out = append(out, id)
		}
	}
	return out
}

// waitFor polls until cond holds, failing the test after timeout.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitAll waits until the collectors together received every id.
func waitAll(t *testing.T, timeout time.Duration, ids []string, cs ...*collector) {
	t.Helper()
	var left []string
	waitFor(t, timeout, "all messages received", func() bool {
		left = slices.Clone(ids)
		for _, c := range cs {
			left = c.missing(left)
		}
		return len(left) == 0
	})
}

// jetStream returns a management connection, closed when the test ends.
func jetStream(t *testing.T, url string) nc.JetStreamContext {
	t.Helper()
	conn, err := nc.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(conn.Close)
	js, err := conn.JetStream()
	if err != nil {
		t.Fatal(err)
	}
	return js
}

func newSubscriber(t *testing.T, cfg busnats.Config) *busnats.Subscriber {
	t.Helper()
	sub, err := busnats.NewSubscriber(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Close() })
	return sub
}

// A member of a group closing — the one that created the consumer — does
// not cut the others off: the consumer stays, and the remaining member gets
// every message published afterwards.
func TestGroupMemberCloseKeepsOthersReceiving(t *testing.T) {
	prefix := testenv.UniqueName("tr")
	url := setup(t, prefix)
	topic := prefix + ".members"
	// A message sent to the closing member just before its subscription
	// ended is redelivered to the other one after AckWait.
	cfg := busnats.Config{URL: url, ConsumerGroup: "workers", AckWait: 3 * time.Second, CloseTimeout: 5 * time.Second}

	first := newSubscriber(t, cfg) // creates the consumer
	ch1, err := first.Subscribe(t.Context(), topic)
	if err != nil {
		t.Fatal(err)
	}
	second := newSubscriber(t, cfg)
	ch2, err := second.Subscribe(t.Context(), topic)
	if err != nil {
		t.Fatal(err)
	}
	c1, c2 := collect(ch1), collect(ch2)

	before := publishN(t, url, topic, 20)
	waitAll(t, 30*time.Second, before, c1, c2)

	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	<-c1.done
	js := jetStream(t, url)
	if _, err := js.ConsumerInfo(busnats.StreamName(topic), busnats.ConsumerName("workers", topic)); err != nil {
		t.Fatalf("the group's consumer after one member closed: %v", err)
	}

	after := publishN(t, url, topic, 20)
	waitAll(t, 30*time.Second, after, c2)
}

// A group keeps its position while no member runs: a new member gets the
// messages published meanwhile and those left unacked, never the ones
// acked before.
func TestGroupResumesAfterAllMembersClosed(t *testing.T) {
	prefix := testenv.UniqueName("tr")
	url := setup(t, prefix)
	topic := prefix + ".resume"
	cfg := busnats.Config{URL: url, ConsumerGroup: "audit", AckWait: 3 * time.Second, CloseTimeout: 200 * time.Millisecond}

	ids := publishN(t, url, topic, 5)
	sub := newSubscriber(t, cfg)
	ch, err := sub.Subscribe(t.Context(), topic)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range ids[:3] {
		msg := receive(t, ch)
		if msg.UUID != want {
			t.Fatalf("got %s, want %s (stream order)", msg.UUID, want)
		}
		msg.Ack()
	}
	if msg := receive(t, ch); msg.UUID != ids[3] { // left unacked: given up on Close
		t.Fatalf("got %s, want %s", msg.UUID, ids[3])
	}
	if err := sub.Close(); err != nil { // returns after the acks reached the server
		t.Fatal(err)
	}

	ids = append(ids, publishN(t, url, topic, 3)...)
	next := newSubscriber(t, cfg)
	ch, err = next.Subscribe(t.Context(), topic)
	if err != nil {
		t.Fatal(err)
	}
	c := collect(ch)
	// ids[3] and ids[4] come back after AckWait, ids[5:] at once.
	waitAll(t, 30*time.Second, ids[3:], c)
	for i, id := range ids[:3] {
		if c.has(id) {
			t.Errorf("message %d, acked before the restart, was delivered again", i)
		}
	}
}

// Members subscribing at the same time, each on its own connection, all
// succeed — one creates the consumer, the others find it — and share the
// messages.
func TestGroupConcurrentCreate(t *testing.T) {
	prefix := testenv.UniqueName("tr")
	url := setup(t, prefix)
	for round := range 3 {
		topic := prefix + ".race" + string(rune('a'+round))
		cfg := busnats.Config{URL: url, ConsumerGroup: "race", Subscribers: 2, AckWait: 3 * time.Second}
		const members = 4
		subs := make([]*busnats.Subscriber, members)
		for i := range subs {
			subs[i] = newSubscriber(t, cfg)
			if err := subs[i].SubscribeInitialize(topic); err != nil {
				t.Fatal(err)
			}
		}
		chans := make([]<-chan *message.Message, members)
		errs := make([]error, members)
		start := make(chan struct{})
		var wg sync.WaitGroup
		for i, sub := range subs {
			wg.Go(func() {
				<-start
				chans[i], errs[i] = sub.Subscribe(t.Context(), topic)
			})
		}
		close(start)
		wg.Wait()
		var cs []*collector
		for i, err := range errs {
			if err != nil {
				t.Fatalf("round %d: member %d: %v", round, i, err)
			}
			cs = append(cs, collect(chans[i]))
		}
		ids := publishN(t, url, topic, 40)
		waitAll(t, 30*time.Second, ids, cs...)
		for _, sub := range subs {
			if err := sub.Close(); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// A consumer of the group's name that the subscriber cannot use is
// refused with an error saying what differs and what to do, and left as
// it is. One that differs only in ways that do not matter (its deliver
// subject, as left by an earlier version) is used.
func TestGroupIncompatibleConsumer(t *testing.T) {
	prefix := testenv.UniqueName("tr")
	url := setup(t, prefix)
	js := jetStream(t, url)

	for _, tc := range []struct {
		name  string
		edit  func(*nc.ConsumerConfig)
		wants []string // in the error; none: compatible
	}{
		{"other deliver group and ack wait", func(c *nc.ConsumerConfig) {
			c.DeliverGroup = "others"
			c.AckWait = 5 * time.Second
		}, []string{`deliver group is "others", want "g"`, "ack wait is 5s, want 30s"}},
		{"pull consumer", func(c *nc.ConsumerConfig) {
			c.DeliverSubject, c.DeliverGroup = "", ""
		}, []string{"pull consumer"}},
		{"other filter", func(c *nc.ConsumerConfig) { c.FilterSubject += ".sub" }, []string{"filter subject is"}},
		{"random deliver subject and deliver new", func(c *nc.ConsumerConfig) {
			c.DeliverPolicy = nc.DeliverNewPolicy
		}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			topic := prefix + "." + strings.ReplaceAll(tc.name, " ", "_")
			cfg := busnats.Config{URL: url, ConsumerGroup: "g"}
			stream, name := busnats.StreamName(topic), busnats.ConsumerName("g", topic)
			// Also capturing topic.> so that another filter is valid.
			if _, err := js.AddStream(&nc.StreamConfig{Name: stream, Subjects: []string{topic, topic + ".>"}}); err != nil {
				t.Fatal(err)
			}
			sub := newSubscriber(t, cfg)
			want := &nc.ConsumerConfig{
				Durable:        name,
				DeliverSubject: nc.NewInbox(),
				DeliverGroup:   "g",
				FilterSubject:  topic,
				DeliverPolicy:  nc.DeliverAllPolicy,
				AckPolicy:      nc.AckExplicitPolicy,
				AckWait:        busnats.DefaultAckWait,
			}
			tc.edit(want)
			created, err := js.AddConsumer(stream, want)
			if err != nil {
				t.Fatal(err)
			}

			ch, err := sub.Subscribe(t.Context(), topic)
			if tc.wants == nil {
				if err != nil {
					t.Fatalf("Subscribe to a compatible consumer: %v", err)
				}
				ids := publishN(t, url, topic, 3)
				waitAll(t, 30*time.Second, ids, collect(ch))
				return
			}
			if !errors.Is(err, busnats.ErrConsumerMismatch) {
				t.Fatalf("Subscribe: %v, want ErrConsumerMismatch", err)
			}
			for _, s := range append(tc.wants, name, stream, "delete the consumer", "another ConsumerGroup") {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error does not mention %q: %v", s, err)
				}
			}
			info, err := js.ConsumerInfo(stream, name)
			if err != nil {
				t.Fatalf("the mismatching consumer is gone: %v", err)
			}
			if info.Config.DeliverGroup != created.Config.DeliverGroup || info.Config.AckWait != created.Config.AckWait ||
				info.Config.DeliverSubject != created.Config.DeliverSubject {
				t.Fatalf("the mismatching consumer was changed: %+v, was %+v", info.Config, created.Config)
			}
		})
	}
}
