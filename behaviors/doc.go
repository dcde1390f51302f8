// Package behaviors holds the stock mediator behaviors: Recover, Logging,
// Validation, Timeout and Retry (the Transaction behavior lives next to them
// and comes with the outbox).
//
// It exists because every CQRS service needs the same cross-cutting steps
// around its handlers, and they are only correct in a stated order and with
// stated guarantees: a retry must not repeat a request that can never
// succeed, a timeout must bound the transaction it wraps, a panic must
// become an error before it escapes. Each behavior here documents what it
// guarantees, takes a Config with documented defaults validated by its
// constructor, and returns a concrete type that implements mediator.Behavior.
//
// # Order
//
// Each behavior has a suggested Order constant, and a Layer method that
// uses it. Lower is outer, so the suggested pipeline is:
//
//	Logging (100) → Recover (200) → Validation (300) → Retry (400)
//	  → Timeout (500) → Transaction (600) → handler
//
// Logging sees the final outcome, a panic already turned into an error by
// Recover; invalid requests are rejected before any retry; each retry
// attempt gets its own timeout and its own transaction.
//
// Errors that retrying cannot fix (a *ValidationError, a *PanicError) are
// marked with tailrace.Permanent, so Retry and the outbox relay give up on
// them at once; errors.As still finds them.
package behaviors

// Suggested orders: lower is outer. See the package documentation.
const (
	OrderLogging     = 100
	OrderRecover     = 200
	OrderValidation  = 300
	OrderRetry       = 400
	OrderTimeout     = 500
	OrderTransaction = 600
)
