package outbox

import (
	"context"
	neturl "net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"

	busamqp "github.com/tailrace/tailrace/bus/amqp"
	"github.com/tailrace/tailrace/internal/testenv"
)

// Broker outages of a quiet service, against the real RabbitMQ behind a
// TCP proxy the test owns (cutProxy: connections reset, new ones refused;
// the shared broker keeps running). The relay runs in the test process on
// PostgreSQL and publishes through bus/amqp with its default reconnect
// settings. Short by default; TAILRACE_RELAY_FULL=1 (or TAILRACE_CHAOS=1)
// runs the lengths: a 40 s outage, a 20 s start while down.

func outageFull() bool {
	return os.Getenv("TAILRACE_RELAY_FULL") == "1" || os.Getenv("TAILRACE_CHAOS") == "1"
}

// outageRig is an outbox on PostgreSQL, a durable queue the test consumes
// from the real broker, and a proxy in front of the broker for the relay.
type outageRig struct {
	*relayRig
	url   string // the broker, unproxied
	cons  *amqpConsumer
	proxy *cutProxy
	pub   *busamqp.Publisher
}

func newOutageRig(t *testing.T, cutFirst bool) *outageRig {
	t.Helper()
	url := testenv.AMQPURL(t)
	g := newRelayRig(t, testenv.NewPostgres(t).DB, PostgreSQL)
	g.topic = testenv.UniqueName("tr_outage")
	o := &outageRig{relayRig: g, url: url, cons: consumeAMQP(t, url, g.topic)}
	u, err := neturl.Parse(url)
	if err != nil {
		t.Fatal(err)
	}
	o.proxy = newCutProxy(t, u.Host)
	if cutFirst {
		o.proxy.cut()
	}
	var logger watermill.LoggerAdapter
	if os.Getenv("TAILRACE_RELAY_LOG") != "" {
		logger = watermill.NewStdLogger(true, false)
	}
	// The default exchange: the routing key is the queue, named after the
	// topic. Reconnect settings are the defaults.
	o.pub, err = busamqp.NewPublisher(busamqp.Config{
		URL:      proxiedURL(t, url, o.proxy),
		Topology: busamqp.Topology{ExchangeName: func(string) string { return "" }},
	}, logger)
	if err != nil {
		t.Fatalf("NewPublisher with the broker %s: %v", map[bool]string{true: "cut", false: "up"}[cutFirst], err)
	}
	t.Cleanup(func() { _ = o.pub.Close() })
	return o
}

// stageUnroutable stages a message for a queue that does not exist: the
// broker returns it (mandatory), a failure of the message itself.
func (o *outageRig) stageUnroutable(t *testing.T, id string) {
	t.Helper()
	topic := o.topic
	o.topic = testenv.UniqueName("tr_nowhere")
	defer func() { o.topic = topic }()
	o.stage(t, relayMsg{id: id, key: id})
}

func (o *outageRig) dead(t *testing.T) int { return o.count(t, o.table+suffixDead) }

// relayCfg dead-letters a failing message within about a second: without
// outage mode, a broker outage would dead-letter everything pending.
func relayCfg() RelayConfig {
	return RelayConfig{MaxAttempts: 3, InitialInterval: 200 * time.Millisecond, MaxInterval: 500 * time.Millisecond}
}

// deliveryBound is the most the test accepts between the proxy's restore
// and the last delivery: the 5 s in the full run; more by default,
// on a CI box shared by parallel test binaries (the figure is logged).
func deliveryBound() time.Duration {
	if outageFull() {
		return 5 * time.Second
	}
	return 15 * time.Second
}

// TestRelayQuietBrokerOutage: a relay with nothing to do loses the broker;
// two messages are staged during the outage, plus one that no queue
// receives. Nothing is dead-lettered during the outage however long it
// lasts (MaxAttempts 3 at 200–500 ms would take about a second), the
// health check says so, both messages arrive within seconds of the
// restore, and the unroutable one is still dead-lettered after its 3
// attempts.
func TestRelayQuietBrokerOutage(t *testing.T) {
	outage := 5 * time.Second
	if outageFull() {
		outage = 40 * time.Second
	}
	o := newOutageRig(t, false)
	r := o.start(t, o.pub, relayCfg())
	h, err := NewHealth(o.db, HealthConfig{Dialect: o.d, Table: o.table, Relay: r})
	if err != nil {
		t.Fatal(err)
	}

	o.proxy.cut()
	cutAt := time.Now()
	msgs := []relayMsg{{id: "quiet-1", key: "k1"}, {id: "quiet-2", key: "k2"}}
	o.stage(t, msgs...)
	o.stageUnroutable(t, "unroutable-1")

	waitFor(t, 10*time.Second, "outage mode", func() bool { return r.Output().Down })
	t.Logf("outage mode %s after the cut", time.Since(cutAt).Round(time.Millisecond))
	if c, _ := h.Check(context.Background()).Component("publisher"); c.Status == HealthOK {
		t.Fatalf("publisher in outage mode: %+v; want not ok", c)
	}
	var unhealthyAfter time.Duration
	for time.Since(cutAt) < outage {
		if unhealthyAfter == 0 {
			rep := h.Check(context.Background())
			if c, _ := rep.Component("publisher"); c.Status == HealthUnhealthy {
				unhealthyAfter = time.Since(cutAt)
				t.Logf("health %s after %s: publisher: %s", rep.Status, unhealthyAfter.Round(time.Millisecond), c.Message)
			}
		}
		if n := o.dead(t); n != 0 {
			t.Fatalf("%d message(s) dead-lettered %s into a broker outage", n, time.Since(cutAt).Round(time.Second))
		}
		time.Sleep(250 * time.Millisecond)
	}
	if n := o.cons.n(); n != 0 {
		t.Fatalf("%d message(s) delivered through a cut proxy", n)
	}
	st := r.Output()
	if !st.Down || st.Waiting != 3 {
		t.Fatalf("after %s of outage: %+v; want down with 3 waiting", outage, st)
	}
	if outage > 15*time.Second && unhealthyAfter == 0 {
		t.Fatalf("the publisher component never turned unhealthy in a %s outage", outage)
	}

	o.proxy.restore()
	restored := time.Now()
	waitFor(t, 60*time.Second, "both messages after the restore", func() bool { return o.cons.n() >= 2 })
	took := time.Since(restored)
	t.Logf("OUTAGE quiet: %s outage, 2 pending: delivered %s after the restore, %d dead letters during the outage",
		outage, took.Round(time.Millisecond), 0)
	if took > deliveryBound() {
		t.Errorf("delivered %s after the restore; want at most %s", took.Round(time.Millisecond), deliveryBound())
	}
	waitFor(t, 30*time.Second, "the unroutable message dead-lettered", func() bool { return o.dead(t) == 1 })
	var attempts int
	var lastErr string
	if err := o.db.QueryRow(`SELECT attempts, last_error FROM `+o.d.quote(o.table+suffixDead)).Scan(&attempts, &lastErr); err != nil {
		t.Fatal(err)
	}
	if attempts != 3 || !strings.Contains(lastErr, "unroutable") && !strings.Contains(lastErr, "returned") {
		t.Fatalf("dead letter after %d attempts (%s); want the unroutable one after 3", attempts, lastErr)
	}
	if c, _ := h.Check(context.Background()).Component("publisher"); c.Status != HealthOK {
		t.Fatalf("publisher after recovery: %+v", c)
	}
	if l := makeLedger(msgs, o.cons.ids(), keyMap(msgs), 0); !l.clean() {
		t.Fatal(l)
	}
}

// TestRelayStartsWhileBrokerDown: the publisher and the relay are built
// and started while the broker cannot be reached, messages are staged,
// nothing is dead-lettered, and they arrive within seconds of the broker
// becoming reachable.
func TestRelayStartsWhileBrokerDown(t *testing.T) {
	down := 3 * time.Second
	if outageFull() {
		down = 20 * time.Second
	}
	o := newOutageRig(t, true)
	if o.pub.Connected() {
		t.Fatal("connected through a cut proxy")
	}
	r := o.start(t, o.pub, relayCfg())
	msgs := []relayMsg{{id: "early-1", key: "k1"}, {id: "early-2", key: "k2"}}
	o.stage(t, msgs...)
	waitFor(t, 10*time.Second, "outage mode", func() bool { return r.Output().Down })
	time.Sleep(down)
	if n := o.dead(t); n != 0 {
		t.Fatalf("%d message(s) dead-lettered while the broker was down", n)
	}
	o.proxy.restore()
	restored := time.Now()
	waitFor(t, 60*time.Second, "both messages after the restore", func() bool { return o.cons.n() >= 2 })
	took := time.Since(restored)
	t.Logf("OUTAGE start-while-down: down for %s, 2 pending: delivered %s after the restore, 0 dead letters", down, took.Round(time.Millisecond))
	if took > deliveryBound() {
		t.Errorf("delivered %s after the restore; want at most %s", took.Round(time.Millisecond), deliveryBound())
	}
	if l := makeLedger(msgs, o.cons.ids(), keyMap(msgs), 0); !l.clean() {
		t.Fatal(l)
	}
}
