package mediator

import "github.com/google/wire"

// ProviderSet provides a *Mediator built by Build. Its inputs are a Config,
// the []Layer of behaviors and the []Registration of handlers, all provided
// by the application (see mediator/internal/wireexample): a library set
// never decides which behaviors or handlers an application has. There is no
// interface to bind: Send, Publish and SendStream are functions taking the
// concrete *Mediator.
var ProviderSet = wire.NewSet(Build)
