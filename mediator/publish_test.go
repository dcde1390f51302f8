package mediator_test

import (
	"context"
	"errors"
	"fmt"
	"iter"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tailrace/tailrace/mediator"
)

type ptrEvent struct {
	mediator.Notification
	N int
}

func (*ptrEvent) Kind() string { return "ptr.event" }

func TestPublishStrategies(t *testing.T) {
	ctx := context.Background()
	e1, e3 := errors.New("h1"), errors.New("h3")
	tests := []struct {
		name     string
		strategy mediator.PublishStrategy
		errs     []error // per handler
		wantErr  string
		wantRan  []int
	}{
		{"stop: all ok", mediator.StopAtFirstError(), []error{nil, nil, nil}, "", []int{0, 1, 2}},
		{"stop: stops at first", mediator.StopAtFirstError(), []error{nil, e1, e3}, "h1", []int{0, 1}},
		{"zero value is stop", mediator.PublishStrategy{}, []error{e1, nil, nil}, "h1", []int{0}},
		{"join: runs all", mediator.JoinAllErrors(), []error{e1, nil, e3}, "h1\nh3", []int{0, 1, 2}},
		{"parallel: runs all", mediator.Parallel(2), []error{e1, nil, e3}, "h1\nh3", []int{0, 1, 2}},
		{"parallel unbounded limit", mediator.Parallel(0), []error{nil, nil, nil}, "", []int{0, 1, 2}},
	}
	for _, tt := range tests {
		for _, behaviors := range []int{0, 1} {
			for _, with := range []bool{false, true} {
				t.Run(fmt.Sprintf("%s/behaviors=%d/with=%v", tt.name, behaviors, with), func(t *testing.T) {
					m := mediator.New()
					if !with {
						m = mediator.New(mediator.WithPublishStrategy(tt.strategy))
					}
					rec := &recorder{}
					if behaviors > 0 {
						m.Use(mediator.Layer{Behavior: rec})
					}
					var mu sync.Mutex
					var ran []int
					for i, err := range tt.errs {
						mediator.RegisterNotificationFunc(m, func(_ context.Context, n userCreated) error {
							assert.Equal(t, "ada", n.Name)
							mu.Lock()
							ran = append(ran, i)
							mu.Unlock()
							return err
						})
					}
					var err error
					if with {
						err = mediator.PublishWith(ctx, m, userCreated{Name: "ada"}, tt.strategy)
					} else {
						err = mediator.Publish(ctx, m, userCreated{Name: "ada"})
					}
					if tt.wantErr == "" {
						assert.NoError(t, err)
					} else {
						assert.EqualError(t, err, tt.wantErr)
					}
					assert.ElementsMatch(t, tt.wantRan, ran)
					if behaviors > 0 {
						assert.Equal(t, []string{"notification users.created"}, rec.Seen())
					}
				})
			}
		}
	}
}

func TestPublishEdgeCases(t *testing.T) {
	ctx := context.Background()
	m := mediator.New()
	// Zero handlers is not an error, for any strategy.
	require.NoError(t, mediator.Publish(ctx, m, userCreated{}))
	require.NoError(t, mediator.PublishWith(ctx, m, userCreated{}, mediator.Parallel(4)))
	require.NoError(t, mediator.Publish(ctx, &mediator.Mediator{}, userCreated{}))

	// Nil pointer notification of a registered type.
	mediator.RegisterNotificationFunc(m, func(context.Context, *ptrEvent) error { return nil })
	assert.ErrorIs(t, mediator.Publish(ctx, m, (*ptrEvent)(nil)), mediator.ErrNilRequest)
	assert.ErrorIs(t, mediator.PublishWith(ctx, m, (*ptrEvent)(nil), mediator.JoinAllErrors()), mediator.ErrNilRequest)
	require.NoError(t, mediator.Publish(ctx, m, &ptrEvent{}))

	// The zero value is StopAtFirstError.
	assert.NoError(t, mediator.PublishWith(ctx, m, &ptrEvent{}, mediator.PublishStrategy{}), "the zero value is valid")
	assert.Equal(t, "stop-at-first-error", mediator.StopAtFirstError().String())
	assert.Equal(t, "join-all-errors", mediator.JoinAllErrors().String())
	assert.Equal(t, "parallel(3)", mediator.Parallel(3).String())

	// Typed nil error from a notification handler.
	var p *myErr
	mediator.RegisterNotificationFunc(m, func(context.Context, userCreated) error { return p })
	assert.ErrorIs(t, mediator.Publish(ctx, m, userCreated{}), mediator.ErrTypedNil)
	assert.ErrorIs(t, mediator.PublishWith(ctx, m, userCreated{}, mediator.JoinAllErrors()), mediator.ErrTypedNil)
	assert.ErrorIs(t, mediator.PublishWith(ctx, m, userCreated{}, mediator.Parallel(1)), mediator.ErrTypedNil)

	// A behavior passing on another type.
	m.Use(mediator.Layer{Behavior: mediator.BehaviorFunc(func(ctx context.Context, _ any, _ mediator.Info, next mediator.Next) (any, error) {
		return next(ctx, 1)
	})})
	assert.ErrorIs(t, mediator.Publish(ctx, m, userCreated{}), mediator.ErrRequestType)
}

func TestPublishParallel(t *testing.T) {
	ctx := context.Background()
	m := mediator.New(mediator.WithPublishStrategy(mediator.Parallel(2)))
	var running, peak atomic.Int64
	for range 6 {
		mediator.RegisterNotificationFunc(m, func(context.Context, userCreated) error {
			n := running.Add(1)
			for {
				p := peak.Load()
				if n <= p || peak.CompareAndSwap(p, n) {
					break
				}
			}
			time.Sleep(5 * time.Millisecond)
			running.Add(-1)
			return nil
		})
	}
	require.NoError(t, mediator.Publish(ctx, m, userCreated{}))
	assert.Equal(t, int64(2), peak.Load(), "bounded by the limit, and actually parallel")

	// A panic in a handler goroutine is raised again in the caller, after all
	// handlers finished.
	var finished atomic.Int64
	m2 := mediator.New(mediator.WithPublishStrategy(mediator.Parallel(4)))
	mediator.RegisterNotificationFunc(m2, func(context.Context, userCreated) error { panic("in goroutine") })
	mediator.RegisterNotificationFunc(m2, func(context.Context, userCreated) error {
		time.Sleep(10 * time.Millisecond)
		finished.Add(1)
		return nil
	})
	func() {
		defer func() {
			v := recover()
			gp, ok := v.(*mediator.GoroutinePanic)
			require.True(t, ok, "%#v", v)
			assert.Equal(t, "in goroutine", gp.Value)
			assert.Contains(t, string(gp.Stack), "publish_test.go")
			assert.Contains(t, gp.Error(), "notification handler panicked: in goroutine")
		}()
		_ = mediator.Publish(ctx, m2, userCreated{})
	}()
	assert.Equal(t, int64(1), finished.Load())
}

func TestPublishConcurrent(t *testing.T) {
	m := mediator.New(mediator.WithLayers(mediator.Layer{Behavior: &recorder{}}))
	var count atomic.Int64
	for range 3 {
		mediator.RegisterNotificationFunc(m, func(context.Context, userCreated) error { count.Add(1); return nil })
	}
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 100 {
				_ = mediator.PublishWith(context.Background(), m, userCreated{}, mediator.Parallel(2))
				_ = mediator.Publish(context.Background(), m, userCreated{})
			}
		})
	}
	wg.Wait()
	assert.Equal(t, int64(8*100*2*3), count.Load())
}

func count(n int, failAt int) iter.Seq2[int, error] {
	return func(yield func(int, error) bool) {
		for i := range n {
			if i == failAt {
				yield(0, errors.New("count failed"))
				return
			}
			if !yield(i, nil) {
				return
			}
		}
	}
}

func TestSendStream(t *testing.T) {
	ctx := context.Background()
	collect := func(seq iter.Seq2[int, error]) (vals []int, errs []string) {
		for v, err := range seq {
			if err != nil {
				errs = append(errs, err.Error())
				continue
			}
			vals = append(vals, v)
		}
		return vals, errs
	}
	for _, behaviors := range []int{0, 1} {
		t.Run(fmt.Sprintf("behaviors=%d", behaviors), func(t *testing.T) {
			m := mediator.New()
			var trace []string
			if behaviors > 0 {
				m.Use(mediator.Layer{Behavior: mediator.BehaviorFunc(func(ctx context.Context, req any, info mediator.Info, next mediator.Next) (any, error) {
					trace = append(trace, "before")
					res, err := next(ctx, req)
					trace = append(trace, fmt.Sprintf("after err=%v", err))
					return res, err
				})})
			}
			mediator.RegisterStreamFunc(m, func(_ context.Context, c countTo) iter.Seq2[int, error] {
				if c.N < 0 {
					return nil // empty stream
				}
				return count(c.N, 3)
			})

			vals, errs := collect(mediator.SendStream(ctx, m, countTo{N: 3}))
			assert.Equal(t, []int{0, 1, 2}, vals)
			assert.Empty(t, errs)

			vals, errs = collect(mediator.SendStream(ctx, m, countTo{N: 5}))
			assert.Equal(t, []int{0, 1, 2}, vals)
			assert.Equal(t, []string{"count failed"}, errs, "an error element is delivered once")

			vals, errs = collect(mediator.SendStream(ctx, m, countTo{N: -1}))
			assert.Empty(t, vals)
			assert.Empty(t, errs)

			// The consumer stops early.
			var got []int
			for v := range mediator.SendStream(ctx, m, countTo{N: 3}) {
				got = append(got, v)
				break
			}
			assert.Equal(t, []int{0}, got)
			if behaviors > 0 {
				// The behavior wraps the whole iteration of each stream.
				assert.Equal(t, []string{
					"before", "after err=<nil>",
					"before", "after err=count failed",
					"before", "after err=<nil>",
					"before", "after err=<nil>",
				}, trace)
			}
		})
	}
}

func TestSendStreamErrors(t *testing.T) {
	ctx := context.Background()
	first := func(seq iter.Seq2[int, error]) error {
		for _, err := range seq {
			return err
		}
		return nil
	}
	m := mediator.New()
	assert.ErrorIs(t, first(mediator.SendStream(ctx, m, countTo{})), mediator.ErrNoHandler)
	assert.ErrorContains(t, first(mediator.SendStream(ctx, m, countTo{})), `no handler for stream "count.to"`)

	type ptrStream struct{ mediator.Stream[int] }
	mediator.RegisterStreamFunc(m, func(context.Context, *ptrStream) iter.Seq2[int, error] { return count(1, -1) }, mediator.WithKind("ptr.stream"))
	assert.ErrorIs(t, first(mediator.SendStream(ctx, m, (*ptrStream)(nil))), mediator.ErrNilRequest)

	// A behavior that refuses: its error is the one element.
	denied := errors.New("denied")
	m2 := mediator.New(mediator.WithLayers(mediator.Layer{Behavior: mediator.BehaviorFunc(func(context.Context, any, mediator.Info, mediator.Next) (any, error) {
		return nil, denied
	})}))
	mediator.RegisterStreamFunc(m2, func(context.Context, countTo) iter.Seq2[int, error] { return count(3, -1) })
	n := 0
	for _, err := range mediator.SendStream(ctx, m2, countTo{}) {
		n++
		assert.ErrorIs(t, err, denied)
	}
	assert.Equal(t, 1, n)

	// A behavior passing on another type.
	m3 := mediator.New(mediator.WithLayers(mediator.Layer{Behavior: mediator.BehaviorFunc(func(ctx context.Context, _ any, _ mediator.Info, next mediator.Next) (any, error) {
		return next(ctx, "x")
	})}))
	mediator.RegisterStreamFunc(m3, func(context.Context, countTo) iter.Seq2[int, error] { return count(3, -1) })
	assert.ErrorIs(t, first(mediator.SendStream(ctx, m3, countTo{})), mediator.ErrRequestType)

	// A behavior calling next again after the consumer stopped: no element.
	m4 := mediator.New(mediator.WithLayers(mediator.Layer{Behavior: mediator.BehaviorFunc(func(ctx context.Context, req any, _ mediator.Info, next mediator.Next) (any, error) {
		_, _ = next(ctx, req)
		return next(ctx, req)
	})}))
	mediator.RegisterStreamFunc(m4, func(context.Context, countTo) iter.Seq2[int, error] { return count(3, -1) })
	n = 0
	for range mediator.SendStream(ctx, m4, countTo{}) {
		n++
		break
	}
	assert.Equal(t, 1, n)

	// A panic in the consumer's loop body reaches the consumer even if a
	// behavior recovers it.
	recovering := mediator.BehaviorFunc(func(ctx context.Context, req any, _ mediator.Info, next mediator.Next) (res any, err error) {
		defer func() {
			if v := recover(); v != nil {
				err = fmt.Errorf("recovered: %v", v)
			}
		}()
		return next(ctx, req)
	})
	m5 := mediator.New(mediator.WithLayers(mediator.Layer{Behavior: recovering}))
	mediator.RegisterStreamFunc(m5, func(context.Context, countTo) iter.Seq2[int, error] { return count(3, -1) })
	assert.PanicsWithError(t, "recovered: consumer", func() {
		for range mediator.SendStream(ctx, m5, countTo{}) {
			panic("consumer")
		}
	})
}
