package amqp_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/pubsub/tests"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/tailrace/tailrace"
	busamqp "github.com/tailrace/tailrace/bus/amqp"
	"github.com/tailrace/tailrace/internal/testenv"
)

// testBundle is one test's access to RabbitMQ: every exchange and queue its
// configs name is recorded and deleted when the test ends.
type testBundle struct {
	url    string
	prefix string
	admin  *amqp091.Connection

	mu        sync.Mutex
	exchanges map[string]bool
	queues    map[string]bool
}

func setup(t testing.TB) *testBundle {
	t.Helper()
	url := testenv.AMQPURL(t)
	admin, err := amqp091.Dial(url)
	if err != nil {
		t.Fatalf("dial RabbitMQ: %v", busamqp.RedactURL(err.Error()))
	}
	b := &testBundle{
		url:       url,
		prefix:    testenv.UniqueName("tr"),
		admin:     admin,
		exchanges: map[string]bool{},
		queues:    map[string]bool{},
	}
	t.Cleanup(func() {
		defer admin.Close()
		ch, err := admin.Channel()
		if err != nil {
			t.Logf("cleanup: open channel: %v", err)
			return
		}
		defer ch.Close()
		b.mu.Lock()
		defer b.mu.Unlock()
		for q := range b.queues {
			if _, err := ch.QueueDelete(q, false, false, false); err != nil {
				t.Logf("cleanup: delete queue %s: %v", q, err)
				return
			}
		}
		for x := range b.exchanges {
			if err := ch.ExchangeDelete(x, false, false); err != nil {
				t.Logf("cleanup: delete exchange %s: %v", x, err)
				return
			}
		}
	})
	return b
}

// config maps topic T to exchange <prefix>.T and queue <prefix>.T.<group>.
func (b *testBundle) config(group string) busamqp.Config {
	return busamqp.Config{
		URL: b.url,
		Topology: busamqp.Topology{
			ExchangeName: func(topic string) string {
				n := b.prefix + "." + topic
				b.mu.Lock()
				b.exchanges[n] = true
				b.mu.Unlock()
				return n
			},
			QueueName: func(topic string) string {
				n := b.prefix + "." + topic + "." + group
				b.mu.Lock()
				b.queues[n] = true
				b.mu.Unlock()
				return n
			},
		},
	}
}

func (b *testBundle) channel(t testing.TB) *amqp091.Channel {
	t.Helper()
	ch, err := b.admin.Channel()
	if err != nil {
		t.Fatalf("open channel: %v", err)
	}
	t.Cleanup(func() { _ = ch.Close() })
	return ch
}

func newPublisher(t testing.TB, cfg busamqp.Config, logger watermill.LoggerAdapter) *busamqp.Publisher {
	t.Helper()
	p, err := busamqp.NewPublisher(cfg, logger)
	if err != nil {
		t.Fatalf("NewPublisher: %v", err)
	}
	t.Cleanup(func() { _ = p.Close() })
	return p
}

func TestPublishIsConfirmedPersistentAndIdentified(t *testing.T) {
	b := setup(t)
	cfg := b.config("q")
	cfg.Topology.DeclareQueues = true
	p := newPublisher(t, cfg, nil)

	msgs := make([]*message.Message, 3)
	for i := range msgs {
		msgs[i] = message.NewMessage(watermill.NewUUID(), fmt.Appendf(nil, "payload-%d", i))
		msgs[i].Metadata.Set("kind", "OrderPlaced")
	}
	if err := p.Publish("orders", msgs...); err != nil {
		t.Fatalf("Publish: %v", err)
	}
	ch := b.channel(t)
	for i, want := range msgs {
		d, ok, err := ch.Get(cfg.Topology.QueueName("orders"), true)
		if err != nil || !ok {
			t.Fatalf("Get #%d: ok=%v err=%v", i, ok, err)
		}
		if d.DeliveryMode != amqp091.Persistent {
			t.Errorf("delivery mode %d, want persistent", d.DeliveryMode)
		}
		if d.MessageId != want.UUID || !bytes.Equal(d.Body, want.Payload) || d.Headers["kind"] != "OrderPlaced" {
			t.Errorf("got id %q body %q headers %v, want %q %q", d.MessageId, d.Body, d.Headers, want.UUID, want.Payload)
		}
	}
}

func TestPublishWithNoBoundQueueFails(t *testing.T) {
	b := setup(t)
	p := newPublisher(t, b.config("unused"), nil) // declares the exchange, binds nothing

	msg := message.NewMessage(watermill.NewUUID(), []byte("lost?"))
	err := p.Publish("nobody-listens", msg)
	if !errors.Is(err, busamqp.ErrUnroutable) {
		t.Fatalf("Publish to an exchange without queues: got %v, want ErrUnroutable", err)
	}
	var re *busamqp.ReturnedError
	if !errors.As(err, &re) || re.MessageUUID != msg.UUID || re.ReplyCode != 312 || re.Exchange != b.prefix+".nobody-listens" {
		t.Fatalf("ReturnedError = %+v", re)
	}

	// The default exchange with a queue that does not exist: unroutable too.
	cfg := b.config("unused")
	cfg.Topology.ExchangeName = func(string) string { return "" }
	p2 := newPublisher(t, cfg, nil)
	if err := p2.Publish("no-such-queue", message.NewMessage(watermill.NewUUID(), nil)); !errors.Is(err, busamqp.ErrUnroutable) {
		t.Fatalf("Publish to a missing queue via the default exchange: got %v, want ErrUnroutable", err)
	}

	// The publisher still works after returns.
	cfg = b.config("q")
	cfg.Topology.DeclareQueues = true
	p3 := newPublisher(t, cfg, nil)
	if err := p3.Publish("routable", message.NewMessage(watermill.NewUUID(), nil)); err != nil {
		t.Fatalf("routable publish after returns: %v", err)
	}
}

// Concurrent publishes, half unroutable, pipelined on one channel: each
// caller gets its own outcome, and exactly the routable ones are stored.
func TestConcurrentRoutableAndUnroutable(t *testing.T) {
	b := setup(t)
	cfg := b.config("q")
	p := newPublisher(t, cfg, nil)
	sub, err := busamqp.NewSubscriber(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	if err := sub.SubscribeInitialize("routable"); err != nil {
		t.Fatal(err)
	}

	const goroutines, each = 8, 40
	var wg sync.WaitGroup
	errs := make(chan error, goroutines*each)
	for g := 0; g < goroutines; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; i++ {
				// The same message to both topics: correlation must not mix them up.
				msg := message.NewMessage(watermill.NewUUID(), []byte("x"))
				if err := p.Publish("routable", msg); err != nil {
					errs <- fmt.Errorf("routable: %w", err)
				}
				if err := p.Publish("unroutable", msg); !errors.Is(err, busamqp.ErrUnroutable) {
					errs <- fmt.Errorf("unroutable: got %v", err)
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	q, err := b.channel(t).QueueDeclarePassive(cfg.Topology.QueueName("routable"), true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	if q.Messages != goroutines*each {
		t.Fatalf("queue holds %d messages, want %d", q.Messages, goroutines*each)
	}
}

func TestPublishHonoursTheMessageContext(t *testing.T) {
	b := setup(t)
	cfg := b.config("q")
	cfg.Topology.DeclareQueues = true
	p := newPublisher(t, cfg, nil)
	msg := message.NewMessage(watermill.NewUUID(), nil)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	msg.SetContext(ctx)
	if err := p.Publish("t", msg); !errors.Is(err, context.Canceled) {
		t.Fatalf("Publish with a cancelled context: got %v", err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if err := p.Publish("t", message.NewMessage(watermill.NewUUID(), nil)); !errors.Is(err, busamqp.ErrClosed) {
		t.Fatalf("Publish after Close: got %v, want ErrClosed", err)
	}
}

func TestDeclareUpFront(t *testing.T) {
	b := setup(t)
	cfg := b.config("q")
	cfg.Topology.Declare = busamqp.DeclareUpFront
	cfg.Topology.DeclareQueues = true
	cfg.Topology.Topics = []string{"a", "b"}
	p := newPublisher(t, cfg, nil)

	ch := b.channel(t)
	for _, topic := range cfg.Topology.Topics {
		if _, err := ch.QueueDeclarePassive(cfg.Topology.QueueName(topic), true, false, false, false, nil); err != nil {
			t.Fatalf("queue for %q not declared up front: %v", topic, err)
		}
	}
	if err := p.Publish("a", message.NewMessage(watermill.NewUUID(), nil)); err != nil {
		t.Fatalf("Publish to a declared topic: %v", err)
	}
	if err := p.Publish("c", message.NewMessage(watermill.NewUUID(), nil)); !errors.Is(err, busamqp.ErrUndeclaredTopic) {
		t.Fatalf("Publish to an undeclared topic: got %v, want ErrUndeclaredTopic", err)
	}
}

func TestDeclareNeverChecksTheExchange(t *testing.T) {
	b := setup(t)
	// Topology managed elsewhere: create it by hand.
	cfg := b.config("q")
	ch := b.channel(t)
	ex, q := cfg.Topology.ExchangeName("managed"), cfg.Topology.QueueName("managed")
	if err := ch.ExchangeDeclare(ex, "fanout", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDeclare(q, true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueBind(q, "", ex, false, nil); err != nil {
		t.Fatal(err)
	}

	cfg.Topology.Declare = busamqp.DeclareNever
	p := newPublisher(t, cfg, nil)
	if err := p.Publish("missing", message.NewMessage(watermill.NewUUID(), nil)); err == nil || !strings.Contains(err.Error(), "NOT_FOUND") {
		t.Fatalf("Publish to a missing exchange: got %v, want a NOT_FOUND error", err)
	}
	// The failed check did not break the publishing channel.
	if err := p.Publish("managed", message.NewMessage(watermill.NewUUID(), nil)); err != nil {
		t.Fatalf("Publish to the managed exchange: %v", err)
	}
}

func TestConfigValidateReportsEverything(t *testing.T) {
	cfg := busamqp.Config{
		URL:            "amqp://u:secretpw@host:5672/%zz",
		PublishTimeout: -1,
		MaxInFlight:    -5,
		Topology:       busamqp.Topology{ExchangeType: "weird", Declare: busamqp.DeclareUpFront},
	}
	_, err := busamqp.NewPublisher(cfg, nil)
	if err == nil {
		t.Fatal("NewPublisher accepted an invalid config")
	}
	for _, want := range []string{"invalid URL", "ExchangeType", "Topics", "PublishTimeout", "MaxInFlight"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not mention %s:\n%v", want, err)
		}
	}
	if strings.Contains(err.Error(), "secretpw") {
		t.Errorf("error leaks the password: %v", err)
	}
}

// syncBuffer is a bytes.Buffer safe for concurrent writers.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Every log line and error produced with a password in the URL is scanned
// for it: malformed URLs, refused credentials, an unreachable broker, a
// connection that drops and comes back, unroutable messages.
func TestSecretsNeverLeak(t *testing.T) {
	b := setup(t)
	logs := &syncBuffer{}
	logger := watermill.NewStdLoggerWithOut(logs, true, true)
	var seen []string
	record := func(err error) {
		if err != nil {
			seen = append(seen, err.Error(), fmt.Sprintf("%+v", err), fmt.Sprintf("%#v", err))
		}
	}

	const secret = "Tr0ub4dor%zz3"
	host := hostOf(b.url)
	for _, raw := range []string{
		"amqp://guest:" + secret + "@" + host,                                   // malformed escape
		"amqp://guest:" + strings.ReplaceAll(secret, "%", "") + "@" + host,      // refused credentials
		"amqp://guest:" + strings.ReplaceAll(secret, "%", "") + "@127.0.0.1:1/", // nothing listens
		"amqp://guest:" + secret + "@127.0.0.1:1/%zz",
	} {
		cfg := b.config("q")
		cfg.URL = raw
		cfg.DialTimeout = 2 * time.Second
		cfg.FailFast = true
		_, err := busamqp.NewPublisher(cfg, logger)
		if err == nil {
			t.Fatalf("NewPublisher(%s) succeeded", busamqp.RedactURL(raw))
		}
		record(err)
		_, err = busamqp.NewSubscriber(cfg, logger)
		record(err)
	}
	// Without FailFast an unreachable broker gives a publisher that logs
	// its connection attempts and fails Publish.
	cfg := b.config("q")
	cfg.URL = "amqp://guest:" + strings.ReplaceAll(secret, "%", "") + "@127.0.0.1:1/"
	cfg.ReconnectInitial = 20 * time.Millisecond
	cfg.ReconnectMax = 50 * time.Millisecond
	down := newPublisher(t, cfg, logger)
	time.Sleep(150 * time.Millisecond)
	record(down.Publish("t", message.NewMessage(watermill.NewUUID(), nil)))
	record(down.Close())

	// A working publisher whose connection drops, through a proxy that
	// carries the password in the URL it is given.
	px := newProxy(t, host)
	cfg = b.config("q")
	cfg.URL = strings.Replace(b.url, host, px.addr(), 1)
	cfg.ReconnectInitial = 20 * time.Millisecond
	cfg.ReconnectMax = 100 * time.Millisecond
	p := newPublisher(t, cfg, logger)
	record(p.Publish("unroutable", message.NewMessage(watermill.NewUUID(), nil)))
	px.dropAll()
	time.Sleep(300 * time.Millisecond)
	record(p.Publish("unroutable", message.NewMessage(watermill.NewUUID(), nil)))
	record(p.Close())

	text := logs.String() + "\n" + strings.Join(seen, "\n")
	if len(seen) == 0 || !strings.Contains(text, "***") {
		t.Fatalf("nothing redacted was captured; logs:\n%s", text)
	}
	userinfo := b.url[strings.Index(b.url, "://")+3 : strings.LastIndex(b.url, "@")]
	_, realPassword, _ := strings.Cut(userinfo, ":")
	for _, s := range []string{secret, strings.ReplaceAll(secret, "%", ""), "Tr0ub4dor", ":" + realPassword + "@"} {
		if strings.Contains(text, s) {
			t.Errorf("captured logs or errors contain %q:\n%s", s, text)
		}
	}
}

// proxy forwards TCP connections to RabbitMQ, so a test can cut them without
// touching the shared broker.
type proxy struct {
	t        testing.TB
	ln       net.Listener
	upstream string
	mu       sync.Mutex
	conns    []net.Conn
}

func newProxy(t testing.TB, upstream string) *proxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	px := &proxy{t: t, ln: ln, upstream: upstream}
	go px.serve(ln)
	t.Cleanup(px.stop)
	return px
}

func (px *proxy) addr() string { return px.ln.Addr().String() }

func (px *proxy) serve(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		u, err := net.Dial("tcp", px.upstream)
		if err != nil {
			_ = c.Close()
			continue
		}
		px.mu.Lock()
		px.conns = append(px.conns, c, u)
		px.mu.Unlock()
		go func() { _, _ = io.Copy(u, c); _ = u.Close() }()
		go func() { _, _ = io.Copy(c, u); _ = c.Close() }()
	}
}

// dropAll cuts every open connection; new ones are still accepted.
func (px *proxy) dropAll() {
	px.mu.Lock()
	defer px.mu.Unlock()
	for _, c := range px.conns {
		_ = c.Close()
	}
	px.conns = nil
}

// pause stops accepting and cuts every connection: a broker outage.
func (px *proxy) pause() {
	_ = px.ln.Close()
	px.dropAll()
}

// resume accepts again on the same address.
func (px *proxy) resume() {
	ln, err := net.Listen("tcp", px.addr())
	if err != nil {
		px.t.Fatalf("proxy resume: %v", err)
	}
	px.mu.Lock()
	px.ln = ln
	px.mu.Unlock()
	go px.serve(ln)
}

func (px *proxy) stop() {
	px.mu.Lock()
	ln := px.ln
	px.mu.Unlock()
	_ = ln.Close()
	px.dropAll()
}

// An outage (simulated by a proxy, the shared broker keeps running): Publish
// fails fast with ErrNotConnected instead of hanging, and works again once
// the publisher has reconnected by itself.
func TestReconnectAfterOutage(t *testing.T) {
	b := setup(t)
	host := hostOf(b.url)
	px := newProxy(t, host)
	cfg := b.config("q")
	cfg.URL = strings.Replace(b.url, host, px.addr(), 1)
	cfg.Topology.DeclareQueues = true
	cfg.ReconnectInitial = 20 * time.Millisecond
	cfg.ReconnectMax = 200 * time.Millisecond
	cfg.PublishTimeout = 5 * time.Second
	logs := &syncBuffer{}
	p := newPublisher(t, cfg, watermill.NewStdLoggerWithOut(logs, false, false))

	if err := p.Publish("t", message.NewMessage(watermill.NewUUID(), nil)); err != nil {
		t.Fatalf("Publish before the outage: %v", err)
	}
	px.pause()
	deadline := time.Now().Add(5 * time.Second)
	var err error
	for time.Now().Before(deadline) {
		start := time.Now()
		err = p.Publish("t", message.NewMessage(watermill.NewUUID(), nil))
		if time.Since(start) > cfg.PublishTimeout+time.Second {
			t.Fatalf("Publish during the outage took %v", time.Since(start))
		}
		if errors.Is(err, busamqp.ErrNotConnected) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !errors.Is(err, busamqp.ErrNotConnected) {
		t.Fatalf("Publish during the outage: got %v, want ErrNotConnected", err)
	}
	time.Sleep(500 * time.Millisecond) // a few failed reconnect attempts
	// Backoff from 20ms doubling to 200ms (with jitter down to half): about
	// 5 attempts in 500ms, never a hot loop.
	if n := strings.Count(logs.String(), "Reconnect failed"); n < 1 || n > 12 {
		t.Errorf("%d reconnect attempts in 500ms, want a handful:\n%s", n, logs.String())
	}
	px.resume()
	deadline = time.Now().Add(10 * time.Second)
	for {
		err = p.Publish("t", message.NewMessage(watermill.NewUUID(), nil))
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Publish after the outage: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !strings.Contains(logs.String(), "Reconnected") {
		t.Errorf("no reconnect logged:\n%s", logs.String())
	}
}

// The universal suite runs twice. With Prefetch 1 the broker holds back
// the next message until the previous is settled, so the suite's ordering
// tests (a nacked message comes back before the next one) apply. With a
// large prefetch several messages are in flight at once and are settled
// independently: a nacked message is requeued behind ones already handed
// over, so the order is not guaranteed in the suite's sense.
func TestUniversalPubSub(t *testing.T) {
	b := setup(t)
	for _, tc := range []struct {
		name     string
		prefetch int
		ordered  bool
	}{
		{"prefetch1", 1, true},
		{"prefetch256", 256, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			constructor := func(group string) (message.Publisher, message.Subscriber) {
				cfg := b.config(tc.name + "-" + group)
				cfg.Prefetch = tc.prefetch
				logger := watermill.NopLogger{}
				pub, err := busamqp.NewPublisher(cfg, logger)
				if err != nil {
					t.Fatal(err)
				}
				sub, err := busamqp.NewSubscriber(cfg, logger)
				if err != nil {
					t.Fatal(err)
				}
				return pub, sub
			}
			tests.TestPubSub(t,
				tests.Features{
					ConsumerGroups:                      true,
					ExactlyOnceDelivery:                 false,
					GuaranteedOrder:                     tc.ordered,
					GuaranteedOrderWithSingleSubscriber: tc.ordered,
					Persistent:                          true,
					// Short runs keep the suite well under two minutes on a
					// shared 2-core machine; the long version is the same
					// tests with 5,000-10,000 messages.
					ForceShort: true,
				},
				func(t *testing.T) (message.Publisher, message.Subscriber) { return constructor("default") },
				func(t *testing.T, group string) (message.Publisher, message.Subscriber) { return constructor(group) },
			)
		})
	}
}

// hostOf returns the host:port of an AMQP URL.
func hostOf(raw string) string {
	rest := raw[strings.Index(raw, "://")+3:]
	if i := strings.IndexAny(rest, "/?"); i >= 0 {
		rest = rest[:i]
	}
	return rest[strings.LastIndex(rest, "@")+1:]
}

// A publisher built while the broker is unreachable (a proxy that refuses
// connections; the shared broker keeps running): construction succeeds,
// Publish fails fast with ErrNotConnected marked tailrace.Unavailable, and
// the first Publish after the broker is reachable again succeeds within
// ReconnectMax or so. FailFast keeps the old error at construction. An
// unroutable message is the message's failure, not the transport's.
func TestPublisherStartsWhileBrokerDown(t *testing.T) {
	b := setup(t)
	host := hostOf(b.url)
	px := newProxy(t, host)
	px.pause()
	cfg := b.config("q")
	cfg.URL = strings.Replace(b.url, host, px.addr(), 1)
	cfg.DialTimeout = 2 * time.Second

	ff := cfg
	ff.FailFast = true
	if p, err := busamqp.NewPublisher(ff, nil); err == nil {
		_ = p.Close()
		t.Fatal("FailFast: NewPublisher succeeded with the broker unreachable")
	} else if !tailrace.IsUnavailable(fmt.Errorf("x: %w", err)) && !strings.Contains(err.Error(), "connect") {
		t.Fatalf("FailFast: unexpected error %v", err)
	}

	logs := &syncBuffer{}
	p := newPublisher(t, cfg, watermill.NewStdLoggerWithOut(logs, false, false))
	if p.Connected() {
		t.Fatal("connected through a paused proxy")
	}
	err := p.Publish("t", message.NewMessage(watermill.NewUUID(), nil))
	if !errors.Is(err, busamqp.ErrNotConnected) || !tailrace.IsUnavailable(err) {
		t.Fatalf("Publish while down: %v (unavailable %v); want ErrNotConnected, unavailable", err, tailrace.IsUnavailable(err))
	}
	px.resume()
	restored := time.Now()
	// No queue is bound to topic "t": once connected, the broker returns
	// the message, which is the message's failure, not the transport's.
	for {
		err = p.Publish("t", message.NewMessage(watermill.NewUUID(), nil))
		if !tailrace.IsUnavailable(err) {
			break
		}
		if time.Since(restored) > 15*time.Second {
			t.Fatalf("Publish 15 s after the broker became reachable: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("the broker answered a Publish %s after it became reachable (ReconnectMax %s)", time.Since(restored).Round(time.Millisecond), busamqp.DefaultReconnectMax)
	if !p.Connected() {
		t.Fatal("Connected() is false after a successful Publish")
	}
	if !errors.Is(err, busamqp.ErrUnroutable) || tailrace.IsUnavailable(err) {
		t.Fatalf("unroutable: %v (unavailable %v); want ErrUnroutable, not unavailable", err, tailrace.IsUnavailable(err))
	}
}
