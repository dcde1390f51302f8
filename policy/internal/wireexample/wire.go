//go:build wireinject

package wireexample

import (
	"log/slog"

	"github.com/google/wire"

	"github.com/tailrace/tailrace/policy"
)

// NewProvider assembles the policy Provider the routing publisher needs.
// The logger and the watcher's configuration are inputs: they belong to the
// application.
func NewProvider(logger *slog.Logger, cfg policy.WatcherConfig) (policy.Provider, func(), error) {
	wire.Build(policy.ProviderSet)
	return nil, nil, nil
}
