package behaviors

import (
	"context"
	"log/slog"

	"go.opentelemetry.io/otel/trace"
)

// TraceLogHandler wraps h so that every record logged with a context that
// carries a valid OpenTelemetry span gets the attributes trace_id and
// span_id: the Logging behavior, the relay and the consumer log with the
// request's context, so their records can be joined with its trace.
// Records without a span pass through unchanged.
func TraceLogHandler(h slog.Handler) slog.Handler { return traceLogHandler{h} }

type traceLogHandler struct{ slog.Handler }

func (t traceLogHandler) Handle(ctx context.Context, r slog.Record) error {
	if sc := trace.SpanContextFromContext(ctx); sc.IsValid() {
		r = r.Clone()
		r.AddAttrs(slog.String("trace_id", sc.TraceID().String()), slog.String("span_id", sc.SpanID().String()))
	}
	return t.Handler.Handle(ctx, r)
}

func (t traceLogHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return traceLogHandler{t.Handler.WithAttrs(attrs)}
}

func (t traceLogHandler) WithGroup(name string) slog.Handler {
	return traceLogHandler{t.Handler.WithGroup(name)}
}
