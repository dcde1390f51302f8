package mediator_test

import (
	"context"
	"errors"
	"fmt"
	"iter"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tailrace/tailrace/mediator"
)

// Test types. Each has a Kind unless the test is about kinds.

type createUser struct {
	mediator.Command[string]
	Name string
}

func (createUser) Kind() string { return "users.create" }

type ptrCmd struct {
	mediator.Command[*result]
	N int
}

func (*ptrCmd) Kind() string { return "ptr.cmd" }

type result struct{ N int }

type unitCmd struct{ mediator.Command[struct{}] }

func (unitCmd) Kind() string { return "unit.cmd" }

type noKind struct{ mediator.Query[int] }

type errIface struct {
	mediator.Query[error]
}

func (errIface) Kind() string { return "err.iface" }

type userCreated struct {
	mediator.Notification
	Name string
}

func (userCreated) Kind() string { return "users.created" }

type countTo struct {
	mediator.Stream[int]
	N int
}

func (countTo) Kind() string { return "count.to" }

type myErr struct{}

func (*myErr) Error() string { return "my error" }

func okUser(_ context.Context, c createUser) (string, error) { return "user:" + c.Name, nil }

// recorder is a behavior that records what it sees.
type recorder struct {
	mu    sync.Mutex
	name  string
	seen  []string
	trace *[]string
}

func (r *recorder) Handle(ctx context.Context, req any, info mediator.Info, next mediator.Next) (any, error) {
	r.mu.Lock()
	r.seen = append(r.seen, info.Type.String()+" "+info.Kind)
	if r.trace != nil {
		*r.trace = append(*r.trace, r.name)
	}
	r.mu.Unlock()
	return next(ctx, req)
}

func (r *recorder) Seen() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.seen)
}

func TestSend(t *testing.T) {
	ctx := context.Background()
	for _, behaviors := range []int{0, 2} {
		t.Run(fmt.Sprintf("behaviors=%d", behaviors), func(t *testing.T) {
			m := mediator.New()
			for i := range behaviors {
				m.Use(mediator.Layer{Order: i, Behavior: &recorder{}})
			}
			mediator.RegisterFunc(m, okUser)
			mediator.RegisterFunc(m, func(_ context.Context, c *ptrCmd) (*result, error) {
				if c.N < 0 {
					return nil, nil // a typed nil response is a valid response
				}
				return &result{N: c.N * 2}, nil
			})
			mediator.RegisterFunc(m, func(context.Context, unitCmd) (struct{}, error) { return struct{}{}, nil })
			mediator.RegisterFunc(m, func(context.Context, errIface) (error, error) {
				var p *myErr
				return p, nil // typed nil inside an interface response: returned as is
			})

			s, err := mediator.Send(ctx, m, createUser{Name: "ada"})
			require.NoError(t, err)
			assert.Equal(t, "user:ada", s)

			r, err := mediator.Send(ctx, m, &ptrCmd{N: 21})
			require.NoError(t, err)
			assert.Equal(t, 42, r.N)

			r, err = mediator.Send(ctx, m, &ptrCmd{N: -1})
			require.NoError(t, err)
			assert.Nil(t, r)

			_, err = mediator.Send(ctx, m, unitCmd{})
			require.NoError(t, err)

			e, err := mediator.Send(ctx, m, errIface{})
			require.NoError(t, err)
			assert.True(t, e != nil) // a non-nil interface holding a nil *myErr
			assert.Nil(t, e.(*myErr))
		})
	}
}

func TestSendErrors(t *testing.T) {
	ctx := context.Background()
	boom := errors.New("boom")
	tests := []struct {
		name    string
		setup   func(m *mediator.Mediator)
		send    func(m *mediator.Mediator) error
		is      error
		message string
	}{
		{
			name:    "no handler names the kind",
			send:    func(m *mediator.Mediator) error { _, err := mediator.Send(ctx, m, createUser{}); return err },
			is:      mediator.ErrNoHandler,
			message: `mediator: no handler for command "users.create"`,
		},
		{
			name:    "no handler without kind names the type",
			send:    func(m *mediator.Mediator) error { _, err := mediator.Send(ctx, m, noKind{}); return err },
			is:      mediator.ErrNoHandler,
			message: "mediator: no handler for query mediator_test.noKind",
		},
		{
			name: "zero mediator has no handler",
			send: func(*mediator.Mediator) error {
				_, err := mediator.Send(ctx, &mediator.Mediator{}, createUser{})
				return err
			},
			is:      mediator.ErrNoHandler,
			message: "no handler",
		},
		{
			name: "nil pointer request",
			setup: func(m *mediator.Mediator) {
				mediator.RegisterFunc(m, func(context.Context, *ptrCmd) (*result, error) { panic("not called") })
			},
			send:    func(m *mediator.Mediator) error { _, err := mediator.Send(ctx, m, (*ptrCmd)(nil)); return err },
			is:      mediator.ErrNilRequest,
			message: `mediator: nil request for command "ptr.cmd"`,
		},
		{
			name:    "nil pointer request, unregistered",
			send:    func(m *mediator.Mediator) error { _, err := mediator.Send(ctx, m, (*ptrCmd)(nil)); return err },
			is:      mediator.ErrNilRequest,
			message: "nil request",
		},
		{
			name: "handler error",
			setup: func(m *mediator.Mediator) {
				mediator.RegisterFunc(m, func(context.Context, createUser) (string, error) { return "ignored", boom })
			},
			send:    func(m *mediator.Mediator) error { _, err := mediator.Send(ctx, m, createUser{}); return err },
			is:      boom,
			message: "boom",
		},
		{
			name: "typed nil error",
			setup: func(m *mediator.Mediator) {
				mediator.RegisterFunc(m, func(context.Context, createUser) (string, error) {
					var e *myErr
					return "", e
				})
			},
			send:    func(m *mediator.Mediator) error { _, err := mediator.Send(ctx, m, createUser{}); return err },
			is:      mediator.ErrTypedNil,
			message: `(*mediator_test.myErr) for command "users.create"`,
		},
		{
			name: "typed nil error through behaviors",
			setup: func(m *mediator.Mediator) {
				m.Use(mediator.Layer{Behavior: &recorder{}})
				mediator.RegisterFunc(m, func(context.Context, createUser) (string, error) {
					var e *myErr
					return "", e
				})
			},
			send: func(m *mediator.Mediator) error { _, err := mediator.Send(ctx, m, createUser{}); return err },
			is:   mediator.ErrTypedNil,
		},
		{
			name: "behavior returns a response of the wrong type",
			setup: func(m *mediator.Mediator) {
				mediator.RegisterFunc(m, okUser)
				m.Use(mediator.Layer{Behavior: mediator.BehaviorFunc(func(context.Context, any, mediator.Info, mediator.Next) (any, error) {
					return 42, nil
				})})
			},
			send:    func(m *mediator.Mediator) error { _, err := mediator.Send(ctx, m, createUser{}); return err },
			is:      mediator.ErrResponseType,
			message: `got int for command "users.create", want string`,
		},
		{
			name: "behavior passes a request of the wrong type",
			setup: func(m *mediator.Mediator) {
				mediator.RegisterFunc(m, okUser)
				m.Use(mediator.Layer{Behavior: mediator.BehaviorFunc(func(ctx context.Context, _ any, _ mediator.Info, next mediator.Next) (any, error) {
					return next(ctx, "not a request")
				})})
			},
			send:    func(m *mediator.Mediator) error { _, err := mediator.Send(ctx, m, createUser{}); return err },
			is:      mediator.ErrRequestType,
			message: `string passed on for command "users.create"`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := mediator.New()
			if tt.setup != nil {
				tt.setup(m)
			}
			err := tt.send(m)
			require.ErrorIs(t, err, tt.is)
			assert.Contains(t, err.Error(), tt.message)
		})
	}
}

func TestShortCircuit(t *testing.T) {
	m := mediator.New()
	called := false
	mediator.RegisterFunc(m, func(context.Context, createUser) (string, error) { called = true; return "x", nil })
	m.Use(mediator.Layer{Behavior: mediator.BehaviorFunc(func(ctx context.Context, req any, _ mediator.Info, _ mediator.Next) (any, error) {
		if req.(createUser).Name == "cached" {
			return "from cache", nil
		}
		return nil, nil // (nil, nil): zero response, no error
	})})
	s, err := mediator.Send(context.Background(), m, createUser{Name: "cached"})
	require.NoError(t, err)
	assert.Equal(t, "from cache", s)
	s, err = mediator.Send(context.Background(), m, createUser{})
	require.NoError(t, err)
	assert.Equal(t, "", s)
	assert.False(t, called)
}

func TestPanicPropagates(t *testing.T) {
	m := mediator.New()
	mediator.RegisterFunc(m, func(context.Context, createUser) (string, error) { panic("kaboom") })
	assert.PanicsWithValue(t, "kaboom", func() { _, _ = mediator.Send(context.Background(), m, createUser{}) })
	m.Use(mediator.Layer{Behavior: &recorder{}})
	assert.PanicsWithValue(t, "kaboom", func() { _, _ = mediator.Send(context.Background(), m, createUser{}) })
}

// A behavior may call next several times (Retry), pass on a replacement of
// the same type, and replace the context; each must see the right response.
func TestNextReuse(t *testing.T) {
	ctx := context.Background()
	calls := 0
	m := mediator.New()
	mediator.RegisterFunc(m, func(_ context.Context, c createUser) (string, error) {
		calls++
		return fmt.Sprintf("%s#%d", c.Name, calls), nil
	})
	var first any
	m.Use(
		mediator.Layer{Order: 1, Behavior: mediator.BehaviorFunc(func(ctx context.Context, req any, _ mediator.Info, next mediator.Next) (any, error) {
			r1, err := next(ctx, req)
			require.NoError(t, err)
			first = r1
			r2, err := next(context.WithoutCancel(ctx), req)
			require.NoError(t, err)
			r3, err := next(context.Background(), createUser{Name: "other"})
			require.NoError(t, err)
			return r1.(string) + "," + r2.(string) + "," + r3.(string), nil
		})},
	)
	s, err := mediator.Send(ctx, m, createUser{Name: "ada"})
	require.NoError(t, err)
	assert.Equal(t, "ada#1,ada#2,other#3", s)
	assert.Equal(t, "ada#1", first) // the first response was not overwritten
}

func TestNestedSendAndConcurrency(t *testing.T) {
	m := mediator.New()
	rec := &recorder{}
	m.Use(mediator.Layer{Behavior: rec})
	mediator.RegisterFunc(m, okUser)
	mediator.RegisterFunc(m, func(ctx context.Context, c *ptrCmd) (*result, error) {
		// Re-entrant: a handler dispatches on the same mediator.
		s, err := mediator.Send(ctx, m, createUser{Name: fmt.Sprint(c.N)})
		if err != nil {
			return nil, err
		}
		return &result{N: len(s)}, nil
	})
	var wg sync.WaitGroup
	var failures atomic.Int64
	for g := range 16 {
		wg.Go(func() {
			for i := range 200 {
				s, err := mediator.Send(context.Background(), m, createUser{Name: fmt.Sprint(g, i)})
				if err != nil || s != fmt.Sprint("user:", g, i) {
					failures.Add(1)
				}
				r, err := mediator.Send(context.Background(), m, &ptrCmd{N: i})
				if err != nil || r.N != len("user:"+fmt.Sprint(i)) {
					failures.Add(1)
				}
			}
		})
	}
	// Registration while dispatching is safe too.
	wg.Go(func() {
		for i := range 50 {
			m.Use(mediator.Layer{Order: 100 + i, Behavior: &recorder{}})
		}
	})
	wg.Wait()
	assert.Zero(t, failures.Load())
	assert.Len(t, rec.Seen(), 16*200*3)
}

func TestOrder(t *testing.T) {
	var trace []string
	m := mediator.New()
	mediator.RegisterFunc(m, okUser)
	add := func(name string, order int) {
		m.Use(mediator.Layer{Order: order, Behavior: &recorder{name: name, trace: &trace}})
	}
	add("c", 5)
	add("a", -1)
	add("d", 5) // equal order: after c, its elder
	add("b", 0)
	add("e", 10)
	_, err := mediator.Send(context.Background(), m, createUser{})
	require.NoError(t, err)
	assert.Equal(t, []string{"a", "b", "c", "d", "e"}, trace)
}

type auditable interface{ Audited() }

type auditedCmd struct{ mediator.Command[int] }

func (auditedCmd) Kind() string { return "audited" }
func (auditedCmd) Audited()     {}

type getUser struct{ mediator.Query[string] }

func (getUser) Kind() string { return "users.get" }

func TestScopes(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name  string
		scope mediator.Scope
		want  []string
	}{
		{"nil wraps all", nil, []string{"command users.create", "command audited", "query users.get", "notification users.created", "stream count.to"}},
		{"commands", mediator.Commands(), []string{"command users.create", "command audited"}},
		{"of type", mediator.OfType(mediator.TypeQuery, mediator.TypeStream), []string{"query users.get", "stream count.to"}},
		{"implementing", mediator.Implementing[auditable](), []string{"command audited"}},
		{"kinds", mediator.Kinds("users.get", "users.created"), []string{"query users.get", "notification users.created"}},
		{"where", mediator.Where(func(i mediator.Info) bool { return strings.HasPrefix(i.Kind, "users.c") }), []string{"command users.create", "notification users.created"}},
		{"all", mediator.All(mediator.Commands(), mediator.Implementing[auditable]()), []string{"command audited"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec := &recorder{}
			m := mediator.New(mediator.WithLayers(mediator.Layer{Behavior: rec, Scope: tt.scope}))
			mediator.RegisterFunc(m, okUser)
			mediator.RegisterFunc(m, func(context.Context, auditedCmd) (int, error) { return 1, nil })
			mediator.RegisterFunc(m, func(context.Context, getUser) (string, error) { return "", nil })
			mediator.RegisterNotificationFunc(m, func(context.Context, userCreated) error { return nil })
			mediator.RegisterStreamFunc(m, func(context.Context, countTo) iter.Seq2[int, error] { return nil })
			_, _ = mediator.Send(ctx, m, createUser{})
			_, _ = mediator.Send(ctx, m, auditedCmd{})
			_, _ = mediator.Send(ctx, m, getUser{})
			_ = mediator.Publish(ctx, m, userCreated{})
			for range mediator.SendStream(ctx, m, countTo{}) {
			}
			assert.Equal(t, tt.want, rec.Seen())
		})
	}
}

// Next may be called concurrently (a hedging behavior): every response must
// stay intact.
func TestNextConcurrent(t *testing.T) {
	m := mediator.New()
	var n atomic.Int64
	mediator.RegisterFunc(m, func(_ context.Context, c createUser) (string, error) {
		return fmt.Sprint(c.Name, n.Add(1)), nil
	})
	m.Use(mediator.Layer{Behavior: mediator.BehaviorFunc(func(ctx context.Context, req any, _ mediator.Info, next mediator.Next) (any, error) {
		results := make([]any, 8)
		var wg sync.WaitGroup
		for i := range results {
			wg.Go(func() { results[i], _ = next(ctx, req) })
		}
		wg.Wait()
		seen := map[any]bool{}
		for _, r := range results {
			seen[r] = true
		}
		return fmt.Sprint(len(seen)), nil
	})})
	for range 50 {
		s, err := mediator.Send(context.Background(), m, createUser{Name: "x"})
		require.NoError(t, err)
		require.Equal(t, "8", s, "eight distinct responses")
	}
}
