package behaviors

import (
	"context"
	"errors"
	"fmt"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/tailrace/tailrace/mediator"
)

// OrderTracing is the suggested Order of Tracing: outside everything, so
// that the span covers the whole dispatch and the records Logging writes
// carry its trace context.
const OrderTracing = 50

// tracerName is the instrumentation scope of the mediator spans.
const tracerName = "github.com/tailrace/tailrace/behaviors"

// Attribute keys of the mediator spans and metrics.
const (
	// AttrKind is the request's kind (mediator.Info.Kind).
	AttrKind = attribute.Key("request.kind")
	// AttrType is command, query, notification or stream.
	AttrType = attribute.Key("request.type")
	// AttrOutcome is ok, error or panic.
	AttrOutcome = attribute.Key("outcome")
)

// TracingConfig configures Tracing.
type TracingConfig struct {
	// TracerProvider creates the tracer. Default: the global one
	// (otel.GetTracerProvider()), read when NewTracing runs.
	TracerProvider trace.TracerProvider
	// SpanName names a dispatch's span. Default "<type> <kind>", e.g.
	// "command orders.place": kinds are stable, low-cardinality names.
	SpanName func(info mediator.Info) string
}

// Tracing starts an OpenTelemetry span around every dispatch, a child of
// the span in the caller's context (an HTTP server span, a consumer's
// span), with the attributes request.kind, request.type and outcome (ok,
// error, panic). A failed dispatch records the error and sets the span's
// status to Error; a panic is recorded and keeps propagating. Handlers see
// the span in their context, so the messages they stage carry its W3C
// traceparent and the trace continues through the relay and the consumer
// (see bus.RelayTracing and bus.ConsumerTracing).
type Tracing struct {
	tracer trace.Tracer
	cfg    TracingConfig
}

// NewTracing returns a Tracing behavior.
func NewTracing(cfg TracingConfig) (*Tracing, error) {
	if cfg.TracerProvider == nil {
		cfg.TracerProvider = otel.GetTracerProvider()
	}
	if cfg.SpanName == nil {
		cfg.SpanName = func(info mediator.Info) string { return info.Type.String() + " " + info.Kind }
	}
	return &Tracing{tracer: cfg.TracerProvider.Tracer(tracerName), cfg: cfg}, nil
}

// Layer returns t at OrderTracing, wrapping every dispatch.
func (t *Tracing) Layer() mediator.Layer {
	return mediator.Layer{Order: OrderTracing, Behavior: t}
}

// Handle implements mediator.Behavior.
func (t *Tracing) Handle(ctx context.Context, req any, info mediator.Info, next mediator.Next) (res any, err error) {
	ctx, span := t.tracer.Start(ctx, t.cfg.SpanName(info), trace.WithSpanKind(trace.SpanKindInternal),
		trace.WithAttributes(AttrKind.String(info.Kind), AttrType.String(info.Type.String())))
	returned := false
	defer func() {
		switch {
		case !returned:
			r := recover()
			span.SetAttributes(AttrOutcome.String("panic"))
			span.RecordError(fmt.Errorf("panic: %v", r))
			span.SetStatus(codes.Error, "panic")
			span.End()
			panic(r)
		case err != nil:
			span.SetAttributes(AttrOutcome.String("error"))
			span.RecordError(err)
			span.SetStatus(codes.Error, err.Error())
		default:
			span.SetAttributes(AttrOutcome.String("ok"))
		}
		span.End()
	}()
	res, err = next(ctx, req)
	returned = true
	return res, err
}

// Traced wraps the behavior of l so that each of its invocations is a span
// of its own, named "behavior <name>", a child of the dispatch's span: a
// trace then shows how long the Transaction's BEGIN/COMMIT or the Retry's
// waits took around the handler. The span covers the behaviors inside l and
// the handler as well (a behavior's time is its span minus its child's).
// Use it on the few layers worth seeing; each costs a span per dispatch.
func Traced(name string, l mediator.Layer, tp trace.TracerProvider) mediator.Layer {
	if tp == nil {
		tp = otel.GetTracerProvider()
	}
	tracer := tp.Tracer(tracerName)
	inner := l.Behavior
	spanName := "behavior " + name
	l.Behavior = mediator.BehaviorFunc(func(ctx context.Context, req any, info mediator.Info, next mediator.Next) (any, error) {
		ctx, span := tracer.Start(ctx, spanName, trace.WithAttributes(AttrKind.String(info.Kind)))
		defer span.End()
		res, err := inner.Handle(ctx, req, info, next)
		if err != nil && !errors.Is(err, context.Canceled) {
			span.RecordError(err)
			span.SetStatus(codes.Error, err.Error())
		}
		return res, err
	})
	return l
}
