package bus_test

import (
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"go.opentelemetry.io/otel/propagation"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/tailrace/tailrace/behaviors"
	"github.com/tailrace/tailrace/bus"
	"github.com/tailrace/tailrace/bus/gochannel"
	"github.com/tailrace/tailrace/internal/testenv"
	"github.com/tailrace/tailrace/mediator"
	"github.com/tailrace/tailrace/outbox"
)

type otelPlaceOrder struct {
	mediator.Command[struct{}]
	ID string `json:"id"`
}

func (otelPlaceOrder) Kind() string { return "otel.place_order" }

type otelOrderPlaced struct {
	mediator.Notification
	ID string `json:"id"`
}

func (otelOrderPlaced) Kind() string { return "otel.order_placed" }

// TestTraceAcrossTheOutbox follows one request: an HTTP server span, the
// command's span (behaviors.Tracing), the staged event, the relay's publish
// span (RelayTracing), the consumer's span (ConsumerTracing) and the
// event's dispatch span on the consumer side — one trace, each span the
// child of the previous one. It also reads the consumer duration metric.
func TestTraceAcrossTheOutbox(t *testing.T) {
	ctx := context.Background()
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	defer func() { _ = tp.Shutdown(ctx) }()
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	defer func() { _ = mp.Shutdown(ctx) }()
	logger := slog.New(slog.DiscardHandler)

	s := testenv.NewSQLite(t)
	db := s.DB
	const table = "tailrace_outbox"
	if err := outbox.InitializeSchema(ctx, db, outbox.SQLite, table); err != nil {
		t.Fatal(err)
	}
	notifier := &outbox.Notifier{}
	ob, err := outbox.New(db, logger, outbox.Config{Dialect: outbox.SQLite, Notifier: notifier})
	if err != nil {
		t.Fatal(err)
	}

	// The service side: Tracing outside Transaction; the handler stages.
	tracing, _ := behaviors.NewTracing(behaviors.TracingConfig{TracerProvider: tp})
	txb, err := behaviors.NewTransaction(db, logger, behaviors.TransactionConfig{Notifier: notifier})
	if err != nil {
		t.Fatal(err)
	}
	svc := mediator.New(mediator.WithLayers(tracing.Layer(), txb.Layer()))
	mediator.RegisterFunc(svc, func(ctx context.Context, c otelPlaceOrder) (struct{}, error) {
		return struct{}{}, ob.Stage(ctx, otelOrderPlaced{ID: c.ID})
	})

	// The consumer side: its own mediator with Tracing.
	pubsub, err := gochannel.New(gochannel.Config{}, watermill.NopLogger{})
	if err != nil {
		t.Fatal(err)
	}
	defer pubsub.Close()
	handled := make(chan string, 1)
	worker := mediator.New(mediator.WithLayers(tracing.Layer()))
	mediator.RegisterNotificationFunc(worker, func(ctx context.Context, e otelOrderPlaced) error {
		handled <- trace.SpanContextFromContext(ctx).TraceID().String()
		return nil
	})
	cmw, err := bus.ConsumerMetrics(mp, "orders")
	if err != nil {
		t.Fatal(err)
	}
	consumer, err := bus.NewConsumer(worker, logger, bus.ConsumerConfig{
		Name: "orders", PoisonPublisher: pubsub,
		Middlewares: []message.HandlerMiddleware{bus.ConsumerTracing(tp), cmw},
	})
	if err != nil {
		t.Fatal(err)
	}
	bus.HandleEvent[otelOrderPlaced](consumer)
	if err := consumer.Subscribe("otel.order_placed", pubsub); err != nil {
		t.Fatal(err)
	}
	go func() { _ = consumer.Run(ctx) }()
	defer consumer.Close()
	<-consumer.Running()

	relay, err := outbox.NewRelay(db, pubsub, logger, outbox.RelayConfig{
		Dialect: outbox.SQLite, Table: table, Notifier: notifier, PollInterval: 50 * time.Millisecond,
		Middlewares: []message.HandlerMiddleware{bus.RelayTracing(tp)},
	})
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = relay.Run(ctx) }()
	defer relay.Close()

	// The HTTP request, with a server span as otelhttp would start it,
	// continuing the caller's traceparent header.
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rctx := propagation.TraceContext{}.Extract(r.Context(), propagation.HeaderCarrier(r.Header))
		rctx, span := tp.Tracer("http").Start(rctx, "POST /orders", trace.WithSpanKind(trace.SpanKindServer))
		defer span.End()
		if _, err := mediator.Send(rctx, svc, otelPlaceOrder{ID: "o-1"}); err != nil {
			http.Error(w, err.Error(), 500)
			return
		}
		w.WriteHeader(http.StatusAccepted)
	}))
	defer srv.Close()
	client, span := tp.Tracer("client").Start(ctx, "client")
	req, _ := http.NewRequestWithContext(client, http.MethodPost, srv.URL+"/orders", strings.NewReader("{}"))
	propagation.TraceContext{}.Inject(client, propagation.HeaderCarrier(req.Header))
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != http.StatusAccepted {
		t.Fatalf("POST: %v %v", resp, err)
	}
	_ = resp.Body.Close()
	span.End()
	traceID := span.SpanContext().TraceID()

	select {
	case got := <-handled:
		if got != traceID.String() {
			t.Fatalf("the consumer's handler ran in trace %s, want %s", got, traceID)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the event was not consumed")
	}

	// Wait for the consumer span to end, then check the chain.
	want := []string{"client", "POST /orders", "command otel.place_order", "publish otel.order_placed",
		"process otel.order_placed", "notification otel.order_placed"}
	byName := map[string]tracetest.SpanStub{}
	deadline := time.Now().Add(20 * time.Second)
	for {
		for _, s := range exp.GetSpans() {
			byName[s.Name] = s
		}
		if len(byName) >= len(want) && byName["process otel.order_placed"].Name != "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("spans: %v", byName)
		}
		time.Sleep(20 * time.Millisecond)
	}
	kinds := map[string]trace.SpanKind{"POST /orders": trace.SpanKindServer, "publish otel.order_placed": trace.SpanKindProducer,
		"process otel.order_placed": trace.SpanKindConsumer, "command otel.place_order": trace.SpanKindInternal}
	for i, name := range want {
		s, ok := byName[name]
		if !ok {
			t.Fatalf("no span %q among %v", name, byName)
		}
		if s.SpanContext.TraceID() != traceID {
			t.Errorf("span %q is in trace %s, want %s", name, s.SpanContext.TraceID(), traceID)
		}
		if i > 0 && s.Parent.SpanID() != byName[want[i-1]].SpanContext.SpanID() {
			t.Errorf("span %q: parent %s, want %q (%s)", name, s.Parent.SpanID(), want[i-1], byName[want[i-1]].SpanContext.SpanID())
		}
		if k, ok := kinds[name]; ok && s.SpanKind != k {
			t.Errorf("span %q: kind %s, want %s", name, s.SpanKind, k)
		}
	}
	attrs := map[string]string{}
	for _, a := range byName["command otel.place_order"].Attributes {
		attrs[string(a.Key)] = a.Value.AsString()
	}
	if attrs["request.kind"] != "otel.place_order" || attrs["request.type"] != "command" || attrs["outcome"] != "ok" {
		t.Errorf("command span attributes: %v", attrs)
	}

	// The consumer metric: one handling, ok.
	var rm metricdata.ResourceMetrics
	if err := reader.Collect(ctx, &rm); err != nil {
		t.Fatal(err)
	}
	var count uint64
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if h, ok := m.Data.(metricdata.Histogram[float64]); ok && m.Name == bus.MetricConsumerDuration {
				for _, p := range h.DataPoints {
					if v, _ := p.Attributes.Value(bus.AttrOutcome); v.AsString() == "ok" {
						count += p.Count
					}
				}
			}
		}
	}
	if count != 1 {
		t.Errorf("%s: %d ok handlings recorded, want 1", bus.MetricConsumerDuration, count)
	}
}
