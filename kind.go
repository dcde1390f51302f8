package tailrace

// Kinder is implemented by command, query, event and notification types that
// name themselves. The kind is persisted (outbox rows), routed (policy rules
// match it as Event), and used in logs and metric labels, so Kind must return
// a constant: the same string for every value of the type, stable across
// releases, never derived from the Go type name. Declare it on the value
// receiver so that both T and *T have it.
//
// The mediator and the outbox both read it; mediator.Kinder is the same
// interface.
type Kinder interface {
	Kind() string
}
