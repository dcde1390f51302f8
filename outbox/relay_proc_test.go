package outbox

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
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

	busamqp "github.com/tailrace/tailrace/bus/amqp"
	busnats "github.com/tailrace/tailrace/bus/nats"
	busredis "github.com/tailrace/tailrace/bus/redisstream"
	"github.com/tailrace/tailrace/internal/testenv"
)

// Fault tests run the relay as a separate process — this test binary
// re-executed with TAILRACE_RELAY_CHILD=1 running TestRelayChildProcess —
// so that it can be killed with SIGKILL. The parent stages, consumes from
// the broker and keeps the ledger. The relay process publishes with
// tailrace's own publishers (bus/amqp, bus/nats, bus/redisstream) and reads
// the outbox on PostgreSQL or MariaDB.

// newAMQPPublisher is watermill-amqp's publisher with confirms on and a pool
// of channels: the comparison baseline of the relay benchmarks.
func newAMQPPublisher(url string, pool int) (*amqp.Publisher, error) {
	cfg := amqp.NewDurableQueueConfig(url)
	cfg.Publish.ConfirmDelivery = true
	cfg.Publish.ChannelPoolSize = pool
	return amqp.NewPublisher(cfg, watermill.NopLogger{})
}

// faultConsumer is the parent's view of a broker: every delivery by
// message id, in arrival order.
type faultConsumer interface {
	n() int        // deliveries so far
	ids() []string // message ids in arrival order, repeats included
	note() string  // consumer-side events worth logging (reconnects, …)
}

// amqpConsumer records every message delivered on one durable queue. It is
// written over amqp091-go and reconnects by itself (RabbitMQ stopped and
// started again), so the parent runs no watermill-amqp reconnect code.
// A message the broker redelivers after the consumer's own connection
// dropped (unacked at the time) is counted apart, not as a relay duplicate.
type amqpConsumer struct {
	mu          sync.Mutex
	got         []string
	seen        map[string]bool
	redelivered int // redeliveries of ids already recorded
	sessions    int // connections opened
}

// consumeAMQP declares the durable queue (so that published messages are
// routable), consumes it until the test ends and deletes it then.
func consumeAMQP(t testing.TB, url, queue string) *amqpConsumer {
	t.Helper()
	c := &amqpConsumer{seen: map[string]bool{}}
	conn, err := amqp091.Dial(url)
	if err != nil {
		t.Fatal(err)
	}
	ch, err := conn.Channel()
	if err == nil {
		_, err = ch.QueueDeclare(queue, true, false, false, false, nil)
	}
	_ = conn.Close()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			err := c.session(ctx, url, queue)
			if ctx.Err() != nil {
				return
			}
			_ = err // the broker went away: reconnect
			select {
			case <-ctx.Done():
				return
			case <-time.After(200 * time.Millisecond):
			}
		}
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Error("the AMQP consumer did not stop")
		}
		deleteQueue(url, queue)
	})
	return c
}

// session consumes on one connection until it drops or ctx is done.
func (c *amqpConsumer) session(ctx context.Context, url, queue string) error {
	conn, err := amqp091.DialConfig(url, amqp091.Config{Dial: amqp091.DefaultDial(5 * time.Second)})
	if err != nil {
		return err
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return err
	}
	if err := ch.Qos(1000, 0, false); err != nil {
		return err
	}
	if _, err := ch.QueueDeclare(queue, true, false, false, false, nil); err != nil {
		return err
	}
	deliveries, err := ch.Consume(queue, "", false, false, false, false, nil)
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.sessions++
	c.mu.Unlock()
	for {
		select {
		case <-ctx.Done():
			return nil
		case d, ok := <-deliveries:
			if !ok {
				return errors.New("deliveries closed")
			}
			id, _ := d.Headers[amqp.DefaultMessageUUIDHeaderKey].(string)
			if id == "" {
				id = d.MessageId
			}
			c.mu.Lock()
			if d.Redelivered && c.seen[id] {
				c.redelivered++
			} else {
				c.seen[id] = true
				c.got = append(c.got, id)
			}
			c.mu.Unlock()
			_ = d.Ack(false)
		}
	}
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

func (c *amqpConsumer) note() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return fmt.Sprintf("consumer: %d connections, %d redeliveries of its own unacked messages (not counted)", c.sessions, c.redelivered)
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

// The relay process's settings, passed in its environment.
const (
	envChild        = "TAILRACE_RELAY_CHILD"
	envChildDialect = "TAILRACE_RELAY_CHILD_DIALECT" // postgres | mysql
	envChildDB      = "TAILRACE_RELAY_CHILD_DB"
	envChildTable   = "TAILRACE_RELAY_CHILD_TABLE"
	envChildBus     = "TAILRACE_RELAY_CHILD_BUS" // amqp | nats | redis
	envChildBusURL  = "TAILRACE_RELAY_CHILD_BUS_URL"
	envChildTTL     = "TAILRACE_RELAY_CHILD_TTL"
	envChildOwner   = "TAILRACE_RELAY_CHILD_OWNER" // RelayConfig.Owner; the default when empty
)

// relayChildMaxInFlight is the relay process's MaxInFlight: with two ack
// batches (BatchSize, the default) it bounds the duplicates one kill can
// cause.
const relayChildMaxInFlight = 256

// childPublisher is the relay process's output: tailrace's own publisher
// for the transport, reconnecting quickly so that a test's outage ends
// soon after the broker is back.
func childPublisher(kind, url string, logger watermill.LoggerAdapter) (message.Publisher, error) {
	switch kind {
	case "amqp":
		// The default exchange: the routing key is the queue, named after
		// the topic and declared by the test's consumer.
		return busamqp.NewPublisher(busamqp.Config{
			URL:              url,
			Topology:         busamqp.Topology{ExchangeName: func(string) string { return "" }},
			ReconnectInitial: 100 * time.Millisecond,
			ReconnectMax:     2 * time.Second,
			PublishTimeout:   10 * time.Second,
		}, logger)
	case "nats":
		// A PubAck wait shorter than the tests' cuts: publishes buffered by
		// the client during the cut time out and are retried by the relay,
		// and JetStream must drop the second copy (Nats-Msg-Id).
		return busnats.NewPublisher(busnats.Config{
			URL:            url,
			ReconnectWait:  250 * time.Millisecond,
			PublishTimeout: 2 * time.Second,
		}, logger)
	case "redis":
		return busredis.NewPublisher(busredis.Config{URL: url, DialTimeout: 2 * time.Second}, logger)
	}
	return nil, fmt.Errorf("unknown bus %q", kind)
}

// TestRelayChildProcess is not a test: it is the relay process of the fault
// tests, started by them with TAILRACE_RELAY_CHILD=1.
func TestRelayChildProcess(t *testing.T) {
	if os.Getenv(envChild) != "1" {
		t.Skip("the relay process of the fault tests; runs only when they start it")
	}
	driver, dialect := "pgx", Dialect(PostgreSQL)
	if os.Getenv(envChildDialect) == "mysql" {
		driver, dialect = "mysql", MySQL
	}
	db, err := sql.Open(driver, os.Getenv(envChildDB))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	pub, err := childPublisher(os.Getenv(envChildBus), os.Getenv(envChildBusURL), watermill.NewSlogLogger(logger))
	if err != nil {
		t.Fatal(err)
	}
	ttl, _ := time.ParseDuration(os.Getenv(envChildTTL))
	r, err := NewRelay(db, pub, logger, RelayConfig{
		Dialect: dialect, Table: os.Getenv(envChildTable),
		LeaseTTL: ttl, MaxInFlight: relayChildMaxInFlight, CloseTimeout: 10 * time.Second,
		Owner:           os.Getenv(envChildOwner),
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
	if err := pub.Close(); err != nil {
		t.Fatal(err)
	}
	// Exit here, before the testing package turns a data race reported in
	// third-party code into a failure: the parent inspects every race report
	// and fails on any with a tailrace frame (the relay, bus/*).
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

// startRelay starts a relay process on the rig's outbox publishing to
// busURL (the rig's broker, or a proxy in front of it), lease TTL 1 s.
func (f *faultRig) startRelay(t testing.TB, busURL string) *relayChild {
	t.Helper()
	return f.startRelayAs(t, busURL, "")
}

// startRelayAs is startRelay with the relay's lease owner name (its
// default, host-pid-random, when owner is empty).
func (f *faultRig) startRelayAs(t testing.TB, busURL, owner string) *relayChild {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestRelayChildProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(),
		envChild+"=1",
		envChildDialect+"="+f.dialect,
		envChildDB+"="+f.dbURL,
		envChildTable+"="+f.table,
		envChildBus+"="+f.bus,
		envChildBusURL+"="+busURL,
		envChildTTL+"="+time.Second.String(),
		envChildOwner+"="+owner,
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

// warnings counts the warning and error lines the relay process logged.
func (c *relayChild) warnings() int {
	out := c.stderr.String()
	return strings.Count(out, "level=WARN") + strings.Count(out, "level=ERROR")
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
	dialect string // the relay process's: postgres or mysql
	dbURL   string // its database URL / DSN
	bus     string // its transport: amqp, nats or redis
	busURL  string // the broker, unproxied
	cons    faultConsumer
	msgs    []relayMsg
}

// newFaultRig is an outbox on PostgreSQL relayed to RabbitMQ, with n
// messages staged.
func newFaultRig(t *testing.T, n int) *faultRig {
	return newFaultRigOn(t, n, "postgres", "amqp")
}

// newFaultRigOn is an outbox on dialect (postgres or mysql) relayed to bus
// (amqp, nats or redis), the parent consuming what arrives, with n messages
// over 200 keys staged.
func newFaultRigOn(t *testing.T, n int, dialect, bus string) *faultRig {
	t.Helper()
	f := &faultRig{dialect: dialect, bus: bus}
	topic := testenv.UniqueName("relay_fault")
	switch bus {
	case "amqp":
		f.busURL = testenv.AMQPURL(t)
		f.cons = consumeAMQP(t, f.busURL, topic)
	case "nats":
		f.busURL = testenv.NATSURL(t)
		f.cons = consumeNATS(t, f.busURL, topic)
	case "redis":
		f.busURL = "redis://" + testenv.RedisAddr(t) + "/0"
		f.cons = consumeRedis(t, f.busURL, topic)
	default:
		t.Fatalf("unknown bus %q", bus)
	}
	var db *sql.DB
	var d Dialect
	switch dialect {
	case "postgres":
		pg := testenv.NewPostgres(t)
		db, d, f.dbURL = pg.DB, PostgreSQL, pg.URL
	case "mysql":
		my := testenv.NewMySQL(t)
		db, d, f.dbURL = my.DB, MySQL, my.DSN
	default:
		t.Fatalf("unknown dialect %q", dialect)
	}
	f.relayRig = newRelayRig(t, db, d)
	f.topic = topic
	f.msgs = genMsgs(0, n, 200)
	f.stageMany(t, f.msgs, 1000)
	return f
}

// delivered is how many different messages reached the consumer.
func (f *faultRig) delivered() int {
	got := map[string]bool{}
	for _, id := range f.cons.ids() {
		got[id] = true
	}
	return len(got)
}

func (f *faultRig) check(t *testing.T, allowDup bool) ledger {
	t.Helper()
	waitFor(t, 60*time.Second, "every message at the consumer", func() bool { return f.delivered() >= len(f.msgs) })
	time.Sleep(300 * time.Millisecond) // stragglers, for the duplicate count
	stuck := f.count(t, f.table) + f.count(t, f.table+suffixDead)
	l := makeLedger(f.msgs, f.cons.ids(), keyMap(f.msgs), stuck)
	t.Logf("ledger over %d messages (%s outbox → %s): %s; %s", len(f.msgs), f.dialect, f.bus, l, f.cons.note())
	if len(l.lost)+len(l.unexpected)+l.stuck+len(l.orderViolations) > 0 || (!allowDup && len(l.duplicated) > 0) {
		t.Fatalf("ledger: %s; lost %v; order %v", l, head(l.lost), head(l.orderViolations))
	}
	return l
}

// waitRelayed waits until the relay deleted n rows from the outbox: they
// were confirmed by the broker. It watches the outbox rather than the
// consumer, so a consumer lagging on a loaded machine cannot delay the
// fault until the drain is over.
func (f *faultRig) waitRelayed(t *testing.T, n int) {
	t.Helper()
	waitFor(t, 60*time.Second, "the drain to start", func() bool { return f.count(t, f.table) <= len(f.msgs)-n })
}

// waitDrained waits until the outbox is empty; after timeout it dumps the
// relay process's goroutines into the failure.
func (f *faultRig) waitDrained(t *testing.T, c *relayChild, timeout time.Duration, what string) {
	t.Helper()
	f.waitDrainedAll(t, []*relayChild{c}, timeout, what)
}

// waitDrainedAll is waitDrained with several relay processes, every one of
// them dumped after timeout.
func (f *faultRig) waitDrainedAll(t *testing.T, cs []*relayChild, timeout time.Duration, what string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for f.count(t, f.table) > 0 {
		if time.Now().After(deadline) {
			for _, c := range cs {
				_ = c.cmd.Process.Signal(syscall.SIGQUIT) // goroutine dump into the log
			}
			var all, tails strings.Builder
			for i, c := range cs {
				select {
				case <-c.done:
				case <-time.After(5 * time.Second):
				}
				out := c.stderr.String()
				fmt.Fprintf(&all, "==== relay process %d (pid %d)\n%s\n", i, c.cmd.Process.Pid, out)
				fmt.Fprintf(&tails, "\n==== relay process %d (pid %d), tail:\n%s", i, c.cmd.Process.Pid, out[max(0, len(out)-6000/len(cs)):])
			}
			if os.Getenv("TAILRACE_RELAY_DUMP") != "" {
				_ = os.WriteFile(os.Getenv("TAILRACE_RELAY_DUMP"), []byte(all.String()), 0o644)
			}
			t.Fatalf("the outbox did not drain %s: %d rows left; relay log:%s", what, f.count(t, f.table), tails.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestRelayKill9: the relay process is killed with SIGKILL again and again
// during a drain; every message reaches RabbitMQ at least once, per-key
// order of first deliveries holds, and nothing is left behind. The outbox
// is on PostgreSQL; TestRelayKill9MariaDB is the same on MariaDB.
func TestRelayKill9(t *testing.T) {
	relayKill9(t, newFaultRig(t, relayFaultSize(5000)))
}

// TestRelayKill9MariaDB is TestRelayKill9 with the outbox on MariaDB: the
// relay's claims, lease takeovers and acknowledgements run on InnoDB.
func TestRelayKill9MariaDB(t *testing.T) {
	relayKill9(t, newFaultRigOn(t, relayFaultSize(3000), "mysql", "amqp"))
}

func relayKill9(t *testing.T, f *faultRig) {
	kills := 0
	start := time.Now()
	// Each process is killed once it relayed another 5–15 % of the messages
	// (after taking the leases over from the one killed before it, at
	// LeaseTTL): kills land mid-drain whatever the relay's speed.
	for kills < 6 && f.count(t, f.table) > 0 {
		c := f.startRelay(t, f.busURL)
		from := f.delivered()
		step := len(f.msgs)/20 + rand.IntN(len(f.msgs)/10+1)
		target := min(from+step, len(f.msgs))
		waitFor(t, 60*time.Second, "the relay process to relay some", func() bool { return f.delivered() >= target })
		c.kill9(t)
		kills++
	}
	c := f.startRelay(t, f.busURL)
	f.waitDrained(t, c, 120*time.Second, "after the kills")
	c.term(t, 20*time.Second)
	l := f.check(t, true)
	t.Logf("%d kill -9 in %s; %d duplicates (bounded by in-flight + unflushed acks per kill)",
		kills, time.Since(start).Round(time.Millisecond), len(l.duplicated))
	if len(l.duplicated) > kills*(relayChildMaxInFlight+2*DefaultRelayBatchSize) {
		t.Errorf("%d duplicates for %d kills", len(l.duplicated), kills)
	}
}

// TestRelayGracefulCloseProcess: SIGTERM mid-drain closes the relay
// gracefully; a new process finishes; no message is lost or duplicated.
func TestRelayGracefulCloseProcess(t *testing.T) {
	f := newFaultRig(t, relayFaultSize(5000)/2)
	c := f.startRelay(t, f.busURL)
	f.waitRelayed(t, len(f.msgs)/5)
	c.term(t, 20*time.Second)
	left := f.count(t, f.table)
	if left == 0 {
		t.Log("the drain finished before SIGTERM; the close was not mid-drain")
	}
	// Released leases: the next process starts at once.
	c = f.startRelay(t, f.busURL)
	f.waitDrained(t, c, 60*time.Second, "after the restart")
	c.term(t, 20*time.Second)
	t.Logf("closed with %d rows left", left)
	f.check(t, false)
}

// TestRelayBrokerOutage stops RabbitMQ for 30 s under load while the relay
// process publishes through bus/amqp. It stops the shared broker, so it
// runs only with TAILRACE_CHAOS=1 (and rabbitmqctl).
func TestRelayBrokerOutage(t *testing.T) {
	if os.Getenv("TAILRACE_CHAOS") != "1" {
		t.Skip("stops the shared RabbitMQ for 30 s; set TAILRACE_CHAOS=1 to run")
	}
	f := newFaultRig(t, relayFaultSize(5000))
	c := f.startRelay(t, f.busURL)
	f.waitRelayed(t, len(f.msgs)/10)
	if out, err := exec.Command("rabbitmqctl", "stop_app").CombinedOutput(); err != nil {
		t.Fatalf("rabbitmqctl stop_app: %v\n%s", err, out)
	}
	stopped := time.Now()
	at, left := f.cons.n(), f.count(t, f.table)
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
	t.Logf("broker down for %s at %d of %d delivered, %d rows in the outbox", time.Since(stopped).Round(time.Second), at, len(f.msgs), left)
	if left == 0 {
		t.Error("the outbox drained before the broker stopped: the outage was not under load")
	}
	back := time.Now()
	// The test's consumer reconnects on its own.
	f.waitDrained(t, c, 90*time.Second, "after the outage")
	t.Logf("outbox drained %s after start_app; %d warnings from the relay process", time.Since(back).Round(time.Millisecond), c.warnings())
	c.term(t, 20*time.Second)
	f.check(t, true)
}

// cutProxy is a TCP proxy in front of a broker (or database) that the test
// can cut: the relay process sees an outage (connections reset, new ones
// refused) while the shared server and everyone else's tests are untouched.
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

// proxiedURL is rawURL with its host:port replaced by the proxy's.
func proxiedURL(t testing.TB, rawURL string, p *cutProxy) string {
	u, err := neturl.Parse(rawURL)
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
// resumes when the broker is reachable again. TestRelayBrokerCutNATS and
// TestRelayBrokerCutRedis do the same to NATS JetStream and Redis Streams.
func TestRelayBrokerCut(t *testing.T) {
	outage := 5 * time.Second
	if os.Getenv("TAILRACE_RELAY_FULL") == "1" {
		outage = 30 * time.Second
	}
	relayBrokerCut(t, newFaultRig(t, relayFaultSize(4000)), outage)
}

// relayBrokerCut starts a relay process on f publishing through a proxy,
// cuts the proxy for outage once a tenth of the messages arrived, restores
// it and checks the ledger (duplicates allowed: confirms lost in the cut).
func relayBrokerCut(t *testing.T, f *faultRig, outage time.Duration) ledger {
	t.Helper()
	u, err := neturl.Parse(f.busURL)
	if err != nil {
		t.Fatal(err)
	}
	proxy := newCutProxy(t, u.Host)
	c := f.startRelay(t, proxiedURL(t, f.busURL, proxy))
	f.waitRelayed(t, len(f.msgs)/10)
	proxy.cut()
	at, left := f.cons.n(), f.count(t, f.table)
	warnBefore := c.warnings()
	time.Sleep(outage)
	during := f.cons.n() - at
	warnings := c.warnings() - warnBefore
	proxy.restore()
	t.Logf("broker cut (%s) for %s at %d of %d delivered, %d rows in the outbox; %d arrived during the cut (sent before it); %d relay warnings during the cut",
		f.bus, outage, at, len(f.msgs), left, during, warnings)
	if left == 0 {
		t.Error("the outbox drained before the cut: the cut was not mid-drain")
	}
	back := time.Now()
	f.waitDrained(t, c, 90*time.Second, "after the cut")
	t.Logf("outbox drained %s after the cut ended", time.Since(back).Round(time.Millisecond))
	c.term(t, 20*time.Second)
	return f.check(t, true)
}
