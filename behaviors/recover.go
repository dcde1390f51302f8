package behaviors

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"

	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/mediator"
)

// DefaultMaxStackBytes is the default RecoverConfig.MaxStackBytes.
const DefaultMaxStackBytes = 64 << 10

// RecoverConfig configures Recover.
type RecoverConfig struct {
	// MaxStackBytes caps the stack captured in a PanicError. Default
	// DefaultMaxStackBytes (64 KiB); must not be negative.
	MaxStackBytes int
}

func (c *RecoverConfig) setDefaults() {
	if c.MaxStackBytes == 0 {
		c.MaxStackBytes = DefaultMaxStackBytes
	}
}

// Validate reports every problem of c at once.
func (c RecoverConfig) Validate() error {
	var errs []error
	if c.MaxStackBytes < 0 {
		errs = append(errs, fmt.Errorf("behaviors: RecoverConfig.MaxStackBytes %d is negative", c.MaxStackBytes))
	}
	return errors.Join(errs...)
}

// PanicError is a panic in a handler or an inner behavior, turned into an
// error by Recover.
type PanicError struct {
	// Kind is the kind of the request being dispatched.
	Kind string
	// Value is the value passed to panic.
	Value any
	// Stack is the stack of the goroutine that panicked, at most
	// RecoverConfig.MaxStackBytes.
	Stack []byte
}

func (e *PanicError) Error() string {
	return fmt.Sprintf("behaviors: %q panicked: %v", e.Kind, e.Value)
}

// Unwrap returns the panic value if it is an error, so that errors.Is sees
// through panic(err).
func (e *PanicError) Unwrap() error {
	err, _ := e.Value.(error)
	return err
}

// Recover turns a panic in the behaviors inside it or in the handler into a
// *PanicError, marked tailrace.Permanent (a panic is a bug; retrying it is
// pointless). Without Recover a panic propagates to the caller of Send.
//
// A panic of a notification handler run by the Parallel strategy is carried
// back to the publishing goroutine by the mediator and recovered here too,
// with the stack of the goroutine that panicked. A panic in the loop body of
// a SendStream consumer is recovered and then raised again by SendStream (as
// the error), because the consumer must see it.
type Recover struct {
	cfg RecoverConfig
}

// NewRecover returns a Recover behavior.
func NewRecover(cfg RecoverConfig) (*Recover, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &Recover{cfg: cfg}, nil
}

// Layer returns r at OrderRecover, wrapping every dispatch.
func (r *Recover) Layer() mediator.Layer {
	return mediator.Layer{Order: OrderRecover, Behavior: r}
}

// Handle implements mediator.Behavior.
func (r *Recover) Handle(ctx context.Context, req any, info mediator.Info, next mediator.Next) (res any, err error) {
	defer func() {
		if v := recover(); v != nil {
			pe := &PanicError{Kind: info.Kind, Value: v}
			if gp, ok := v.(*mediator.GoroutinePanic); ok {
				pe.Value, pe.Stack = gp.Value, gp.Stack
			} else {
				pe.Stack = debug.Stack()
			}
			if len(pe.Stack) > r.cfg.MaxStackBytes {
				pe.Stack = pe.Stack[:r.cfg.MaxStackBytes]
			}
			res, err = nil, tailrace.Permanent(pe)
		}
	}()
	return next(ctx, req)
}
