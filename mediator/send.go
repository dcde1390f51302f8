package mediator

import (
	"context"
	"fmt"
	"reflect"
	"unsafe"
)

// RegisterOption configures one registration.
type RegisterOption func(*registerOptions)

type registerOptions struct {
	kind string
}

// WithKind names the registered type. The type's Kind() method, if any, must
// return the same name. A type with neither cannot be registered: kinds are
// logged, used as metric labels, persisted and routed, so they never come
// from the Go type name.
func WithKind(kind string) RegisterOption {
	return func(o *registerOptions) { o.kind = kind }
}

func applyOptions(opts []RegisterOption) registerOptions {
	var o registerOptions
	for _, f := range opts {
		if f != nil {
			f(&o)
		}
	}
	return o
}

type requestEntry[Req Request[R], R any] struct {
	meta
	h      Handler[Req, R]
	call   func(context.Context, Req) (R, error) // h's method, or h itself if a HandlerFunc
	layers []Layer
	pipe   Next // nil when no layer applies: Send calls h directly
	reqBox boxing
	resBox boxing
}

func (e *requestEntry[Req, R]) base() *meta { return &e.meta }

func (e *requestEntry[Req, R]) build(s *snapshot) entry {
	c := *e
	c.layers = applicable(s.layers, c.info, c.sample)
	c.pipe = nil
	c.reqBox, c.resBox = boxingOf[Req](), boxingOf[R]()
	if f, ok := c.h.(HandlerFunc[Req, R]); ok {
		c.call = f // one indirect call instead of two
	} else {
		c.call = c.h.Handle
	}
	if len(c.layers) > 0 {
		h, info, resBox := c.call, c.info, c.resBox
		c.pipe = chain(c.layers, info, func(ctx context.Context, req any) (any, error) {
			r, ok := req.(Req)
			if !ok {
				return nil, fmt.Errorf("%w: %T passed on for %s %q", ErrRequestType, req, info.Type, info.Kind)
			}
			res, err := h(ctx, r)
			if err != nil {
				return nil, checkErr(info, err)
			}
			if !resBox.direct {
				// Box the response into the frame Send allocated, if this is
				// the first response of the original request.
				f, ok := ctx.(*sendFrame[Req, R]) // no behavior replaced the context
				if !ok {
					f, ok = ctx.Value(frameKey{}).(*sendFrame[Req, R])
				}
				if ok && dataOf(req) == unsafe.Pointer(&f.req) && f.used.CompareAndSwap(false, true) {
					f.res = res
					return resBox.at(unsafe.Pointer(&f.res)), nil
				}
			}
			return res, nil
		})
	}
	return &c
}

// Register registers h as the handler of Req. Its kind comes from Req's Kind
// method or WithKind. Register panics if Req already has a handler, if the
// kind is missing, invalid or taken by another type, or if h is nil;
// RegisterSafely returns the error instead.
func Register[Req Request[R], R any](m *Mediator, h Handler[Req, R], opts ...RegisterOption) {
	if err := RegisterSafely(m, h, opts...); err != nil {
		panic(err)
	}
}

// RegisterFunc is Register for a function.
func RegisterFunc[Req Request[R], R any](m *Mediator, f func(ctx context.Context, req Req) (R, error), opts ...RegisterOption) {
	if f == nil {
		panic(fmt.Errorf("%w for %v", ErrNilHandler, reflect.TypeFor[Req]()))
	}
	Register(m, HandlerFunc[Req, R](f), opts...)
}

// RegisterSafely is Register returning an error instead of panicking.
func RegisterSafely[Req Request[R], R any](m *Mediator, h Handler[Req, R], opts ...RegisterOption) error {
	if isNil(h) {
		return fmt.Errorf("%w for %v", ErrNilHandler, reflect.TypeFor[Req]())
	}
	o := applyOptions(opts)
	rt := requestTypeOf[Req, R]()
	if rt == 0 {
		// An interface type: the marker, hence command or query, is unknown.
		return fmt.Errorf("mediator: %v must be a struct (or a pointer to one) embedding Command or Query", reflect.TypeFor[Req]())
	}
	mt, t, err := newMeta[Req](rt, o.kind)
	if err != nil {
		return err
	}
	return m.add(t, typeKey[Req](), &requestEntry[Req, R]{meta: mt, h: h}, nil)
}

// Handle returns a Registration of h for Build (and ProviderSet).
func Handle[Req Request[R], R any](h Handler[Req, R], opts ...RegisterOption) Registration {
	return func(m *Mediator) error { return RegisterSafely(m, h, opts...) }
}

// Send dispatches req to its handler through the behaviors registered for
// its type and returns the handler's response; R is inferred from the marker
// Req embeds, so call sites need no type arguments:
//
//	id, err := mediator.Send(ctx, m, PlaceOrder{Customer: "ada"})
//
// Errors: ErrNoHandler (naming the kind) if Req has no handler; ErrNilRequest
// for a nil pointer request; the handler's or a behavior's error otherwise.
// On error the response is the zero R. A nil pointer (or an interface
// holding one) is a valid response and is returned as is; a behavior that
// returns an untyped nil response yields the zero R. A handler that returns
// an error interface holding a nil pointer gets ErrTypedNil instead of a
// confusing non-nil "nil". A panic in a handler or behavior propagates to the caller
// unless the Recover behavior is installed.
//
// Send uses no reflection. With no behavior for the type it calls the
// handler directly and allocates nothing; through behaviors it allocates one
// frame holding the request and response the behaviors see as any (none if
// both are pointer-shaped). The context the behaviors and the handler get is
// then that frame, wrapping ctx.
func Send[Req Request[R], R any](ctx context.Context, m *Mediator, req Req) (R, error) {
	var zero R
	var e *requestEntry[Req, R]
	if s := m.snap.Load(); s != nil {
		e, _ = s.table.lookup(typeKey[Req]()).(*requestEntry[Req, R])
	}
	if e == nil {
		return zero, noHandler(requestTypeOf[Req, R](), req)
	}
	if e.nilable && any(req) == e.zero {
		return zero, fmt.Errorf("%w for %s %q", ErrNilRequest, e.info.Type, e.info.Kind)
	}
	if e.pipe == nil {
		res, err := e.call(ctx, req)
		if err != nil {
			return zero, checkErr(e.info, err)
		}
		return res, nil
	}
	var res any
	var err error
	switch {
	case !e.resBox.direct:
		// One allocation holds the request and the response the behaviors
		// see; see frame.go.
		f := &sendFrame[Req, R]{Context: ctx, req: req}
		if e.reqBox.direct {
			res, err = e.pipe(f, req)
		} else {
			res, err = e.pipe(f, e.reqBox.at(unsafe.Pointer(&f.req)))
		}
	default:
		res, err = e.pipe(ctx, req)
	}
	if err != nil {
		return zero, err
	}
	if res == nil {
		return zero, nil
	}
	r, ok := res.(R)
	if !ok {
		return zero, fmt.Errorf("%w: got %T for %s %q, want %v", ErrResponseType, res, e.info.Type, e.info.Kind, reflect.TypeFor[R]())
	}
	return r, nil
}

// requestTypeOf returns whether Req is a command or a query. Registration and
// error paths only.
func requestTypeOf[Req Request[R], R any]() RequestType {
	var zeroR R
	if s, ok := sampleOf[Req]().(Req); ok && !isNil(s) {
		return s.requestType(zeroR)
	}
	return 0
}
