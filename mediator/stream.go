package mediator

import (
	"context"
	"errors"
	"fmt"
	"iter"
	"reflect"
)

type streamEntry[Req StreamRequest[T], T any] struct {
	meta
	h      StreamHandler[Req, T]
	layers []Layer
}

func (e *streamEntry[Req, T]) base() *meta { return &e.meta }

func (e *streamEntry[Req, T]) build(s *snapshot) entry {
	c := *e
	c.layers = applicable(s.layers, c.info, c.sample)
	return &c
}

// RegisterStream registers h as the handler of the stream request Req. It
// panics like Register; RegisterStreamSafely returns the error.
func RegisterStream[Req StreamRequest[T], T any](m *Mediator, h StreamHandler[Req, T], opts ...RegisterOption) {
	if err := RegisterStreamSafely(m, h, opts...); err != nil {
		panic(err)
	}
}

// RegisterStreamFunc is RegisterStream for a function.
func RegisterStreamFunc[Req StreamRequest[T], T any](m *Mediator, f func(ctx context.Context, req Req) iter.Seq2[T, error], opts ...RegisterOption) {
	if f == nil {
		panic(fmt.Errorf("%w for %v", ErrNilHandler, reflect.TypeFor[Req]()))
	}
	RegisterStream(m, StreamHandlerFunc[Req, T](f), opts...)
}

// RegisterStreamSafely is RegisterStream returning an error instead of
// panicking.
func RegisterStreamSafely[Req StreamRequest[T], T any](m *Mediator, h StreamHandler[Req, T], opts ...RegisterOption) error {
	if isNil(h) {
		return fmt.Errorf("%w for %v", ErrNilHandler, reflect.TypeFor[Req]())
	}
	o := applyOptions(opts)
	mt, t, err := newMeta[Req](TypeStream, o.kind)
	if err != nil {
		return err
	}
	return m.add(t, typeKey[Req](), &streamEntry[Req, T]{meta: mt, h: h}, nil)
}

// HandleStream returns a Registration of h for Build (and ProviderSet).
func HandleStream[Req StreamRequest[T], T any](h StreamHandler[Req, T], opts ...RegisterOption) Registration {
	return func(m *Mediator) error { return RegisterStreamSafely(m, h, opts...) }
}

// SendStream dispatches the stream request req and returns its sequence.
// Nothing runs until the sequence is ranged over; then the behaviors wrap
// the whole iteration: their next returns once the handler's sequence is
// exhausted or the consumer stopped, so Logging measures the stream's life,
// Timeout bounds it and Recover catches a panic in the handler.
//
// Failures arrive as elements with a non-nil error: ErrNoHandler,
// ErrNilRequest, an error from a behavior (which did not call next or failed
// after it), and the handler's own error elements (which are also returned
// to the behaviors as next's error, the first one winning). An error already
// delivered as an element is not delivered twice. The behavior chain of a
// stream is built per call: a few small allocations.
//
// Behaviors must not call next again after the consumer stopped; a second
// call returns at once. The Retry behavior passes streams through.
func SendStream[Req StreamRequest[T], T any](ctx context.Context, m *Mediator, req Req) iter.Seq2[T, error] {
	return func(yield func(T, error) bool) {
		var zero T
		var e *streamEntry[Req, T]
		if s := m.snap.Load(); s != nil {
			e, _ = s.table.lookup(typeKey[Req]()).(*streamEntry[Req, T])
		}
		if e == nil {
			yield(zero, noHandler(TypeStream, req))
			return
		}
		if e.nilable && any(req) == e.zero {
			yield(zero, fmt.Errorf("%w for stream %q", ErrNilRequest, e.info.Kind))
			return
		}
		var (
			stopped   bool  // the consumer returned false
			inYield   bool  // set while the consumer's loop body runs
			delivered error // first error element delivered
		)
		inner := func(ctx context.Context, r any) (any, error) {
			if stopped {
				return nil, nil
			}
			rq, ok := r.(Req)
			if !ok {
				return nil, fmt.Errorf("%w: %T passed on for stream %q", ErrRequestType, r, e.info.Kind)
			}
			seq := e.h.Handle(ctx, rq)
			if seq == nil {
				return nil, nil
			}
			var first error
			for v, err := range seq {
				if err != nil && first == nil {
					first = err
				}
				inYield = true
				more := yield(v, err)
				inYield = false
				if err != nil && delivered == nil {
					delivered = err
				}
				if !more {
					stopped = true
					break
				}
			}
			return nil, first
		}
		var err error
		if len(e.layers) == 0 {
			_, err = inner(ctx, req)
		} else {
			_, err = chain(e.layers, e.info, inner)(ctx, req)
		}
		if inYield {
			// The consumer's loop body panicked and a behavior recovered:
			// the consumer must see its panic, not another element.
			if err == nil {
				err = fmt.Errorf("mediator: the loop body over stream %q panicked and a behavior swallowed the panic", e.info.Kind)
			}
			panic(err)
		}
		if err == nil || stopped || (delivered != nil && errors.Is(err, delivered)) {
			return
		}
		yield(zero, err)
	}
}
