package mediator_test

import (
	"context"
	"testing"

	"github.com/tailrace/tailrace/mediator"
)

type benchCmd struct {
	mediator.Command[int64]
	Customer string
	Amount   int64
}

func (benchCmd) Kind() string { return "bench.cmd" }

type benchEvent struct {
	mediator.Notification
	ID int64
}

func (benchEvent) Kind() string { return "bench.event" }

func benchHandler(_ context.Context, c benchCmd) (int64, error) { return c.Amount + 1000, nil }

var passThrough = mediator.BehaviorFunc(func(ctx context.Context, req any, _ mediator.Info, next mediator.Next) (any, error) {
	return next(ctx, req)
})

var sink int64

// BenchmarkDirect is the reference: calling the handler function itself.
func BenchmarkDirect(b *testing.B) {
	ctx := context.Background()
	h := benchHandler
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		r, _ := h(ctx, benchCmd{Customer: "ada", Amount: int64(i)})
		sink = r
	}
}

// BenchmarkClosureChain is a hand-written chain of 3 pass-through
// middlewares around the handler: the floor for a pipeline.
func BenchmarkClosureChain(b *testing.B) {
	ctx := context.Background()
	type fn func(context.Context, benchCmd) (int64, error)
	var h fn = benchHandler
	for range 3 {
		next := h
		h = func(ctx context.Context, c benchCmd) (int64, error) { return next(ctx, c) }
	}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		r, _ := h(ctx, benchCmd{Customer: "ada", Amount: int64(i)})
		sink = r
	}
}

func BenchmarkSend(b *testing.B) {
	for _, n := range []int{0, 3} {
		b.Run(map[int]string{0: "behaviors=0", 3: "behaviors=3"}[n], func(b *testing.B) {
			m := mediator.New()
			mediator.RegisterFunc(m, benchHandler)
			for i := range n {
				m.Use(mediator.Layer{Order: i, Behavior: passThrough})
			}
			ctx := context.Background()
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				r, err := mediator.Send(ctx, m, benchCmd{Customer: "ada", Amount: int64(i)})
				if err != nil {
					b.Fatal(err)
				}
				sink = r
			}
		})
	}
}

func BenchmarkSendParallel(b *testing.B) {
	m := mediator.New()
	mediator.RegisterFunc(m, benchHandler)
	for i := range 3 {
		m.Use(mediator.Layer{Order: i, Behavior: passThrough})
	}
	ctx := context.Background()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		var i int64
		for pb.Next() {
			i++
			if _, err := mediator.Send(ctx, m, benchCmd{Customer: "ada", Amount: i}); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

func BenchmarkPublish(b *testing.B) {
	for _, n := range []int{0, 3} {
		b.Run(map[int]string{0: "handlers=3/behaviors=0", 3: "handlers=3/behaviors=3"}[n], func(b *testing.B) {
			m := mediator.New()
			for range 3 {
				mediator.RegisterNotificationFunc(m, func(_ context.Context, e benchEvent) error {
					sink = e.ID
					return nil
				})
			}
			for i := range n {
				m.Use(mediator.Layer{Order: i, Behavior: passThrough})
			}
			ctx := context.Background()
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				if err := mediator.Publish(ctx, m, benchEvent{ID: int64(i)}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

type benchPtrCmd struct {
	mediator.Command[*int64]
	Amount int64
}

func (*benchPtrCmd) Kind() string { return "bench.ptr" }

// BenchmarkSendPointers sends a pointer request answered with a pointer:
// both are pointer-shaped, so Send through behaviors allocates nothing of
// its own (the handler's result is allocated by the handler).
func BenchmarkSendPointers(b *testing.B) {
	m := mediator.New()
	res := int64(42)
	mediator.RegisterFunc(m, func(_ context.Context, c *benchPtrCmd) (*int64, error) { return &res, nil })
	for i := range 3 {
		m.Use(mediator.Layer{Order: i, Behavior: passThrough})
	}
	ctx := context.Background()
	req := &benchPtrCmd{Amount: 1}
	b.ReportAllocs()
	for b.Loop() {
		r, err := mediator.Send(ctx, m, req)
		if err != nil {
			b.Fatal(err)
		}
		sink = *r
	}
}
