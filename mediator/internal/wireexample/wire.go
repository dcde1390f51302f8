//go:build wireinject

package wireexample

import (
	"log/slog"

	"github.com/google/wire"

	"github.com/tailrace/tailrace/behaviors"
	"github.com/tailrace/tailrace/mediator"
)

// NewMediator assembles the Mediator. The logger, the store and the configs
// are inputs: shared infrastructure and configuration belong to the
// application.
func NewMediator(
	logger *slog.Logger,
	store *Store,
	cfg mediator.Config,
	logCfg behaviors.LoggingConfig,
	recoverCfg behaviors.RecoverConfig,
	validationCfg behaviors.ValidationConfig,
) (*mediator.Mediator, error) {
	wire.Build(
		mediator.ProviderSet,
		behaviors.ProviderSet,
		NewCreateUserHandler,
		NewWelcomeHandler,
		Layers,
		Registrations,
	)
	return nil, nil
}
