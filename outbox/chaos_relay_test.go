package outbox_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	wamqp "github.com/ThreeDotsLabs/watermill-amqp/v2/pkg/amqp"
	"github.com/ThreeDotsLabs/watermill/message"
	amqp091 "github.com/rabbitmq/amqp091-go"

	busamqp "github.com/tailrace/tailrace/bus/amqp"
	"github.com/tailrace/tailrace/internal/testenv"
	"github.com/tailrace/tailrace/outbox"
)

// Fault-injection scenarios of the relay that the relay's own fault tests
// do not cover (make chaos). Each keeps a ledger by message id and logs it
// as a "CHAOS LEDGER" line; small by default, full scale with
// TAILRACE_CHAOS=1.

func chaosFull() bool {
	return os.Getenv("TAILRACE_CHAOS") == "1" || os.Getenv("TAILRACE_RELAY_FULL") == "1"
}

func chaosLogger() *slog.Logger {
	if os.Getenv("TAILRACE_RELAY_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// chaosQueue counts deliveries by Watermill message UUID on a durable,
// uniquely named queue, deleted when the test ends.
type chaosQueue struct {
	name string
	mu   sync.Mutex
	got  map[string]int
}

func newChaosQueue(t *testing.T, url string) *chaosQueue {
	t.Helper()
	conn, err := amqp091.Dial(url)
	if err != nil {
		t.Fatal(busamqp.RedactURL(err.Error()))
	}
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	q := &chaosQueue{name: testenv.UniqueName("tr_chaos_q"), got: map[string]int{}}
	if _, err := ch.QueueDeclare(q.name, true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	deliveries, err := ch.Consume(q.name, "", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for d := range deliveries {
			id, _ := d.Headers[wamqp.DefaultMessageUUIDHeaderKey].(string)
			q.mu.Lock()
			q.got[id]++
			q.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		if ch, err := conn.Channel(); err == nil {
			_, _ = ch.QueueDelete(q.name, false, false, false)
		}
		_ = conn.Close()
	})
	return q
}

func (q *chaosQueue) distinct() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.got)
}

// ledger compares what arrived with want: lost, duplicated (extra
// deliveries) and unexpected ids.
func (q *chaosQueue) ledger(want map[string]bool) (lost, dup, unexpected int) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for id, n := range q.got {
		if !want[id] {
			unexpected++
		}
		dup += n - 1
	}
	for id := range want {
		if q.got[id] == 0 {
			lost++
		}
	}
	return lost, dup, unexpected
}

func chaosPublisher(t *testing.T, url string) *busamqp.Publisher {
	t.Helper()
	pub, err := busamqp.NewPublisher(busamqp.Config{
		URL:      url,
		Topology: busamqp.Topology{ExchangeName: func(string) string { return "" }}, // routing key = queue
	}, watermill.NopLogger{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pub.Close() })
	return pub
}

func chaosOutbox(t *testing.T, db *sql.DB, maxPayload int) (*outbox.Outbox, string) {
	return chaosOutboxOn(t, db, outbox.PostgreSQL, maxPayload)
}

func chaosOutboxOn(t *testing.T, db *sql.DB, d outbox.Dialect, maxPayload int) (*outbox.Outbox, string) {
	t.Helper()
	table := testenv.UniqueName("chaos_ob")
	if err := outbox.InitializeSchema(context.Background(), db, d, table); err != nil {
		t.Fatal(err)
	}
	ob, err := outbox.New(db, nil, outbox.Config{Dialect: d, Table: table, MaxPayloadBytes: maxPayload})
	if err != nil {
		t.Fatal(err)
	}
	return ob, table
}

type chaosValue struct {
	ID  string `json:"id"`
	Pad string `json:"pad,omitempty"`
}

func chaosStage(id, topic, pad string) outbox.Message {
	return outbox.Message{Value: chaosValue{ID: id, Pad: pad}, Options: &outbox.StageOptions{
		Kind: "chaos.msg", Topic: topic, MessageID: id, PartitionKey: "k" + id[len(id)-2:],
	}}
}

func startChaosRelay(t *testing.T, db *sql.DB, pub message.Publisher, cfg outbox.RelayConfig) {
	t.Helper()
	if cfg.Dialect == nil {
		cfg.Dialect = outbox.PostgreSQL
	}
	if cfg.PollInterval == 0 {
		cfg.PollInterval = 100 * time.Millisecond
	}
	if cfg.LeaseTTL == 0 {
		cfg.LeaseTTL = 2 * time.Second
	}
	r, err := outbox.NewRelay(db, pub, chaosLogger(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- r.Run(context.Background()) }()
	t.Cleanup(func() {
		_ = r.Close()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Error("relay Run did not return after Close")
		}
	})
	select {
	case <-r.Running():
	case err := <-done:
		t.Fatalf("relay stopped at start: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("relay did not start")
	}
}

func countRows(t *testing.T, db *sql.DB, table string) int {
	t.Helper()
	var n int
	if err := db.QueryRow(`SELECT COUNT(*) FROM ` + table).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestChaosOversizedPayload stages transactions of good messages, one in
// ten of them also carrying a payload over Config.MaxPayloadBytes. Staging
// must fail inside the transaction (ErrPayloadTooLarge); the caller rolls
// back, so neither the oversized message nor its good siblings exist; the
// relay delivers every committed message and nothing else.
func TestChaosOversizedPayload(t *testing.T) {
	n := 500
	if chaosFull() {
		n = 5000
	}
	pg := testenv.NewPostgres(t)
	url := testenv.AMQPURL(t)
	q := newChaosQueue(t, url)
	const limit = 1024
	ob, table := chaosOutbox(t, pg.DB, limit)
	ctx := context.Background()
	want := map[string]bool{}
	rejected, rolledBack := 0, 0
	big := strings.Repeat("x", limit)
	for i := 0; i < n; i += 5 {
		tx, err := pg.DB.BeginTx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		var vals []any
		var ids []string
		for j := i; j < min(i+5, n); j++ {
			id := fmt.Sprintf("m-%06d", j)
			ids = append(ids, id)
			vals = append(vals, chaosStage(id, q.name, ""))
		}
		oversized := (i/5)%10 == 3
		if oversized {
			vals = append(vals, chaosStage(fmt.Sprintf("big-%06d", i), q.name, big))
		}
		err = ob.StageTx(ctx, tx, vals...)
		switch {
		case oversized && errors.Is(err, outbox.ErrPayloadTooLarge):
			rejected++
			rolledBack += len(ids)
			if err := tx.Rollback(); err != nil {
				t.Fatal(err)
			}
			continue
		case err != nil:
			t.Fatalf("stage: %v", err)
		case oversized:
			t.Fatal("an oversized payload was staged")
		}
		if err := tx.Commit(); err != nil {
			t.Fatal(err)
		}
		for _, id := range ids {
			want[id] = true
		}
	}
	if rows := countRows(t, pg.DB, table); rows != len(want) {
		t.Fatalf("outbox holds %d rows, want %d (the committed ones)", rows, len(want))
	}
	startChaosRelay(t, pg.DB, chaosPublisher(t, url), outbox.RelayConfig{Table: table})
	deadline := time.Now().Add(20 * time.Second)
	for q.distinct() < len(want) && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond)
	lost, dup, unexpected := q.ledger(want)
	left := countRows(t, pg.DB, table)
	t.Logf("CHAOS LEDGER oversized payloads: committed %d, oversized rejected at staging %d (their %d siblings rolled back), delivered %d, lost %d, duplicated %d, unexpected %d, stuck %d",
		len(want), rejected, rolledBack, q.distinct(), lost, dup, unexpected, left)
	if rejected == 0 || lost != 0 || dup != 0 || unexpected != 0 || left != 0 {
		t.Fatal("ledger mismatch")
	}
}

// TestChaosUnroutable relays routable messages mixed with messages for a
// destination no queue is bound to. With mandatory publishing RabbitMQ
// returns those; bus/amqp reports ErrUnroutable, so the relay retries them
// (never acknowledging them as sent) and dead-letters each after
// MaxAttempts, while the routable ones (other keys) flow.
func TestChaosUnroutable(t *testing.T) {
	n, bad := 1000, 20
	if chaosFull() {
		n, bad = 10000, 200
	}
	pg := testenv.NewPostgres(t)
	url := testenv.AMQPURL(t)
	q := newChaosQueue(t, url)
	ob, table := chaosOutbox(t, pg.DB, 0)
	nowhere := testenv.UniqueName("tr_chaos_nowhere")
	ctx := context.Background()
	want, wantDead := map[string]bool{}, map[string]bool{}
	var vals []any
	for i := range n {
		id := fmt.Sprintf("m-%06d", i)
		want[id] = true
		vals = append(vals, chaosStage(id, q.name, ""))
		if i%(n/bad) == 0 {
			bid := fmt.Sprintf("u-%06d", i)
			wantDead[bid] = true
			vals = append(vals, chaosStage(bid, nowhere, ""))
		}
	}
	for len(vals) > 0 {
		k := min(500, len(vals))
		tx := mustBegin(t, pg.DB)
		if err := ob.StageTx(ctx, tx, vals[:k]...); err != nil {
			t.Fatal(err)
		}
		if err := tx.Commit(); err != nil {
			t.Fatal(err)
		}
		vals = vals[k:]
	}
	const attempts = 3
	startChaosRelay(t, pg.DB, chaosPublisher(t, url), outbox.RelayConfig{
		Table: table, MaxAttempts: attempts, InitialInterval: 20 * time.Millisecond, MaxInterval: 200 * time.Millisecond,
	})
	dl, err := outbox.NewDeadLetters(pg.DB, outbox.PostgreSQL, table)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(25 * time.Second)
	for {
		c, err := dl.Count(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if (q.distinct() >= n && c >= bad) || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond)
	lost, dup, unexpected := q.ledger(want)
	letters, err := dl.List(ctx, 0, 10*bad)
	if err != nil {
		t.Fatal(err)
	}
	deadOK, wrongDead, wrongAttempts, notUnroutable := 0, 0, 0, 0
	for _, d := range letters {
		switch {
		case !wantDead[d.MessageID]:
			wrongDead++
		case d.Attempts != attempts:
			wrongAttempts++
		case !strings.Contains(d.LastError, "NO_ROUTE") && !strings.Contains(d.LastError, "unroutable"):
			notUnroutable++
		default:
			deadOK++
		}
	}
	left := countRows(t, pg.DB, table)
	t.Logf("CHAOS LEDGER unroutable destination: routable %d, delivered %d, lost %d, duplicated %d, unexpected %d; unroutable %d, dead-lettered after %d attempts with an unroutable error %d, wrongly dead %d, wrong attempts %d, other error %d; stuck in outbox %d",
		n, q.distinct(), lost, dup, unexpected, bad, attempts, deadOK, wrongDead, wrongAttempts, notUnroutable, left)
	if len(letters) > 0 && notUnroutable > 0 {
		t.Logf("a last error: %s", letters[0].LastError)
	}
	if lost != 0 || dup != 0 || unexpected != 0 || deadOK != bad || wrongDead != 0 || left != 0 {
		t.Fatal("ledger mismatch")
	}
}

func mustBegin(t *testing.T, db *sql.DB) *sql.Tx {
	t.Helper()
	tx, err := db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = tx.Rollback() })
	return tx
}

// slowPublisher confirms at most rate messages a second (a slow broker or
// downstream) and counts deliveries by index in a preallocated slice, so
// that the ledger itself does not grow the heap during the drain.
type slowPublisher struct {
	mu    sync.Mutex
	next  time.Time
	every time.Duration
	got   []uint8
	n     atomic.Int64
}

func (p *slowPublisher) Publish(_ string, msgs ...*message.Message) error {
	for _, m := range msgs {
		p.mu.Lock()
		now := time.Now()
		if p.next.Before(now) {
			p.next = now
		}
		wait := p.next.Sub(now)
		p.next = p.next.Add(p.every)
		p.mu.Unlock()
		time.Sleep(wait)
		i, err := strconv.Atoi(strings.TrimPrefix(m.UUID, "m-"))
		if err != nil || i >= len(p.got) {
			return fmt.Errorf("unexpected id %q", m.UUID)
		}
		p.mu.Lock()
		if p.got[i] == 0 {
			p.n.Add(1)
		}
		p.got[i]++
		p.mu.Unlock()
	}
	return nil
}

func (p *slowPublisher) Close() error { return nil }

// TestChaosBoundedMemory stages a backlog (100,000 messages at full scale)
// and drains it through a publisher that confirms only 5,000 messages a
// second, sampling the heap (runtime.MemStats) every 100 ms. The relay
// holds at most MaxPending rows in memory, so the heap must not grow with
// the backlog.
func TestChaosBoundedMemory(t *testing.T) {
	n, rate := 10000, 5000
	if chaosFull() {
		n = 100000
	}
	pg := testenv.NewPostgres(t)
	ob, table := chaosOutbox(t, pg.DB, 0)
	ctx := context.Background()
	pad := strings.Repeat("p", 200)
	for start := 0; start < n; start += 1000 {
		tx, err := pg.DB.BeginTx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		var vals []any
		for i := start; i < min(start+1000, n); i++ {
			vals = append(vals, chaosStage(fmt.Sprintf("m-%07d", i), "slow", pad))
		}
		if err := ob.StageTx(ctx, tx, vals...); err != nil {
			t.Fatal(err)
		}
		if err := tx.Commit(); err != nil {
			t.Fatal(err)
		}
	}
	pub := &slowPublisher{every: time.Second / time.Duration(rate), got: make([]uint8, n)}
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	base := ms.HeapAlloc
	var peak atomic.Uint64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				var ms runtime.MemStats
				runtime.ReadMemStats(&ms)
				if ms.HeapAlloc > peak.Load() {
					peak.Store(ms.HeapAlloc)
				}
			}
		}
	}()
	began := time.Now()
	startChaosRelay(t, pg.DB, pub, outbox.RelayConfig{Table: table})
	limit := time.Duration(n/rate)*time.Second + 30*time.Second
	deadline := time.Now().Add(limit)
	for pub.n.Load() < int64(n) && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	el := time.Since(began)
	close(stop)
	<-sampled
	time.Sleep(200 * time.Millisecond) // acknowledged rows deleted
	dup, lost := 0, 0
	pub.mu.Lock() // the relay is still running: a late duplicate may come in
	for _, k := range pub.got {
		if k == 0 {
			lost++
		} else {
			dup += int(k) - 1
		}
	}
	pub.mu.Unlock()
	grow := float64(int64(peak.Load())-int64(base)) / (1 << 20)
	payloadMB := float64(n*(len(pad)+40)) / (1 << 20)
	t.Logf("CHAOS LEDGER bounded memory: backlog %d (~%.1f MiB of payloads) drained at ≤%d msg/s in %.1fs; heap %.1f MiB before, peak %.1f MiB (+%.1f MiB); lost %d, duplicated %d, left %d",
		n, payloadMB, rate, el.Seconds(), float64(base)/(1<<20), float64(peak.Load())/(1<<20), grow, lost, dup, countRows(t, pg.DB, table))
	if lost != 0 || dup != 0 {
		t.Fatal("ledger mismatch")
	}
	if grow > 64 {
		t.Fatalf("heap grew by %.1f MiB during the drain", grow)
	}
}
