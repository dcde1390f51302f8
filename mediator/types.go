package mediator

import (
	"context"
	"iter"

	"github.com/tailrace/tailrace"
)

// RequestType says what kind of dispatch a behavior is wrapping. It comes
// from the marker a request type embeds, so it is fixed per Go type.
type RequestType uint8

const (
	// TypeCommand is a request that changes state; it embeds Command[R].
	// Behaviors such as Transaction limit themselves to commands.
	TypeCommand RequestType = iota + 1
	// TypeQuery is a request that only reads; it embeds Query[R].
	TypeQuery
	// TypeNotification is a notification sent to every registered handler
	// with Publish; it embeds Notification.
	TypeNotification
	// TypeStream is a request whose response is a sequence; it embeds
	// Stream[T] and is dispatched with SendStream.
	TypeStream
)

// String returns "command", "query", "notification" or "stream".
func (t RequestType) String() string {
	switch t {
	case TypeCommand:
		return "command"
	case TypeQuery:
		return "query"
	case TypeNotification:
		return "notification"
	case TypeStream:
		return "stream"
	}
	return "unknown"
}

// Info describes one dispatch to the behaviors that wrap it, like grpc's
// UnaryServerInfo. It is computed once per request type at registration.
type Info struct {
	// Kind is the stable name of the request type: its Kind() method or the
	// name given with WithKind. It never comes from the Go type name, so it
	// can be logged, used as a metric label, persisted and routed.
	Kind string
	// Type says whether the request is a command, a query, a notification
	// or a stream.
	Type RequestType
}

// Command is the marker a command request embeds; R is the response type
// Send returns. Commands change state: the Transaction behavior wraps them.
//
//	type PlaceOrder struct {
//		mediator.Command[OrderID]
//		Customer string
//	}
type Command[R any] struct{}

func (Command[R]) requestType(R) RequestType { return TypeCommand }

// Query is the marker a query request embeds; R is the response type Send
// returns. Queries only read.
type Query[R any] struct{}

func (Query[R]) requestType(R) RequestType { return TypeQuery }

// Request is satisfied by every type that embeds Command[R] or Query[R]. The
// method is unexported: embedding a marker is the only way to satisfy it, and
// it lets the compiler infer R at the call site of Send.
type Request[R any] interface {
	requestType(R) RequestType
}

// Stream is the marker a stream request embeds; T is the element type of the
// sequence SendStream returns.
type Stream[T any] struct{}

func (Stream[T]) streamElem(T) {}

// StreamRequest is satisfied by every type that embeds Stream[T].
type StreamRequest[T any] interface {
	streamElem(T)
}

// Notification is the marker a notification embeds. A notification has any
// number of handlers (zero included) and no response.
type Notification struct{}

func (Notification) notification() {}

// Notifiable is satisfied by every type that embeds Notification.
type Notifiable interface {
	notification()
}

// Kinder is implemented by request and message types that name themselves;
// it is tailrace.Kinder, shared with the outbox. Kind must return a constant:
// the same string for every value of the type, stable across releases (it is
// persisted and routed). Declare it on the value receiver so that both T and
// *T have it.
type Kinder = tailrace.Kinder

// Handler handles one request type. Exactly one handler is registered per
// request type.
type Handler[Req Request[R], R any] interface {
	Handle(ctx context.Context, req Req) (R, error)
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc[Req Request[R], R any] func(ctx context.Context, req Req) (R, error)

// Handle calls f(ctx, req).
func (f HandlerFunc[Req, R]) Handle(ctx context.Context, req Req) (R, error) { return f(ctx, req) }

// NotificationHandler handles one notification type. Any number of them may
// be registered for a type; Publish calls them in registration order (or
// concurrently with the Parallel strategy).
type NotificationHandler[N Notifiable] interface {
	Handle(ctx context.Context, n N) error
}

// NotificationHandlerFunc adapts a function to NotificationHandler.
type NotificationHandlerFunc[N Notifiable] func(ctx context.Context, n N) error

// Handle calls f(ctx, n).
func (f NotificationHandlerFunc[N]) Handle(ctx context.Context, n N) error { return f(ctx, n) }

// StreamHandler handles one stream request type. The sequence it returns
// reports failures as elements with a non-nil error; a nil sequence is an
// empty stream.
type StreamHandler[Req StreamRequest[T], T any] interface {
	Handle(ctx context.Context, req Req) iter.Seq2[T, error]
}

// StreamHandlerFunc adapts a function to StreamHandler.
type StreamHandlerFunc[Req StreamRequest[T], T any] func(ctx context.Context, req Req) iter.Seq2[T, error]

// Handle calls f(ctx, req).
func (f StreamHandlerFunc[Req, T]) Handle(ctx context.Context, req Req) iter.Seq2[T, error] {
	return f(ctx, req)
}
