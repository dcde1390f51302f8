package outbox

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/internal/testenv"
)

// TestRelayQuietOutageCostsNoAttempt: two messages pending, the publisher
// fails with transport errors (tailrace.Unavailable) for far longer than
// MaxAttempts × the retry delay would allow: the relay goes into outage
// mode at the first failure, dead-letters nothing, reports the outage in
// Output, and delivers both within a second or so of the publisher
// working again. A third message that fails for a reason of its own
// (unmarked) still dead-letters after MaxAttempts once the outage is over.
// The health check's "publisher" component and the outage gauges follow
// the outage.
func TestRelayQuietOutageCostsNoAttempt(t *testing.T) {
	g := newRelayRig(t, testenv.NewSQLite(t).DB, SQLite)
	pub := newRecPub()
	var mu sync.Mutex
	down := true
	pub.fail = func(id string, _ int) error {
		mu.Lock()
		defer mu.Unlock()
		switch {
		case down:
			return tailrace.Unavailable(errors.New("bus/test: not connected"))
		case id == "poison":
			return errors.New("bus/test: message unroutable")
		}
		return nil
	}
	r := g.start(t, pub, RelayConfig{MaxAttempts: 3, InitialInterval: 100 * time.Millisecond, MaxInterval: 200 * time.Millisecond})
	msgs := []relayMsg{{id: "a", key: "k1"}, {id: "b", key: "k2"}}
	g.stage(t, append(msgs, relayMsg{id: "poison", key: "k3"})...)

	h, err := NewHealth(g.db, HealthConfig{Dialect: g.d, Table: g.table, Relay: r, OutageUnhealthy: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	mr := newMetricsRig(t)
	m, err := NewMetrics(mr.mp)
	if err != nil {
		t.Fatal(err)
	}
	reg, err := m.ObserveRelay(g.table, r)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = reg.Unregister() }()
	publisher := func() HealthComponent {
		c, ok := h.Check(context.Background()).Component("publisher")
		if !ok {
			t.Fatal("no publisher component")
		}
		return c
	}
	if c := publisher(); c.Status != HealthOK {
		t.Fatalf("publisher before anything failed: %+v", c)
	}

	waitFor(t, 10*time.Second, "outage mode", func() bool { return r.Output().Down })
	if c := publisher(); c.Status != HealthDegraded {
		t.Fatalf("publisher at the start of the outage: %+v; want degraded", c)
	}
	// Without outage mode 3 attempts at 100–200 ms would dead-letter
	// everything within half a second.
	time.Sleep(2 * time.Second)
	st := r.Output()
	if !st.Down || st.Waiting != 3 || st.For < time.Second || st.LastError == "" {
		t.Fatalf("during the outage: %+v; want down for over 1 s with 3 waiting", st)
	}
	if n := g.count(t, g.table+suffixDead); n != 0 {
		t.Fatalf("%d messages dead-lettered during an outage", n)
	}
	c := publisher()
	if c.Status != HealthUnhealthy || !strings.Contains(c.Message, "3 message(s) waiting") || !strings.Contains(c.Message, "not connected") {
		t.Fatalf("publisher after 2 s of outage: %+v; want unhealthy, 3 waiting, the error", c)
	}
	t.Logf("health during the outage: publisher %s: %s", c.Status, c.Message)
	if v := mr.value(t, MetricRelayOutage); v != 1 {
		t.Fatalf("%s = %v during the outage", MetricRelayOutage, v)
	}
	if v := mr.value(t, MetricRelayOutageDuration); v < 1 {
		t.Fatalf("%s = %v after 2 s of outage", MetricRelayOutageDuration, v)
	}
	pub.mu.Lock()
	tries := pub.attempts["a"] + pub.attempts["b"] + pub.attempts["poison"]
	pub.mu.Unlock()
	// One probe at a time, at least 100 ms apart (jittered): about 10 in
	// 2 s, 3 for the first failures.
	if tries > 40 {
		t.Errorf("%d publish attempts in a 2 s outage; want one probe at a time", tries)
	}
	var attempts int
	if err := g.db.QueryRow(`SELECT COALESCE(MAX(attempts), 0) FROM ` + g.d.quote(g.table)).Scan(&attempts); err != nil {
		t.Fatal(err)
	}
	if attempts != 0 {
		t.Fatalf("an outage recorded %d attempts on a message", attempts)
	}

	mu.Lock()
	down = false
	mu.Unlock()
	back := time.Now()
	waitFor(t, 10*time.Second, "both messages after the outage", func() bool { return pub.n() == 2 })
	t.Logf("delivered %s after the publisher came back, %d publish attempts during the outage", time.Since(back).Round(time.Millisecond), tries)
	waitFor(t, 10*time.Second, "the poison message dead-lettered", func() bool { return g.count(t, g.table+suffixDead) == 1 })
	var n int
	if err := g.db.QueryRow(`SELECT attempts FROM ` + g.d.quote(g.table+suffixDead)).Scan(&n); err != nil {
		t.Fatal(err)
	}
	pub.mu.Lock()
	poisonTries := pub.attempts["poison"]
	pub.mu.Unlock()
	if n != 3 {
		t.Fatalf("dead letter after %d attempts; want 3 (MaxAttempts)", n)
	}
	if poisonTries < 3 {
		t.Fatalf("the poison message was published %d times; want its 3 attempts at least", poisonTries)
	}
	if st := r.Output(); st.Down {
		t.Fatalf("still down after recovery: %+v", st)
	}
	if c := publisher(); c.Status != HealthOK {
		t.Fatalf("publisher after recovery: %+v", c)
	}
	if v := mr.value(t, MetricRelayOutage); v != 0 {
		t.Fatalf("%s = %v after recovery", MetricRelayOutage, v)
	}
	if l := makeLedger(msgs, ids(pub.snapshot()), keyMap(msgs), 0); !l.clean() {
		t.Fatal(l)
	}
}

// TestRelayResumeReleasesRetryDelays: a message waiting out a long retry
// delay (it failed for an unclassified reason before the broker went away)
// goes out as soon as an outage ends, not after its backoff.
func TestRelayResumeReleasesRetryDelays(t *testing.T) {
	g := newRelayRig(t, testenv.NewSQLite(t).DB, SQLite)
	pub := newRecPub()
	var mu sync.Mutex
	down := false
	pub.fail = func(id string, attempt int) error {
		mu.Lock()
		defer mu.Unlock()
		switch {
		case down:
			return tailrace.Unavailable(errors.New("bus/test: not connected"))
		case id == "slow" && attempt == 1:
			return errors.New("bus/test: timeout talking to the broker")
		}
		return nil
	}
	r := g.start(t, pub, RelayConfig{InitialInterval: time.Minute, MaxInterval: time.Minute, Jitter: -1})
	g.stage(t, relayMsg{id: "slow", key: "k1"})
	waitFor(t, 10*time.Second, "the first failure", func() bool {
		pub.mu.Lock()
		defer pub.mu.Unlock()
		return pub.attempts["slow"] == 1
	})
	mu.Lock()
	down = true
	mu.Unlock()
	g.stage(t, relayMsg{id: "fresh", key: "k2"})
	waitFor(t, 10*time.Second, "outage mode", func() bool { return r.Output().Down })
	mu.Lock()
	down = false
	mu.Unlock()
	back := time.Now()
	// A minute's backoff otherwise.
	waitFor(t, 20*time.Second, "both messages after the outage", func() bool { return pub.n() == 2 })
	t.Logf("the message in its retry delay went %s after the outage ended", time.Since(back).Round(time.Millisecond))
}
