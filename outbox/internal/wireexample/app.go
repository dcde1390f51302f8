// Package wireexample shows outbox.ProviderSet, with the Transaction and
// Inbox behaviors of behaviors.ProviderSet, in a Wire injector (wire.go,
// generated into wire_gen.go by make generate and checked by make test): a
// command stages an event in its transaction, the relay publishes it, and
// the event handled twice under one message id has its effect once.
package wireexample

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/tailrace/tailrace/behaviors"
	"github.com/tailrace/tailrace/mediator"
	"github.com/tailrace/tailrace/outbox"
)

// PlaceOrder is a command answered with the order's id.
type PlaceOrder struct {
	mediator.Command[string]
	ID string
}

// Kind implements mediator.Kinder.
func (PlaceOrder) Kind() string { return "orders.place" }

// OrderPlaced is staged by the PlaceOrder handler; the relay publishes it to
// the destination "orders.placed", its kind.
type OrderPlaced struct {
	mediator.Notification
	ID string `json:"id"`
}

// Kind implements mediator.Kinder.
func (OrderPlaced) Kind() string { return "orders.placed" }

// Orders handles PlaceOrder.
type Orders struct{ outbox *outbox.Outbox }

// NewOrders returns the handler; it stages through the Outbox the set
// provides.
func NewOrders(o *outbox.Outbox) *Orders { return &Orders{outbox: o} }

// Handle implements mediator.Handler. Stage writes in the transaction the
// Transaction behavior put in ctx.
func (h *Orders) Handle(ctx context.Context, c PlaceOrder) (string, error) {
	if c.ID == "" {
		return "", errors.New("wireexample: no order id")
	}
	return c.ID, h.outbox.Stage(ctx, OrderPlaced{ID: c.ID})
}

// Shipping handles OrderPlaced, as a bus consumer would dispatch it.
type Shipping struct {
	mu      sync.Mutex
	shipped []string
}

// NewShipping returns the handler.
func NewShipping() *Shipping { return &Shipping{} }

// Handle implements mediator.NotificationHandler.
func (s *Shipping) Handle(ctx context.Context, e OrderPlaced) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.shipped = append(s.shipped, e.ID)
	return nil
}

// Shipped returns the ids handled so far.
func (s *Shipping) Shipped() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.shipped...)
}

// Settings is the application's own configuration (a service reads it from
// flags or the environment); the config providers below turn it into the
// library configs, which are inputs of the sets.
type Settings struct {
	Dialect      outbox.Dialect
	PollInterval time.Duration
}

// NewNotifier is the in-process "committed" signal shared by the
// Transaction behavior and the relay: the application's, not a set's.
func NewNotifier() *outbox.Notifier { return &outbox.Notifier{} }

// OutboxConfig configures the Outbox.
func OutboxConfig(s Settings) outbox.Config { return outbox.Config{Dialect: s.Dialect} }

// InboxStoreConfig configures the inbox table.
func InboxStoreConfig(s Settings) outbox.InboxConfig {
	return outbox.InboxConfig{Dialect: s.Dialect}
}

// RelayConfig configures the relay; the notifier wakes it after commits.
func RelayConfig(s Settings, n *outbox.Notifier) outbox.RelayConfig {
	return outbox.RelayConfig{Dialect: s.Dialect, Table: outbox.DefaultTable, Notifier: n, PollInterval: s.PollInterval}
}

// TransactionConfig runs commands and notifications in a transaction (Inbox
// needs one for the events it deduplicates) and signals the notifier after
// each commit.
func TransactionConfig(n *outbox.Notifier) behaviors.TransactionConfig {
	return behaviors.TransactionConfig{
		Notifier: n,
		Applies: func(info mediator.Info) bool {
			return info.Type == mediator.TypeCommand || info.Type == mediator.TypeNotification
		},
	}
}

// InboxConfig is the Inbox behavior's configuration: the defaults.
func InboxConfig() behaviors.InboxConfig { return behaviors.InboxConfig{} }

// MediatorConfig is the mediator's configuration: the defaults.
func MediatorConfig() mediator.Config { return mediator.Config{} }

// Layers is the pipeline: Transaction outside Inbox, at their suggested
// orders.
func Layers(tx *behaviors.Transaction, in *behaviors.Inbox) []mediator.Layer {
	return []mediator.Layer{tx.Layer(), in.Layer()}
}

// Registrations lists the handlers.
func Registrations(o *Orders, s *Shipping) []mediator.Registration {
	return []mediator.Registration{
		mediator.Handle[PlaceOrder](o),
		mediator.HandleNotification[OrderPlaced](s),
	}
}

// App is what the injector assembles.
type App struct {
	Mediator *mediator.Mediator
	Relay    *outbox.Relay
	Inbox    *outbox.Inbox
	Shipping *Shipping
}
