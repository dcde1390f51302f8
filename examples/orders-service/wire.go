//go:build wireinject

package main

import (
	"database/sql"
	"log/slog"

	"github.com/google/wire"

	"github.com/tailrace/tailrace/behaviors"
	"github.com/tailrace/tailrace/mediator"
	"github.com/tailrace/tailrace/policy"
)

// initApp assembles the service. The configuration, the logger and the
// database are inputs: shared infrastructure belongs to main, not to a
// provider set. The cleanup closes, in reverse order, what the providers
// opened (the broker connections, the policy watcher, the metrics).
func initApp(cfg Config, logger *slog.Logger, db *sql.DB) (*App, func(), error) {
	wire.Build(
		mediator.ProviderSet,
		behaviors.ProviderSet,
		policy.ProviderSet,
		provideMediatorConfig,
		provideLoggingConfig,
		provideRecoverConfig,
		provideValidationConfig,
		provideNotifier,
		provideTelemetry,
		provideOutboxMetrics,
		provideBehaviorMetrics,
		provideOutbox,
		provideTransaction,
		provideInboxStore,
		provideInbox,
		layers,
		newService,
		registrations,
		watermillLogger,
		provideAMQPConfig,
		provideNATSConfig,
		provideRegistry,
		provideWatcherConfig,
		provideRouting,
		provideRelay,
		provideSubscriber,
		provideConsumer,
		provideAuditConsumer,
		newApp,
	)
	return nil, nil, nil
}
