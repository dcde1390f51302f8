package outbox

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"fmt"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill-amqp/v2/pkg/amqp"
	wsql "github.com/ThreeDotsLabs/watermill-sql/v3/pkg/sql"
	"github.com/ThreeDotsLabs/watermill/components/forwarder"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/tailrace/tailrace/internal/testenv"
)

// Benchmarks of the relay, PostgreSQL → RabbitMQ with publisher confirms.
// They need the local services (they skip without them) and take tens of
// seconds each; run them one iteration at a time:
//
//	go test ./outbox/ -run '^$' -bench 'BenchmarkRelay' -benchtime=1x
//
// TAILRACE_BENCH_N changes the drain size (default 20,000).

func benchN() int {
	if n, err := strconv.Atoi(os.Getenv("TAILRACE_BENCH_N")); err == nil && n > 0 {
		return n
	}
	return 20000
}

// fastConsumer counts distinct messages on a durable queue as fast as
// RabbitMQ delivers them (no-ack mode), so that it never limits a relay.
type fastConsumer struct {
	mu       sync.Mutex
	seen     map[string]bool
	received map[string]time.Time
	n        atomic.Int64
	conn     *amqp091.Connection
}

func newFastConsumer(b testing.TB, url, queue string) *fastConsumer {
	b.Helper()
	conn, err := amqp091.Dial(url)
	if err != nil {
		b.Fatal(err)
	}
	ch, err := conn.Channel()
	if err != nil {
		b.Fatal(err)
	}
	if _, err := ch.QueueDeclare(queue, true, false, false, false, nil); err != nil {
		b.Fatal(err)
	}
	deliveries, err := ch.Consume(queue, "", true, false, false, false, nil)
	if err != nil {
		b.Fatal(err)
	}
	c := &fastConsumer{seen: map[string]bool{}, received: map[string]time.Time{}, conn: conn}
	go func() {
		for d := range deliveries {
			id, _ := d.Headers[amqp.DefaultMessageUUIDHeaderKey].(string)
			now := time.Now()
			c.mu.Lock()
			if !c.seen[id] {
				c.seen[id] = true
				c.received[id] = now
				c.n.Add(1)
			}
			c.mu.Unlock()
		}
	}()
	b.Cleanup(func() {
		if ch, err := conn.Channel(); err == nil {
			_, _ = ch.QueueDelete(queue, false, false, false)
		}
		_ = conn.Close()
	})
	return c
}

func (c *fastConsumer) waitN(b testing.TB, n int, timeout time.Duration) {
	b.Helper()
	deadline := time.Now().Add(timeout)
	for c.n.Load() < int64(n) {
		if time.Now().After(deadline) {
			b.Fatalf("consumer got %d of %d messages in %s", c.n.Load(), n, timeout)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// benchRig: a PostgreSQL schema, a destination queue and the AMQP
// publisher every contender uses (confirms on, 256 pooled channels).
type benchRig struct {
	pg        *testenv.Postgres
	url       string
	queue     string
	pub       message.Publisher
	pipelined bool
	cons      *fastConsumer
}

func newBenchRig(b *testing.B) *benchRig {
	return newBenchRigWith(b, false)
}

// newBenchRigWith uses the pipelined publisher when pipelined is set, else
// watermill-amqp's (confirms, 256 pooled channels).
func newBenchRigWith(b *testing.B, pipelined bool) *benchRig {
	b.Helper()
	url := testenv.AMQPURL(b)
	pg := testenv.NewPostgres(b)
	queue := testenv.UniqueName("relay_bench")
	cons := newFastConsumer(b, url, queue)
	pub, err := newBenchPublisher(url, pipelined)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = pub.Close() })
	return &benchRig{pg: pg, url: url, queue: queue, pub: pub, pipelined: pipelined, cons: cons}
}

func newBenchPublisher(url string, pipelined bool) (message.Publisher, error) {
	if pipelined {
		return newPipelinedPublisher(url, 4)
	}
	return newAMQPPublisher(url, 256)
}

func benchPayload(i int) (string, []byte) {
	id := fmt.Sprintf("m-%07d", i)
	return id, []byte(`{"id":"` + id + `","amount":42,"currency":"EUR","note":"benchmark payload"}`)
}

// BenchmarkRelayDrain drains n pre-staged messages: the stock forwarder
// (watermill-sql subscriber + forwarder.NewForwarder), our relay, and
// three of our relays on one outbox. Run the sub-benchmarks together so
// that the ratios are measured side by side.
//
// The "pipelined" variants give both the same test-only publisher that
// keeps many confirms outstanding per channel (pipelinedPublisher):
// watermill-amqp's pooled publisher, one confirm per channel at a time,
// is the limit of our relay in the plain variants.
func BenchmarkRelayDrain(b *testing.B) {
	n := benchN()
	for _, pipelined := range []bool{false, true} {
		suffix := ""
		if pipelined {
			suffix = "_pipelined"
		}
		var stock atomic.Value
		b.Run("publisher_only"+suffix, func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				b.ReportMetric(publishOnly(b, n, pipelined), "msg/s")
			}
		})
		b.Run("stock_forwarder"+suffix, func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				rate := drainStock(b, n, pipelined)
				stock.Store(rate)
				b.ReportMetric(rate, "msg/s")
			}
		})
		for _, relays := range []int{1, 3} {
			b.Run(fmt.Sprintf("tailrace_%d_relay%s", relays, suffix), func(b *testing.B) {
				for i := 0; i < b.N; i++ {
					rate := drainOurs(b, n, relays, pipelined)
					b.ReportMetric(rate, "msg/s")
					if s, ok := stock.Load().(float64); ok && s > 0 {
						b.ReportMetric(rate/s, "x_stock")
					}
				}
			})
		}
	}
}

// publishOnly is the ceiling without any database: n messages published
// through the same publisher by 512 goroutines (the relay's MaxInFlight).
func publishOnly(b *testing.B, n int, pipelined bool) float64 {
	b.StopTimer()
	r := newBenchRigWith(b, pipelined)
	work := make(chan int)
	var wg sync.WaitGroup
	start := time.Now()
	b.StartTimer()
	for w := 0; w < DefaultRelayMaxInFlight; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				id, payload := benchPayload(i)
				if err := r.pub.Publish(r.queue, message.NewMessage(id, payload)); err != nil {
					b.Error(err)
				}
			}
		}()
	}
	for i := 0; i < n; i++ {
		work <- i
	}
	close(work)
	wg.Wait()
	r.cons.waitN(b, n, 10*time.Minute)
	b.StopTimer()
	return float64(n) / time.Since(start).Seconds()
}

func drainStock(b *testing.B, n int, pipelined bool) float64 {
	b.StopTimer()
	r := newBenchRigWith(b, pipelined)
	db := r.pg.DB
	topic := testenv.UniqueName("stock")
	logger := watermill.NopLogger{}
	schema := wsql.DefaultPostgreSQLSchema{}
	sub, err := wsql.NewSubscriber(db, wsql.SubscriberConfig{
		SchemaAdapter:    schema,
		OffsetsAdapter:   wsql.DefaultPostgreSQLOffsetsAdapter{},
		InitializeSchema: true,
	}, logger)
	if err != nil {
		b.Fatal(err)
	}
	if err := sub.SubscribeInitialize(topic); err != nil {
		b.Fatal(err)
	}
	// Stage exactly as Watermill's outbox recipe does, 1,000 per transaction.
	for start := 0; start < n; start += 1000 {
		tx, err := db.Begin()
		if err != nil {
			b.Fatal(err)
		}
		p, err := wsql.NewPublisher(tx, wsql.PublisherConfig{SchemaAdapter: schema}, logger)
		if err != nil {
			b.Fatal(err)
		}
		fp := forwarder.NewPublisher(p, forwarder.PublisherConfig{ForwarderTopic: topic})
		var msgs []*message.Message
		for i := start; i < min(start+1000, n); i++ {
			id, payload := benchPayload(i)
			m := message.NewMessage(id, payload)
			m.Metadata.Set("kind", "bench")
			msgs = append(msgs, m)
		}
		if err := fp.Publish(r.queue, msgs...); err != nil {
			b.Fatal(err)
		}
		if err := tx.Commit(); err != nil {
			b.Fatal(err)
		}
	}
	fwd, err := forwarder.NewForwarder(sub, r.pub, logger, forwarder.Config{ForwarderTopic: topic})
	if err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	b.StartTimer()
	go func() { _ = fwd.Run(context.Background()) }()
	r.cons.waitN(b, n, 10*time.Minute)
	b.StopTimer()
	el := time.Since(start)
	_ = fwd.Close()
	return float64(n) / el.Seconds()
}

func stageBench(b testing.TB, g *relayRig, n int) {
	ctx := context.Background()
	for start := 0; start < n; start += 1000 {
		tx, err := g.db.BeginTx(ctx, nil)
		if err != nil {
			b.Fatal(err)
		}
		var vals []any
		for i := start; i < min(start+1000, n); i++ {
			id, payload := benchPayload(i)
			vals = append(vals, Message{Value: rawJSON(payload), Options: &StageOptions{
				Kind: "bench", Topic: g.topic, MessageID: id, PartitionKey: fmt.Sprintf("k%d", i%1000),
			}})
		}
		if err := g.ob.StageTx(ctx, tx, vals...); err != nil {
			b.Fatal(err)
		}
		if err := tx.Commit(); err != nil {
			b.Fatal(err)
		}
	}
}

// rawJSON marshals to itself with the JSON marshaler.
type rawJSON []byte

func (r rawJSON) MarshalJSON() ([]byte, error) { return r, nil }

func drainOurs(b *testing.B, n, relays int, pipelined bool) float64 {
	b.StopTimer()
	r := newBenchRigWith(b, pipelined)
	g := newRelayRig(b, r.pg.DB, PostgreSQL)
	g.topic = r.queue
	stageBench(b, g, n)
	var rs []*Relay
	for i := 0; i < relays; i++ {
		db := r.pg.DB
		pub := r.pub
		if relays > 1 { // separate processes would have their own pools and connections
			var err error
			if db, err = sql.Open("pgx", r.pg.URL); err != nil {
				b.Fatal(err)
			}
			db.SetMaxOpenConns(8)
			b.Cleanup(func() { _ = db.Close() })
			p, err := newBenchPublisher(r.url, r.pipelined)
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { _ = p.Close() })
			pub = p
		}
		rl, err := NewRelay(db, pub, testLogger(b), RelayConfig{Dialect: PostgreSQL, Table: g.table, LeaseTTL: 3 * time.Second})
		if err != nil {
			b.Fatal(err)
		}
		rs = append(rs, rl)
	}
	start := time.Now()
	b.StartTimer()
	for _, rl := range rs {
		go func() { _ = rl.Run(context.Background()) }()
	}
	r.cons.waitN(b, n, 10*time.Minute)
	b.StopTimer()
	el := time.Since(start)
	for _, rl := range rs {
		_ = rl.Close()
	}
	if left := g.count(b, g.table); left != 0 {
		b.Errorf("%d rows left in the outbox after the drain", left)
	}
	return float64(n) / el.Seconds()
}

// BenchmarkRelayLatency commits one message per transaction at a steady
// 200 msg/s and measures commit → consumer receipt. "listen" wakes the
// relay through PostgreSQL NOTIFY only, sent by NotifyPostgres (as for a
// relay in another process); "notifier" adds the in-process signal.
func BenchmarkRelayLatency(b *testing.B) {
	for _, mode := range []string{"listen", "notifier"} {
		b.Run(mode, func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				benchLatency(b, mode == "notifier")
			}
		})
	}
}

func benchLatency(b *testing.B, useNotifier bool) {
	b.StopTimer()
	r := newBenchRig(b)
	g := newRelayRig(b, r.pg.DB, PostgreSQL)
	g.topic = r.queue
	// The staging side signals its commits on its own Notifier. With
	// useNotifier the relay shares it (same process); otherwise only
	// NotifyPostgres carries the signal, as to a relay in another process.
	notifier := &Notifier{}
	stopNotify, err := NotifyPostgres(r.pg.DB, g.table, notifier, testLogger(b))
	if err != nil {
		b.Fatal(err)
	}
	defer stopNotify()
	var relayNotifier *Notifier
	if useNotifier {
		relayNotifier = notifier
	}
	rl, err := NewRelay(r.pg.DB, r.pub, testLogger(b), RelayConfig{Dialect: PostgreSQL, Table: g.table, Notifier: relayNotifier})
	if err != nil {
		b.Fatal(err)
	}
	go func() { _ = rl.Run(context.Background()) }()
	defer rl.Close()
	<-rl.Running()
	time.Sleep(500 * time.Millisecond) // leases taken

	const rate = 200
	dur := 10 * time.Second
	if d, err := time.ParseDuration(os.Getenv("TAILRACE_BENCH_LATENCY_FOR")); err == nil {
		dur = d
	}
	total := int(dur.Seconds() * rate)
	committed := make(map[string]time.Time, total)
	tick := time.NewTicker(time.Second / rate)
	defer tick.Stop()
	b.StartTimer()
	for i := 0; i < total; i++ {
		<-tick.C
		id := fmt.Sprintf("m-%07d", i)
		g.stage(b, relayMsg{id: id, key: fmt.Sprintf("k%d", i%50)})
		committed[id] = time.Now()
		notifier.Notify()
	}
	r.cons.waitN(b, total, time.Minute)
	b.StopTimer()
	lat := make([]float64, 0, total)
	r.cons.mu.Lock()
	for id, at := range committed {
		lat = append(lat, float64(r.cons.received[id].Sub(at).Microseconds())/1000)
	}
	r.cons.mu.Unlock()
	slices.Sort(lat)
	b.ReportMetric(lat[len(lat)/2], "p50_ms")
	b.ReportMetric(lat[len(lat)*99/100], "p99_ms")
	b.ReportMetric(lat[len(lat)-1], "max_ms")
	b.ReportMetric(0, "ns/op")
}

// countingConnector counts the statements sent through a pgx pool.
type countingConnector struct {
	driver.Connector
	n *atomic.Int64
}

type countingConn struct {
	*stdlib.Conn
	n *atomic.Int64
}

func (c countingConnector) Connect(ctx context.Context) (driver.Conn, error) {
	conn, err := c.Connector.Connect(ctx)
	if err != nil {
		return nil, err
	}
	return &countingConn{Conn: conn.(*stdlib.Conn), n: c.n}, nil
}

func (c *countingConn) ExecContext(ctx context.Context, q string, args []driver.NamedValue) (driver.Result, error) {
	c.n.Add(1)
	return c.Conn.ExecContext(ctx, q, args)
}

func (c *countingConn) QueryContext(ctx context.Context, q string, args []driver.NamedValue) (driver.Rows, error) {
	c.n.Add(1)
	return c.Conn.QueryContext(ctx, q, args)
}

func (c *countingConn) BeginTx(ctx context.Context, opts driver.TxOptions) (driver.Tx, error) {
	c.n.Add(1)
	return c.Conn.BeginTx(ctx, opts)
}

// BenchmarkRelayIdle counts the statements an idle relay sends (default
// configuration, LISTEN on) over 10 s.
func BenchmarkRelayIdle(b *testing.B) {
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		pg := testenv.NewPostgres(b)
		g := newRelayRig(b, pg.DB, PostgreSQL)
		cfg, err := pgx.ParseConfig(pg.URL)
		if err != nil {
			b.Fatal(err)
		}
		var n atomic.Int64
		db := sql.OpenDB(countingConnector{Connector: stdlib.GetConnector(*cfg), n: &n})
		b.Cleanup(func() { _ = db.Close() })
		rl, err := NewRelay(db, newRecPub(), testLogger(b), RelayConfig{Dialect: PostgreSQL, Table: g.table})
		if err != nil {
			b.Fatal(err)
		}
		go func() { _ = rl.Run(context.Background()) }()
		<-rl.Running()
		time.Sleep(2 * time.Second)
		dur := 10 * time.Second
		before := n.Load()
		b.StartTimer()
		time.Sleep(dur)
		b.StopTimer()
		q := float64(n.Load()-before) / dur.Seconds()
		_ = rl.Close()
		b.ReportMetric(q, "queries/s")
		b.ReportMetric(0, "ns/op")
	}
}

// BenchmarkRelayBacklog drains backlogs of growing size from PostgreSQL
// into a publisher that returns at once: the relay's own cost per message,
// which must not grow with the backlog (the stock subscriber re-reads the
// whole backlog on every poll).
func BenchmarkRelayBacklog(b *testing.B) {
	for _, n := range []int{2000, 20000, 100000} {
		b.Run(strconv.Itoa(n), func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				pg := testenv.NewPostgres(b)
				g := newRelayRig(b, pg.DB, PostgreSQL)
				stageBench(b, g, n)
				pub := newRecPub()
				rl, err := NewRelay(pg.DB, pub, testLogger(b), RelayConfig{Dialect: PostgreSQL, Table: g.table})
				if err != nil {
					b.Fatal(err)
				}
				start := time.Now()
				b.StartTimer()
				go func() { _ = rl.Run(context.Background()) }()
				for pub.n() < n {
					time.Sleep(time.Millisecond)
				}
				b.StopTimer()
				el := time.Since(start)
				_ = rl.Close()
				b.ReportMetric(float64(n)/el.Seconds(), "msg/s")
			}
		})
	}
}

// pipelinedPublisher is a minimal AMQP publisher for the benchmarks only:
// a few channels in confirm mode, each carrying many unconfirmed messages
// at once (amqp091's deferred confirmations), where watermill-amqp's
// pooled publisher waits for each confirm before the channel takes the
// next message. It shows what the relay does when the publisher is not the
// limit. Default exchange, routing key = topic, persistent, the message
// UUID in watermill-amqp's header; no reconnects, no mandatory returns.
type pipelinedPublisher struct {
	conn *amqp091.Connection
	chs  []*amqp091.Channel
	next atomic.Uint64
}

func newPipelinedPublisher(url string, channels int) (*pipelinedPublisher, error) {
	conn, err := amqp091.Dial(url)
	if err != nil {
		return nil, err
	}
	p := &pipelinedPublisher{conn: conn}
	for i := 0; i < channels; i++ {
		ch, err := conn.Channel()
		if err != nil {
			_ = conn.Close()
			return nil, err
		}
		if err := ch.Confirm(false); err != nil {
			_ = conn.Close()
			return nil, err
		}
		p.chs = append(p.chs, ch)
	}
	return p, nil
}

func (p *pipelinedPublisher) Publish(topic string, msgs ...*message.Message) error {
	ch := p.chs[p.next.Add(1)%uint64(len(p.chs))]
	dcs := make([]*amqp091.DeferredConfirmation, 0, len(msgs))
	for _, m := range msgs {
		h := amqp091.Table{amqp.DefaultMessageUUIDHeaderKey: m.UUID}
		for k, v := range m.Metadata {
			h[k] = v
		}
		dc, err := ch.PublishWithDeferredConfirmWithContext(m.Context(), "", topic, false, false, amqp091.Publishing{
			Headers: h, Body: m.Payload, DeliveryMode: amqp091.Persistent,
		})
		if err != nil {
			return err
		}
		dcs = append(dcs, dc)
	}
	for i, dc := range dcs {
		ok, err := dc.WaitContext(msgs[i].Context())
		if err != nil {
			return err
		}
		if !ok {
			return fmt.Errorf("broker nacked message %s", msgs[i].UUID)
		}
	}
	return nil
}

func (p *pipelinedPublisher) Close() error { return p.conn.Close() }
