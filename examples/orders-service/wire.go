//go:build wireinject

package main

import (
	"database/sql"
	"log/slog"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/google/wire"

	"github.com/tailrace/tailrace/behaviors"
	"github.com/tailrace/tailrace/bus"
	"github.com/tailrace/tailrace/mediator"
	"github.com/tailrace/tailrace/outbox"
	"github.com/tailrace/tailrace/policy"
)

// initApp assembles the service. The configuration, the logger and the
// database are inputs: shared infrastructure belongs to main, not to a
// provider set. The library sets provide the mediator, the behaviors, the
// outbox, the inbox, the relay, the policy watcher and the routing
// publisher from the configs the providers in app.go return. The relay
// publishes through the routing publisher: binding message.Publisher to it
// is the application's decision, so it is made here. The cleanup closes,
// in reverse order, what the providers opened (the relay, the routing
// publisher, the broker connections, the policy watcher, the metrics).
func initApp(cfg Config, logger *slog.Logger, db *sql.DB) (*App, func(), error) {
	wire.Build(
		mediator.ProviderSet,
		behaviors.ProviderSet,
		outbox.ProviderSet,
		bus.ProviderSet,
		policy.ProviderSet,
		wire.Bind(new(message.Publisher), new(*bus.RoutingPublisher)),
		provideMediatorConfig,
		provideLoggingConfig,
		provideRecoverConfig,
		provideValidationConfig,
		provideNotifier,
		provideTelemetry,
		provideOutboxMetrics,
		provideBehaviorMetrics,
		provideOutboxConfig,
		provideTransactionConfig,
		provideInboxStoreConfig,
		provideInboxConfig,
		layers,
		newService,
		registrations,
		watermillLogger,
		provideAMQPConfig,
		provideNATSConfig,
		provideRegistry,
		provideWatcherConfig,
		provideRoutingConfig,
		provideRelayConfig,
		provideSubscriber,
		provideConsumer,
		provideAuditConsumer,
		provideOutboxHealth,
		newApp,
	)
	return nil, nil, nil
}
