package mediator

import (
	"cmp"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"sync"
	"sync/atomic"
	"unsafe"
)

// Mediator dispatches requests, notifications and streams to their handlers
// through the registered behaviors. Create one with New or Build; the zero
// value is also ready to use (with the default Config).
//
// A Mediator is safe for concurrent use. Registration (Register, Use, ...)
// copies the registry and builds the pipeline of every affected request type
// once; dispatch reads an immutable snapshot without locking, so handlers and
// behaviors may call Send, Publish or even Register on the same Mediator
// (re-entrant, no deadlock). Register everything at start-up: a dispatch that
// starts while a registration is in progress sees the registry as it was
// before or after it, never half of it.
type Mediator struct {
	mu   sync.Mutex // serializes writers
	snap atomic.Pointer[snapshot]
	cfg  Config
}

// Config configures a Mediator.
type Config struct {
	// PublishStrategy is the strategy Publish uses (PublishWith overrides it
	// per call). Default: StopAtFirstError().
	PublishStrategy PublishStrategy
}

// Validate reports every problem of c at once.
func (c Config) Validate() error {
	var errs []error
	if err := c.PublishStrategy.validate(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Option configures New.
type Option func(*Mediator)

// WithPublishStrategy sets the strategy Publish uses (Config.PublishStrategy).
func WithPublishStrategy(s PublishStrategy) Option {
	return func(m *Mediator) { m.cfg.PublishStrategy = s }
}

// WithLayers adds behaviors, as Use does.
func WithLayers(layers ...Layer) Option {
	return func(m *Mediator) { m.Use(layers...) }
}

// New returns an empty Mediator. It panics if an option is invalid (a nil
// behavior, an invalid strategy); Build returns the error instead.
func New(opts ...Option) *Mediator {
	m := &Mediator{}
	for _, o := range opts {
		o(m)
	}
	if err := m.cfg.Validate(); err != nil {
		panic(err)
	}
	return m
}

// Registration registers something on a Mediator: see Handle,
// HandleNotification, HandleStream and Build. It lets a DI container collect
// handlers as values.
type Registration func(m *Mediator) error

// Build returns a Mediator configured by cfg, with the layers and the
// registrations applied in order; it returns the first error. It is the
// constructor ProviderSet uses, and works as well by hand.
func Build(cfg Config, layers []Layer, regs []Registration) (*Mediator, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	m := &Mediator{cfg: cfg}
	if err := m.UseSafely(layers...); err != nil {
		return nil, err
	}
	for _, r := range regs {
		if r == nil {
			return nil, fmt.Errorf("%w: nil Registration", ErrNilHandler)
		}
		if err := r(m); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// Use adds behaviors to the pipeline of every request type, registered
// before or after; see Layer for the order. It panics on a nil behavior;
// UseSafely returns the error.
func (m *Mediator) Use(layers ...Layer) {
	if err := m.UseSafely(layers...); err != nil {
		panic(err)
	}
}

// UseSafely is Use returning an error instead of panicking.
func (m *Mediator) UseSafely(layers ...Layer) error {
	for _, l := range layers {
		if err := l.validate(); err != nil {
			return err
		}
	}
	if len(layers) == 0 {
		return nil
	}
	return m.update(func(s *snapshot) error {
		s.layers = append(slices.Clip(s.layers), layers...)
		slices.SortStableFunc(s.layers, func(a, b Layer) int { return cmp.Compare(a.Order, b.Order) })
		for t, e := range s.entries {
			s.entries[t] = e.build(s)
		}
		return nil
	})
}

// snapshot is the immutable registry that dispatch reads.
type snapshot struct {
	strategy PublishStrategy
	layers   []Layer                  // sorted by Order, stable
	entries  map[unsafe.Pointer]entry // by typeKey
	table    typeTable                // entries again, for dispatch
	kinds    map[string]reflect.Type  // kind → type, to reject a kind used twice
	names    map[reflect.Type]string  // type → kind, for KindOf
}

// entry is a registered request, notification or stream type.
type entry interface {
	base() *meta
	// build returns a copy of the entry with its pipeline built for s.
	build(s *snapshot) entry
}

// meta is what every entry knows about its type.
type meta struct {
	info    Info
	sample  any
	nilable bool // pointer or interface type: compare with zero for nil
	zero    any  // the zero value as any (a typed nil for pointers)
}

func newMeta[T any](t RequestType, kind string) (meta, reflect.Type, error) {
	rt := reflect.TypeFor[T]()
	sample := sampleOf[T]()
	k, err := resolveKind(rt, sample, kind)
	if err != nil {
		return meta{}, rt, err
	}
	var zero T
	nilable := rt.Kind() == reflect.Pointer || rt.Kind() == reflect.Interface
	return meta{info: Info{Kind: k, Type: t}, sample: sample, nilable: nilable, zero: any(zero)}, rt, nil
}

func (m *Mediator) update(f func(s *snapshot) error) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	old := m.snap.Load()
	s := &snapshot{
		strategy: m.cfg.PublishStrategy,
		entries:  map[unsafe.Pointer]entry{},
		kinds:    map[string]reflect.Type{},
		names:    map[reflect.Type]string{},
	}
	if old != nil {
		s.layers = old.layers
		s.entries = cloneMap(old.entries)
		s.kinds = cloneMap(old.kinds)
		s.names = cloneMap(old.names)
	}
	if err := f(s); err != nil {
		return err
	}
	if err := s.check(); err != nil {
		return err
	}
	s.table = newTypeTable(s.entries)
	m.snap.Store(s)
	return nil
}

// check runs the layers' Checks on every pipeline, in a stable order so
// the same error is reported each time.
func (s *snapshot) check() error {
	if !slices.ContainsFunc(s.layers, func(l Layer) bool { return l.Check != nil }) {
		return nil
	}
	metas := make([]*meta, 0, len(s.entries))
	for _, e := range s.entries {
		metas = append(metas, e.base())
	}
	slices.SortFunc(metas, func(a, b *meta) int { return cmp.Compare(a.info.Kind, b.info.Kind) })
	for _, m := range metas {
		pipeline := applicable(s.layers, m.info, m.sample)
		for _, l := range pipeline {
			if l.Check == nil {
				continue
			}
			if err := l.Check(m.info, pipeline); err != nil {
				return fmt.Errorf("mediator: the pipeline of %s %q: %w", m.info.Type, m.info.Kind, err)
			}
		}
	}
	return nil
}

func cloneMap[K comparable, V any](in map[K]V) map[K]V {
	out := make(map[K]V, len(in)+1)
	for k, v := range in {
		out[k] = v
	}
	return out
}

// claimKind records that t is named kind, rejecting a kind already used by
// another type and a type already registered under another kind.
func (s *snapshot) claimKind(t reflect.Type, kind string) error {
	if other, ok := s.kinds[kind]; ok && other != t {
		return fmt.Errorf("%w: kind %q is already used by %v, cannot name %v", ErrDuplicate, kind, other, t)
	}
	if prev, ok := s.names[t]; ok && prev != kind {
		return fmt.Errorf("%w: %v is already named %q, cannot rename it %q", ErrDuplicate, t, prev, kind)
	}
	s.kinds[kind] = t
	s.names[t] = kind
	return nil
}

// add registers a new entry for type t, or merges it into the existing one
// (notifications), then builds its pipeline.
func (m *Mediator) add(t reflect.Type, key unsafe.Pointer, e entry, merge func(old entry) (entry, error)) error {
	return m.update(func(s *snapshot) error {
		if err := s.claimKind(t, e.base().info.Kind); err != nil {
			return err
		}
		if old, ok := s.entries[key]; ok {
			if merge == nil || old.base().info.Type != e.base().info.Type {
				return fmt.Errorf("%w: %v (kind %q) already has a %s handler", ErrDuplicate, t, old.base().info.Kind, old.base().info.Type)
			}
			merged, err := merge(old)
			if err != nil {
				return err
			}
			e = merged
		}
		s.entries[key] = e.build(s)
		return nil
	})
}

// RegisterKind names T for KindOf without registering a handler: the outbox
// stamps this kind on staged messages of type T (events handled by other
// services, say). It panics on an invalid or conflicting name;
// RegisterKindSafely returns the error.
func RegisterKind[T any](m *Mediator, kind string) {
	if err := RegisterKindSafely[T](m, kind); err != nil {
		panic(err)
	}
}

// RegisterKindSafely is RegisterKind returning an error instead of panicking.
func RegisterKindSafely[T any](m *Mediator, kind string) error {
	t := reflect.TypeFor[T]()
	k, err := resolveKind(t, sampleOf[T](), kind)
	if err != nil {
		return err
	}
	return m.update(func(s *snapshot) error { return s.claimKind(t, k) })
}

// Registered returns the Info of every type with a handler, sorted by kind,
// for diagnostics and tests.
func (m *Mediator) Registered() []Info {
	s := m.snap.Load()
	if s == nil {
		return nil
	}
	out := make([]Info, 0, len(s.entries))
	for _, e := range s.entries {
		out = append(out, e.base().info)
	}
	slices.SortFunc(out, func(a, b Info) int { return cmp.Compare(a.Kind, b.Kind) })
	return out
}

// typeKey identifies T without reflection: the type word of an interface
// holding a *T, which is unique per T (the same descriptor reflect uses).
// It lets dispatch find an entry with a map lookup on a pointer, the fastest
// map key Go has.
func typeKey[T any]() unsafe.Pointer {
	var p any = (*T)(nil)
	return (*[2]unsafe.Pointer)(unsafe.Pointer(&p))[0]
}
