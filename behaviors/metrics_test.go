package behaviors_test

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"

	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/tailrace/tailrace/behaviors"
	"github.com/tailrace/tailrace/internal/testenv"
	"github.com/tailrace/tailrace/mediator"
	"github.com/tailrace/tailrace/outbox"
)

type opsCmd struct {
	mediator.Command[int]
	Fail, Panic bool
}

func (opsCmd) Kind() string { return "ops.cmd" }

type opsEvt struct{ mediator.Notification }

func (opsEvt) Kind() string { return "ops.evt" }

// histCounts returns the data point counts of the dispatch histogram by
// "kind/type/outcome".
func histCounts(t *testing.T, r *sdkmetric.ManualReader) map[string]uint64 {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := r.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	out := map[string]uint64{}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			switch d := m.Data.(type) {
			case metricdata.Histogram[float64]:
				if m.Name != behaviors.MetricDispatchDuration {
					continue
				}
				for _, p := range d.DataPoints {
					k, _ := p.Attributes.Value(behaviors.AttrKind)
					ty, _ := p.Attributes.Value(behaviors.AttrType)
					o, _ := p.Attributes.Value(behaviors.AttrOutcome)
					out[k.AsString()+"/"+ty.AsString()+"/"+o.AsString()] += p.Count
				}
			case metricdata.Sum[int64]:
				for _, p := range d.DataPoints {
					c, _ := p.Attributes.Value(behaviors.AttrConsumer)
					out[m.Name+"/"+c.AsString()] += uint64(p.Value)
				}
			}
		}
	}
	return out
}

func TestMetricsAndTracingBehaviors(t *testing.T) {
	ctx := context.Background()
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	defer func() { _ = mp.Shutdown(ctx) }()
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	defer func() { _ = tp.Shutdown(ctx) }()

	met, err := behaviors.NewMetrics(behaviors.MetricsConfig{MeterProvider: mp})
	if err != nil {
		t.Fatal(err)
	}
	tr, _ := behaviors.NewTracing(behaviors.TracingConfig{TracerProvider: tp})
	rec, _ := behaviors.NewRecover(behaviors.RecoverConfig{})
	m := mediator.New(mediator.WithLayers(met.Layer(), tr.Layer(),
		behaviors.Traced("recover", rec.Layer(), tp)))
	mediator.RegisterFunc(m, func(ctx context.Context, c opsCmd) (int, error) {
		if c.Panic {
			panic("boom")
		}
		if c.Fail {
			return 0, errors.New("refused")
		}
		return 1, nil
	})
	mediator.RegisterNotificationFunc(m, func(ctx context.Context, e opsEvt) error { return nil })

	for range 3 {
		if _, err := mediator.Send(ctx, m, opsCmd{}); err != nil {
			t.Fatal(err)
		}
	}
	_, _ = mediator.Send(ctx, m, opsCmd{Fail: true})
	_, _ = mediator.Send(ctx, m, opsCmd{Panic: true}) // Recover turns it into an error
	_ = mediator.Publish(ctx, m, opsEvt{})

	got := histCounts(t, reader)
	want := map[string]uint64{"ops.cmd/command/ok": 3, "ops.cmd/command/error": 2, "ops.evt/notification/ok": 1}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s: %d dispatches recorded, want %d (all: %v)", k, got[k], v, got)
		}
	}

	// Spans: one per dispatch, the behavior span under it.
	spans := exp.GetSpans()
	n := map[string]int{}
	var failed tracetest.SpanStub
	for _, s := range spans {
		n[s.Name]++
		if s.Name == "command ops.cmd" && s.Status.Description == "refused" {
			failed = s
		}
	}
	if n["command ops.cmd"] != 5 || n["notification ops.evt"] != 1 || n["behavior recover"] != 6 {
		t.Fatalf("spans: %v", n)
	}
	if failed.Name == "" || len(failed.Events) == 0 || failed.Events[0].Name != "exception" {
		t.Fatalf("failed dispatch span: %+v", failed)
	}
	for _, s := range spans {
		if s.Name == "behavior recover" && s.Parent.SpanID() == (trace.SpanID{}) {
			t.Fatalf("behavior span without parent")
		}
	}
}

func TestTracingPanicOutcome(t *testing.T) {
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	tr, _ := behaviors.NewTracing(behaviors.TracingConfig{TracerProvider: tp})
	m := mediator.New(mediator.WithLayers(tr.Layer()))
	mediator.RegisterFunc(m, func(ctx context.Context, c opsCmd) (int, error) { panic("boom") })
	func() {
		defer func() {
			if recover() == nil {
				t.Fatal("the panic did not propagate")
			}
		}()
		_, _ = mediator.Send(context.Background(), m, opsCmd{})
	}()
	s := exp.GetSpans()
	if len(s) != 1 || s[0].Status.Description != "panic" {
		t.Fatalf("spans: %+v", s)
	}
	for _, a := range s[0].Attributes {
		if a.Key == behaviors.AttrOutcome && a.Value.AsString() != "panic" {
			t.Fatalf("outcome %s", a.Value.AsString())
		}
	}
}

// TestMetricsInboxSkipped delivers one message id twice through the real
// Inbox behavior on SQLite and reads the duplicates counter.
func TestMetricsInboxSkipped(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewSQLite(t).DB
	store, err := outbox.NewInbox(db, nil, outbox.InboxConfig{Dialect: outbox.SQLite})
	if err != nil {
		t.Fatal(err)
	}
	if err := outbox.InitializeInboxSchema(ctx, db, outbox.SQLite, store.Table()); err != nil {
		t.Fatal(err)
	}
	txb, _ := behaviors.NewTransaction(db, nil, behaviors.TransactionConfig{})
	ib, err := behaviors.NewInbox(store, nil, behaviors.InboxConfig{})
	if err != nil {
		t.Fatal(err)
	}
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	defer func() { _ = mp.Shutdown(ctx) }()
	met, _ := behaviors.NewMetrics(behaviors.MetricsConfig{MeterProvider: mp})
	reg, err := met.ObserveInbox(ib, "billing")
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Unregister()
	m := mediator.New(mediator.WithLayers(txb.Layer(), ib.Layer()))
	runs := 0
	mediator.RegisterFunc(m, func(ctx context.Context, c opsCmd) (int, error) { runs++; return 1, nil })
	mctx := outbox.WithConsumer(outbox.WithMessageID(ctx, "msg-1"), "billing")
	for range 3 {
		if _, err := mediator.Send(mctx, m, opsCmd{}); err != nil {
			t.Fatal(err)
		}
	}
	got := histCounts(t, reader)
	if runs != 1 || got[behaviors.MetricInboxSkipped+"/billing"] != 2 {
		t.Fatalf("runs %d, skipped %v", runs, got)
	}
}

func TestTraceLogHandler(t *testing.T) {
	var buf strings.Builder
	logger := slog.New(behaviors.TraceLogHandler(slog.NewTextHandler(&buf, nil))).With("svc", "orders")
	tp := sdktrace.NewTracerProvider()
	ctx, span := tp.Tracer("t").Start(context.Background(), "s")
	logger.InfoContext(ctx, "in span")
	span.End()
	logger.InfoContext(context.Background(), "no span")
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	sc := span.SpanContext()
	if len(lines) != 2 || !strings.Contains(lines[0], "svc=orders trace_id="+sc.TraceID().String()+" span_id="+sc.SpanID().String()) ||
		strings.Contains(lines[1], "trace_id") {
		t.Fatalf("records:\n%s", buf.String())
	}
}
