package mediator

import (
	"fmt"
	"reflect"
	"unicode"
)

// MaxKindLen is the longest kind accepted, in bytes.
const MaxKindLen = 255

// KindOf returns the stable kind of v from its Kind() method, without a
// mediator. It fails with ErrNoKind if v has no Kind method and with
// ErrInvalidKind if the method returns an invalid name. Use
// (*Mediator).KindOf to honour registered names too.
func KindOf(v any) (string, error) {
	if isNil(v) {
		return "", fmt.Errorf("%w (%T)", ErrNilRequest, v)
	}
	k, ok := v.(Kinder)
	if !ok {
		return "", fmt.Errorf("%w for %T: add a Kind() string method or register a name", ErrNoKind, v)
	}
	kind := k.Kind()
	if err := ValidateKind(kind); err != nil {
		return "", err
	}
	return kind, nil
}

// KindOf returns the stable kind of v: its Kind() method when it has one,
// otherwise the name registered for its type (or, for a pointer, for the
// type it points to) in m with WithKind or RegisterKind. It does not
// dispatch; the outbox uses it to stamp the kind of a staged message.
func (m *Mediator) KindOf(v any) (string, error) {
	if _, ok := v.(Kinder); ok {
		return KindOf(v)
	}
	if isNil(v) {
		return "", fmt.Errorf("%w (%T)", ErrNilRequest, v)
	}
	if s := m.snap.Load(); s != nil {
		t := reflect.TypeOf(v)
		if k, ok := s.names[t]; ok {
			return k, nil
		}
		if t.Kind() == reflect.Pointer {
			if k, ok := s.names[t.Elem()]; ok {
				return k, nil
			}
		}
	}
	return "", fmt.Errorf("%w for %T: add a Kind() string method or register a name", ErrNoKind, v)
}

// ValidateKind reports whether kind is acceptable: 1 to MaxKindLen bytes of
// printable characters without spaces.
func ValidateKind(kind string) error {
	if kind == "" {
		return fmt.Errorf("%w: empty", ErrInvalidKind)
	}
	if len(kind) > MaxKindLen {
		return fmt.Errorf("%w: %q is longer than %d bytes", ErrInvalidKind, kind, MaxKindLen)
	}
	for _, r := range kind {
		if r == unicode.ReplacementChar || unicode.IsSpace(r) || !unicode.IsPrint(r) {
			return fmt.Errorf("%w: %q contains a space, control or invalid character", ErrInvalidKind, kind)
		}
	}
	return nil
}

// sampleOf returns a non-nil value of T where possible: the zero value, or
// for a pointer type a pointer to a zero value. Registration only.
func sampleOf[T any]() any {
	t := reflect.TypeFor[T]()
	if t.Kind() == reflect.Pointer {
		return reflect.New(t.Elem()).Interface()
	}
	var zero T
	return zero
}

// resolveKind decides the kind of a type at registration from its Kind
// method and the name given with WithKind; they must agree if both exist.
func resolveKind(t reflect.Type, sample any, named string) (string, error) {
	var method string
	if k, ok := sample.(Kinder); ok {
		method = k.Kind()
		if err := ValidateKind(method); err != nil {
			return "", fmt.Errorf("Kind() of %v: %w", t, err)
		}
	}
	if named != "" {
		if err := ValidateKind(named); err != nil {
			return "", err
		}
		if method != "" && method != named {
			return "", fmt.Errorf("%w: %v has Kind() %q but is registered as %q", ErrInvalidKind, t, method, named)
		}
		return named, nil
	}
	if method == "" {
		return "", fmt.Errorf("%w for %v: add a Kind() string method or register it WithKind", ErrNoKind, t)
	}
	return method, nil
}
