package nats_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	neturl "net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/pubsub/tests"
	nc "github.com/nats-io/nats.go"

	"github.com/tailrace/tailrace"
	busnats "github.com/tailrace/tailrace/bus/nats"
	"github.com/tailrace/tailrace/internal/testenv"
)

// setup returns the NATS URL and deletes, when the test ends, every stream
// whose name starts with prefix.
func setup(t *testing.T, prefix string) string {
	t.Helper()
	url := testenv.NATSURL(t)
	t.Cleanup(func() {
		conn, err := nc.Connect(url)
		if err != nil {
			t.Logf("cleanup: %v", err)
			return
		}
		defer conn.Close()
		js, err := conn.JetStream()
		if err != nil {
			t.Logf("cleanup: %v", err)
			return
		}
		for name := range js.StreamNames() {
			if strings.HasPrefix(name, prefix) {
				if err := js.DeleteStream(name); err != nil {
					t.Logf("cleanup: delete stream %s: %v", name, err)
				}
			}
		}
	})
	return url
}

func TestPublishWithoutStreamFails(t *testing.T) {
	prefix := testenv.UniqueName("tr")
	url := setup(t, prefix)
	pub, err := busnats.NewPublisher(busnats.Config{URL: url, NoProvision: true, PublishTimeout: 2 * time.Second}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	err = pub.Publish(prefix+".nostream", message.NewMessage(watermill.NewUUID(), nil))
	if !errors.Is(err, nc.ErrNoStreamResponse) && !errors.Is(err, nc.ErrNoResponders) {
		t.Fatalf("Publish to a subject no stream captures: got %v, want no responders", err)
	}

	prov, err := busnats.NewPublisher(busnats.Config{URL: url}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer prov.Close()
	msg := message.NewMessage(watermill.NewUUID(), []byte("x"))
	for range 2 { // the second copy is deduplicated by Nats-Msg-Id
		if err := prov.Publish(prefix+".orders", msg); err != nil {
			t.Fatalf("Publish with provisioning: %v", err)
		}
	}
	conn, _ := nc.Connect(url)
	defer conn.Close()
	js, _ := conn.JetStream()
	info, err := js.StreamInfo(busnats.StreamName(prefix + ".orders"))
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Msgs != 1 || info.Config.Storage != nc.FileStorage {
		t.Fatalf("stream holds %d messages (want 1, deduplicated), storage %v", info.State.Msgs, info.Config.Storage)
	}
}

func TestSecretsNeverLeak(t *testing.T) {
	const pw = "Tr0ub4dor%zz3"
	var out []string
	for _, url := range []string{
		"nats://user:" + pw + "@127.0.0.1:4222",
		"nats://user:" + strings.ReplaceAll(pw, "%", "") + "@127.0.0.1:1",
	} {
		_, err := busnats.NewPublisher(busnats.Config{URL: url, ConnectTimeout: time.Second, FailFast: true}, nil)
		if err == nil {
			t.Fatalf("connected to %s", url)
		}
		_, err2 := busnats.NewSubscriber(busnats.Config{URL: url, ConnectTimeout: time.Second}, nil)
		out = append(out, err.Error(), err2.Error())
	}
	text := strings.Join(out, "\n")
	for _, s := range []string{pw, "Tr0ub4dor"} {
		if strings.Contains(text, s) {
			t.Errorf("errors contain %q:\n%s", s, text)
		}
	}
	if !strings.Contains(text, "***") {
		t.Errorf("no redacted URL in:\n%s", text)
	}
}

// The universal suite runs twice: with MaxAckPending 1 the server pushes
// the next message only once the previous is settled, so the suite's
// ordering tests apply; with the default several messages are in flight and
// settled independently, and a nacked one comes back after others: order
// in the suite's sense is not claimed.
func TestUniversalPubSub(t *testing.T) {
	for _, tc := range []struct {
		name          string
		maxAckPending int
		ordered       bool
	}{
		{"maxackpending1", 1, true},
		{"default", 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) { universalPubSub(t, tc.maxAckPending, tc.ordered) })
	}
}

func universalPubSub(t *testing.T, maxAckPending int, ordered bool) {
	prefix := testenv.UniqueName("tr")
	url := setup(t, prefix)
	constructor := func(t *testing.T, group string) (message.Publisher, message.Subscriber) {
		// Close gives handed-over messages CloseTimeout (default 30s) to be
		// acked before giving them up. The suite often closes while holding
		// unacked messages: TestMessageCtx wants such a message's context
		// cancelled within 15s, and TestConcurrentSubscribe's multiplier
		// leaves one unacked per subscriber, closing them one by one.
		//
		// AckWait 5s: a message pushed to a member that was closing is given
		// up unacked and goes to the group's next member after AckWait; the
		// suite waits 15s for messages, the default AckWait is 30s.
		cfg := busnats.Config{URL: url, ConsumerGroup: group, CloseTimeout: 250 * time.Millisecond, AckWait: 5 * time.Second,
			MaxAckPending: maxAckPending}
		if group != "" {
			cfg.Subscribers = 2
		}
		pub, err := busnats.NewPublisher(cfg, nil)
		if err != nil {
			t.Fatal(err)
		}
		sub, err := busnats.NewSubscriber(cfg, nil)
		if err != nil {
			t.Fatal(err)
		}
		return pub, sub
	}
	tests.TestPubSub(t,
		tests.Features{
			ConsumerGroups:                      true,
			ExactlyOnceDelivery:                 false,
			GuaranteedOrder:                     ordered,
			GuaranteedOrderWithSingleSubscriber: ordered,
			Persistent:                          true,
			NewSubscriberReceivesOldMessages:    true,
			ForceShort:                          true,
			GenerateTopicFunc: func(tctx tests.TestContext) string {
				return prefix + "_" + string(tctx.TestID)
			},
		},
		func(t *testing.T) (message.Publisher, message.Subscriber) { return constructor(t, "") },
		constructor,
	)
}

// publishN publishes n messages to topic and returns their UUIDs in order.
func publishN(t *testing.T, url, topic string, n int) []string {
	t.Helper()
	pub, err := busnats.NewPublisher(busnats.Config{URL: url}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	var ids []string
	for range n {
		msg := message.NewMessage(watermill.NewUUID(), []byte("x"))
		if err := pub.Publish(topic, msg); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, msg.UUID)
	}
	return ids
}

func receive(t *testing.T, ch <-chan *message.Message) *message.Message {
	t.Helper()
	select {
	case msg, ok := <-ch:
		if !ok {
			t.Fatal("channel closed, want a message")
		}
		return msg
	case <-time.After(10 * time.Second):
		t.Fatal("no message within 10s")
	}
	return nil
}

func isClosed(ch <-chan *message.Message) bool {
	select {
	case _, ok := <-ch:
		return !ok
	default:
		return false
	}
}

// errorLog records what is logged at error level. (Watermill's
// CaptureLoggerAdapter hands out its map itself, which races with the NATS
// connection's callbacks that still log after Close returns.)
type errorLog struct {
	watermill.LoggerAdapter
	mu   sync.Mutex
	errs []string
}

func (l *errorLog) Error(msg string, err error, fields watermill.LogFields) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.errs = append(l.errs, fmt.Sprintf("%s: %v %v", msg, err, fields))
}

func (l *errorLog) With(watermill.LogFields) watermill.LoggerAdapter { return l }

func (l *errorLog) errors() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.errs)
}

// An ack sent while Close waits for in-flight messages reaches the server
// (AckSync succeeds, so nothing is logged as an error), and Close returns
// only after the channel is closed.
func TestCloseWaitsForInFlightAck(t *testing.T) {
	prefix := testenv.UniqueName("tr")
	url := setup(t, prefix)
	topic := prefix + ".inflight"
	ids := publishN(t, url, topic, 2)

	logs := &errorLog{LoggerAdapter: watermill.NopLogger{}}
	sub, err := busnats.NewSubscriber(busnats.Config{URL: url, ConsumerGroup: "g", CloseTimeout: 10 * time.Second}, logs)
	if err != nil {
		t.Fatal(err)
	}
	ch, err := sub.Subscribe(t.Context(), topic)
	if err != nil {
		t.Fatal(err)
	}
	msg := receive(t, ch)
	if msg.UUID != ids[0] {
		t.Fatalf("got %s, want the first message %s", msg.UUID, ids[0])
	}
	closed := make(chan error, 1)
	go func() { closed <- sub.Close() }()
	time.Sleep(300 * time.Millisecond)
	select {
	case err := <-closed:
		t.Fatalf("Close returned (%v) while a handed-over message waited for its ack", err)
	default:
	}
	if msg.Context().Err() != nil {
		t.Fatal("the in-flight message's context was cancelled before CloseTimeout")
	}
	acked := time.Now()
	msg.Ack()
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
	if d := time.Since(acked); d > 3*time.Second {
		t.Fatalf("Close took %v after the ack", d)
	}
	if !isClosed(ch) {
		t.Fatal("Close returned before the channel was closed")
	}
	if msg.Context().Err() == nil {
		t.Fatal("message context not cancelled after its ack")
	}
	if errs := logs.errors(); len(errs) > 0 {
		t.Fatalf("errors logged (the ack did not reach the server?): %q", errs)
	}
	if _, err := sub.Subscribe(t.Context(), topic); !errors.Is(err, busnats.ErrClosed) {
		t.Fatalf("Subscribe after Close: %v, want ErrClosed", err)
	}
}

// A message still unacked after CloseTimeout is given up: Close returns,
// the channel is closed and the message context cancelled.
func TestCloseGivesUpAfterCloseTimeout(t *testing.T) {
	prefix := testenv.UniqueName("tr")
	url := setup(t, prefix)
	topic := prefix + ".giveup"
	publishN(t, url, topic, 1)

	sub, err := busnats.NewSubscriber(busnats.Config{URL: url, CloseTimeout: 500 * time.Millisecond}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ch, err := sub.Subscribe(t.Context(), topic)
	if err != nil {
		t.Fatal(err)
	}
	msg := receive(t, ch)
	start := time.Now()
	if err := sub.Close(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 400*time.Millisecond || d > 5*time.Second {
		t.Fatalf("Close took %v, want about CloseTimeout (500ms)", d)
	}
	if !isClosed(ch) {
		t.Fatal("Close returned before the channel was closed")
	}
	if msg.Context().Err() == nil {
		t.Fatal("given-up message context not cancelled")
	}
	if err := sub.Close(); err != nil { // idempotent
		t.Fatal(err)
	}
}

// Subscriptions closed by their ctx and by Close while messages are being
// handed over: every channel is closed once, nothing is sent on a closed
// channel (a panic) and the race detector sees no race.
func TestCloseWhileDelivering(t *testing.T) {
	prefix := testenv.UniqueName("tr")
	url := setup(t, prefix)
	topic := prefix + ".churn"
	publishN(t, url, topic, 50)

	for round := range 5 {
		sub, err := busnats.NewSubscriber(busnats.Config{URL: url, ConsumerGroup: "churn", Subscribers: 4, CloseTimeout: time.Second}, nil)
		if err != nil {
			t.Fatal(err)
		}
		var chans []<-chan *message.Message
		for i := range 6 {
			ctx, cancel := context.WithCancel(t.Context())
			ch, err := sub.Subscribe(ctx, topic)
			if err != nil {
				t.Fatal(err)
			}
			chans = append(chans, ch)
			go func() {
				n := 0
				for msg := range ch {
					if n++; n%2 == 0 {
						msg.Nack()
					} else {
						msg.Ack()
					}
					if i%2 == 0 && n == 3 {
						cancel()
					}
				}
				cancel()
			}()
		}
		time.Sleep(time.Duration(round*20) * time.Millisecond)
		if err := sub.Close(); err != nil {
			t.Fatal(err)
		}
		for i, ch := range chans {
			if !isClosed(ch) {
				t.Fatalf("round %d: channel %d not closed when Close returned", round, i)
			}
		}
	}
}

// A publisher built while no server can be reached (a port nothing listens
// on yet): construction succeeds, Publish fails at once with
// ErrNotConnected marked tailrace.Unavailable; once a proxy to the real
// server listens on that port, the publisher connects by itself and
// Publish succeeds. FailFast keeps the error at construction.
func TestPublisherStartsWhileServerDown(t *testing.T) {
	prefix := testenv.UniqueName("tr")
	url := setup(t, prefix)
	u, err := neturl.Parse(url)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close() // nothing listens there now
	down := "nats://" + addr
	cfg := busnats.Config{URL: down, ConnectTimeout: time.Second, ReconnectWait: 100 * time.Millisecond, PublishTimeout: 2 * time.Second}

	ff := cfg
	ff.FailFast = true
	if p, err := busnats.NewPublisher(ff, nil); err == nil {
		_ = p.Close()
		t.Fatal("FailFast: NewPublisher succeeded with no server")
	}
	pub, err := busnats.NewPublisher(cfg, nil)
	if err != nil {
		t.Fatalf("NewPublisher with the server down: %v", err)
	}
	defer pub.Close()
	topic := prefix + ".down"
	err = pub.Publish(topic, message.NewMessage(watermill.NewUUID(), nil))
	if !errors.Is(err, busnats.ErrNotConnected) || !tailrace.IsUnavailable(err) {
		t.Fatalf("Publish while down: %v; want ErrNotConnected, unavailable", err)
	}

	ln, err = net.Listen("tcp", addr)
	if err != nil {
		t.Skipf("cannot listen on %s again: %v", addr, err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", u.Host)
			if err != nil {
				_ = c.Close()
				continue
			}
			go func() { _, _ = io.Copy(s, c); _ = s.Close() }()
			go func() { _, _ = io.Copy(c, s); _ = c.Close() }()
		}
	}()
	up := time.Now()
	for {
		err = pub.Publish(topic, message.NewMessage(watermill.NewUUID(), nil))
		if err == nil {
			break
		}
		if !tailrace.IsUnavailable(err) || time.Since(up) > 15*time.Second {
			t.Fatalf("Publish after the server became reachable: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("published %s after the server became reachable", time.Since(up).Round(time.Millisecond))
}

// A subject no stream captures is the message's failure, not the
// transport's.
func TestNoStreamIsNotUnavailable(t *testing.T) {
	prefix := testenv.UniqueName("tr")
	url := setup(t, prefix)
	pub, err := busnats.NewPublisher(busnats.Config{URL: url, NoProvision: true, PublishTimeout: 2 * time.Second}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	err = pub.Publish(prefix+".nostream", message.NewMessage(watermill.NewUUID(), nil))
	if err == nil || tailrace.IsUnavailable(err) {
		t.Fatalf("Publish to a subject no stream captures: %v (unavailable %v); want a failure of the message", err, tailrace.IsUnavailable(err))
	}
}

// Up to MaxAckPending messages are handed over before any ack, in stream
// order, and each is settled on its own: acked out of order, one nacked;
// only the nacked one comes again.
func TestSeveralInFlightSettledOutOfOrder(t *testing.T) {
	prefix := testenv.UniqueName("tr")
	url := setup(t, prefix)
	topic := prefix + ".window"
	ids := publishN(t, url, topic, 5)
	sub, err := busnats.NewSubscriber(busnats.Config{URL: url, MaxAckPending: 3, AckWait: time.Minute, CloseTimeout: time.Second}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	ch, err := sub.Subscribe(t.Context(), topic)
	if err != nil {
		t.Fatal(err)
	}
	var held []*message.Message
	for i := range 3 {
		m := receive(t, ch)
		if m.UUID != ids[i] {
			t.Fatalf("message %d is %s, want %s", i, m.UUID, ids[i])
		}
		held = append(held, m)
	}
	select {
	case m := <-ch:
		t.Fatalf("a fourth message %s beyond MaxAckPending 3", m.UUID)
	case <-time.After(300 * time.Millisecond):
	}
	held[2].Ack()
	held[0].Ack()
	held[1].Nack()
	got := map[string]int{}
	for range 3 { // 4, 5 and the nacked 2, in some order
		m := receive(t, ch)
		got[m.UUID]++
		m.Ack()
	}
	if got[ids[1]] != 1 || got[ids[3]] != 1 || got[ids[4]] != 1 {
		t.Fatalf("got %v; want %s (nacked), %s and %s once each", got, ids[1], ids[3], ids[4])
	}
	select {
	case m := <-ch:
		t.Fatalf("unexpected redelivery of %s", m.UUID)
	case <-time.After(300 * time.Millisecond):
	}
}
