package mediator

import (
	"errors"
	"fmt"
	"reflect"
)

var (
	// ErrNoHandler: Send or SendStream was called for a request type that has
	// no registered handler. The error names the request's kind.
	ErrNoHandler = errors.New("mediator: no handler")
	// ErrDuplicate: a handler is already registered for the request type, or
	// the kind is already taken by another type.
	ErrDuplicate = errors.New("mediator: already registered")
	// ErrNilRequest: the request (or notification) is a nil pointer or nil
	// interface.
	ErrNilRequest = errors.New("mediator: nil request")
	// ErrNilHandler: a nil handler or behavior was registered.
	ErrNilHandler = errors.New("mediator: nil handler")
	// ErrNoKind: the type has neither a Kind() method nor a registered name.
	ErrNoKind = errors.New("mediator: no kind")
	// ErrInvalidKind: a kind is empty, too long or contains spaces or control
	// characters.
	ErrInvalidKind = errors.New("mediator: invalid kind")
	// ErrTypedNil: a handler returned a non-nil error interface holding a nil
	// pointer (the classic typed-nil mistake). The error names the kind.
	ErrTypedNil = errors.New("mediator: handler returned a typed nil error")
	// ErrResponseType: a behavior returned a response that is not of the
	// request's response type.
	ErrResponseType = errors.New("mediator: response of the wrong type")
	// ErrRequestType: a behavior passed next a request of another type than
	// the one being dispatched.
	ErrRequestType = errors.New("mediator: request of the wrong type")
)

// GoroutinePanic carries a panic raised by a notification handler running in
// its own goroutine (the Parallel strategy) back to the goroutine that called
// Publish, where it is raised again with this value so that the Recover
// behavior (or the caller) sees it. Stack is the stack of the goroutine that
// panicked.
type GoroutinePanic struct {
	Value any
	Stack []byte
}

func (p *GoroutinePanic) Error() string {
	return fmt.Sprintf("mediator: notification handler panicked: %v\n\n%s", p.Value, p.Stack)
}

// checkErr turns a typed-nil error into ErrTypedNil. It runs only when err is
// non-nil, so the success path has no reflection.
func checkErr(info Info, err error) error {
	v := reflect.ValueOf(err)
	switch v.Kind() {
	case reflect.Pointer, reflect.Map, reflect.Slice, reflect.Func, reflect.Chan, reflect.Interface:
		if v.IsNil() {
			return fmt.Errorf("%w (%T) for %s %q", ErrTypedNil, err, info.Type, info.Kind)
		}
	}
	return err
}

// describe names a value for an error message (never for anything persisted):
// its kind if it has one, else its Go type.
func describe(v any) string {
	if k, ok := v.(Kinder); ok && !isNil(v) {
		return fmt.Sprintf("%q", k.Kind())
	}
	return fmt.Sprintf("%T", v)
}

func isNil(v any) bool {
	if v == nil {
		return true
	}
	rv := reflect.ValueOf(v)
	switch rv.Kind() {
	case reflect.Pointer, reflect.Map, reflect.Slice, reflect.Func, reflect.Chan, reflect.Interface:
		return rv.IsNil()
	}
	return false
}

func noHandler(t RequestType, req any) error {
	if isNil(req) {
		return fmt.Errorf("%w (%T)", ErrNilRequest, req)
	}
	return fmt.Errorf("%w for %s %s", ErrNoHandler, t, describe(req))
}
