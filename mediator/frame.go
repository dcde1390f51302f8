package mediator

import (
	"context"
	"sync/atomic"
	"unsafe"
)

// This file holds the one piece of unsafe code in the package: it lets Send
// hand the behaviors a request and take back a response as `any` with a
// single allocation per call instead of two (one box for the request, one
// for the response). It never reinterprets memory as another type: it only
// builds interface values whose data word points into a heap-allocated
// frame, which is exactly what the runtime does when it boxes a value that
// is not pointer-shaped. The boxed fields are written once, before they are
// boxed, and never again, so the interfaces stay immutable as Go requires.

// eface is the layout of an empty interface (runtime.eface).
type eface struct {
	typ  unsafe.Pointer
	data unsafe.Pointer
}

func efaceOf(p *any) *eface { return (*eface)(unsafe.Pointer(p)) }

// boxing describes how to box values of one type, decided at registration.
type boxing struct {
	typ    unsafe.Pointer // type word of the type
	direct bool           // pointer-shaped: the interface holds the value itself
}

// boxingOf returns the boxing of T. A pointer-shaped type is stored in the
// interface data word directly; the runtime boxes the zero value of such a
// type with a nil data word, and the zero value of any other type with a
// non-nil pointer to a zero value, which is how the two are told apart.
func boxingOf[T any]() boxing {
	var zero T
	x := any(zero)
	if efaceOf(&x).typ == nil {
		// T is an interface type: values keep their own dynamic type.
		return boxing{direct: true}
	}
	return boxing{typ: efaceOf(&x).typ, direct: efaceOf(&x).data == nil}
}

// at returns an interface of the boxing's type whose data word is p, which
// must point to a value of that type that is never modified afterwards.
func (b boxing) at(p unsafe.Pointer) any {
	var x any
	e := efaceOf(&x)
	e.typ, e.data = b.typ, p
	return x
}

// dataOf returns the data word of x.
func dataOf(x any) unsafe.Pointer { return efaceOf(&x).data }

// frameKey is the context key under which a sendFrame finds itself.
type frameKey struct{}

// sendFrame is the one allocation of a Send through behaviors: the context
// the pipeline runs with, plus the request and the response that the
// behaviors see as `any`.
type sendFrame[Req, R any] struct {
	context.Context
	req  Req
	res  R
	used atomic.Bool // res has been claimed; Next may run concurrently
}

// Value makes the frame findable from the innermost Next, below any context
// the behaviors derived from it.
func (f *sendFrame[Req, R]) Value(key any) any {
	if _, ok := key.(frameKey); ok {
		return f
	}
	return f.Context.Value(key)
}
