package behaviors

import "github.com/google/wire"

// ProviderSet provides every stock behavior as its concrete type (*Recover,
// *Logging, *Validation, *Timeout, *Retry) from its Config and, for Logging,
// the application's *slog.Logger; those are inputs, never provided here.
// Wire only asks for the inputs of the behaviors an injector uses. Binding
// them to mediator.Behavior is left to the application: several behaviors
// cannot share one binding, and each needs its Order anyway (see the Layer
// methods and mediator/internal/wireexample).
var ProviderSet = wire.NewSet(NewRecover, NewLogging, NewValidation, NewTimeout, NewRetry)
