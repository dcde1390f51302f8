//go:build wireinject

package wireexample

import (
	"database/sql"
	"log/slog"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/google/wire"

	"github.com/tailrace/tailrace/bus"
	"github.com/tailrace/tailrace/outbox"
	"github.com/tailrace/tailrace/policy"
)

// NewPipeline assembles the relay and its routing publisher. The database,
// the logger, the registry (with the application's publishers) and the
// configs are inputs. The relay publishes through the routing publisher:
// the injector binds message.Publisher to it, which no library set does.
// The cleanup closes the relay, the routing publisher and the policy
// watcher, in that order; the registry's publishers stay the caller's.
func NewPipeline(
	db *sql.DB,
	logger *slog.Logger,
	reg *bus.Registry,
	watcherCfg policy.WatcherConfig,
	routingCfg bus.RoutingConfig,
	relayCfg outbox.RelayConfig,
) (*Pipeline, func(), error) {
	wire.Build(
		bus.ProviderSet,
		policy.ProviderSet,
		outbox.ProviderSet,
		wire.Bind(new(message.Publisher), new(*bus.RoutingPublisher)),
		wire.Struct(new(Pipeline), "*"),
	)
	return nil, nil, nil
}
