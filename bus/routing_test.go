package bus_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/bus"
	"github.com/tailrace/tailrace/bus/gochannel"
	"github.com/tailrace/tailrace/policy"
)

// flaky wraps a publisher and fails its first n publishes of each message
// UUID (or every publish when n < 0), counting what it let through.
type flaky struct {
	next message.Publisher
	n    int
	err  error
	// only, when set, limits the failures to the messages it accepts.
	only func(*message.Message) bool

	mu    sync.Mutex
	tries map[string]int
	sent  atomic.Int64
}

func newFlaky(next message.Publisher, n int, err error) *flaky {
	return &flaky{next: next, n: n, err: err, tries: map[string]int{}}
}

func (f *flaky) Publish(topic string, msgs ...*message.Message) error {
	for _, m := range msgs {
		if f.only != nil && !f.only(m) {
			continue
		}
		f.mu.Lock()
		f.tries[m.UUID]++
		try := f.tries[m.UUID]
		f.mu.Unlock()
		if f.n < 0 || try <= f.n {
			return f.err
		}
	}
	if err := f.next.Publish(topic, msgs...); err != nil {
		return err
	}
	f.sent.Add(int64(len(msgs)))
	return nil
}

func (f *flaky) Close() error { return nil }

// recorder is a publisher that keeps what it receives, by topic.
type recorder struct {
	mu   sync.Mutex
	msgs map[string][]*message.Message
}

func newRecorder() *recorder { return &recorder{msgs: map[string][]*message.Message{}} }

func (r *recorder) Publish(topic string, msgs ...*message.Message) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.msgs[topic] = append(r.msgs[topic], msgs...)
	return nil
}

func (r *recorder) Close() error { return nil }

func (r *recorder) got(topic string) []*message.Message {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]*message.Message(nil), r.msgs[topic]...)
}

func mustPolicy(t testing.TB, src string) *policy.Policy {
	t.Helper()
	p, err := policy.Parse("test.json", []byte(src), nil)
	if err != nil {
		t.Fatalf("policy: %v", err)
	}
	return p
}

func newMsg(kind string) *message.Message {
	m := message.NewMessage(watermill.NewUUID(), []byte(`{}`))
	m.Metadata.Set(tailrace.MetaKind, kind)
	return m
}

const fanOutPolicy = `{
  "Rules": [
    {"Name": "orders", "Priority": 10, "Match": {"Event": "orders.*"},
     "Publishers": [{"Key": "good", "Destination": "orders"}, {"Key": "bad", "Destination": "orders-audit"}]}
  ],
  "Default": {"Publishers": [{"Key": "good", "Destination": "{topic}"}]}
}`

// TestRoutingFanOutOneFailingRoute: the healthy route receives exactly one
// copy while the failing one is retried, on the in-process transport.
func TestRoutingFanOutOneFailingRoute(t *testing.T) {
	ps, err := gochannel.New(gochannel.Config{NoWaitForAck: true, OutputBuffer: 64}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ps.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	good, err := ps.Subscribe(ctx, "orders")
	if err != nil {
		t.Fatal(err)
	}
	audit, err := ps.Subscribe(ctx, "orders-audit")
	if err != nil {
		t.Fatal(err)
	}

	reg := bus.NewRegistry()
	reg.Register("good", ps)
	bad := newFlaky(ps, 3, errors.New("broker down"))
	reg.Register("bad", bad)
	rp, err := bus.NewRoutingPublisher(reg, policy.Static(mustPolicy(t, fanOutPolicy)), nil, bus.RoutingConfig{})
	if err != nil {
		t.Fatal(err)
	}
	defer rp.Close()

	const n = 20
	var msgs []*message.Message
	for range n {
		msgs = append(msgs, newMsg("orders.placed"))
	}
	// The relay's retry, as it does it: the whole Publish again, with an
	// equal message (a fresh unwrap of the same envelope) each time.
	for _, m := range msgs {
		for attempt := 1; ; attempt++ {
			c := m.Copy()
			err := rp.Publish("orders.placed", c)
			if err == nil {
				if attempt != 4 {
					t.Fatalf("message %s succeeded at attempt %d, want 4", m.UUID, attempt)
				}
				break
			}
			if tailrace.IsPermanent(err) {
				t.Fatalf("transient route failure reported as permanent: %v", err)
			}
			var pe *bus.PublishError
			if !errors.As(err, &pe) || len(pe.Failed) != 1 || pe.Failed[0].Key != "bad" || pe.Routes != 2 {
				t.Fatalf("error = %#v, want a PublishError for route bad", err)
			}
			if attempt > 10 {
				t.Fatal("no success after 10 attempts")
			}
		}
	}
	if got := rp.Tracked(); got != 0 {
		t.Errorf("Tracked() = %d after every message succeeded, want 0", got)
	}

	count := func(ch <-chan *message.Message) map[string]int {
		seen := map[string]int{}
		deadline := time.After(500 * time.Millisecond)
		for {
			select {
			case m := <-ch:
				m.Ack()
				seen[m.UUID]++
				if m.Metadata.Get(tailrace.MetaPolicyRule) != "orders" || m.Metadata.Get(tailrace.MetaPolicyVersion) == "" {
					t.Errorf("message %s: policy stamps %v", m.UUID, m.Metadata)
				}
			case <-deadline:
				return seen
			}
		}
	}
	for name, ch := range map[string]<-chan *message.Message{"orders": good, "orders-audit": audit} {
		seen := count(ch)
		if len(seen) != n {
			t.Errorf("%s received %d distinct messages, want %d", name, len(seen), n)
		}
		for id, c := range seen {
			if c != 1 {
				t.Errorf("%s received message %s %d times, want exactly once", name, id, c)
			}
		}
	}
}

func TestRoutingStampsAndTopicPlaceholder(t *testing.T) {
	rec := newRecorder()
	reg := bus.NewRegistry()
	reg.Register("good", rec)
	pol := mustPolicy(t, fanOutPolicy)
	rp, err := bus.NewRoutingPublisher(reg, policy.Static(pol), nil, bus.RoutingConfig{})
	if err != nil {
		t.Fatal(err)
	}
	m := newMsg("billing.invoiced")
	if err := rp.Publish("staged-topic", m); err != nil {
		t.Fatal(err)
	}
	got := rec.got("staged-topic")
	if len(got) != 1 {
		t.Fatalf("staged-topic received %d messages, want 1 (Default routes to {topic})", len(got))
	}
	if v := got[0].Metadata.Get(tailrace.MetaPolicyVersion); v != pol.Version() {
		t.Errorf("%s = %q, want %q", tailrace.MetaPolicyVersion, v, pol.Version())
	}
	if r := got[0].Metadata.Get(tailrace.MetaPolicyRule); r != "default" {
		t.Errorf("%s = %q, want default", tailrace.MetaPolicyRule, r)
	}
}

func TestRoutingContinueRulesStamp(t *testing.T) {
	rec := newRecorder()
	reg := bus.NewRegistry()
	reg.Register("a", rec)
	reg.Register("b", rec)
	rp, err := bus.NewRoutingPublisher(reg, policy.Static(mustPolicy(t, `{
  "Rules": [
    {"Name": "audit", "Priority": 10, "Continue": true, "Match": {"Domain": "Orders"},
     "Publishers": [{"Key": "a", "Destination": "audit"}]},
    {"Name": "orders", "Priority": 5, "Match": {"Event": "OrderPlaced"},
     "Publishers": [{"Key": "b", "Destination": "orders"}]}
  ]}`)), nil, bus.RoutingConfig{})
	if err != nil {
		t.Fatal(err)
	}
	m := newMsg("OrderPlaced")
	m.Metadata.Set(tailrace.MetaDomain, "Orders")
	if err := rp.Publish("x", m); err != nil {
		t.Fatal(err)
	}
	for _, topic := range []string{"audit", "orders"} {
		got := rec.got(topic)
		if len(got) != 1 {
			t.Fatalf("%s received %d, want 1", topic, len(got))
		}
		if r := got[0].Metadata.Get(tailrace.MetaPolicyRule); r != "audit,orders" {
			t.Errorf("%s: rule stamp %q, want audit,orders", topic, r)
		}
		if got[0].UUID != m.UUID {
			t.Errorf("%s: copy UUID %s, want %s", topic, got[0].UUID, m.UUID)
		}
	}
	if _, ok := m.Metadata[tailrace.MetaPolicyRule]; ok {
		t.Error("fan-out stamped the caller's message; it must stamp copies")
	}
}

func TestRoutingNoRouteIsPermanent(t *testing.T) {
	reg := bus.NewRegistry()
	reg.Register("a", newRecorder())
	rp, err := bus.NewRoutingPublisher(reg, policy.Static(mustPolicy(t, `{"Rules": [
	  {"Priority": 1, "Match": {"Event": "known"}, "Publishers": [{"Key": "a", "Destination": "d"}]}]}`)), nil, bus.RoutingConfig{})
	if err != nil {
		t.Fatal(err)
	}
	err = rp.Publish("t", newMsg("unknown"))
	if !tailrace.IsPermanent(err) || !errors.Is(err, policy.ErrNoRoute) {
		t.Fatalf("err = %v; want a permanent error wrapping policy.ErrNoRoute", err)
	}
}

func TestRoutingUnknownPublisherIsPermanent(t *testing.T) {
	rec := newRecorder()
	reg := bus.NewRegistry()
	reg.Register("a", rec)
	// Loaded without KnownPublishers, so "ghost" passes the policy load.
	rp, err := bus.NewRoutingPublisher(reg, policy.Static(mustPolicy(t, `{"Default": {"Publishers": [
	  {"Key": "a", "Destination": "d"}, {"Key": "ghost", "Destination": "d"}]}}`)), nil, bus.RoutingConfig{})
	if err != nil {
		t.Fatal(err)
	}
	m := newMsg("k")
	err = rp.Publish("t", m)
	if !tailrace.IsPermanent(err) || !errors.Is(err, bus.ErrUnknownPublisher) {
		t.Fatalf("err = %v; want a permanent error wrapping ErrUnknownPublisher", err)
	}
	if n := len(rec.got("d")); n != 1 {
		t.Fatalf("the known route received %d copies, want 1", n)
	}
	// A replay of the dead letter (same UUID) does not duplicate the
	// delivered route while its state is tracked.
	_ = rp.Publish("t", m.Copy())
	if n := len(rec.got("d")); n != 1 {
		t.Fatalf("after a retry the known route has %d copies, want 1", n)
	}
}

// A mix of permanent and transient failures is transient as a whole: the
// relay keeps retrying the transient route.
func TestRoutingMixedFailuresAreTransient(t *testing.T) {
	reg := bus.NewRegistry()
	reg.Register("down", newFlaky(newRecorder(), -1, errors.New("connection refused")))
	reg.Register("refuses", newFlaky(newRecorder(), -1, tailrace.Permanent(errors.New("message too large"))))
	rp, err := bus.NewRoutingPublisher(reg, policy.Static(mustPolicy(t, `{"Default": {"Publishers": [
	  {"Key": "down", "Destination": "d"}, {"Key": "refuses", "Destination": "d"}]}}`)), nil, bus.RoutingConfig{})
	if err != nil {
		t.Fatal(err)
	}
	err = rp.Publish("t", newMsg("k"))
	var pe *bus.PublishError
	if err == nil || tailrace.IsPermanent(err) || !errors.As(err, &pe) || len(pe.Failed) != 2 {
		t.Fatalf("err = %v; want a transient *PublishError with 2 failures", err)
	}
}

func TestRoutingHotReload(t *testing.T) {
	rec := newRecorder()
	reg := bus.NewRegistry()
	reg.Register("a", rec)
	var cur atomic.Pointer[policy.Policy]
	cur.Store(mustPolicy(t, `{"Default": {"Publishers": [{"Key": "a", "Destination": "v1"}]}}`))
	rp, err := bus.NewRoutingPublisher(reg, providerFunc(cur.Load), nil, bus.RoutingConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if err := rp.Publish("t", newMsg("k")); err != nil {
		t.Fatal(err)
	}
	cur.Store(mustPolicy(t, `{"Default": {"Publishers": [{"Key": "a", "Destination": "v2"}]}}`))
	if err := rp.Publish("t", newMsg("k")); err != nil {
		t.Fatal(err)
	}
	if len(rec.got("v1")) != 1 || len(rec.got("v2")) != 1 {
		t.Fatalf("v1 %d, v2 %d; want 1 and 1", len(rec.got("v1")), len(rec.got("v2")))
	}
	if rec.got("v1")[0].Metadata.Get(tailrace.MetaPolicyVersion) == rec.got("v2")[0].Metadata.Get(tailrace.MetaPolicyVersion) {
		t.Error("both messages carry the same policy version")
	}
}

type providerFunc func() *policy.Policy

func (f providerFunc) Policy() *policy.Policy { return f() }

func TestRoutingTrackingIsBounded(t *testing.T) {
	reg := bus.NewRegistry()
	reg.Register("ok", newRecorder())
	reg.Register("down", newFlaky(newRecorder(), -1, errors.New("down")))
	rp, err := bus.NewRoutingPublisher(reg, policy.Static(mustPolicy(t, `{"Default": {"Publishers": [
	  {"Key": "ok", "Destination": "d"}, {"Key": "down", "Destination": "d"}]}}`)), nil, bus.RoutingConfig{MaxTracked: 10})
	if err != nil {
		t.Fatal(err)
	}
	for range 50 {
		_ = rp.Publish("t", newMsg("k"))
	}
	if got := rp.Tracked(); got != 10 {
		t.Fatalf("Tracked() = %d, want the bound 10", got)
	}
	_ = rp.Close()
	if err := rp.Publish("t", newMsg("k")); !errors.Is(err, bus.ErrRoutingClosed) {
		t.Fatalf("Publish after Close: %v", err)
	}
}

func TestRoutingConfigValidate(t *testing.T) {
	err := bus.RoutingConfig{Concurrency: -1, MaxTracked: -1, TrackTTL: -time.Second}.Validate()
	if err == nil {
		t.Fatal("want errors")
	}
	for _, f := range []string{"Concurrency", "MaxTracked", "TrackTTL"} {
		if !strings.Contains(err.Error(), f) {
			t.Errorf("error %q does not name %s", err, f)
		}
	}
	if _, err := bus.NewRoutingPublisher(nil, nil, nil, bus.RoutingConfig{}); err == nil {
		t.Error("NewRoutingPublisher(nil, nil) succeeded")
	}
}

// Concurrent publishes of many messages with several routes: no race, each
// route one copy per message.
func TestRoutingConcurrent(t *testing.T) {
	rec := newRecorder()
	reg := bus.NewRegistry()
	for i := range 4 {
		reg.Register(fmt.Sprintf("p%d", i), rec)
	}
	rp, err := bus.NewRoutingPublisher(reg, policy.Static(mustPolicy(t, `{"Default": {"Publishers": [
	  {"Key": "p0", "Destination": "a"}, {"Key": "p1", "Destination": "b"},
	  {"Key": "p2", "Destination": "c"}, {"Key": "p3", "Destination": "d"}]}}`)), nil, bus.RoutingConfig{Concurrency: 2})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 50 {
				if err := rp.Publish("t", newMsg("k")); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	for _, d := range []string{"a", "b", "c", "d"} {
		if n := len(rec.got(d)); n != 400 {
			t.Errorf("%s: %d messages, want 400", d, n)
		}
	}
}
