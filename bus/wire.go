package bus

import (
	"log/slog"

	"github.com/google/wire"

	"github.com/tailrace/tailrace/policy"
)

// ProviderSet provides a *RoutingPublisher (ProvideRoutingPublisher, with a
// cleanup that closes it). Its inputs are the application's *Registry (its
// publishers are the application's choice, and the Registry closes them),
// the policy.Provider (policy.ProviderSet provides one), a *slog.Logger and
// the RoutingConfig. The set binds no interface: bind message.Publisher to
// *RoutingPublisher in the injector where the relay should publish through
// it. See bus/internal/wireexample.
//
// Not in the set: the Registry (publishers are registered into it, which is
// application code) and Consumer (it is ready only once its handlers are
// registered and its destinations subscribed, and a service often runs
// several).
var ProviderSet = wire.NewSet(ProvideRoutingPublisher)

// ProvideRoutingPublisher is NewRoutingPublisher for Wire: it needs the
// publisher registry, the routing policy, a logger and the routing
// configuration, and provides the *RoutingPublisher. The returned cleanup
// closes it (Close), which does not close the registry's publishers.
func ProvideRoutingPublisher(reg *Registry, policies policy.Provider, logger *slog.Logger, cfg RoutingConfig) (*RoutingPublisher, func(), error) {
	p, err := NewRoutingPublisher(reg, policies, logger, cfg)
	if err != nil {
		return nil, nil, err
	}
	return p, func() { _ = p.Close() }, nil
}
