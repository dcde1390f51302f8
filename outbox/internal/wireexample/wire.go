//go:build wireinject

package wireexample

import (
	"database/sql"
	"log/slog"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/google/wire"

	"github.com/tailrace/tailrace/behaviors"
	"github.com/tailrace/tailrace/mediator"
	"github.com/tailrace/tailrace/outbox"
)

// NewApp assembles the App. The database, the logger, the publisher the
// relay publishes to and the settings are inputs: shared infrastructure and
// configuration belong to the application. The cleanup closes the relay.
func NewApp(db *sql.DB, logger *slog.Logger, publisher message.Publisher, s Settings) (*App, func(), error) {
	wire.Build(
		outbox.ProviderSet,
		behaviors.ProviderSet,
		mediator.ProviderSet,
		NewNotifier,
		OutboxConfig,
		InboxStoreConfig,
		RelayConfig,
		TransactionConfig,
		InboxConfig,
		MediatorConfig,
		NewOrders,
		NewShipping,
		Layers,
		Registrations,
		wire.Struct(new(App), "*"),
	)
	return nil, nil, nil
}
