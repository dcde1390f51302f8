package behaviors

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/cenkalti/backoff/v5"

	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/mediator"
)

// Retry defaults.
const (
	DefaultMaxAttempts         = 3
	DefaultInitialInterval     = 100 * time.Millisecond
	DefaultMaxInterval         = 5 * time.Second
	DefaultMultiplier          = 2.0
	DefaultRandomizationFactor = 0.5
)

// RetryConfig configures Retry. The waits grow exponentially from
// InitialInterval by Multiplier up to MaxInterval, each randomized by
// ±RandomizationFactor (jitter), as github.com/cenkalti/backoff/v5 computes
// them.
type RetryConfig struct {
	// MaxAttempts is the number of attempts, the first included. Default
	// DefaultMaxAttempts (3); must be ≥ 1 once defaulted.
	MaxAttempts int
	// InitialInterval is the wait before the second attempt. Default
	// DefaultInitialInterval (100 ms).
	InitialInterval time.Duration
	// MaxInterval caps the wait between attempts. Default
	// DefaultMaxInterval (5 s); must be ≥ InitialInterval.
	MaxInterval time.Duration
	// Multiplier is the growth of the wait per attempt. Default
	// DefaultMultiplier (2); must be ≥ 1.
	Multiplier float64
	// RandomizationFactor is the jitter, in [0, 1]. Default
	// DefaultRandomizationFactor (0.5), unless NoJitter.
	RandomizationFactor float64
	// NoJitter sets RandomizationFactor to 0 (deterministic waits, for
	// tests). Default false.
	NoJitter bool
	// Retryable, if set, is asked about every error not marked permanent;
	// false stops retrying. Default nil: every such error is retried.
	Retryable func(err error) bool
}

func (c *RetryConfig) setDefaults() {
	if c.MaxAttempts == 0 {
		c.MaxAttempts = DefaultMaxAttempts
	}
	if c.InitialInterval == 0 {
		c.InitialInterval = DefaultInitialInterval
	}
	if c.MaxInterval == 0 {
		c.MaxInterval = max(DefaultMaxInterval, c.InitialInterval)
	}
	if c.Multiplier == 0 {
		c.Multiplier = DefaultMultiplier
	}
	if c.NoJitter {
		c.RandomizationFactor = 0
	} else if c.RandomizationFactor == 0 {
		c.RandomizationFactor = DefaultRandomizationFactor
	}
}

// Validate reports every problem of c at once. Run it after defaults are
// applied (NewRetry does), or zero fields are reported as invalid.
func (c RetryConfig) Validate() error {
	var errs []error
	if c.MaxAttempts < 1 {
		errs = append(errs, fmt.Errorf("behaviors: RetryConfig.MaxAttempts %d is below 1", c.MaxAttempts))
	}
	if c.InitialInterval <= 0 {
		errs = append(errs, fmt.Errorf("behaviors: RetryConfig.InitialInterval %v is not positive", c.InitialInterval))
	}
	if c.MaxInterval < c.InitialInterval {
		errs = append(errs, fmt.Errorf("behaviors: RetryConfig.MaxInterval %v is below InitialInterval %v", c.MaxInterval, c.InitialInterval))
	}
	if c.Multiplier < 1 {
		errs = append(errs, fmt.Errorf("behaviors: RetryConfig.Multiplier %v is below 1", c.Multiplier))
	}
	if c.RandomizationFactor < 0 || c.RandomizationFactor > 1 {
		errs = append(errs, fmt.Errorf("behaviors: RetryConfig.RandomizationFactor %v is outside [0, 1]", c.RandomizationFactor))
	}
	return errors.Join(errs...)
}

// Retry calls next again when it fails, up to MaxAttempts times in all, with
// exponential backoff and jitter between attempts. It never retries an error
// marked tailrace.Permanent (validation errors and recovered panics are), an
// error Retryable rejects, or once the caller's context is done; it returns
// the last error (joined with the context's cause if the context ended a
// wait). It passes streams through untouched: a stream's elements may
// already have been delivered, so repeating it would duplicate them.
//
// Each attempt runs every behavior inside Retry again: put the Transaction
// behavior inside Retry so that each attempt gets a fresh transaction.
type Retry struct {
	cfg RetryConfig
}

// NewRetry returns a Retry behavior.
func NewRetry(cfg RetryConfig) (*Retry, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &Retry{cfg: cfg}, nil
}

// Layer returns r at OrderRetry, wrapping every dispatch (streams pass
// through).
func (r *Retry) Layer() mediator.Layer {
	return mediator.Layer{Order: OrderRetry, Behavior: r}
}

// Handle implements mediator.Behavior.
func (r *Retry) Handle(ctx context.Context, req any, info mediator.Info, next mediator.Next) (any, error) {
	if info.Type == mediator.TypeStream {
		return next(ctx, req)
	}
	var b *backoff.ExponentialBackOff // allocated on the first failure only
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for attempt := 1; ; attempt++ {
		res, err := next(ctx, req)
		if err == nil || attempt >= r.cfg.MaxAttempts || tailrace.IsPermanent(err) ||
			ctx.Err() != nil || (r.cfg.Retryable != nil && !r.cfg.Retryable(err)) {
			return res, err
		}
		if b == nil {
			b = &backoff.ExponentialBackOff{
				InitialInterval:     r.cfg.InitialInterval,
				RandomizationFactor: r.cfg.RandomizationFactor,
				Multiplier:          r.cfg.Multiplier,
				MaxInterval:         r.cfg.MaxInterval,
			}
			b.Reset()
		}
		wait := b.NextBackOff()
		if timer == nil {
			timer = time.NewTimer(wait)
		} else {
			timer.Reset(wait)
		}
		select {
		case <-timer.C:
		case <-ctx.Done():
			return res, errors.Join(err, context.Cause(ctx))
		}
	}
}
