package main

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	nc "github.com/nats-io/nats.go"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/tailrace/tailrace/bus"
	busnats "github.com/tailrace/tailrace/bus/nats"
	"github.com/tailrace/tailrace/internal/testenv"
	"github.com/tailrace/tailrace/outbox"
)

// testBundle is one service on a PostgreSQL schema and RabbitMQ names of its
// own.
type testBundle struct {
	app *App
	cfg Config
}

// setup assembles the service with initApp (the generated Wire code) and
// runs it with roles, until the test ends.
func setup(t *testing.T, roles ...string) *testBundle {
	t.Helper()
	return start(t, newServices(t), roles...)
}

// services are the database schema and the RabbitMQ names that one or more
// service processes share.
type services struct {
	pg      *testenv.Postgres
	amqpURL string
	natsURL string
	prefix  string
}

func newServices(t *testing.T) *services {
	t.Helper()
	s := &services{pg: testenv.NewPostgres(t), amqpURL: testenv.AMQPURL(t), natsURL: testenv.NATSURL(t), prefix: testenv.UniqueName("orders") + "."}
	t.Cleanup(func() {
		deleteAMQP(t, s.amqpURL, s.prefix+"orders.events", s.prefix+"orders.events.priority", s.prefix+bus.DefaultPoisonTopic)
		deleteStreams(t, s.natsURL, busnats.StreamName(s.prefix))
	})
	return s
}

// start runs one service process (an App of its own, with its own pool) on
// svc, with roles.
func start(t *testing.T, svc *services, roles ...string) *testBundle {
	t.Helper()
	pg, amqpURL, prefix := svc.pg, svc.amqpURL, svc.prefix
	db, err := sql.Open("pgx", pg.URL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })

	cfg := Config{
		Addr: "127.0.0.1:0", PostgresURL: pg.URL, AMQPURL: amqpURL, AMQPPrefix: prefix,
		NATSURL: svc.natsURL, NATSPrefix: prefix,
		PolicyPaths: []string{"policy.json"}, Roles: roles,
		RelayPollInterval: 200 * time.Millisecond, ShutdownTimeout: 10 * time.Second,
	}
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	logger := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	ctx := context.Background()
	if err := initSchema(ctx, db); err != nil {
		t.Fatal(err)
	}
	app, cleanup, err := initApp(cfg, logger, db)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cleanup)

	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- app.Run(runCtx) }()
	t.Cleanup(func() {
		stop()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Error("Run did not return after its context was cancelled")
		}
	})
	return &testBundle{app: app, cfg: cfg}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// call does one HTTP request and decodes the JSON answer into out (if not
// nil); it returns the status.
func call(t *testing.T, method, url string, body string, header http.Header, out any) int {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if out != nil && len(bytes.TrimSpace(data)) > 0 {
		if err := json.Unmarshal(data, out); err != nil {
			t.Fatalf("%s %s: %d %s: %v", method, url, resp.StatusCode, data, err)
		}
	}
	return resp.StatusCode
}

// eventually polls GET /orders/{id} until the order's events are want and
// its audit lists their kinds.
func eventually(t *testing.T, base string, id OrderID, want []ReceivedEvent) Order {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	var o Order
	for {
		if code := call(t, "GET", base+"/orders/"+string(id), "", nil, &o); code != http.StatusOK {
			t.Fatalf("GET order %s: %d", id, code)
		}
		var audit []string
		for _, e := range want {
			audit = append(audit, e.Kind)
		}
		if slices.Equal(o.Events, want) && slices.Equal(o.Audit, audit) {
			return o
		}
		if time.Now().After(deadline) {
			t.Fatalf("order %s: events %+v, audit %q; want %+v, %q", id, o.Events, o.Audit, want, audit)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestOrders drives the API over HTTP with the relay and the consumers
// running: an order's event travels PostgreSQL → outbox → relay → policy →
// RabbitMQ → consumer → inbox, and comes back in the read model; the
// policy's Continue rule also sends it to NATS, where the audit consumer
// records it.
func TestOrders(t *testing.T) {
	b := setup(t, RoleRelay, RoleConsumer)
	srv := httptest.NewServer(b.app.Handler())
	defer srv.Close()

	var h Health
	if code := call(t, "GET", srv.URL+"/healthz", "", nil, &h); code != http.StatusOK || h.Status != "ok" || h.PolicyVersion == "" {
		t.Fatalf("healthz: %d %+v", code, h)
	}

	// Validation rejects a bad order before any transaction.
	var eb errorBody
	if code := call(t, "POST", srv.URL+"/orders", `{"customer":" ","amount_cents":0}`, nil, &eb); code != http.StatusBadRequest ||
		len(eb.Fields) != 2 || eb.Fields[0].Field != "customer" || eb.Fields[1].Field != "amount_cents" {
		t.Fatalf("invalid order: %d %+v", code, eb)
	}
	if code := call(t, "POST", srv.URL+"/orders", `{"customer":"ada","amount_cents":1,"extra":1}`, nil, &eb); code != http.StatusBadRequest {
		t.Fatalf("unknown field: %d %+v", code, eb)
	}

	// An enterprise tenant's event is routed by the enterprise rule, the
	// others by the Default.
	var created map[string]OrderID
	ent := http.Header{"X-Tenant": {"acme"}, "X-Tenant-Tier": {"enterprise"}}
	if code := call(t, "POST", srv.URL+"/orders", `{"customer":"ada","amount_cents":1250}`, ent, &created); code != http.StatusCreated {
		t.Fatalf("create: %d", code)
	}
	entID := created["id"]
	if code := call(t, "POST", srv.URL+"/orders", `{"customer":"bob","amount_cents":990}`, nil, &created); code != http.StatusCreated {
		t.Fatalf("create: %d", code)
	}
	stdID := created["id"]

	o := eventually(t, srv.URL, entID, []ReceivedEvent{{Kind: "orders.created", Rule: "audit,enterprise-orders"}})
	if o.Customer != "ada" || o.AmountCents != 1250 || o.Status != "created" || o.Tenant != "acme" {
		t.Errorf("order: %+v", o)
	}
	eventually(t, srv.URL, stdID, []ReceivedEvent{{Kind: "orders.created", Rule: "audit,default"}})

	// Cancel: once, then a conflict; unknown orders are 404.
	if code := call(t, "POST", srv.URL+"/orders/"+string(stdID)+"/cancel", "", nil, nil); code != http.StatusNoContent {
		t.Fatalf("cancel: %d", code)
	}
	if code := call(t, "POST", srv.URL+"/orders/"+string(stdID)+"/cancel", "", nil, &eb); code != http.StatusConflict {
		t.Fatalf("second cancel: %d %+v", code, eb)
	}
	if code := call(t, "POST", srv.URL+"/orders/nope/cancel", "", nil, &eb); code != http.StatusNotFound {
		t.Fatalf("cancel unknown: %d %+v", code, eb)
	}
	if code := call(t, "GET", srv.URL+"/orders/nope", "", nil, &eb); code != http.StatusNotFound {
		t.Fatalf("get unknown: %d %+v", code, eb)
	}
	o = eventually(t, srv.URL, stdID, []ReceivedEvent{{Kind: "orders.created", Rule: "audit,default"}, {Kind: "orders.cancelled", Rule: "audit,default"}})
	if o.Status != "cancelled" {
		t.Errorf("status %q after cancel", o.Status)
	}

	// GET /metrics: the events that flowed were counted when staged and
	// when relayed. Prometheus names are the OpenTelemetry names with
	// underscores, and counters end in _total. The relay counts a message
	// once the publish returned, which may be a moment after the consumer
	// got it: poll briefly.
	deadline := time.Now().Add(5 * time.Second)
	for {
		metrics := scrape(t, srv.URL+"/metrics")
		var short []string
		for _, name := range []string{outbox.MetricStaged, outbox.MetricRelayed} {
			prom := strings.ReplaceAll(name, ".", "_") + "_total"
			if total := sumSamples(t, metrics, prom); total < 3 { // two orders created, one cancelled
				short = append(short, fmt.Sprintf("%s = %v, want at least 3", prom, total))
			}
		}
		if len(short) == 0 {
			for line := range strings.Lines(metrics) {
				if strings.HasPrefix(line, "tailrace_outbox_staged_total") || strings.HasPrefix(line, "tailrace_outbox_relayed_total") {
					t.Logf("metrics: %s", strings.TrimSpace(line))
				}
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("metrics: %s; got:\n%s", strings.Join(short, "; "), metrics)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// sumSamples adds the values of the samples of metric name (every label
// set) in a Prometheus text exposition.
func sumSamples(t *testing.T, exposition, name string) float64 {
	t.Helper()
	var total float64
	for line := range strings.Lines(exposition) {
		line = strings.TrimSpace(line)
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		v, err := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
		if err != nil {
			t.Fatalf("metrics: %q: %v", line, err)
		}
		total += v
	}
	return total
}

// scrape GETs url and returns the body (the Prometheus text format).
func scrape(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %d %s", url, resp.StatusCode, data)
	}
	return string(data)
}

// TestRun runs every role in one process on a real listener, then shuts it
// down: Run returns nil once the context is cancelled (setup's cleanup checks
// it).
func TestRun(t *testing.T) {
	b := setup(t) // all roles
	deadline := time.Now().Add(10 * time.Second)
	for b.app.Addr() == nil {
		if time.Now().After(deadline) {
			t.Fatal("the API did not start listening")
		}
		time.Sleep(10 * time.Millisecond)
	}
	base := "http://" + b.app.Addr().String()
	var h Health
	if code := call(t, "GET", base+"/healthz", "", nil, &h); code != http.StatusOK || !slices.Equal(h.Roles, allRoles) {
		t.Fatalf("healthz: %d %+v", code, h)
	}
	var created map[string]OrderID
	if code := call(t, "POST", base+"/orders", `{"customer":"cy","amount_cents":5}`, nil, &created); code != http.StatusCreated {
		t.Fatalf("create: %d", code)
	}
	eventually(t, base, created["id"], []ReceivedEvent{{Kind: "orders.created", Rule: "audit,default"}})
}

// TestRoles runs the API in one App and the relay and the consumer in
// another (each with its own connection pool, as two processes would), on
// the same database and broker.
func TestRoles(t *testing.T) {
	svc := newServices(t)
	api := start(t, svc, RoleAPI)
	start(t, svc, RoleRelay, RoleConsumer)
	deadline := time.Now().Add(10 * time.Second)
	for api.app.Addr() == nil {
		if time.Now().After(deadline) {
			t.Fatal("the API did not start listening")
		}
		time.Sleep(10 * time.Millisecond)
	}
	base := "http://" + api.app.Addr().String()
	for range 2 {
		var created map[string]OrderID
		if code := call(t, "POST", base+"/orders", `{"customer":"di","amount_cents":7}`, nil, &created); code != http.StatusCreated {
			t.Fatalf("create: %d", code)
		}
		eventually(t, base, created["id"], []ReceivedEvent{{Kind: "orders.created", Rule: "audit,default"}})
	}
}

// deleteStreams removes the JetStream streams whose name starts with prefix.
func deleteStreams(t *testing.T, url, prefix string) {
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
}

// deleteAMQP removes the exchanges and the queues named names.
func deleteAMQP(t *testing.T, url string, names ...string) {
	conn, err := amqp091.Dial(url)
	if err != nil {
		t.Logf("cleanup: %v", err)
		return
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Logf("cleanup: %v", err)
		return
	}
	defer ch.Close()
	for _, name := range names {
		if _, err := ch.QueueDelete(name, false, false, false); err != nil {
			t.Logf("cleanup: delete queue %s: %v", name, err)
		}
		if err := ch.ExchangeDelete(name, false, false); err != nil {
			t.Logf("cleanup: delete exchange %s: %v", name, err)
		}
	}
}

// closedAddr is a loopback address nothing listens on.
func closedAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close()
	return addr
}

// TestAPIWhileBrokersDown: a process with only the api role starts and
// takes orders while RabbitMQ and NATS cannot be reached (it builds no
// broker client); the orders' events wait in the outbox and are delivered
// once a relay that reaches the brokers runs.
func TestAPIWhileBrokersDown(t *testing.T) {
	svc := newServices(t)
	down := *svc
	down.amqpURL = "amqp://guest:guest@" + closedAddr(t) + "/"
	down.natsURL = "nats://" + closedAddr(t)
	api := start(t, &down, RoleAPI)
	deadline := time.Now().Add(10 * time.Second)
	for api.app.Addr() == nil {
		if time.Now().After(deadline) {
			t.Fatal("the API did not start listening")
		}
		time.Sleep(10 * time.Millisecond)
	}
	base := "http://" + api.app.Addr().String()
	var h Health
	if code := call(t, "GET", base+"/healthz", "", nil, &h); code != http.StatusOK {
		t.Fatalf("healthz of the api role with the brokers down: %d %+v", code, h)
	}
	var ids []OrderID
	for range 2 {
		var created map[string]OrderID
		if code := call(t, "POST", base+"/orders", `{"customer":"ed","amount_cents":9}`, nil, &created); code != http.StatusCreated {
			t.Fatalf("create with the brokers down: %d", code)
		}
		ids = append(ids, created["id"])
	}
	// A relay (and the consumers) that reach the brokers.
	start(t, svc, RoleRelay, RoleConsumer)
	for _, id := range ids {
		eventually(t, base, id, []ReceivedEvent{{Kind: "orders.created", Rule: "audit,default"}})
	}
}
