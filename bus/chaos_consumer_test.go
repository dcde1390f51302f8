package bus_test

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/behaviors"
	"github.com/tailrace/tailrace/bus"
	busamqp "github.com/tailrace/tailrace/bus/amqp"
	"github.com/tailrace/tailrace/internal/testenv"
	"github.com/tailrace/tailrace/mediator"
	"github.com/tailrace/tailrace/outbox"
)

// Fault-injection scenarios on the consumer side (make chaos). Each keeps a
// ledger by message id and logs it as a "CHAOS LEDGER" line. They run at a
// small scale by default and at full scale with TAILRACE_CHAOS=1.

func chaosFull() bool {
	return os.Getenv("TAILRACE_CHAOS") == "1" || os.Getenv("TAILRACE_RELAY_FULL") == "1"
}

// ChaosEffect is the command of the consumer scenarios. Mode "" succeeds;
// "panic" panics; "fail:N" fails its first N attempts (in one process);
// "permanent" returns a tailrace.Permanent error.
type ChaosEffect struct {
	mediator.Command[struct{}]
	ID   string `json:"id"`
	Mode string `json:"mode,omitempty"`
}

func (ChaosEffect) Kind() string { return "chaos.effect" }

// chaosConsumerTables: effects is written inside the handler's transaction
// (so, with the inbox, once per message); calls outside it, by every
// attempt (so it shows redeliveries).
func chaosConsumerTables(t testing.TB, db *sql.DB) {
	t.Helper()
	ctx := context.Background()
	store, err := outbox.NewInbox(db, nil, outbox.InboxConfig{Dialect: outbox.PostgreSQL})
	if err != nil {
		t.Fatal(err)
	}
	if err := outbox.InitializeInboxSchema(ctx, db, outbox.PostgreSQL, store.Table()); err != nil {
		t.Fatal(err)
	}
	for _, ddl := range []string{
		`CREATE TABLE effects (id TEXT NOT NULL)`,
		`CREATE TABLE calls (id TEXT NOT NULL)`,
		`CREATE TABLE deliveries (id TEXT NOT NULL)`,
	} {
		if _, err := db.ExecContext(ctx, ddl); err != nil {
			t.Fatal(err)
		}
	}
}

// newChaosConsumer builds a consumer named chaos-svc of dest on db with the
// Transaction and Inbox behaviors; its handler records each call, then
// writes the effect in the transaction (after delay).
func newChaosConsumer(db *sql.DB, sub message.Subscriber, poison message.Publisher, dest string, delay time.Duration, cfg bus.ConsumerConfig) (*bus.Consumer, error) {
	store, err := outbox.NewInbox(db, nil, outbox.InboxConfig{Dialect: outbox.PostgreSQL})
	if err != nil {
		return nil, err
	}
	txb, err := behaviors.NewTransaction(db, nil, behaviors.TransactionConfig{})
	if err != nil {
		return nil, err
	}
	ib, err := behaviors.NewInbox(store, nil, behaviors.InboxConfig{})
	if err != nil {
		return nil, err
	}
	m := mediator.New(mediator.WithLayers(txb.Layer(), ib.Layer()))
	var mu sync.Mutex
	tries := map[string]int{}
	mediator.RegisterFunc(m, func(ctx context.Context, c ChaosEffect) (struct{}, error) {
		if _, err := db.ExecContext(ctx, `INSERT INTO calls (id) VALUES ($1)`, c.ID); err != nil {
			return struct{}{}, err
		}
		mu.Lock()
		tries[c.ID]++
		try := tries[c.ID]
		mu.Unlock()
		switch {
		case c.Mode == "panic":
			panic("chaos: handler panics on " + c.ID)
		case c.Mode == "permanent":
			return struct{}{}, tailrace.Permanent(errors.New("chaos: permanent failure of " + c.ID))
		case strings.HasPrefix(c.Mode, "fail:"):
			if n, _ := strconv.Atoi(strings.TrimPrefix(c.Mode, "fail:")); try <= n {
				return struct{}{}, fmt.Errorf("chaos: attempt %d of %s fails", try, c.ID)
			}
		}
		if delay > 0 {
			time.Sleep(delay)
		}
		tx, _ := outbox.TxFromContext(ctx)
		_, err := tx.ExecContext(ctx, `INSERT INTO effects (id) VALUES ($1)`, c.ID)
		return struct{}{}, err
	})
	cfg.Name = "chaos-svc"
	cfg.PoisonPublisher = poison
	if cfg.Concurrency == 0 {
		// The handler holds its transaction's connection and takes a second
		// one for the calls table: 4 handlers need all 8 of testenv's pool.
		// More would deadlock the pool (see docs/bus.md, sizing).
		cfg.Concurrency = 4
	}
	c, err := bus.NewConsumer(m, nil, cfg)
	if err != nil {
		return nil, err
	}
	bus.HandleCommand[ChaosEffect](c)
	if err := c.Subscribe(dest, sub); err != nil {
		return nil, err
	}
	return c, nil
}

func chaosAMQPConfig(url string) busamqp.Config {
	return busamqp.Config{URL: url, Topology: busamqp.Topology{DeclareQueues: true}, Prefetch: 64}
}

func chaosMsg(t testing.TB, e ChaosEffect) *message.Message {
	t.Helper()
	payload, err := json.Marshal(e)
	if err != nil {
		t.Fatal(err)
	}
	m := message.NewMessage(e.ID, payload)
	m.Metadata.Set(tailrace.MetaKind, e.Kind())
	return m
}

// TestChaosConsumerChild is the consumer process of TestChaosConsumerKill9,
// started by it with TAILRACE_CHAOS_CONSUMER_CHILD=1; it consumes until it
// is killed.
func TestChaosConsumerChild(t *testing.T) {
	if os.Getenv("TAILRACE_CHAOS_CONSUMER_CHILD") != "1" {
		t.Skip("the consumer process of TestChaosConsumerKill9")
	}
	db, err := sql.Open("pgx", os.Getenv("TAILRACE_CHAOS_DB"))
	if err != nil {
		t.Fatal(err)
	}
	db.SetMaxOpenConns(16)
	cfg := chaosAMQPConfig(os.Getenv("TAILRACE_CHAOS_AMQP"))
	sub, err := busamqp.NewSubscriber(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := busamqp.NewPublisher(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	poison := poisonPublisher{pub, os.Getenv("TAILRACE_CHAOS_POISON")}
	// Several competing consumers, each holding its acknowledgement back
	// 5 ms after the handler committed: a SIGKILL then often lands between
	// a commit and its ack, which is what makes RabbitMQ redeliver messages
	// whose effects exist (the inbox's work).
	slowAck := func(h message.HandlerFunc) message.HandlerFunc {
		return func(msg *message.Message) ([]*message.Message, error) {
			if _, err := db.Exec(`INSERT INTO deliveries (id) VALUES ($1)`, msg.UUID); err != nil {
				return nil, err
			}
			out, err := h(msg)
			if err == nil {
				time.Sleep(5 * time.Millisecond)
			}
			return out, err
		}
	}
	errs := make(chan error, chaosChildConsumers)
	for range chaosChildConsumers {
		c, err := newChaosConsumer(db, sub, poison, os.Getenv("TAILRACE_CHAOS_DEST"), time.Millisecond,
			// 2 consumers × 4 concurrent handlers × 2 connections = the pool
			// of 16.
			bus.ConsumerConfig{Concurrency: chaosChildConcurrency, Middlewares: []message.HandlerMiddleware{slowAck}})
		if err != nil {
			t.Fatal(err)
		}
		go func() { errs <- c.Run(context.Background()) }()
	}
	if err := <-errs; err != nil {
		t.Fatal(err)
	}
}

// chaosChildConsumers is the number of competing consumers in the consumer
// process, each running chaosChildConcurrency handlers at once.
const (
	chaosChildConsumers   = 2
	chaosChildConcurrency = 4
)

// chaosLedger is what a scenario counted, by message id.
type chaosLedger struct {
	sent, effects, distinct, lost, dupEffects, unexpected, stuck, poisoned, calls int
}

func (l chaosLedger) String() string {
	return fmt.Sprintf("sent %d, effects %d (distinct %d), lost %d, duplicate effects %d, unexpected %d, stuck %d, poisoned %d, handler calls %d",
		l.sent, l.effects, l.distinct, l.lost, l.dupEffects, l.unexpected, l.stuck, l.poisoned, l.calls)
}

// countEffects fills the ledger from the effects and calls tables: want is
// the set of ids that must have exactly one effect.
func countEffects(t testing.TB, db *sql.DB, want map[string]bool) chaosLedger {
	t.Helper()
	l := chaosLedger{sent: len(want)}
	rows, err := db.Query(`SELECT id, COUNT(*) FROM effects GROUP BY id`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	got := map[string]bool{}
	for rows.Next() {
		var id string
		var n int
		if err := rows.Scan(&id, &n); err != nil {
			t.Fatal(err)
		}
		got[id] = true
		l.effects += n
		l.distinct++
		l.dupEffects += n - 1
		if !want[id] {
			l.unexpected++
		}
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	for id := range want {
		if !got[id] {
			l.lost++
		}
	}
	if err := db.QueryRow(`SELECT COUNT(*) FROM calls`).Scan(&l.calls); err != nil {
		t.Fatal(err)
	}
	return l
}

func countDistinctEffects(t testing.TB, db *sql.DB) int {
	var n int
	if err := db.QueryRow(`SELECT COUNT(DISTINCT id) FROM effects`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// queueDepth is the number of ready messages in queue (0 if it is gone).
func queueDepth(t testing.TB, url, queue string) int {
	t.Helper()
	conn, err := amqp091.Dial(url)
	if err != nil {
		t.Fatal(busamqp.RedactURL(err.Error()))
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	q, err := ch.QueueDeclarePassive(queue, true, false, false, false, nil)
	if err != nil {
		return 0
	}
	return q.Messages
}

// TestChaosConsumerKill9 publishes n commands to RabbitMQ and consumes
// them in a separate process (Transaction + Inbox behaviors, effects
// written in the handler's transaction), killed with SIGKILL several times
// mid-drain and restarted. RabbitMQ redelivers what was unacknowledged; the
// inbox must turn every redelivery into a skip: each message's effect
// exactly once, none lost, nothing left in the queue.
func TestChaosConsumerKill9(t *testing.T) {
	n, kills := 2000, 3
	if chaosFull() {
		n, kills = 20000, 6
	}
	pg := testenv.NewPostgres(t)
	url := testenv.AMQPURL(t)
	prefix := testenv.UniqueName("tr_chaos_cons")
	dest, poisonDest := prefix+".commands", prefix+".poison"
	t.Cleanup(func() { deleteAMQP(t, url, dest, poisonDest) })
	chaosConsumerTables(t, pg.DB)

	cfg := chaosAMQPConfig(url)
	pub, err := busamqp.NewPublisher(cfg, watermill.NopLogger{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pub.Close() })
	sub, err := busamqp.NewSubscriber(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := sub.SubscribeInitialize(poisonDest); err != nil {
		t.Fatal(err)
	}
	_ = sub.Close()
	want := map[string]bool{}
	var msgs []*message.Message
	for i := range n {
		id := fmt.Sprintf("c-%06d", i)
		want[id] = true
		msgs = append(msgs, chaosMsg(t, ChaosEffect{ID: id}))
	}
	for len(msgs) > 0 {
		k := min(500, len(msgs))
		if err := pub.Publish(dest, msgs[:k]...); err != nil {
			t.Fatal(err)
		}
		msgs = msgs[k:]
	}

	start := func() *exec.Cmd {
		cmd := exec.Command(os.Args[0], "-test.run=^TestChaosConsumerChild$", "-test.count=1")
		cmd.Env = append(os.Environ(),
			"TAILRACE_CHAOS_CONSUMER_CHILD=1",
			"TAILRACE_CHAOS_DB="+pg.URL,
			"TAILRACE_CHAOS_AMQP="+url,
			"TAILRACE_CHAOS_DEST="+dest,
			"TAILRACE_CHAOS_POISON="+poisonDest,
			"GORACE=exitcode=0",
		)
		out := &syncBuffer{}
		cmd.Stdout, cmd.Stderr = out, out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if s := out.String(); strings.Contains(s, "WARNING: DATA RACE") || strings.Contains(s, "--- FAIL") {
				t.Errorf("consumer process output:\n%s", s[:min(len(s), 4000)])
			}
		})
		return cmd
	}
	kill9 := func(cmd *exec.Cmd) {
		_ = cmd.Process.Signal(syscall.SIGKILL) // our own child, by PID
		_ = cmd.Wait()
	}
	killed := 0
	for k := range kills {
		cmd := start()
		// Kill once the process made progress (so the kill lands mid-drain,
		// with deliveries in flight), after a random extra delay.
		before := countDistinctEffects(t, pg.DB)
		deadline := time.Now().Add(20 * time.Second)
		for countDistinctEffects(t, pg.DB) < min(n, before+50) && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		time.Sleep(time.Duration(50+rand.IntN(250)) * time.Millisecond)
		if countDistinctEffects(t, pg.DB) >= n {
			kill9(cmd)
			t.Logf("drained before kill %d", k+1)
			break
		}
		kill9(cmd)
		killed++
	}
	cmd := start()
	// The last consumer runs until every effect is there, as long as it
	// makes progress: "stuck" means no new effect for a while, not a slow
	// machine (under -race, beside other packages' tests, this consumer has
	// needed more than 20 s for the small run).
	waitWhileProgressing(t, n, func() int { return countDistinctEffects(t, pg.DB) })
	time.Sleep(500 * time.Millisecond) // redeliveries still on their way
	kill9(cmd)
	l := countEffects(t, pg.DB, want)
	l.stuck = queueDepth(t, url, dest)
	l.poisoned = queueDepth(t, url, poisonDest)
	var deliveries int
	if err := pg.DB.QueryRow(`SELECT COUNT(*) FROM deliveries`).Scan(&deliveries); err != nil {
		t.Fatal(err)
	}
	t.Logf("CHAOS LEDGER consumer kill -9 ×%d: %s; deliveries to the consumer %d, of which redeliveries %d (the inbox skipped those already handled)",
		killed, l, deliveries, deliveries-l.distinct)
	if l.lost != 0 || l.dupEffects != 0 || l.unexpected != 0 || l.stuck != 0 || l.poisoned != 0 {
		t.Fatalf("ledger: %s", l)
	}
	if killed == 0 {
		t.Fatal("the consumer was never killed mid-drain")
	}
}

// TestChaosConsumerPoison runs one consumer (in process, RabbitMQ) over a
// mix of good messages and bad ones: unknown kinds, payloads that do not
// decode, handlers that panic, return a permanent error, fail always, or
// fail twice and then succeed. The good ones and the flaky ones must take
// effect exactly once; every bad one must end in the poison queue, and
// nothing else.
func TestChaosConsumerPoison(t *testing.T) {
	good := 300
	if chaosFull() {
		good = 3000
	}
	pg := testenv.NewPostgres(t)
	url := testenv.AMQPURL(t)
	prefix := testenv.UniqueName("tr_chaos_poison")
	dest, poisonDest := prefix+".commands", prefix+".poison"
	t.Cleanup(func() { deleteAMQP(t, url, dest, poisonDest) })
	chaosConsumerTables(t, pg.DB)
	cfg := chaosAMQPConfig(url)
	pub, err := busamqp.NewPublisher(cfg, watermill.NopLogger{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pub.Close() })
	sub, err := busamqp.NewSubscriber(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Close() })
	if err := sub.SubscribeInitialize(poisonDest); err != nil {
		t.Fatal(err)
	}
	c, err := newChaosConsumer(pg.DB, sub, poisonPublisher{pub, poisonDest}, dest, 0,
		bus.ConsumerConfig{MaxAttempts: 4, InitialInterval: 5 * time.Millisecond, MaxInterval: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}

	want := map[string]bool{}    // must take effect once
	wantBad := map[string]bool{} // must be poisoned
	var msgs []*message.Message
	for i := range good {
		id := fmt.Sprintf("g-%05d", i)
		mode := ""
		if i%10 == 0 {
			mode = "fail:2" // recovers within MaxAttempts
		}
		want[id] = true
		msgs = append(msgs, chaosMsg(t, ChaosEffect{ID: id, Mode: mode}))
		if i%50 == 0 {
			for _, mode := range []string{"panic", "permanent", "fail:100"} {
				bid := fmt.Sprintf("b-%s-%05d", strings.TrimSuffix(mode, ":100"), i)
				wantBad[bid] = true
				msgs = append(msgs, chaosMsg(t, ChaosEffect{ID: bid, Mode: mode}))
			}
			unknown := message.NewMessage(fmt.Sprintf("b-unknown-%05d", i), []byte(`{}`))
			unknown.Metadata.Set(tailrace.MetaKind, "chaos.mystery")
			undecodable := message.NewMessage(fmt.Sprintf("b-undecodable-%05d", i), []byte(`{"id": 42`))
			undecodable.Metadata.Set(tailrace.MetaKind, "chaos.effect")
			wantBad[unknown.UUID], wantBad[undecodable.UUID] = true, true
			msgs = append(msgs, unknown, undecodable)
		}
	}
	if err := pub.Publish(dest, msgs...); err != nil {
		t.Fatal(err)
	}

	poisoned := map[string]int{}
	var pmu sync.Mutex
	pctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pch, err := sub.Subscribe(pctx, poisonDest)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for m := range pch {
			pmu.Lock()
			poisoned[m.UUID]++
			pmu.Unlock()
			m.Ack()
		}
	}()
	done := make(chan error, 1)
	go func() { done <- c.Run(context.Background()) }()
	waitWhileProgressing(t, good+len(wantBad), func() int {
		pmu.Lock()
		np := len(poisoned)
		pmu.Unlock()
		return min(countDistinctEffects(t, pg.DB), good) + min(np, len(wantBad))
	})
	time.Sleep(300 * time.Millisecond)
	if err := c.Close(); err != nil {
		t.Error(err)
	}
	if err := <-done; err != nil {
		t.Error(err)
	}
	cancel()

	l := countEffects(t, pg.DB, want)
	l.stuck = queueDepth(t, url, dest)
	pmu.Lock()
	wrongPoison, missingPoison, dupPoison := 0, 0, 0
	for id, k := range poisoned {
		if !wantBad[id] {
			wrongPoison++
		}
		dupPoison += k - 1
	}
	for id := range wantBad {
		if poisoned[id] == 0 {
			missingPoison++
		}
	}
	l.poisoned = len(poisoned)
	pmu.Unlock()
	t.Logf("CHAOS LEDGER consumer poison/panics/errors: %s; bad messages %d, poisoned wrongly %d, bad not poisoned %d, poisoned twice %d",
		l, len(wantBad), wrongPoison, missingPoison, dupPoison)
	if l.lost != 0 || l.dupEffects != 0 || l.unexpected != 0 || l.stuck != 0 || wrongPoison != 0 || missingPoison != 0 || dupPoison != 0 {
		t.Fatalf("ledger: %s; poisoned wrongly %d, missing %d, twice %d", l, wrongPoison, missingPoison, dupPoison)
	}
}

// waitWhileProgressing polls progress until it reaches target, or it has not
// grown for 15 s (the ledger then reports what is stuck), or a cap of 2
// minutes (5 at full scale) is up. A slow machine makes a chaos run longer;
// only a consumer that stops making progress fails it.
func waitWhileProgressing(t *testing.T, target int, progress func() int) {
	t.Helper()
	const stall = 15 * time.Second
	limit := 2 * time.Minute
	if chaosFull() {
		limit = 5 * time.Minute
	}
	deadline := time.Now().Add(limit)
	last, lastAt := -1, time.Now()
	for time.Now().Before(deadline) {
		c := progress()
		if c >= target {
			return
		}
		if c > last {
			last, lastAt = c, time.Now()
		} else if time.Since(lastAt) > stall {
			t.Logf("no progress for %s at %d of %d", stall, c, target)
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("still at %d of %d after %s", progress(), target, limit)
}
