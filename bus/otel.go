package bus

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"github.com/tailrace/tailrace"
)

// OpenTelemetry for the two hops a message makes after it is staged: the
// relay's publish (RelayTracing, a forwarder middleware) and the
// consumer's handling (ConsumerTracing, ConsumerMetrics, router
// middlewares). Staging stamps the W3C traceparent of the span in the
// staging context on every message (tailrace.MetaTraceparent); each hop
// starts its span as a child of the traceparent it receives and passes its
// own on, so one trace runs from the request that staged the message,
// through the relay, to the handler that consumed it.

const instrumentationName = "github.com/tailrace/tailrace/bus"

// Attribute keys of the bus spans and metrics (OpenTelemetry messaging
// conventions where one exists).
const (
	AttrMessagingOperation = attribute.Key("messaging.operation.type")
	AttrDestination        = attribute.Key("messaging.destination.name")
	AttrMessageID          = attribute.Key("messaging.message.id")
	// AttrKind is the message kind (tailrace.MetaKind).
	AttrKind = attribute.Key("message.kind")
	// AttrOutcome is ok or error.
	AttrOutcome = attribute.Key("outcome")
	// AttrConsumer is the consumer's name.
	AttrConsumer = attribute.Key("consumer")
)

// MetricConsumerDuration (histogram, s) is the duration of one handling
// attempt by a consumer, by consumer, message.kind and outcome.
const MetricConsumerDuration = "tailrace.consumer.handle.duration"

// traceContext is the W3C propagator: traceparent (and tracestate) in the
// message metadata, the keys staging writes.
var traceContext = propagation.TraceContext{}

// envelope is Watermill's forwarder envelope: the outbox row's payload.
type envelope struct {
	DestinationTopic string            `json:"destination_topic"`
	UUID             string            `json:"uuid"`
	Payload          []byte            `json:"payload"`
	Metadata         map[string]string `json:"metadata"`
}

// RelayTracing returns a forwarder middleware for the relay
// (outbox.RelayConfig.Middlewares) that starts a producer span "publish
// <destination>" for every publish attempt, as a child of the traceparent
// the message was staged with, and rewrites that traceparent to the
// span's own, so that the consumer's span becomes a child of the publish.
// The span records the error of a failed attempt; each retry is a span of
// its own. tp nil means the global TracerProvider.
//
// A message staged without a trace context gets a new trace at the relay.
func RelayTracing(tp trace.TracerProvider) message.HandlerMiddleware {
	if tp == nil {
		tp = otel.GetTracerProvider()
	}
	tracer := tp.Tracer(instrumentationName)
	return func(h message.HandlerFunc) message.HandlerFunc {
		return func(msg *message.Message) ([]*message.Message, error) {
			var env envelope
			if err := json.Unmarshal(msg.Payload, &env); err != nil || env.DestinationTopic == "" {
				return h(msg) // not an envelope: the forwarder reports it
			}
			if env.Metadata == nil {
				env.Metadata = map[string]string{}
			}
			parent := traceContext.Extract(msg.Context(), propagation.MapCarrier(env.Metadata))
			ctx, span := tracer.Start(parent, "publish "+env.DestinationTopic,
				trace.WithSpanKind(trace.SpanKindProducer),
				trace.WithAttributes(
					AttrMessagingOperation.String("publish"),
					AttrDestination.String(env.DestinationTopic),
					AttrMessageID.String(env.UUID),
					AttrKind.String(env.Metadata[tailrace.MetaKind]),
				))
			defer span.End()
			traceContext.Inject(ctx, propagation.MapCarrier(env.Metadata))
			if payload, err := json.Marshal(env); err == nil {
				msg.Payload = payload
			}
			// The forwarder hands this context to the unwrapped message the
			// publisher gets.
			msg.SetContext(trace.ContextWithSpan(msg.Context(), span))
			out, err := h(msg)
			if err != nil {
				span.RecordError(err)
				span.SetStatus(codes.Error, err.Error())
			}
			return out, err
		}
	}
}

// ConsumerTracing returns a router middleware for consumers
// (ConsumerConfig.Middlewares) that starts a consumer span "process
// <kind>" for every handling attempt, as a child of the message's
// traceparent (the relay's publish span with RelayTracing), and puts it in
// the message context, which the handler's context derives from: spans
// the handler starts (behaviors.Tracing) and messages it stages continue
// the trace. tp nil means the global TracerProvider.
func ConsumerTracing(tp trace.TracerProvider) message.HandlerMiddleware {
	if tp == nil {
		tp = otel.GetTracerProvider()
	}
	tracer := tp.Tracer(instrumentationName)
	return func(h message.HandlerFunc) message.HandlerFunc {
		return func(msg *message.Message) ([]*message.Message, error) {
			parent := traceContext.Extract(msg.Context(), propagation.MapCarrier(msg.Metadata))
			kind := msg.Metadata.Get(tailrace.MetaKind)
			ctx, span := tracer.Start(parent, "process "+kind,
				trace.WithSpanKind(trace.SpanKindConsumer),
				trace.WithAttributes(
					AttrMessagingOperation.String("process"),
					AttrMessageID.String(msg.UUID),
					AttrKind.String(kind),
				))
			defer span.End()
			orig := msg.Context()
			msg.SetContext(ctx)
			out, err := h(msg)
			msg.SetContext(orig)
			if err != nil {
				span.RecordError(err)
				span.SetStatus(codes.Error, err.Error())
			}
			return out, err
		}
	}
}

// ConsumerMetrics returns a router middleware for the consumer named
// consumer (ConsumerConfig.Middlewares) that records each handling
// attempt's duration in MetricConsumerDuration, by consumer, message.kind
// and outcome. mp nil means the global MeterProvider.
func ConsumerMetrics(mp metric.MeterProvider, consumer string) (message.HandlerMiddleware, error) {
	if mp == nil {
		mp = otel.GetMeterProvider()
	}
	hist, err := mp.Meter(instrumentationName).Float64Histogram(MetricConsumerDuration, metric.WithUnit("s"),
		metric.WithDescription("Duration of one handling attempt by a consumer."),
		metric.WithExplicitBucketBoundaries(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
	if err != nil {
		return nil, fmt.Errorf("bus: create consumer metrics: %w", err)
	}
	c := AttrConsumer.String(consumer)
	return func(h message.HandlerFunc) message.HandlerFunc {
		return func(msg *message.Message) ([]*message.Message, error) {
			start := time.Now()
			out, err := h(msg)
			outcome := "ok"
			if err != nil {
				outcome = "error"
			}
			hist.Record(context.WithoutCancel(msg.Context()), time.Since(start).Seconds(),
				metric.WithAttributes(c, AttrKind.String(msg.Metadata.Get(tailrace.MetaKind)), AttrOutcome.String(outcome)))
			return out, err
		}
	}, nil
}
