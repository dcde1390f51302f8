package outbox

import (
	"context"
	"testing"

	"github.com/ThreeDotsLabs/watermill/message"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
)

// metricsRig is a MeterProvider with a ManualReader.
type metricsRig struct {
	reader *sdkmetric.ManualReader
	mp     *sdkmetric.MeterProvider
}

func newMetricsRig(t *testing.T) *metricsRig {
	r := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(r))
	t.Cleanup(func() { _ = mp.Shutdown(context.Background()) })
	return &metricsRig{reader: r, mp: mp}
}

// point is one data point's value and attributes, whatever its kind.
type point struct {
	attrs attribute.Set
	value float64 // sum or gauge value; histogram count
}

func (g *metricsRig) points(t *testing.T, name string) []point {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := g.reader.Collect(context.Background(), &rm); err != nil {
		t.Fatalf("collect: %v", err)
	}
	var out []point
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name != name {
				continue
			}
			switch d := m.Data.(type) {
			case metricdata.Sum[int64]:
				for _, p := range d.DataPoints {
					out = append(out, point{p.Attributes, float64(p.Value)})
				}
			case metricdata.Gauge[int64]:
				for _, p := range d.DataPoints {
					out = append(out, point{p.Attributes, float64(p.Value)})
				}
			case metricdata.Gauge[float64]:
				for _, p := range d.DataPoints {
					out = append(out, point{p.Attributes, p.Value})
				}
			case metricdata.Histogram[float64]:
				for _, p := range d.DataPoints {
					out = append(out, point{p.Attributes, float64(p.Count)})
				}
			default:
				t.Fatalf("%s: unexpected data %T", name, m.Data)
			}
		}
	}
	return out
}

// value sums the points of name whose attributes include every kv.
func (g *metricsRig) value(t *testing.T, name string, kvs ...attribute.KeyValue) float64 {
	t.Helper()
	sum := 0.0
	for _, p := range g.points(t, name) {
		ok := true
		for _, kv := range kvs {
			if v, has := p.attrs.Value(kv.Key); !has || v != kv.Value {
				ok = false
			}
		}
		if ok {
			sum += p.value
		}
	}
	return sum
}

// TestMetricsRealRun stages messages, relays them through a real relay with
// the metrics middleware, and reads every figure back through a
// ManualReader.
func TestMetricsRealRun(t *testing.T) {
	for name, setup := range opsDBs() {
		t.Run(name, func(t *testing.T) {
			g := setup(t)
			ctx := context.Background()
			mr := newMetricsRig(t)
			m, err := NewMetrics(mr.mp)
			if err != nil {
				t.Fatal(err)
			}
			reg, err := m.ObserveTable(g.db, g.d, g.table)
			if err != nil {
				t.Fatal(err)
			}
			defer reg.Unregister()
			table := AttrTable.String(g.table)

			// Nothing yet: the gauges read zero, no relay is live.
			if v := mr.value(t, MetricPending, table); v != 0 {
				t.Fatalf("pending before staging: %v", v)
			}

			// Stage 25 + 3 poison through an Outbox observed by m.
			g.ob.cfg.Observer = m
			g.stage(t, ctx, "ops.ok", 25)
			g.stage(t, ctx, "ops.poison", 3)
			if v := mr.value(t, MetricPending, table); v != 28 {
				t.Fatalf("pending: %v, want 28", v)
			}
			if v := mr.value(t, MetricOldestPendingAge, table); v < 0 {
				t.Fatalf("oldest age: %v", v)
			}
			if v := mr.value(t, MetricStaged, table); v != 28 {
				t.Fatalf("staged: %v, want 28", v)
			}

			pub := &memPub{failKinds: map[string]bool{"ops.poison": true}}
			dl, _ := NewDeadLetters(g.db, g.d, g.table)
			rcfg := RelayConfig{Middlewares: []message.HandlerMiddleware{m.RelayMiddleware(g.table)}, Observer: m}
			_, stop := g.startRelay(t, nil, pub, rcfg)
			opsEventually(t, "all relayed or dead", func() bool {
				n, _ := dl.Count(ctx)
				return pub.count() == 25 && n == 3
			})
			opsEventually(t, "relays live and acks written", func() bool {
				return mr.value(t, MetricPending, table) == 0 && mr.value(t, MetricLiveRelays, table) == 1
			})
			ok := AttrKind.String("ops.ok")
			poison := AttrKind.String("ops.poison")
			checks := []struct {
				name string
				kvs  []attribute.KeyValue
				want float64
			}{
				{MetricRelayed, []attribute.KeyValue{table, ok}, 25},
				{MetricRelayed, []attribute.KeyValue{table, poison}, 0},
				{MetricRelayFailures, []attribute.KeyValue{table, poison}, 3}, // permanent: one attempt each
				{MetricRelayFailures, []attribute.KeyValue{table, ok}, 0},
				{MetricPublishDuration, []attribute.KeyValue{table, ok, AttrOutcome.String("ok")}, 25},
				{MetricPublishDuration, []attribute.KeyValue{table, poison, AttrOutcome.String("error")}, 3},
				{MetricDeadLetters, []attribute.KeyValue{table}, 3},
				{MetricOldestPendingAge, []attribute.KeyValue{table}, 0},
			}
			for _, c := range checks {
				if v := mr.value(t, c.name, c.kvs...); v != c.want {
					t.Errorf("%s %v = %v, want %v", c.name, c.kvs, v, c.want)
				}
			}

			if err := stop(); err != nil {
				t.Fatal(err)
			}
			if v := mr.value(t, MetricLiveRelays, table); v != 0 {
				t.Fatalf("live relays after stop: %v", v)
			}
			if v := mr.value(t, MetricDeadLettered, table, poison, AttrReason.String("permanent")); v != 3 {
				t.Fatalf("dead lettered: %v, want 3", v)
			}
		})
	}
}

func TestEnvelopeMetadata(t *testing.T) {
	md := EnvelopeMetadata([]byte(`{"destination_topic":"x","uuid":"u","payload":"e30=","metadata":{"kind":"k","traceparent":"tp"}}`))
	if md.Get("kind") != "k" || md.Get("traceparent") != "tp" {
		t.Fatalf("metadata: %v", md)
	}
	if EnvelopeMetadata([]byte("not json")) != nil {
		t.Fatal("not an envelope: want nil")
	}
}
