package outbox

import (
	"database/sql"
	"log/slog"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/google/wire"
)

// ProviderSet provides an *Outbox (New), an *Inbox (NewInbox) and a *Relay
// (ProvideRelay, with a cleanup that closes it). Its inputs are the
// application's *sql.DB and *slog.Logger, the Config, InboxConfig and
// RelayConfig, and, for the relay, the message.Publisher it publishes
// through (bind one: wire.Bind(new(message.Publisher),
// new(*bus.RoutingPublisher)), for instance); a library set never provides
// shared infrastructure. The *Notifier the configs may name is the
// application's too. Wire only asks for the inputs of the providers an
// injector uses: a process that only stages messages needs no publisher.
// See outbox/internal/wireexample.
//
// Not in the set: NotifyPostgres (it provides no value and takes a table
// name as a string; start it where the process decides it runs), Metrics,
// Health, Admin and DeadLetters.
var ProviderSet = wire.NewSet(New, NewInbox, ProvideRelay)

// ProvideRelay is NewRelay for Wire: it needs the database holding the
// outbox table, the publisher the messages go to, a logger and the relay's
// configuration, and provides the *Relay; Run starts it, and closes it when
// its context is done. The returned cleanup closes the relay (Close: stops
// claiming, waits up to RelayConfig.CloseTimeout for the messages in flight,
// releases the partitions; at once if Run never started, and a no-op after
// Run returned). Call the cleanup after Run returned, as an injector's
// cleanup usually is.
func ProvideRelay(db *sql.DB, publisher message.Publisher, logger *slog.Logger, cfg RelayConfig) (*Relay, func(), error) {
	r, err := NewRelay(db, publisher, logger, cfg)
	if err != nil {
		return nil, nil, err
	}
	return r, func() { _ = r.Close() }, nil
}
