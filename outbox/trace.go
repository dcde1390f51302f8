package outbox

import (
	"context"

	"go.opentelemetry.io/otel/trace"
)

// traceparent returns the W3C traceparent of the OpenTelemetry span in ctx
// ("00-<trace id>-<span id>-<flags>"), or "" when ctx carries no valid span.
// Consumers continue the trace from it (tailrace.MetaTraceparent).
func traceparent(ctx context.Context) string {
	sc := trace.SpanContextFromContext(ctx)
	if !sc.IsValid() {
		return ""
	}
	return "00-" + sc.TraceID().String() + "-" + sc.SpanID().String() + "-" + sc.TraceFlags().String()
}
