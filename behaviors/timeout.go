package behaviors

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/tailrace/tailrace/mediator"
)

// DefaultTimeout is the default TimeoutConfig.Default.
const DefaultTimeout = 30 * time.Second

// ErrTimeout is wrapped by the error Timeout returns when the time limit
// expired and the dispatch failed; context.DeadlineExceeded is usually
// wrapped too (when the handler returned the context's error).
var ErrTimeout = errors.New("behaviors: timeout")

// TimeoutConfig configures Timeout.
type TimeoutConfig struct {
	// Default is the time limit of every dispatch Timeout wraps. Default
	// DefaultTimeout (30 s); must not be negative.
	Default time.Duration
	// PerKind overrides Default for some request kinds; a negative value
	// disables the limit for that kind. Default none.
	PerKind map[string]time.Duration
}

func (c *TimeoutConfig) setDefaults() {
	if c.Default == 0 {
		c.Default = DefaultTimeout
	}
}

// Validate reports every problem of c at once.
func (c TimeoutConfig) Validate() error {
	var errs []error
	if c.Default < 0 {
		errs = append(errs, fmt.Errorf("behaviors: TimeoutConfig.Default %v is negative", c.Default))
	}
	for kind := range c.PerKind {
		if err := mediator.ValidateKind(kind); err != nil {
			errs = append(errs, fmt.Errorf("behaviors: TimeoutConfig.PerKind: %w", err))
		}
	}
	return errors.Join(errs...)
}

// TimeoutOverrider is implemented by requests that choose their own time
// limit; a non-zero value wins over TimeoutConfig, and a negative one
// disables the limit. Zero means "use TimeoutConfig".
type TimeoutOverrider interface {
	Timeout() time.Duration
}

// Timeout bounds a dispatch with context.WithTimeout. It is cooperative: the
// handler (and the behaviors inside) must honour the context; Timeout never
// abandons a running handler, because an abandoned handler would keep
// running past the transaction or retry that wraps it. When the limit
// expired and the dispatch failed, the error wraps ErrTimeout and the
// dispatch's error; a dispatch that succeeded late keeps its result. For a
// stream, the limit covers the whole iteration.
type Timeout struct {
	cfg TimeoutConfig
}

// NewTimeout returns a Timeout behavior.
func NewTimeout(cfg TimeoutConfig) (*Timeout, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &Timeout{cfg: cfg}, nil
}

// Layer returns t at OrderTimeout, wrapping every dispatch.
func (t *Timeout) Layer() mediator.Layer {
	return mediator.Layer{Order: OrderTimeout, Behavior: t}
}

func (t *Timeout) limit(req any, info mediator.Info) time.Duration {
	if o, ok := req.(TimeoutOverrider); ok {
		if d := o.Timeout(); d != 0 {
			return d
		}
	}
	if d, ok := t.cfg.PerKind[info.Kind]; ok {
		return d
	}
	return t.cfg.Default
}

// Handle implements mediator.Behavior.
func (t *Timeout) Handle(ctx context.Context, req any, info mediator.Info, next mediator.Next) (any, error) {
	d := t.limit(req, info)
	if d <= 0 {
		return next(ctx, req)
	}
	tctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	res, err := next(tctx, req)
	if err != nil && ctx.Err() == nil && errors.Is(tctx.Err(), context.DeadlineExceeded) {
		return res, fmt.Errorf("%w: %s %q after %v: %w", ErrTimeout, info.Type, info.Kind, d, err)
	}
	return res, err
}
