package behaviors

import (
	"context"
	"fmt"
	"sync"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/tailrace/tailrace/mediator"
)

// OrderMetrics is the suggested Order of Metrics: inside Tracing, outside
// Logging and Recover, so that a panic is measured as one.
const OrderMetrics = 60

// Names of the mediator metrics.
const (
	// MetricDispatchDuration (histogram, s): duration of one dispatch
	// through the pipeline, by request.kind, request.type and outcome (ok,
	// error, panic). Its count is the dispatch rate.
	MetricDispatchDuration = "tailrace.mediator.dispatch.duration"
	// MetricInboxSkipped (counter, {message}): duplicate deliveries the
	// Inbox behavior skipped, by consumer (the name given to ObserveInbox).
	MetricInboxSkipped = "tailrace.inbox.duplicates_skipped"
)

// AttrConsumer names the consumer on MetricInboxSkipped.
const AttrConsumer = attribute.Key("consumer")

const meterName = "github.com/tailrace/tailrace/behaviors"

// MetricsConfig configures Metrics.
type MetricsConfig struct {
	// MeterProvider creates the instruments. Default: the global one
	// (otel.GetMeterProvider()), read when NewMetrics runs.
	MeterProvider metric.MeterProvider
}

// Metrics records the duration and outcome of every dispatch in an
// OpenTelemetry histogram (MetricDispatchDuration). Attribute sets are
// built once per request type and outcome, so recording allocates
// nothing beyond what the SDK does.
type Metrics struct {
	meter    metric.Meter
	duration metric.Float64Histogram
	skipped  metric.Int64ObservableCounter
	cache    sync.Map // mediator.Info → *outcomeSets
}

// NewMetrics returns a Metrics behavior.
func NewMetrics(cfg MetricsConfig) (*Metrics, error) {
	if cfg.MeterProvider == nil {
		cfg.MeterProvider = otel.GetMeterProvider()
	}
	meter := cfg.MeterProvider.Meter(meterName)
	d, err := meter.Float64Histogram(MetricDispatchDuration, metric.WithUnit("s"),
		metric.WithDescription("Duration of one mediator dispatch through its behaviors and handler."),
		metric.WithExplicitBucketBoundaries(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
	if err != nil {
		return nil, fmt.Errorf("behaviors: create metrics: %w", err)
	}
	s, err := meter.Int64ObservableCounter(MetricInboxSkipped, metric.WithUnit("{message}"),
		metric.WithDescription("Duplicate deliveries the Inbox behavior skipped."))
	if err != nil {
		return nil, fmt.Errorf("behaviors: create metrics: %w", err)
	}
	return &Metrics{meter: meter, duration: d, skipped: s}, nil
}

// Layer returns m at OrderMetrics, wrapping every dispatch.
func (m *Metrics) Layer() mediator.Layer {
	return mediator.Layer{Order: OrderMetrics, Behavior: m}
}

// outcomeSets caches the attribute sets of one request type.
type outcomeSets struct{ ok, err, panic metric.MeasurementOption }

func (m *Metrics) sets(info mediator.Info) *outcomeSets {
	if s, ok := m.cache.Load(info); ok {
		return s.(*outcomeSets)
	}
	mk := func(outcome string) metric.MeasurementOption {
		return metric.WithAttributeSet(attribute.NewSet(AttrKind.String(info.Kind), AttrType.String(info.Type.String()), AttrOutcome.String(outcome)))
	}
	s, _ := m.cache.LoadOrStore(info, &outcomeSets{mk("ok"), mk("error"), mk("panic")})
	return s.(*outcomeSets)
}

// Handle implements mediator.Behavior.
func (m *Metrics) Handle(ctx context.Context, req any, info mediator.Info, next mediator.Next) (res any, err error) {
	start := time.Now()
	returned := false
	defer func() {
		s := m.sets(info)
		opt := s.ok
		switch {
		case !returned:
			opt = s.panic
		case err != nil:
			opt = s.err
		}
		m.duration.Record(context.WithoutCancel(ctx), time.Since(start).Seconds(), opt)
	}()
	res, err = next(ctx, req)
	returned = true
	return res, err
}

// ObserveInbox reports in.Skipped() as MetricInboxSkipped with the
// attribute consumer=name at each collection. Unregister the returned
// registration when in is no longer used.
func (m *Metrics) ObserveInbox(in *Inbox, name string) (metric.Registration, error) {
	set := metric.WithAttributeSet(attribute.NewSet(AttrConsumer.String(name)))
	return m.meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		o.ObserveInt64(m.skipped, in.Skipped(), set)
		return nil
	}, m.skipped)
}
