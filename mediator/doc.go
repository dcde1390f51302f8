// Package mediator dispatches commands, queries, notifications and streams
// to their handlers through an ordered pipeline of behaviors.
//
// It exists so that the cross-cutting work every request needs — a
// transaction with its outbox, logging, validation, retries, timeouts,
// panic recovery — is written once as a Behavior and applied in a stated
// order, while handlers stay plain typed functions. It is built for the
// outbox: commands are told apart from queries, every type has a stable kind
// name that can be persisted and routed, and dispatch costs tens of
// nanoseconds, not microseconds.
//
// # Requests
//
// A request embeds a marker that says what it is and what it returns:
//
//	type PlaceOrder struct {
//		mediator.Command[OrderID] // a command answered with an OrderID
//		Customer string
//	}
//
//	func (PlaceOrder) Kind() string { return "orders.place" }
//
// Command[R] and Query[R] are answered by exactly one Handler through Send;
// Notification is delivered to any number of NotificationHandlers through
// Publish (with a PublishStrategy); Stream[T] is answered with an
// iter.Seq2[T, error] through SendStream. Send's response type is inferred
// from the marker: id, err := mediator.Send(ctx, m, PlaceOrder{...}).
//
// # Kinds
//
// Every registered type has a kind: the string its Kind() method returns, or
// the name given with WithKind. The Go type name is never used, because kinds
// are persisted (outbox rows), routed (policy rules) and used as log fields
// and metric labels; renaming a Go type must not change them. KindOf and
// (*Mediator).KindOf return the kind of a value without dispatching.
//
// # Behaviors and their order
//
// A Behavior wraps dispatches like an HTTP middleware: it sees the request
// as any plus an Info (kind, and command/query/notification/stream) and
// calls next to go on. Behaviors are added as Layers with an explicit Order:
// the lower the Order, the further out the behavior runs; equal orders keep
// the order in which they were added. A Layer's Scope limits it to some
// request types (Commands(), Implementing[I](), Where(pred), ...). See
// Example_order for the onion this produces. A behavior may short-circuit by
// returning without calling next.
//
// # Registries are values
//
// There is no package-level state: New (or Build, for DI) returns a
// Mediator, and Register, RegisterNotification, RegisterStream and Use
// configure it. Register panics on a duplicate; the ...Safely variants
// return the error. The pipeline of each request type is built when it is
// registered (and rebuilt when a behavior is added), never per call; dispatch
// reads an immutable snapshot without locks, so a Mediator is safe for
// concurrent use and handlers may dispatch on it again (nested Send).
//
// # Cost
//
// Send finds the handler with one map lookup keyed by the request's static
// Go type (the type word of an interface holding a *Req, a constant: no
// reflect.Value, no dynamic call), then calls the pre-built chain of
// closures. With no behavior for a type it calls the handler directly and
// allocates nothing. Through behaviors, the request and the response must
// become the `any` the behaviors see; instead of two boxes Send allocates
// one frame that holds both (see frame.go, the package's only unsafe code).
// Pointer-shaped responses need no frame at all. Reflection is used at
// registration and on error paths only. See bench_test.go.
//
// # Wire
//
// ProviderSet provides a *Mediator from a Config, a []Layer and a
// []Registration that the application provides; see the wireexample package
// under internal/. Everything works by hand without Wire.
package mediator
