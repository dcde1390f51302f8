package behaviors_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"iter"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/behaviors"
	"github.com/tailrace/tailrace/mediator"
)

type placeOrder struct {
	mediator.Command[string]
	Customer string
	Amount   int
}

func (placeOrder) Kind() string { return "orders.place" }

func (c placeOrder) Validate() error {
	var errs []error
	if c.Customer == "" {
		errs = append(errs, behaviors.FieldError{Field: "customer", Message: "required"})
	}
	if c.Amount <= 0 {
		errs = append(errs, behaviors.FieldError{Field: "amount", Message: "must be positive"})
	}
	return errors.Join(errs...)
}

type orderPlaced struct {
	mediator.Notification
}

func (orderPlaced) Kind() string { return "orders.placed" }

type listOrders struct{ mediator.Stream[int] }

func (listOrders) Kind() string { return "orders.list" }

type slowQuery struct {
	mediator.Query[int]
	Limit time.Duration
}

func (slowQuery) Kind() string { return "slow.query" }

func (q slowQuery) Timeout() time.Duration { return q.Limit }

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

func TestRecover(t *testing.T) {
	ctx := context.Background()
	rec := must(behaviors.NewRecover(behaviors.RecoverConfig{MaxStackBytes: 100}))
	m := mediator.New(mediator.WithLayers(rec.Layer()))
	sentinel := errors.New("sentinel")
	mediator.RegisterFunc(m, func(_ context.Context, c placeOrder) (string, error) {
		if c.Customer == "err" {
			panic(sentinel)
		}
		panic("boom")
	})
	_, err := mediator.Send(ctx, m, placeOrder{})
	var pe *behaviors.PanicError
	require.ErrorAs(t, err, &pe)
	assert.Equal(t, "boom", pe.Value)
	assert.Equal(t, "orders.place", pe.Kind)
	assert.Len(t, pe.Stack, 100)
	assert.True(t, tailrace.IsPermanent(err))
	assert.EqualError(t, err, `behaviors: "orders.place" panicked: boom`)

	_, err = mediator.Send(ctx, m, placeOrder{Customer: "err"})
	assert.ErrorIs(t, err, sentinel, "panic(err) unwraps to err")

	// A parallel notification handler's panic comes back with its stack.
	rec2 := must(behaviors.NewRecover(behaviors.RecoverConfig{}))
	m2 := mediator.New(mediator.WithPublishStrategy(mediator.Parallel(2)), mediator.WithLayers(rec2.Layer()))
	mediator.RegisterNotificationFunc(m2, func(context.Context, orderPlaced) error { panic("in goroutine") })
	err = mediator.Publish(ctx, m2, orderPlaced{})
	require.ErrorAs(t, err, &pe)
	assert.Equal(t, "in goroutine", pe.Value)
	assert.Contains(t, string(pe.Stack), "behaviors_test.go")

	_, err = behaviors.NewRecover(behaviors.RecoverConfig{MaxStackBytes: -1})
	assert.ErrorContains(t, err, "MaxStackBytes -1 is negative")
}

func TestLogging(t *testing.T) {
	ctx := context.Background()
	var buf bytes.Buffer
	logger := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	logging := must(behaviors.NewLogging(logger, behaviors.LoggingConfig{}))
	m := mediator.New(mediator.WithLayers(logging.Layer()))
	mediator.RegisterFunc(m, func(_ context.Context, c placeOrder) (string, error) {
		switch c.Customer {
		case "fail":
			return "", errors.New("no stock")
		case "panic":
			panic("boom")
		}
		return "order-1", nil
	})

	_, err := mediator.Send(ctx, m, placeOrder{Customer: "secret-ada"})
	require.NoError(t, err)
	line := buf.String()
	assert.Contains(t, line, `level=DEBUG msg="mediator dispatch" kind=orders.place type=command duration=`)
	assert.Contains(t, line, "outcome=ok")
	assert.NotContains(t, line, "secret-ada", "payloads are not logged by default")
	assert.NotContains(t, line, "order-1", "responses are never logged")

	buf.Reset()
	_, err = mediator.Send(ctx, m, placeOrder{Customer: "fail"})
	require.Error(t, err)
	assert.Contains(t, buf.String(), `level=ERROR`)
	assert.Contains(t, buf.String(), `outcome=error error="no stock"`)

	buf.Reset()
	assert.Panics(t, func() { _, _ = mediator.Send(ctx, m, placeOrder{Customer: "panic"}) })
	assert.Contains(t, buf.String(), "outcome=panic")

	// ErrorLevelFor logs an expected failure below ERROR; panics stay at ERROR.
	errNoStock := errors.New("no stock")
	leveled := must(behaviors.NewLogging(logger, behaviors.LoggingConfig{ErrorLevelFor: func(err error) slog.Level {
		if errors.Is(err, errNoStock) {
			return slog.LevelInfo
		}
		return slog.LevelError
	}}))
	mLeveled := mediator.New(mediator.WithLayers(leveled.Layer()))
	mediator.RegisterFunc(mLeveled, func(_ context.Context, c placeOrder) (string, error) {
		if c.Customer == "panic" {
			panic("boom")
		}
		return "", fmt.Errorf("placing: %w", errNoStock)
	})
	buf.Reset()
	_, _ = mediator.Send(ctx, mLeveled, placeOrder{Customer: "x"})
	assert.Contains(t, buf.String(), `level=INFO`)
	assert.Contains(t, buf.String(), `outcome=error`)
	buf.Reset()
	assert.Panics(t, func() { _, _ = mediator.Send(ctx, mLeveled, placeOrder{Customer: "panic"}) })
	assert.Contains(t, buf.String(), `level=ERROR`)

	// Opt-in payloads, custom levels, and a disabled level logs nothing.
	buf.Reset()
	logging2 := must(behaviors.NewLogging(logger, behaviors.LoggingConfig{LogRequest: true, Level: slog.LevelInfo, Message: "dispatch"}))
	m2 := mediator.New(mediator.WithLayers(logging2.Layer()))
	mediator.RegisterFunc(m2, func(context.Context, placeOrder) (string, error) { return "", nil })
	_, _ = mediator.Send(ctx, m2, placeOrder{Customer: "ada"})
	assert.Contains(t, buf.String(), `level=INFO msg=dispatch`)
	assert.Contains(t, buf.String(), "request=")
	assert.Contains(t, buf.String(), "ada")

	buf.Reset()
	quiet := slog.New(slog.NewTextHandler(&buf, nil)) // Info: debug records dropped
	m3 := mediator.New(mediator.WithLayers(must(behaviors.NewLogging(quiet, behaviors.LoggingConfig{})).Layer()))
	mediator.RegisterFunc(m3, func(context.Context, placeOrder) (string, error) { return "", nil })
	_, _ = mediator.Send(ctx, m3, placeOrder{})
	assert.Empty(t, buf.String())

	_, err = behaviors.NewLogging(nil, behaviors.LoggingConfig{Level: slog.LevelError, ErrorLevel: slog.LevelInfo})
	assert.ErrorContains(t, err, "ErrorLevel is below Level")
	l, err := behaviors.NewLogging(nil, behaviors.LoggingConfig{})
	require.NoError(t, err)
	assert.NotNil(t, l)
}

func TestValidation(t *testing.T) {
	ctx := context.Background()
	v := must(behaviors.NewValidation(behaviors.ValidationConfig{
		Validators: map[string]behaviors.Validator{
			"orders.place": behaviors.ValidatorFor(func(_ context.Context, c placeOrder) error {
				if c.Customer == "banned" {
					return &behaviors.FieldError{Field: "customer", Message: "banned"}
				}
				if c.Customer == "plain" {
					return errors.New("plain error")
				}
				return nil
			}),
		},
	}))
	m := mediator.New(mediator.WithLayers(v.Layer()))
	called := 0
	mediator.RegisterFunc(m, func(context.Context, placeOrder) (string, error) { called++; return "ok", nil })

	tests := []struct {
		name   string
		req    placeOrder
		fields []behaviors.FieldError
		msg    string
	}{
		{"valid", placeOrder{Customer: "ada", Amount: 1}, nil, ""},
		{"two fields from Validate", placeOrder{}, []behaviors.FieldError{{Field: "customer", Message: "required"}, {Field: "amount", Message: "must be positive"}},
			`behaviors: invalid "orders.place": customer: required; amount: must be positive`},
		{"registered validator", placeOrder{Customer: "banned", Amount: 1}, []behaviors.FieldError{{Field: "customer", Message: "banned"}}, ""},
		{"both", placeOrder{Customer: "banned"}, []behaviors.FieldError{{Field: "amount", Message: "must be positive"}, {Field: "customer", Message: "banned"}}, ""},
		{"plain error", placeOrder{Customer: "plain", Amount: 1}, []behaviors.FieldError{{Message: "plain error"}}, `behaviors: invalid "orders.place": plain error`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := called
			_, err := mediator.Send(ctx, m, tt.req)
			if tt.fields == nil {
				require.NoError(t, err)
				assert.Equal(t, before+1, called)
				return
			}
			var ve *behaviors.ValidationError
			require.ErrorAs(t, err, &ve)
			assert.Equal(t, "orders.place", ve.Kind)
			assert.Equal(t, tt.fields, ve.Fields)
			assert.True(t, tailrace.IsPermanent(err))
			var fe behaviors.FieldError
			assert.ErrorAs(t, err, &fe)
			if tt.msg != "" {
				assert.EqualError(t, err, tt.msg)
			}
			assert.Equal(t, before, called, "handler not called")
		})
	}

	// A Validate returning a *ValidationError keeps its fields.
	v2 := must(behaviors.NewValidation(behaviors.ValidationConfig{Validators: map[string]behaviors.Validator{
		"orders.place": func(context.Context, any) error {
			return &behaviors.ValidationError{Fields: []behaviors.FieldError{{Field: "x", Message: "y"}}}
		},
	}}))
	m2 := mediator.New(mediator.WithLayers(v2.Layer()))
	mediator.RegisterFunc(m2, func(context.Context, placeOrder) (string, error) { return "", nil })
	_, err := mediator.Send(ctx, m2, placeOrder{Customer: "a", Amount: 1})
	assert.EqualError(t, err, `behaviors: invalid "orders.place": x: y`)

	_, err = behaviors.NewValidation(behaviors.ValidationConfig{Validators: map[string]behaviors.Validator{"": nil}})
	assert.ErrorContains(t, err, "invalid kind: empty")
	assert.ErrorContains(t, err, `Validators[""] is nil`)
}

func TestTimeout(t *testing.T) {
	ctx := context.Background()
	to := must(behaviors.NewTimeout(behaviors.TimeoutConfig{
		Default: 20 * time.Millisecond,
		PerKind: map[string]time.Duration{"orders.place": -1},
	}))
	m := mediator.New(mediator.WithLayers(to.Layer()))
	mediator.RegisterFunc(m, func(ctx context.Context, q slowQuery) (int, error) {
		_, hasDeadline := ctx.Deadline()
		if !hasDeadline {
			return -1, nil
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(10 * time.Second):
			return 1, nil
		}
	})
	mediator.RegisterFunc(m, func(ctx context.Context, c placeOrder) (string, error) {
		_, hasDeadline := ctx.Deadline()
		return fmt.Sprint(hasDeadline), nil
	})

	start := time.Now()
	_, err := mediator.Send(ctx, m, slowQuery{})
	assert.ErrorIs(t, err, behaviors.ErrTimeout)
	assert.ErrorIs(t, err, context.DeadlineExceeded)
	assert.ErrorContains(t, err, `behaviors: timeout: query "slow.query" after 20ms: context deadline exceeded`)
	assert.Less(t, time.Since(start), 5*time.Second) // the handler alone takes 10 s

	n, err := mediator.Send(ctx, m, slowQuery{Limit: -1}) // request disables its limit
	require.NoError(t, err)
	assert.Equal(t, -1, n)

	s, err := mediator.Send(ctx, m, placeOrder{}) // kind disabled in config
	require.NoError(t, err)
	assert.Equal(t, "false", s)

	// The caller's own cancellation is not reported as a timeout.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	_, err = mediator.Send(cctx, m, slowQuery{})
	assert.ErrorIs(t, err, context.Canceled)
	assert.NotErrorIs(t, err, behaviors.ErrTimeout)

	_, err = behaviors.NewTimeout(behaviors.TimeoutConfig{Default: -1, PerKind: map[string]time.Duration{"a b": 1}})
	assert.ErrorContains(t, err, "Default -1ns is negative")
	assert.ErrorContains(t, err, "PerKind")
	d := must(behaviors.NewTimeout(behaviors.TimeoutConfig{}))
	assert.NotNil(t, d)
}

func TestRetry(t *testing.T) {
	ctx := context.Background()
	transient := errors.New("transient")
	newMediator := func(cfg behaviors.RetryConfig, failures int, failWith error) (*mediator.Mediator, *int) {
		r := must(behaviors.NewRetry(cfg))
		m := mediator.New(mediator.WithLayers(r.Layer()))
		calls := 0
		mediator.RegisterFunc(m, func(context.Context, placeOrder) (string, error) {
			calls++
			if calls <= failures {
				return "", failWith
			}
			return fmt.Sprint("ok after ", calls), nil
		})
		return m, &calls
	}
	fast := behaviors.RetryConfig{InitialInterval: time.Millisecond, MaxInterval: 2 * time.Millisecond, NoJitter: true}

	tests := []struct {
		name      string
		cfg       behaviors.RetryConfig
		failures  int
		err       error
		wantCalls int
		wantErr   error
	}{
		{"success first", fast, 0, transient, 1, nil},
		{"success on third", fast, 2, transient, 3, nil},
		{"gives up after max attempts", fast, 5, transient, 3, transient},
		{"max attempts 5", withAttempts(fast, 5), 4, transient, 5, nil},
		{"permanent not retried", fast, 5, tailrace.Permanent(transient), 1, transient},
		{"retryable says no", withRetryable(fast, func(error) bool { return false }), 5, transient, 1, transient},
		{"retryable says yes", withRetryable(fast, func(error) bool { return true }), 1, transient, 2, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, calls := newMediator(tt.cfg, tt.failures, tt.err)
			s, err := mediator.Send(ctx, m, placeOrder{})
			assert.Equal(t, tt.wantCalls, *calls)
			if tt.wantErr == nil {
				require.NoError(t, err)
				assert.Equal(t, fmt.Sprint("ok after ", tt.wantCalls), s)
			} else {
				assert.ErrorIs(t, err, tt.wantErr)
			}
		})
	}

	// Backoff grows: with 10 ms initial, ×2, no jitter, 3 attempts wait
	// 10 + 20 ms.
	m, _ := newMediator(behaviors.RetryConfig{InitialInterval: 10 * time.Millisecond, NoJitter: true}, 5, transient)
	start := time.Now()
	_, _ = mediator.Send(ctx, m, placeOrder{})
	assert.GreaterOrEqual(t, time.Since(start), 30*time.Millisecond)

	// The caller's context ends a wait.
	m, calls := newMediator(behaviors.RetryConfig{InitialInterval: time.Hour, MaxAttempts: 5}, 5, transient)
	cctx, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	_, err := mediator.Send(cctx, m, placeOrder{})
	assert.ErrorIs(t, err, transient)
	assert.ErrorIs(t, err, context.DeadlineExceeded)
	assert.Equal(t, 1, *calls)

	// Validation inside Retry: validation errors are permanent.
	r := must(behaviors.NewRetry(fast))
	v := must(behaviors.NewValidation(behaviors.ValidationConfig{}))
	m2 := mediator.New(mediator.WithLayers(mediator.Layer{Order: 1, Behavior: r}, mediator.Layer{Order: 2, Behavior: v}))
	mediator.RegisterFunc(m2, func(context.Context, placeOrder) (string, error) { return "", nil })
	validations := 0
	m2.Use(mediator.Layer{Order: 0, Behavior: mediator.BehaviorFunc(func(ctx context.Context, req any, _ mediator.Info, next mediator.Next) (any, error) {
		validations++
		return next(ctx, req)
	})})
	_, err = mediator.Send(ctx, m2, placeOrder{})
	var ve *behaviors.ValidationError
	assert.ErrorAs(t, err, &ve)
	assert.Equal(t, 1, validations)

	// Streams pass through, never repeated.
	m3 := mediator.New(mediator.WithLayers(r.Layer()))
	runs := 0
	mediator.RegisterStreamFunc(m3, func(context.Context, listOrders) iter.Seq2[int, error] {
		runs++
		return func(yield func(int, error) bool) { yield(1, transient) }
	})
	for range mediator.SendStream(ctx, m3, listOrders{}) {
	}
	assert.Equal(t, 1, runs)

	_, err = behaviors.NewRetry(behaviors.RetryConfig{MaxAttempts: -1, InitialInterval: -1, MaxInterval: -2, Multiplier: 0.5, RandomizationFactor: 2})
	for _, want := range []string{"MaxAttempts -1", "InitialInterval -1ns", "MaxInterval -2ns", "Multiplier 0.5", "RandomizationFactor 2"} {
		assert.ErrorContains(t, err, want)
	}
	d := must(behaviors.NewRetry(behaviors.RetryConfig{}))
	assert.NotNil(t, d)
}

func withAttempts(c behaviors.RetryConfig, n int) behaviors.RetryConfig {
	c.MaxAttempts = n
	return c
}

func withRetryable(c behaviors.RetryConfig, f func(error) bool) behaviors.RetryConfig {
	c.Retryable = f
	return c
}

func TestFieldError(t *testing.T) {
	assert.Equal(t, "whole request", behaviors.FieldError{Message: "whole request"}.Error())
	assert.Equal(t, "a: b", behaviors.FieldError{Field: "a", Message: "b"}.Error())
	assert.True(t, strings.HasPrefix((&behaviors.ValidationError{Kind: "k"}).Error(), `behaviors: invalid "k"`))
}
