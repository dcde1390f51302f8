package bus

import (
	"errors"
	"fmt"
	"slices"
	"sync"
	"unicode"
	"unicode/utf8"

	"github.com/ThreeDotsLabs/watermill/message"
)

// Errors returned by the Registry. Match them with errors.Is.
var (
	// ErrDuplicateKey: a publisher is already registered under the key.
	ErrDuplicateKey = errors.New("bus: duplicate publisher key")
	// ErrUnknownPublisher: no publisher is registered under the key.
	ErrUnknownPublisher = errors.New("bus: unknown publisher key")
	// ErrInvalidKey: the key is empty or contains white space or control
	// characters.
	ErrInvalidKey = errors.New("bus: invalid publisher key")
	// ErrRegistryClosed: the registry was closed; it takes no new publishers.
	ErrRegistryClosed = errors.New("bus: registry closed")
)

// Registry holds the publishers of a service by key: the names a routing
// policy refers to ("rabbit", "audit-nats", "local"). It is a value, not a
// global: build one with NewRegistry (or declare a zero Registry, which is
// ready to use), register every publisher at start-up, hand it to the policy
// loader (HasPublisher) and to the routing publisher (Publisher), and Close it
// at shutdown.
//
// A Registry is safe for concurrent use. It must not be copied after first
// use.
type Registry struct {
	mu     sync.RWMutex
	pubs   map[string]message.Publisher
	order  []string // registration order, for Close
	closed bool
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry { return &Registry{} }

// Register adds a publisher under key. It panics when key is invalid, p is
// nil, the key is taken or the registry is closed: registration happens at
// start-up, where a duplicate is a programming error (as with
// database/sql.Register). Use RegisterSafely to get an error instead.
func (r *Registry) Register(key string, p message.Publisher) {
	if err := r.RegisterSafely(key, p); err != nil {
		panic(err)
	}
}

// RegisterSafely adds a publisher under key, or returns an error wrapping
// ErrInvalidKey, ErrDuplicateKey or ErrRegistryClosed (or an error for a nil
// publisher). The registry takes ownership of p: Close closes it.
func (r *Registry) RegisterSafely(key string, p message.Publisher) error {
	if err := ValidateKey(key); err != nil {
		return err
	}
	if p == nil {
		return fmt.Errorf("bus: nil publisher for key %q", key)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return fmt.Errorf("%w: cannot register %q", ErrRegistryClosed, key)
	}
	if _, ok := r.pubs[key]; ok {
		return fmt.Errorf("%w: %q", ErrDuplicateKey, key)
	}
	if r.pubs == nil {
		r.pubs = make(map[string]message.Publisher)
	}
	r.pubs[key] = p
	r.order = append(r.order, key)
	return nil
}

// ValidateKey reports whether key can name a publisher: it must be non-empty
// valid UTF-8 without white space or control characters, at most 200 bytes.
func ValidateKey(key string) error {
	switch {
	case key == "":
		return fmt.Errorf("%w: empty", ErrInvalidKey)
	case len(key) > 200:
		return fmt.Errorf("%w: longer than 200 bytes", ErrInvalidKey)
	case !utf8.ValidString(key):
		return fmt.Errorf("%w: %q is not valid UTF-8", ErrInvalidKey, key)
	}
	for _, c := range key {
		if unicode.IsSpace(c) || unicode.IsControl(c) {
			return fmt.Errorf("%w: %q contains white space or control characters", ErrInvalidKey, key)
		}
	}
	return nil
}

// Publisher returns the publisher registered under key.
func (r *Registry) Publisher(key string) (message.Publisher, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	p, ok := r.pubs[key]
	return p, ok
}

// Lookup returns the publisher registered under key, or an error wrapping
// ErrUnknownPublisher.
func (r *Registry) Lookup(key string) (message.Publisher, error) {
	if p, ok := r.Publisher(key); ok {
		return p, nil
	}
	return nil, fmt.Errorf("%w: %q", ErrUnknownPublisher, key)
}

// HasPublisher reports whether a publisher is registered under key. Its
// method value fits policy.LoadOptions.KnownPublishers, so a policy that
// names an undeclared key is rejected at load:
//
//	policy.Load(paths, &policy.LoadOptions{KnownPublishers: reg.HasPublisher})
func (r *Registry) HasPublisher(key string) bool {
	_, ok := r.Publisher(key)
	return ok
}

// Keys returns the registered keys, sorted.
func (r *Registry) Keys() []string {
	r.mu.RLock()
	keys := slices.Clone(r.order)
	r.mu.RUnlock()
	slices.Sort(keys)
	return keys
}

// Len returns the number of registered publishers.
func (r *Registry) Len() int {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return len(r.pubs)
}

// Close closes every registered publisher, in reverse registration order,
// and returns their errors joined (each prefixed with its key). After Close
// the registry is empty and refuses new registrations; a second Close is a
// no-op.
func (r *Registry) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	pubs, order := r.pubs, r.order
	r.pubs, r.order = nil, nil
	r.mu.Unlock()

	var errs []error
	for i := len(order) - 1; i >= 0; i-- {
		key := order[i]
		if err := pubs[key].Close(); err != nil {
			errs = append(errs, fmt.Errorf("bus: close publisher %q: %w", key, err))
		}
	}
	return errors.Join(errs...)
}
