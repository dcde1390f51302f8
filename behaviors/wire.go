package behaviors

import "github.com/google/wire"

// ProviderSet provides every stock behavior that is built from its Config
// alone or with shared infrastructure, as its concrete type: *Recover,
// *Logging, *Validation, *Timeout and *Retry from their Configs (and, for
// Logging, the application's *slog.Logger); *Transaction from the
// application's *sql.DB, *slog.Logger and TransactionConfig; *Inbox from
// the *outbox.Inbox (outbox.ProviderSet provides one), the *slog.Logger and
// InboxConfig. Those are inputs, never provided here. Wire only asks for the
// inputs of the behaviors an injector uses. None of them needs closing.
//
// Binding them to mediator.Behavior is left to the application: several
// behaviors cannot share one binding, and each needs its Order anyway (see
// the Layer methods and mediator/internal/wireexample). Metrics and Tracing
// are not in the set.
var ProviderSet = wire.NewSet(
	NewRecover, NewLogging, NewValidation, NewTimeout, NewRetry,
	NewTransaction, NewInbox,
)
