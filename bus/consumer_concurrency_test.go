package bus_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/bus"
	busamqp "github.com/tailrace/tailrace/bus/amqp"
	"github.com/tailrace/tailrace/bus/gochannel"
	"github.com/tailrace/tailrace/internal/testenv"
	"github.com/tailrace/tailrace/mediator"
)

// windowSub is a subscriber that hands over every message pushed to it at
// once, without waiting for acks (a broker with an unbounded prefetch), and
// records how each one was settled, in settlement order. It tests the
// Consumer's scheduling, not a transport: the transports have their own
// tests.
type windowSub struct {
	in chan *message.Message

	mu      sync.Mutex
	settled []string // "ack <uuid>" / "nack <uuid>", in order
	changed chan struct{}
	handed  atomic.Int64 // messages the consumer has taken from the channel
}

// waitHanded waits until the consumer has taken n messages.
func (s *windowSub) waitHanded(t *testing.T, n int64) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for s.handed.Load() < n {
		if time.Now().After(deadline) {
			t.Fatalf("the consumer took %d of %d messages", s.handed.Load(), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func newWindowSub() *windowSub {
	return &windowSub{in: make(chan *message.Message, 10_000), changed: make(chan struct{}, 1)}
}

func (s *windowSub) Subscribe(ctx context.Context, _ string) (<-chan *message.Message, error) {
	out := make(chan *message.Message)
	go func() {
		defer close(out)
		for {
			select {
			case m := <-s.in:
				go s.watch(m)
				select {
				case out <- m:
					s.handed.Add(1)
				case <-ctx.Done():
					m.Nack()
					return
				}
			case <-ctx.Done():
				return
			}
		}
	}()
	return out, nil
}

func (s *windowSub) Close() error { return nil }

func (s *windowSub) watch(m *message.Message) {
	var what string
	select {
	case <-m.Acked():
		what = "ack "
	case <-m.Nacked():
		what = "nack "
	}
	s.mu.Lock()
	s.settled = append(s.settled, what+m.UUID)
	s.mu.Unlock()
	select {
	case s.changed <- struct{}{}:
	default:
	}
}

// waitSettled waits until n messages are settled and returns the record.
func (s *windowSub) waitSettled(t *testing.T, n int) []string {
	t.Helper()
	deadline := time.After(60 * time.Second)
	for {
		s.mu.Lock()
		got := append([]string(nil), s.settled...)
		s.mu.Unlock()
		if len(got) >= n {
			return got
		}
		select {
		case <-s.changed:
		case <-time.After(50 * time.Millisecond):
		case <-deadline:
			t.Fatalf("%d of %d messages settled", len(got), n)
		}
	}
}

func keyedMsg(key string, seq int) *message.Message {
	m := message.NewMessage(watermill.NewUUID(), fmt.Appendf(nil, "%d", seq))
	m.Metadata.Set(tailrace.MetaKind, "test.keyed")
	if key != "" {
		m.Metadata.Set(tailrace.MetaPartitionKey, key)
	}
	return m
}

// runConsumer starts a consumer of "keyed" with f as the handler of
// test.keyed and returns it; Close runs at cleanup.
func runConsumer(t *testing.T, sub message.Subscriber, cfg bus.ConsumerConfig, f func(ctx context.Context, msg *message.Message) error) *bus.Consumer {
	t.Helper()
	if cfg.PoisonPublisher == nil {
		ps, err := gochannel.New(gochannel.Config{AllowNoSubscribers: true}, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = ps.Close() })
		cfg.PoisonPublisher = ps
	}
	c, err := bus.NewConsumer(mediator.New(), nil, cfg)
	if err != nil {
		t.Fatal(err)
	}
	c.HandleFunc("test.keyed", f)
	if err := c.Subscribe("keyed", sub); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- c.Run(context.Background()) }()
	t.Cleanup(func() {
		_ = c.Close()
		<-done
	})
	select {
	case <-c.Running():
	case err := <-done:
		t.Fatalf("Run: %v", err)
	}
	return c
}

// Many keys, many messages each, all delivered at once: each key's
// messages are handled one at a time and in delivery order, different keys
// in parallel, never more than Concurrency at once; a message that panics
// goes to the poison queue and its key goes on.
func TestConsumerConcurrentInOrderPerKey(t *testing.T) {
	const keys, perKey, concurrency = 20, 30, 8
	sub := newWindowSub()
	var (
		running, maxRunning atomic.Int64
		mu                  sync.Mutex
		next                = map[string]int{} // key -> next seq expected
		inFlight            = map[string]bool{}
		errs                []string
		parallel            = make(chan struct{})
		parallelOnce        sync.Once
	)
	poison, err := gochannel.New(gochannel.Config{NoWaitForAck: true}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer poison.Close()
	poisoned, err := poison.Subscribe(t.Context(), "tailrace_poison")
	if err != nil {
		t.Fatal(err)
	}
	runConsumer(t, sub, bus.ConsumerConfig{Concurrency: concurrency, PoisonPublisher: poison}, func(ctx context.Context, msg *message.Message) error {
		n := running.Add(1)
		defer running.Add(-1)
		for {
			m := maxRunning.Load()
			if n <= m || maxRunning.CompareAndSwap(m, n) {
				break
			}
		}
		if n >= 2 {
			parallelOnce.Do(func() { close(parallel) })
		}
		key := msg.Metadata.Get(tailrace.MetaPartitionKey)
		var seq int
		fmt.Sscan(string(msg.Payload), &seq)
		mu.Lock()
		if inFlight[key] {
			errs = append(errs, fmt.Sprintf("key %s: seq %d started while another of the key ran", key, seq))
		}
		inFlight[key] = true
		if next[key] != seq {
			errs = append(errs, fmt.Sprintf("key %s: seq %d handled, want %d", key, seq, next[key]))
		}
		next[key] = seq + 1
		mu.Unlock()
		if key == "k0" && seq == 0 {
			// The first message holds its key until another key's handler
			// runs beside it: without parallelism this never ends.
			select {
			case <-parallel:
			case <-time.After(30 * time.Second):
				mu.Lock()
				errs = append(errs, "no two handlers ever ran at once")
				mu.Unlock()
			}
		}
		mu.Lock()
		inFlight[key] = false
		mu.Unlock()
		if key == "k1" && seq == 5 {
			panic("boom")
		}
		return nil
	})
	for i := range perKey {
		for k := range keys {
			sub.in <- keyedMsg(fmt.Sprintf("k%d", k), i)
		}
	}
	settled := sub.waitSettled(t, keys*perKey)
	for _, s := range settled {
		if s[:4] == "nack" {
			t.Errorf("nacked: %s", s)
		}
	}
	select {
	case p := <-poisoned:
		if p.Metadata.Get(tailrace.MetaPartitionKey) != "k1" || string(p.Payload) != "5" {
			t.Errorf("poisoned %v %s, want k1/5", p.Metadata, p.Payload)
		}
	case <-time.After(10 * time.Second):
		t.Error("the panicking message was not poisoned")
	}
	mu.Lock()
	defer mu.Unlock()
	for _, e := range errs {
		t.Error(e)
	}
	for k := range keys {
		if got := next[fmt.Sprintf("k%d", k)]; got != perKey {
			t.Errorf("key k%d: %d handled, want %d", k, got, perKey)
		}
	}
	if m := maxRunning.Load(); m > concurrency || m < 2 {
		t.Errorf("at most %d handlers ran at once, want 2..%d", m, concurrency)
	}
}

// A message waiting for a retry holds its own key only: with Concurrency
// 1, the other keys' messages are all handled meanwhile; the next message
// of its key waits. Close then leaves both (nacked) without waiting for
// the retry.
func TestConsumerRetryHoldsOnlyItsKey(t *testing.T) {
	sub := newWindowSub()
	var (
		mu      sync.Mutex
		handled []string
	)
	failed := make(chan struct{})
	var failOnce sync.Once
	c := runConsumer(t, sub, bus.ConsumerConfig{
		Concurrency: 1, MaxAttempts: 3, InitialInterval: time.Hour, MaxInterval: time.Hour, CloseTimeout: 20 * time.Second,
	}, func(ctx context.Context, msg *message.Message) error {
		key := msg.Metadata.Get(tailrace.MetaPartitionKey)
		id := key + "/" + string(msg.Payload)
		if id == "a/0" {
			failOnce.Do(func() { close(failed) })
			return errors.New("not yet")
		}
		mu.Lock()
		handled = append(handled, id)
		mu.Unlock()
		return nil
	})
	a0, a1 := keyedMsg("a", 0), keyedMsg("a", 1)
	sub.in <- a0
	<-failed // a/0 now waits an hour for its second attempt
	sub.in <- a1
	for i := range 5 {
		sub.in <- keyedMsg("b", i)
		sub.in <- keyedMsg("", 100+i) // no key: independent
	}
	sub.waitSettled(t, 10)
	mu.Lock()
	if len(handled) != 10 {
		t.Errorf("handled %v; want the 10 messages of other keys", handled)
	}
	for _, h := range handled {
		if h[0] == 'a' {
			t.Errorf("%s handled while a/0 waited for its retry", h)
		}
	}
	mu.Unlock()

	start := time.Now()
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 15*time.Second {
		t.Errorf("Close took %v: it waited for the retry", d)
	}
	settled := sub.waitSettled(t, 12)
	want := map[string]bool{"nack " + a0.UUID: true, "nack " + a1.UUID: true}
	for _, s := range settled[10:] {
		if !want[s] {
			t.Errorf("settled %s; want a/0 and a/1 nacked", s)
		}
	}
}

// Acks go out as messages finish: a slow message is acked after a fast
// one delivered behind it (different keys).
func TestConsumerAcksOutOfOrder(t *testing.T) {
	sub := newWindowSub()
	fastAcked := make(chan struct{})
	slow, fast := keyedMsg("slow", 0), keyedMsg("fast", 0)
	go func() {
		<-fast.Acked()
		close(fastAcked)
	}()
	runConsumer(t, sub, bus.ConsumerConfig{}, func(ctx context.Context, msg *message.Message) error {
		if msg.UUID == slow.UUID {
			select {
			case <-fastAcked:
			case <-time.After(30 * time.Second):
				return tailrace.Permanent(errors.New("the fast message was not acked while the slow one ran"))
			}
		}
		return nil
	})
	sub.in <- slow
	sub.in <- fast
	got := sub.waitSettled(t, 2)
	if want := []string{"ack " + fast.UUID, "ack " + slow.UUID}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("settled %v, want %v", got, want)
	}
}

// Close lets a running handler finish (its context stays live), nacks the
// message of the same key waiting behind it, and returns once the handler
// is done; a handler still running after CloseTimeout gets its context
// cancelled.
func TestConsumerCloseWaitsForRunningHandlers(t *testing.T) {
	t.Run("finishes", func(t *testing.T) {
		sub := newWindowSub()
		started, release := make(chan struct{}), make(chan struct{})
		first, second := keyedMsg("k", 0), keyedMsg("k", 1)
		var ctxErr atomic.Value
		c := runConsumer(t, sub, bus.ConsumerConfig{CloseTimeout: 30 * time.Second}, func(ctx context.Context, msg *message.Message) error {
			if msg.UUID == first.UUID {
				close(started)
				<-release
				ctxErr.Store(fmt.Sprint(ctx.Err()))
				return nil
			}
			return errors.New("the second message ran")
		})
		sub.in <- first
		sub.in <- second
		<-started
		sub.waitHanded(t, 2) // second is with the consumer, waiting for its key
		closed := make(chan error, 1)
		go func() { closed <- c.Close() }()
		// Close waits for the running handler; second, waiting for its key,
		// is given up (nacked) rather than run.
		select {
		case err := <-closed:
			t.Fatalf("Close returned (%v) while a handler ran", err)
		case <-time.After(200 * time.Millisecond):
		}
		close(release)
		if err := <-closed; err != nil {
			t.Fatal(err)
		}
		got := sub.waitSettled(t, 2)
		if !slices.Contains(got, "nack "+second.UUID) || !slices.Contains(got, "ack "+first.UUID) {
			t.Fatalf("settled %v, want the running message acked and the waiting one nacked", got)
		}
		if e := ctxErr.Load(); e != "<nil>" {
			t.Fatalf("the running handler's context: %v, want live", e)
		}
	})
	t.Run("timeout", func(t *testing.T) {
		sub := newWindowSub()
		started := make(chan struct{})
		m := keyedMsg("k", 0)
		c := runConsumer(t, sub, bus.ConsumerConfig{CloseTimeout: 200 * time.Millisecond}, func(ctx context.Context, msg *message.Message) error {
			close(started)
			<-ctx.Done() // until Close gives up on it
			return ctx.Err()
		})
		sub.in <- m
		<-started
		_ = c.Close() // reports the timeout
		if got := sub.waitSettled(t, 1); got[0] != "nack "+m.UUID {
			t.Fatalf("settled %v, want the message nacked", got)
		}
	})
}

// Through RabbitMQ with the defaults (Prefetch 64, Concurrency 32): every
// message handled once, each key in publish order, several keys at once,
// and a message that fails twice first holds only its key.
func TestConsumerConcurrentThroughRabbitMQ(t *testing.T) {
	const keys, perKey = 20, 25
	url := testenv.AMQPURL(t)
	dest := testenv.UniqueName("tr_conc") + ".events"
	t.Cleanup(func() { deleteAMQP(t, url, dest) })
	cfg := busamqp.Config{URL: url, Topology: busamqp.Topology{DeclareQueues: true}}
	pub, err := busamqp.NewPublisher(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	sub, err := busamqp.NewSubscriber(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	if err := sub.SubscribeInitialize(dest); err != nil {
		t.Fatal(err)
	}
	var msgs []*message.Message
	for i := range perKey {
		for k := range keys {
			msgs = append(msgs, keyedMsg(fmt.Sprintf("k%d", k), i))
		}
	}
	if err := pub.Publish(dest, msgs...); err != nil {
		t.Fatal(err)
	}

	var (
		mu                  sync.Mutex
		next                = map[string]int{}
		handled             = map[string]int{}
		errs                []string
		running, maxRunning int
		failed              = map[string]int{}
		all                 = make(chan struct{})
	)
	c, err := bus.NewConsumer(mediator.New(), nil, bus.ConsumerConfig{
		PoisonPublisher: poisonPublisher{pub, dest + ".poison"}, InitialInterval: 20 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	c.HandleFunc("test.keyed", func(ctx context.Context, msg *message.Message) error {
		key := msg.Metadata.Get(tailrace.MetaPartitionKey)
		var seq int
		fmt.Sscan(string(msg.Payload), &seq)
		mu.Lock()
		running++
		maxRunning = max(maxRunning, running)
		mu.Unlock()
		time.Sleep(2 * time.Millisecond) // a little work, so handlers overlap
		mu.Lock()
		defer mu.Unlock()
		running--
		if key == "k3" && seq == 4 && failed[msg.UUID] < 2 {
			failed[msg.UUID]++
			return errors.New("not yet")
		}
		if next[key] != seq {
			errs = append(errs, fmt.Sprintf("key %s: seq %d handled, want %d", key, seq, next[key]))
		}
		next[key] = seq + 1
		if handled[msg.UUID]++; len(handled) == keys*perKey && handled[msg.UUID] == 1 {
			close(all)
		}
		return nil
	})
	if err := c.Subscribe(dest, sub); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- c.Run(context.Background()) }()
	select {
	case <-all:
	case <-time.After(2 * time.Minute):
		t.Error("not every message was handled within 2 minutes")
	}
	if err := c.Close(); err != nil {
		t.Error(err)
	}
	if err := <-done; err != nil {
		t.Error(err)
	}
	mu.Lock()
	defer mu.Unlock()
	for _, e := range errs {
		t.Error(e)
	}
	for id, n := range handled {
		if n != 1 {
			t.Errorf("message %s handled %d times", id, n)
		}
	}
	if maxRunning < 2 {
		t.Errorf("at most %d handlers ran at once, want several", maxRunning)
	}
	t.Logf("%d messages, %d keys, at most %d handlers at once", len(handled), keys, maxRunning)
}
