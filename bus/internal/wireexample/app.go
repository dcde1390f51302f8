// Package wireexample shows bus.ProviderSet in a Wire injector (wire.go,
// generated into wire_gen.go by make generate and checked by make test),
// with policy.ProviderSet and outbox.ProviderSet: the relay publishes
// through the routing publisher, which routes with the watched policy to
// the registry's publishers.
package wireexample

import (
	"github.com/tailrace/tailrace/bus"
	"github.com/tailrace/tailrace/outbox"
)

// Pipeline is what the injector assembles.
type Pipeline struct {
	Relay   *outbox.Relay
	Routing *bus.RoutingPublisher
}
