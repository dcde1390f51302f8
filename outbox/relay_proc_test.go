package outbox

import (
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	neturl "net/url"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill-amqp/v2/pkg/amqp"
	"github.com/ThreeDotsLabs/watermill/message"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/internal/testenv"
)

// Fault tests run the relay as a separate process — this test binary
// re-executed with TAILRACE_RELAY_CHILD=1 running TestRelayChildProcess —
// so that it can be killed with SIGKILL. The parent stages, consumes from
// RabbitMQ and keeps the ledger.

// newAMQPPublisher is the relay's output: publisher confirms on, a pool of
// channels so that many publishes wait for their confirms at once.
func newAMQPPublisher(url string, pool int) (*amqp.Publisher, error) {
	cfg := amqp.NewDurableQueueConfig(url)
	cfg.Publish.ConfirmDelivery = true
	cfg.Publish.ChannelPoolSize = pool
	return amqp.NewPublisher(cfg, watermill.NopLogger{})
}

// amqpConsumer records every message delivered on one durable queue.
type amqpConsumer struct {
	mu   sync.Mutex
	got  []string
	at   []time.Time
	sub  *amqp.Subscriber
	stop context.CancelFunc
}

// consumeAMQP declares the durable queue topic (so that published messages
// are routable), consumes it until the test ends and deletes it then.
func consumeAMQP(t testing.TB, url, topic string) *amqpConsumer {
	t.Helper()
	cfg := amqp.NewDurableQueueConfig(url)
	cfg.Consume.Qos.PrefetchCount = 1000
	sub, err := amqp.NewSubscriber(cfg, watermill.NopLogger{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ch, err := sub.Subscribe(ctx, topic)
	if err != nil {
		t.Fatal(err)
	}
	c := &amqpConsumer{sub: sub, stop: cancel}
	go func() {
		for m := range ch {
			c.mu.Lock()
			c.got = append(c.got, m.UUID)
			c.at = append(c.at, time.Now())
			c.mu.Unlock()
			m.Ack()
		}
	}()
	t.Cleanup(func() {
		cancel()
		_ = sub.Close()
		deleteQueue(url, topic)
	})
	return c
}

func (c *amqpConsumer) n() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.got)
}

func (c *amqpConsumer) ids() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.got...)
}

func deleteQueue(url, name string) {
	conn, err := amqp091.Dial(url)
	if err != nil {
		return
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return
	}
	_, _ = ch.QueueDelete(name, false, false, false)
}

// TestRelayChildProcess is not a test: it is the relay process of the fault
// tests, started by them with TAILRACE_RELAY_CHILD=1.
func TestRelayChildProcess(t *testing.T) {
	if os.Getenv("TAILRACE_RELAY_CHILD") != "1" {
		t.Skip("the relay process of the fault tests; runs only when they start it")
	}
	db, err := sql.Open("pgx", os.Getenv("TAILRACE_RELAY_CHILD_DB"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	pool, _ := strconv.Atoi(os.Getenv("TAILRACE_RELAY_CHILD_POOL"))
	pub, err := newAMQPPublisher(os.Getenv("TAILRACE_RELAY_CHILD_AMQP"), pool)
	if err != nil {
		t.Fatal(err)
	}
	ttl, _ := time.ParseDuration(os.Getenv("TAILRACE_RELAY_CHILD_TTL"))
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	r, err := NewRelay(db, pub, logger, RelayConfig{
		Dialect: PostgreSQL, Table: os.Getenv("TAILRACE_RELAY_CHILD_TABLE"),
		LeaseTTL: ttl, MaxInFlight: 256, CloseTimeout: 10 * time.Second,
		InitialInterval: 100 * time.Millisecond, MaxInterval: 2 * time.Second, MaxAttempts: 5,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	fmt.Println(relayChildReady)
	if err := r.Run(ctx); err != nil {
		t.Fatal(err)
	}
	// watermill-amqp v2.1.1's pooled publisher can panic in Close after a
	// reconnect (a pooled channel left nil when reopening it failed); the
	// process exits next anyway.
	func() {
		defer func() { _ = recover() }()
		_ = pub.Close()
	}()
	// Exit here, before the testing package turns a data race reported in
	// third-party code (watermill-amqp's reconnect) into a failure: the
	// parent inspects every race report and fails on any in tailrace code.
	os.Exit(0)
}

const relayChildReady = "RELAY_CHILD_READY"

// lockedBuffer is the child's output, written by exec and read by the test.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

type relayChild struct {
	cmd    *exec.Cmd
	stderr *lockedBuffer
	done   chan struct{} // closed when the process exited
	err    error         // its exit status, once done
}

func startRelayChild(t testing.TB, dbURL, table, amqpURL string, ttl time.Duration) *relayChild {
	t.Helper()
	return startRelayChildPool(t, dbURL, table, amqpURL, ttl, 64)
}

// startRelayChildPool starts a relay process whose AMQP publisher has pool
// pooled channels (0: a channel per publish).
func startRelayChildPool(t testing.TB, dbURL, table, amqpURL string, ttl time.Duration, pool int) *relayChild {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestRelayChildProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(),
		"TAILRACE_RELAY_CHILD=1",
		"TAILRACE_RELAY_CHILD_DB="+dbURL,
		"TAILRACE_RELAY_CHILD_TABLE="+table,
		"TAILRACE_RELAY_CHILD_AMQP="+amqpURL,
		"TAILRACE_RELAY_CHILD_TTL="+ttl.String(),
		"TAILRACE_RELAY_CHILD_POOL="+strconv.Itoa(pool),
		"GORACE=exitcode=0",
	)
	buf := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = buf, buf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c := &relayChild{cmd: cmd, stderr: buf, done: make(chan struct{})}
	go func() { c.err = cmd.Wait(); close(c.done) }()
	t.Cleanup(func() {
		select {
		case <-c.done:
		default:
			_ = cmd.Process.Kill() // our own child, by PID
			<-c.done
		}
		checkChildRaces(t, c.stderr.String())
	})
	return c
}

// checkChildRaces fails the test for a data race the relay process
// reported with a tailrace frame on top of either access, and logs the
// ones entirely inside dependencies.
func checkChildRaces(t testing.TB, out string) {
	blocks := strings.Split(out, "WARNING: DATA RACE")
	for _, b := range blocks[1:] {
		lines := strings.Split(b, "\n")
		var tops []string
		for i, l := range lines {
			l = strings.TrimSpace(l)
			if (strings.HasPrefix(l, "Write at") || strings.HasPrefix(l, "Read at") ||
				strings.HasPrefix(l, "Previous write at") || strings.HasPrefix(l, "Previous read at")) && i+1 < len(lines) {
				tops = append(tops, strings.TrimSpace(lines[i+1]))
			}
		}
		ours := false
		for _, f := range tops {
			if strings.Contains(f, "github.com/tailrace/tailrace") {
				ours = true
			}
		}
		if ours {
			t.Errorf("the relay process reported a data race in tailrace code:%s", b[:min(len(b), 4000)])
		} else {
			t.Logf("the relay process reported a data race inside a dependency (not ours): %v", tops)
		}
	}
}

func (c *relayChild) kill9(t testing.TB) {
	t.Helper()
	_ = c.cmd.Process.Signal(syscall.SIGKILL)
	<-c.done
}

// term asks the child to close gracefully and waits for it to exit.
func (c *relayChild) term(t testing.TB, timeout time.Duration) {
	t.Helper()
	waitFor(t, 30*time.Second, "the relay process to be ready", func() bool {
		return strings.Contains(c.stderr.String(), relayChildReady)
	})
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.done:
		if c.err != nil {
			t.Fatalf("relay process exited with %v:\n%s", c.err, c.stderr.String())
		}
	case <-time.After(timeout):
		t.Fatalf("relay process did not exit %s after SIGTERM", timeout)
	}
}

// relayFaultSize is the message count of the fault tests: 20,000 with
// TAILRACE_RELAY_FULL=1, a smaller but still many-batch drain by default.
func relayFaultSize(def int) int {
	if os.Getenv("TAILRACE_RELAY_FULL") == "1" {
		return 20000
	}
	if n, err := strconv.Atoi(os.Getenv("TAILRACE_RELAY_FAULT_N")); err == nil && n > 0 {
		return n
	}
	return def
}

type faultRig struct {
	*relayRig
	pg      *testenv.Postgres
	amqpURL string
	cons    *amqpConsumer
	msgs    []relayMsg
}

func newFaultRig(t *testing.T, n int) *faultRig {
	t.Helper()
	amqpURL := testenv.AMQPURL(t)
	pg := testenv.NewPostgres(t)
	g := newRelayRig(t, pg.DB, PostgreSQL)
	g.topic = testenv.UniqueName("relay_fault")
	cons := consumeAMQP(t, amqpURL, g.topic)
	msgs := genMsgs(0, n, 200)
	g.stageMany(t, msgs, 1000)
	return &faultRig{relayRig: g, pg: pg, amqpURL: amqpURL, cons: cons, msgs: msgs}
}

func (f *faultRig) check(t *testing.T, allowDup bool) ledger {
	t.Helper()
	waitFor(t, 60*time.Second, "every message at the consumer", func() bool {
		got := map[string]bool{}
		for _, id := range f.cons.ids() {
			got[id] = true
		}
		return len(got) >= len(f.msgs)
	})
	time.Sleep(300 * time.Millisecond) // stragglers, for the duplicate count
	stuck := f.count(t, f.table) + f.count(t, f.table+suffixDead)
	l := makeLedger(f.msgs, f.cons.ids(), keyMap(f.msgs), stuck)
	t.Logf("ledger over %d messages: %s", len(f.msgs), l)
	if len(l.lost)+len(l.unexpected)+l.stuck+len(l.orderViolations) > 0 || (!allowDup && len(l.duplicated) > 0) {
		t.Fatalf("ledger: %s; lost %v; order %v", l, head(l.lost), head(l.orderViolations))
	}
	return l
}

// TestRelayKill9: the relay process is killed with SIGKILL again and again
// during a drain; every message reaches RabbitMQ at least once, per-key
// order of first deliveries holds, and nothing is left behind.
func TestRelayKill9(t *testing.T) {
	f := newFaultRig(t, relayFaultSize(5000))
	const ttl = time.Second
	kills := 0
	start := time.Now()
	for kills < 6 && f.count(t, f.table) > 0 {
		c := startRelayChild(t, f.pg.URL, f.table, f.amqpURL, ttl)
		// Long enough for the next process to get the leases (ttl) and relay some.
		time.Sleep(ttl + time.Duration(300+rand.IntN(900))*time.Millisecond)
		c.kill9(t)
		kills++
	}
	c := startRelayChild(t, f.pg.URL, f.table, f.amqpURL, ttl)
	waitFor(t, 90*time.Second, "the outbox to drain", func() bool { return f.count(t, f.table) == 0 })
	c.term(t, 20*time.Second)
	l := f.check(t, true)
	t.Logf("%d kill -9 in %s; %d duplicates (bounded by in-flight + unflushed acks per kill)",
		kills, time.Since(start).Round(time.Millisecond), len(l.duplicated))
	if len(l.duplicated) > kills*(256+2*DefaultRelayBatchSize) {
		t.Errorf("%d duplicates for %d kills", len(l.duplicated), kills)
	}
}

// TestRelayGracefulCloseProcess: SIGTERM mid-drain closes the relay
// gracefully; a new process finishes; no message is lost or duplicated.
func TestRelayGracefulCloseProcess(t *testing.T) {
	f := newFaultRig(t, relayFaultSize(5000)/2)
	c := startRelayChild(t, f.pg.URL, f.table, f.amqpURL, time.Second)
	waitFor(t, 60*time.Second, "the drain to start", func() bool { return f.cons.n() >= len(f.msgs)/5 })
	c.term(t, 20*time.Second)
	left := f.count(t, f.table)
	if left == 0 {
		t.Log("the drain finished before SIGTERM; the close was not mid-drain")
	}
	// Released leases: the next process starts at once.
	c = startRelayChild(t, f.pg.URL, f.table, f.amqpURL, time.Second)
	waitFor(t, 60*time.Second, "the outbox to drain", func() bool { return f.count(t, f.table) == 0 })
	c.term(t, 20*time.Second)
	t.Logf("closed with %d rows left", left)
	f.check(t, false)
}

// TestRelayBrokerOutage stops RabbitMQ for 30 s under load. It stops the
// shared broker, so it runs only with TAILRACE_CHAOS=1 (and rabbitmqctl).
func TestRelayBrokerOutage(t *testing.T) {
	if os.Getenv("TAILRACE_CHAOS") != "1" {
		t.Skip("stops the shared RabbitMQ for 30 s; set TAILRACE_CHAOS=1 to run")
	}
	f := newFaultRig(t, relayFaultSize(5000))
	c := startRelayChild(t, f.pg.URL, f.table, f.amqpURL, time.Second)
	waitFor(t, 60*time.Second, "the drain to start", func() bool { return f.cons.n() >= len(f.msgs)/10 })
	if out, err := exec.Command("rabbitmqctl", "stop_app").CombinedOutput(); err != nil {
		t.Fatalf("rabbitmqctl stop_app: %v\n%s", err, out)
	}
	stopped := time.Now()
	restarted := false
	defer func() {
		if !restarted {
			_ = exec.Command("rabbitmqctl", "start_app").Run()
		}
	}()
	time.Sleep(30 * time.Second)
	if out, err := exec.Command("rabbitmqctl", "start_app").CombinedOutput(); err != nil {
		t.Fatalf("rabbitmqctl start_app: %v\n%s", err, out)
	}
	restarted = true
	t.Logf("broker down for %s", time.Since(stopped).Round(time.Second))
	// The test's consumer reconnects on its own (watermill-amqp).
	deadline := time.Now().Add(60 * time.Second)
	for f.count(t, f.table) > 0 {
		if time.Now().After(deadline) {
			_ = c.cmd.Process.Signal(syscall.SIGQUIT) // goroutine dump into the log
			time.Sleep(2 * time.Second)
			if os.Getenv("TAILRACE_RELAY_DUMP") != "" {
				_ = os.WriteFile(os.Getenv("TAILRACE_RELAY_DUMP"), []byte(c.stderr.String()), 0o644)
			}
			out := c.stderr.String()
			t.Fatalf("the outbox did not drain after the outage: %d rows left; relay log (tail):\n%s", f.count(t, f.table), out[max(0, len(out)-6000):])
		}
		time.Sleep(50 * time.Millisecond)
	}
	c.term(t, 20*time.Second)
	f.check(t, true)
}

// cutProxy is a TCP proxy in front of RabbitMQ that the test can cut: the
// relay process sees a broker outage (connections reset, new ones
// refused) while the shared broker and everyone else's tests are untouched.
type cutProxy struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	down   bool
	conns  []net.Conn
}

func newCutProxy(t testing.TB, target string) *cutProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cutProxy{ln: ln, target: target}
	go p.serve()
	t.Cleanup(func() { _ = ln.Close(); p.cut() })
	return p
}

func (p *cutProxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		down := p.down
		p.mu.Unlock()
		if down {
			_ = c.Close()
			continue
		}
		u, err := net.Dial("tcp", p.target)
		if err != nil {
			_ = c.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, c, u)
		p.mu.Unlock()
		go func() { _, _ = io.Copy(u, c); _ = u.Close() }()
		go func() { _, _ = io.Copy(c, u); _ = c.Close() }()
	}
}

// cut resets every proxied connection and refuses new ones until restore.
func (p *cutProxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = true
	for _, c := range p.conns {
		_ = c.Close()
	}
	p.conns = nil
}

func (p *cutProxy) restore() {
	p.mu.Lock()
	p.down = false
	p.mu.Unlock()
}

// proxiedURL is amqpURL with its host:port replaced by the proxy's.
func proxiedURL(t testing.TB, amqpURL string, p *cutProxy) string {
	u, err := neturl.Parse(amqpURL)
	if err != nil {
		t.Fatal(err)
	}
	u.Host = p.ln.Addr().String()
	return u.String()
}

// TestRelayBrokerCut: the relay process loses RabbitMQ under load (every
// connection reset, reconnects refused) for 5 s — 30 s with
// TAILRACE_RELAY_FULL=1 — through a proxy, so the shared broker keeps
// running for everyone else. Nothing is lost or dead-lettered; the drain
// resumes when the broker is reachable again.
func TestRelayBrokerCut(t *testing.T) {
	f := newFaultRig(t, relayFaultSize(4000))
	outage := 5 * time.Second
	if os.Getenv("TAILRACE_RELAY_FULL") == "1" {
		outage = 30 * time.Second
	}
	u, err := neturl.Parse(f.amqpURL)
	if err != nil {
		t.Fatal(err)
	}
	proxy := newCutProxy(t, u.Host)
	// No channel pool: watermill-amqp v2.1.1's pool loses a slot each time
	// reopening a pooled channel fails during a reconnect, and once all are
	// lost every Publish blocks for good.
	c := startRelayChildPool(t, f.pg.URL, f.table, proxiedURL(t, f.amqpURL, proxy), time.Second, 0)
	waitFor(t, 60*time.Second, "the drain to start", func() bool { return f.cons.n() >= len(f.msgs)/10 })
	proxy.cut()
	at := f.cons.n()
	time.Sleep(outage)
	during := f.cons.n() - at
	proxy.restore()
	t.Logf("broker cut for %s at %d of %d delivered; %d arrived during the cut (confirmed before it)", outage, at, len(f.msgs), during)
	deadline := time.Now().Add(60 * time.Second)
	for f.count(t, f.table) > 0 {
		if time.Now().After(deadline) {
			_ = c.cmd.Process.Signal(syscall.SIGQUIT) // goroutine dump into the log
			time.Sleep(2 * time.Second)
			if os.Getenv("TAILRACE_RELAY_DUMP") != "" {
				_ = os.WriteFile(os.Getenv("TAILRACE_RELAY_DUMP"), []byte(c.stderr.String()), 0o644)
			}
			out := c.stderr.String()
			t.Fatalf("the outbox did not drain after the outage: %d rows left; relay log (tail):\n%s", f.count(t, f.table), out[max(0, len(out)-6000):])
		}
		time.Sleep(50 * time.Millisecond)
	}
	c.term(t, 20*time.Second)
	f.check(t, true)
}

var _ message.Publisher = (*amqp.Publisher)(nil)
var _ = tailrace.IsPermanent
var _ = fmt.Sprint
