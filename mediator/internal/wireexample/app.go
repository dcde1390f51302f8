// Package wireexample shows a Mediator, its handlers and the stock behaviors
// assembled by Wire (wire.go, generated into wire_gen.go). Everything here
// also works by hand: see the test.
package wireexample

import (
	"context"
	"errors"
	"sync"

	"github.com/tailrace/tailrace/behaviors"
	"github.com/tailrace/tailrace/mediator"
)

// CreateUser is a command answered with the new user's id.
type CreateUser struct {
	mediator.Command[int]
	Name string
}

// Kind implements mediator.Kinder.
func (CreateUser) Kind() string { return "users.create" }

// Validate implements behaviors.Validatable.
func (c CreateUser) Validate() error {
	if c.Name == "" {
		return behaviors.FieldError{Field: "name", Message: "required"}
	}
	return nil
}

// UserCreated is published by the CreateUser handler.
type UserCreated struct {
	mediator.Notification
	ID int
}

// Kind implements mediator.Kinder.
func (UserCreated) Kind() string { return "users.created" }

// Store stands for the application's shared infrastructure (a *sql.DB in a
// real service): an input of the injector, not provided by a library set.
type Store struct {
	mu      sync.Mutex
	Users   []string
	Welcome []int
}

// CreateUserHandler handles CreateUser.
type CreateUserHandler struct {
	store *Store
}

// NewCreateUserHandler returns the handler.
func NewCreateUserHandler(store *Store) *CreateUserHandler {
	return &CreateUserHandler{store: store}
}

// Handle implements mediator.Handler.
func (h *CreateUserHandler) Handle(ctx context.Context, c CreateUser) (int, error) {
	h.store.mu.Lock()
	defer h.store.mu.Unlock()
	h.store.Users = append(h.store.Users, c.Name)
	return len(h.store.Users), nil
}

// WelcomeHandler handles UserCreated.
type WelcomeHandler struct{ store *Store }

// NewWelcomeHandler returns the handler.
func NewWelcomeHandler(store *Store) *WelcomeHandler { return &WelcomeHandler{store: store} }

// Handle implements mediator.NotificationHandler.
func (h *WelcomeHandler) Handle(ctx context.Context, e UserCreated) error {
	if e.ID <= 0 {
		return errors.New("wireexample: bad id")
	}
	h.store.mu.Lock()
	defer h.store.mu.Unlock()
	h.store.Welcome = append(h.store.Welcome, e.ID)
	return nil
}

// Layers is where the application decides its pipeline: which behaviors,
// at which orders (here their suggested ones).
func Layers(l *behaviors.Logging, r *behaviors.Recover, v *behaviors.Validation) []mediator.Layer {
	return []mediator.Layer{l.Layer(), r.Layer(), v.Layer()}
}

// Registrations lists the application's handlers.
func Registrations(c *CreateUserHandler, w *WelcomeHandler) []mediator.Registration {
	return []mediator.Registration{
		mediator.Handle[CreateUser](c),
		mediator.HandleNotification[UserCreated](w),
	}
}
