package mediator

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"runtime"
	"runtime/debug"
	"sync"
)

// PublishStrategy decides how Publish runs a notification's handlers. The
// zero value is StopAtFirstError.
type PublishStrategy struct {
	mode  publishMode
	limit int
}

type publishMode uint8

const (
	modeStopAtFirst publishMode = iota
	modeJoinAll
	modeParallel
)

// StopAtFirstError runs the handlers one after the other in registration
// order and returns the first error; the handlers after it do not run. The
// default.
func StopAtFirstError() PublishStrategy { return PublishStrategy{mode: modeStopAtFirst} }

// JoinAllErrors runs every handler one after the other in registration
// order, even after a failure, and returns their errors joined with
// errors.Join (in registration order).
func JoinAllErrors() PublishStrategy { return PublishStrategy{mode: modeJoinAll} }

// Parallel runs the handlers concurrently, at most limit at a time (limit < 1
// means runtime.GOMAXPROCS(0)), waits for all of them and returns their
// errors joined in registration order. A panic in a handler is carried back
// and raised again in the goroutine that called Publish, as a
// *GoroutinePanic, after every handler has finished.
func Parallel(limit int) PublishStrategy { return PublishStrategy{mode: modeParallel, limit: limit} }

// String describes the strategy.
func (s PublishStrategy) String() string {
	switch s.mode {
	case modeStopAtFirst:
		return "stop-at-first-error"
	case modeJoinAll:
		return "join-all-errors"
	case modeParallel:
		return fmt.Sprintf("parallel(%d)", s.limit)
	}
	return "invalid"
}

func (s PublishStrategy) validate() error {
	if s.mode > modeParallel {
		return fmt.Errorf("mediator: invalid publish strategy %d", s.mode)
	}
	return nil
}

type notificationEntry[N Notifiable] struct {
	meta
	handlers []NotificationHandler[N]
	layers   []Layer
	strategy PublishStrategy
	pipe     Next // nil when no layer applies
}

func (e *notificationEntry[N]) base() *meta { return &e.meta }

func (e *notificationEntry[N]) build(s *snapshot) entry {
	c := *e
	c.layers = applicable(s.layers, c.info, c.sample)
	c.strategy = s.strategy
	c.pipe = nil
	if len(c.layers) > 0 {
		c.pipe = chain(c.layers, c.info, c.inner(c.strategy))
	}
	return &c
}

func (e *notificationEntry[N]) inner(st PublishStrategy) Next {
	return func(ctx context.Context, req any) (any, error) {
		n, ok := req.(N)
		if !ok {
			return nil, fmt.Errorf("%w: %T passed on for notification %q", ErrRequestType, req, e.info.Kind)
		}
		return nil, e.fanout(ctx, n, st)
	}
}

func (e *notificationEntry[N]) fanout(ctx context.Context, n N, st PublishStrategy) error {
	switch st.mode {
	case modeJoinAll:
		var errs []error
		for _, h := range e.handlers {
			if err := h.Handle(ctx, n); err != nil {
				errs = append(errs, checkErr(e.info, err))
			}
		}
		return errors.Join(errs...)
	case modeParallel:
		return e.parallel(ctx, n, st.limit)
	default:
		for _, h := range e.handlers {
			if err := h.Handle(ctx, n); err != nil {
				return checkErr(e.info, err)
			}
		}
		return nil
	}
}

func (e *notificationEntry[N]) parallel(ctx context.Context, n N, limit int) error {
	if limit < 1 {
		limit = runtime.GOMAXPROCS(0)
	}
	errs := make([]error, len(e.handlers))
	var (
		wg       sync.WaitGroup
		once     sync.Once
		panicked *GoroutinePanic
		sem      = make(chan struct{}, limit)
	)
	for i, h := range e.handlers {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() {
				<-sem
				if v := recover(); v != nil {
					once.Do(func() { panicked = &GoroutinePanic{Value: v, Stack: debug.Stack()} })
				}
			}()
			if err := h.Handle(ctx, n); err != nil {
				errs[i] = checkErr(e.info, err)
			}
		})
	}
	wg.Wait()
	if panicked != nil {
		panic(panicked)
	}
	return errors.Join(errs...)
}

// RegisterNotification adds h to the handlers of N. Any number of handlers
// may be registered for a type, the same one several times too; Publish
// calls them in registration order. The kind comes from N's Kind method or
// WithKind (the same for every registration of N). It panics on a nil
// handler or a missing, invalid or conflicting kind;
// RegisterNotificationSafely returns the error.
func RegisterNotification[N Notifiable](m *Mediator, h NotificationHandler[N], opts ...RegisterOption) {
	if err := RegisterNotificationSafely(m, h, opts...); err != nil {
		panic(err)
	}
}

// RegisterNotificationFunc is RegisterNotification for a function.
func RegisterNotificationFunc[N Notifiable](m *Mediator, f func(ctx context.Context, n N) error, opts ...RegisterOption) {
	if f == nil {
		panic(fmt.Errorf("%w for %v", ErrNilHandler, reflect.TypeFor[N]()))
	}
	RegisterNotification(m, NotificationHandlerFunc[N](f), opts...)
}

// RegisterNotificationSafely is RegisterNotification returning an error
// instead of panicking.
func RegisterNotificationSafely[N Notifiable](m *Mediator, h NotificationHandler[N], opts ...RegisterOption) error {
	if isNil(h) {
		return fmt.Errorf("%w for %v", ErrNilHandler, reflect.TypeFor[N]())
	}
	o := applyOptions(opts)
	mt, t, err := newMeta[N](TypeNotification, o.kind)
	if err != nil {
		return err
	}
	e := &notificationEntry[N]{meta: mt, handlers: []NotificationHandler[N]{h}}
	return m.add(t, typeKey[N](), e, func(old entry) (entry, error) {
		o, ok := old.(*notificationEntry[N])
		if !ok {
			return nil, fmt.Errorf("%w: %v", ErrDuplicate, t)
		}
		c := *o
		c.handlers = append(c.handlers[:len(c.handlers):len(c.handlers)], h)
		return &c, nil
	})
}

// HandleNotification returns a Registration of h for Build (and
// ProviderSet).
func HandleNotification[N Notifiable](h NotificationHandler[N], opts ...RegisterOption) Registration {
	return func(m *Mediator) error { return RegisterNotificationSafely(m, h, opts...) }
}

// Publish sends n to every handler registered for N with the Mediator's
// strategy (Config.PublishStrategy), through the behaviors registered for N,
// which wrap the whole fan-out once. Zero handlers is not an error: Publish
// returns nil without running behaviors. A nil pointer notification of a
// registered type fails with ErrNilRequest.
func Publish[N Notifiable](ctx context.Context, m *Mediator, n N) error {
	var e *notificationEntry[N]
	if s := m.snap.Load(); s != nil {
		e, _ = s.table.lookup(typeKey[N]()).(*notificationEntry[N])
	}
	if e == nil {
		return nil
	}
	if e.nilable && any(n) == e.zero {
		return fmt.Errorf("%w for notification %q", ErrNilRequest, e.info.Kind)
	}
	if e.pipe == nil {
		return e.fanout(ctx, n, e.strategy)
	}
	_, err := e.pipe(ctx, n)
	return err
}

// PublishWith is Publish with the strategy s for this call. With a strategy
// other than the Mediator's, the behavior chain is built for the call (a few
// small allocations).
func PublishWith[N Notifiable](ctx context.Context, m *Mediator, n N, s PublishStrategy) error {
	if err := s.validate(); err != nil {
		return err
	}
	var e *notificationEntry[N]
	if snap := m.snap.Load(); snap != nil {
		e, _ = snap.entries[typeKey[N]()].(*notificationEntry[N])
	}
	if e == nil {
		return nil
	}
	if e.nilable && any(n) == e.zero {
		return fmt.Errorf("%w for notification %q", ErrNilRequest, e.info.Kind)
	}
	if s == e.strategy {
		if e.pipe == nil {
			return e.fanout(ctx, n, s)
		}
		_, err := e.pipe(ctx, n)
		return err
	}
	if len(e.layers) == 0 {
		return e.fanout(ctx, n, s)
	}
	_, err := chain(e.layers, e.info, e.inner(s))(ctx, n)
	return err
}
