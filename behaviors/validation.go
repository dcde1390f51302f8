package behaviors

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/mediator"
)

// Validatable is implemented by requests that validate themselves.
type Validatable interface {
	Validate() error
}

// Validator validates requests of one kind; see ValidatorFor.
type Validator func(ctx context.Context, req any) error

// ValidatorFor adapts a typed function to a Validator. A request of another
// type is left alone (nil error).
func ValidatorFor[Req any](f func(ctx context.Context, req Req) error) Validator {
	return func(ctx context.Context, req any) error {
		r, ok := req.(Req)
		if !ok {
			return nil
		}
		return f(ctx, r)
	}
}

// ValidationConfig configures Validation.
type ValidationConfig struct {
	// Validators are extra validators by request kind, run after the
	// request's own Validate method (if any). Default none.
	Validators map[string]Validator
}

// Validate reports every problem of c at once.
func (c ValidationConfig) Validate() error {
	var errs []error
	for kind, v := range c.Validators {
		if err := mediator.ValidateKind(kind); err != nil {
			errs = append(errs, fmt.Errorf("behaviors: ValidationConfig.Validators: %w", err))
		}
		if v == nil {
			errs = append(errs, fmt.Errorf("behaviors: ValidationConfig.Validators[%q] is nil", kind))
		}
	}
	return errors.Join(errs...)
}

// FieldError is one invalid field. Return it (or several, joined with
// errors.Join) from a Validate method to have them listed by field.
type FieldError struct {
	// Field names the field, in the request's terms ("customer",
	// "lines[2].sku"); empty for a problem with the request as a whole.
	Field string
	// Message says what is wrong.
	Message string
}

func (e FieldError) Error() string {
	if e.Field == "" {
		return e.Message
	}
	return e.Field + ": " + e.Message
}

// ValidationError lists what is wrong with a request. Validation returns it
// marked tailrace.Permanent; errors.As finds it.
type ValidationError struct {
	// Kind is the kind of the invalid request.
	Kind string
	// Fields lists every problem found, in the order reported.
	Fields []FieldError
}

func (e *ValidationError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "behaviors: invalid %q: ", e.Kind)
	for i, f := range e.Fields {
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString(f.Error())
	}
	return b.String()
}

// Unwrap returns the field errors, so that errors.As can find a FieldError.
func (e *ValidationError) Unwrap() []error {
	errs := make([]error, len(e.Fields))
	for i, f := range e.Fields {
		errs[i] = f
	}
	return errs
}

// Validation rejects invalid requests before the handler (and the behaviors
// inside Validation) run: it calls the request's Validate method, if it has
// one, then the Validator registered for its kind, and if either fails
// returns a *ValidationError listing every field reported, marked
// tailrace.Permanent. The handler is not called.
type Validation struct {
	cfg ValidationConfig
}

// NewValidation returns a Validation behavior.
func NewValidation(cfg ValidationConfig) (*Validation, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &Validation{cfg: cfg}, nil
}

// Layer returns v at OrderValidation, wrapping every dispatch.
func (v *Validation) Layer() mediator.Layer {
	return mediator.Layer{Order: OrderValidation, Behavior: v}
}

// Handle implements mediator.Behavior.
func (v *Validation) Handle(ctx context.Context, req any, info mediator.Info, next mediator.Next) (any, error) {
	var fields []FieldError
	if r, ok := req.(Validatable); ok {
		fields = appendFields(fields, r.Validate())
	}
	if f := v.cfg.Validators[info.Kind]; f != nil {
		fields = appendFields(fields, f(ctx, req))
	}
	if len(fields) > 0 {
		return nil, tailrace.Permanent(&ValidationError{Kind: info.Kind, Fields: fields})
	}
	return next(ctx, req)
}

// appendFields flattens err into field errors: FieldErrors and
// ValidationErrors keep their fields, joined errors are walked, and any
// other error becomes a FieldError without a field.
func appendFields(fields []FieldError, err error) []FieldError {
	if err == nil {
		return fields
	}
	var fe FieldError
	var pfe *FieldError
	var ve *ValidationError
	switch {
	case errors.As(err, &ve) && ve != nil:
		return append(fields, ve.Fields...)
	case isJoin(err):
		for _, e := range err.(interface{ Unwrap() []error }).Unwrap() {
			fields = appendFields(fields, e)
		}
		return fields
	case errors.As(err, &fe):
		return append(fields, fe)
	case errors.As(err, &pfe) && pfe != nil:
		return append(fields, *pfe)
	}
	return append(fields, FieldError{Message: err.Error()})
}

func isJoin(err error) bool {
	_, ok := err.(interface{ Unwrap() []error })
	return ok
}
