package policy

import (
	"log/slog"

	"github.com/google/wire"
)

// ProviderSet provides a *Watcher, bound to Provider for the routing
// publisher. Its inputs are the application's *slog.Logger and its
// WatcherConfig (paths, LoadOptions with the bus registry's keys, debounce):
// a library set never decides where an application keeps its files. The
// cleanup Wire returns closes the watcher. By hand: NewWatcher and Close.
var ProviderSet = wire.NewSet(ProvideWatcher, wire.Bind(new(Provider), new(*Watcher)))

// ProvideWatcher is NewWatcher for Wire: the returned cleanup closes the
// watcher.
func ProvideWatcher(logger *slog.Logger, cfg WatcherConfig) (*Watcher, func(), error) {
	w, err := NewWatcher(logger, cfg)
	if err != nil {
		return nil, nil, err
	}
	return w, func() { _ = w.Close() }, nil
}
