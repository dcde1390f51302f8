package mediator_test

import (
	"context"
	"errors"
	"iter"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tailrace/tailrace/mediator"
)

type sameKindA struct{ mediator.Command[int] }
type sameKindB struct{ mediator.Command[int] }

type kindMethodAndName struct{ mediator.Command[int] }

func (kindMethodAndName) Kind() string { return "from.method" }

type badKind struct{ mediator.Command[int] }

func (badKind) Kind() string { return "has space" }

type ifaceReq interface{ mediator.Request[int] }

type plainEvent struct{ mediator.Notification }

type userHandler struct{}

func (userHandler) Handle(_ context.Context, c createUser) (string, error) { return c.Name, nil }

func TestRegisterErrors(t *testing.T) {
	one := func(context.Context, sameKindA) (int, error) { return 1, nil }
	tests := []struct {
		name    string
		setup   func(m *mediator.Mediator)
		reg     func(m *mediator.Mediator) error
		is      error
		message string
	}{
		{
			name:    "duplicate handler",
			setup:   func(m *mediator.Mediator) { mediator.Register(m, userHandler{}) },
			reg:     func(m *mediator.Mediator) error { return mediator.RegisterSafely(m, userHandler{}) },
			is:      mediator.ErrDuplicate,
			message: `already has a command handler`,
		},
		{
			name: "nil handler func",
			reg: func(m *mediator.Mediator) error {
				return mediator.RegisterSafely(m, mediator.HandlerFunc[noKind, int](nil))
			},
			is:      mediator.ErrNilHandler,
			message: "nil handler",
		},
		{
			name: "no kind and no name",
			reg: func(m *mediator.Mediator) error {
				return mediator.RegisterSafely(m, mediator.HandlerFunc[sameKindA, int](one))
			},
			is:      mediator.ErrNoKind,
			message: "add a Kind() string method or register it WithKind",
		},
		{
			name: "kind used by two types",
			setup: func(m *mediator.Mediator) {
				mediator.RegisterFunc(m, one, mediator.WithKind("k"))
			},
			reg: func(m *mediator.Mediator) error {
				return mediator.RegisterSafely(m, mediator.HandlerFunc[sameKindB, int](func(context.Context, sameKindB) (int, error) { return 0, nil }), mediator.WithKind("k"))
			},
			is:      mediator.ErrDuplicate,
			message: `kind "k" is already used by mediator_test.sameKindA`,
		},
		{
			name: "name disagrees with Kind method",
			reg: func(m *mediator.Mediator) error {
				return mediator.RegisterSafely(m, mediator.HandlerFunc[kindMethodAndName, int](func(context.Context, kindMethodAndName) (int, error) { return 0, nil }), mediator.WithKind("other"))
			},
			is:      mediator.ErrInvalidKind,
			message: `has Kind() "from.method" but is registered as "other"`,
		},
		{
			name: "invalid kind",
			reg: func(m *mediator.Mediator) error {
				return mediator.RegisterSafely(m, mediator.HandlerFunc[badKind, int](func(context.Context, badKind) (int, error) { return 0, nil }))
			},
			is:      mediator.ErrInvalidKind,
			message: `"has space" contains a space`,
		},
		{
			name: "interface request type",
			reg: func(m *mediator.Mediator) error {
				return mediator.RegisterSafely(m, mediator.HandlerFunc[ifaceReq, int](func(context.Context, ifaceReq) (int, error) { return 0, nil }), mediator.WithKind("iface"))
			},
			message: "must be a struct",
		},
		{
			name:  "notification kind already used by a request",
			setup: func(m *mediator.Mediator) { mediator.RegisterFunc(m, okUser) },
			reg: func(m *mediator.Mediator) error {
				return mediator.RegisterNotificationSafely(m, mediator.NotificationHandlerFunc[plainEvent](func(context.Context, plainEvent) error { return nil }), mediator.WithKind("users.create"))
			},
			is:      mediator.ErrDuplicate,
			message: `kind "users.create" is already used by mediator_test.createUser`,
		},
		{
			name: "nil notification handler",
			reg: func(m *mediator.Mediator) error {
				return mediator.RegisterNotificationSafely[userCreated](m, nil)
			},
			is: mediator.ErrNilHandler,
		},
		{
			name: "duplicate stream handler",
			setup: func(m *mediator.Mediator) {
				mediator.RegisterStreamFunc(m, func(context.Context, countTo) iter.Seq2[int, error] { return nil })
			},
			reg: func(m *mediator.Mediator) error {
				return mediator.RegisterStreamSafely(m, mediator.StreamHandlerFunc[countTo, int](func(context.Context, countTo) iter.Seq2[int, error] { return nil }))
			},
			is: mediator.ErrDuplicate,
		},
		{
			name: "nil stream handler",
			reg:  func(m *mediator.Mediator) error { return mediator.RegisterStreamSafely[countTo](m, nil) },
			is:   mediator.ErrNilHandler,
		},
		{
			name:    "nil layer behavior",
			reg:     func(m *mediator.Mediator) error { return m.UseSafely(mediator.Layer{Order: 1}) },
			message: "nil Behavior",
		},
		{
			name:    "RegisterKind conflicts",
			setup:   func(m *mediator.Mediator) { mediator.RegisterKind[sameKindA](m, "a") },
			reg:     func(m *mediator.Mediator) error { return mediator.RegisterKindSafely[sameKindA](m, "b") },
			is:      mediator.ErrDuplicate,
			message: `is already named "a"`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := mediator.New()
			if tt.setup != nil {
				tt.setup(m)
			}
			err := tt.reg(m)
			require.Error(t, err)
			if tt.is != nil {
				require.ErrorIs(t, err, tt.is)
			}
			assert.Contains(t, err.Error(), tt.message)
		})
	}
}

func TestRegisterPanics(t *testing.T) {
	m := mediator.New()
	mediator.Register(m, userHandler{})
	assert.PanicsWithError(t, `mediator: already registered: mediator_test.createUser (kind "users.create") already has a command handler`, func() {
		mediator.Register(m, userHandler{})
	})
	assert.Panics(t, func() { mediator.RegisterFunc[createUser](m, nil) })
	assert.Panics(t, func() { mediator.RegisterNotificationFunc[userCreated](m, nil) })
	assert.Panics(t, func() { mediator.RegisterStreamFunc[countTo](m, nil) })
	assert.Panics(t, func() { m.Use(mediator.Layer{}) })
	assert.Panics(t, func() { mediator.RegisterKind[sameKindA](m, "") })
	assert.Panics(t, func() {
		mediator.RegisterNotification[userCreated](m, nil)
	})
	assert.Panics(t, func() {
		mediator.RegisterStream[countTo](m, nil)
	})
	assert.Panics(t, func() { mediator.New(mediator.WithLayers(mediator.Layer{})) })
}

func TestKindOf(t *testing.T) {
	m := mediator.New()
	mediator.RegisterFunc(m, func(context.Context, sameKindA) (int, error) { return 0, nil }, mediator.WithKind("named.a"))
	mediator.RegisterKind[sameKindB](m, "named.b")

	tests := []struct {
		name   string
		v      any
		pkg    string // mediator.KindOf
		pkgErr error
		m      string // m.KindOf
		mErr   error
	}{
		{"Kind method", createUser{}, "users.create", nil, "users.create", nil},
		{"Kind method on pointer", &ptrCmd{}, "ptr.cmd", nil, "ptr.cmd", nil},
		{"registered with handler", sameKindA{}, "", mediator.ErrNoKind, "named.a", nil},
		{"registered without handler", sameKindB{}, "", mediator.ErrNoKind, "named.b", nil},
		{"pointer to registered", &sameKindB{}, "", mediator.ErrNoKind, "named.b", nil},
		{"unknown", noKind{}, "", mediator.ErrNoKind, "", mediator.ErrNoKind},
		{"nil", nil, "", mediator.ErrNilRequest, "", mediator.ErrNilRequest},
		{"nil pointer", (*ptrCmd)(nil), "", mediator.ErrNilRequest, "", mediator.ErrNilRequest},
		{"invalid Kind", badKind{}, "", mediator.ErrInvalidKind, "", mediator.ErrInvalidKind},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k, err := mediator.KindOf(tt.v)
			assert.ErrorIs(t, err, tt.pkgErr)
			assert.Equal(t, tt.pkg, k)
			k, err = m.KindOf(tt.v)
			assert.ErrorIs(t, err, tt.mErr)
			assert.Equal(t, tt.m, k)
		})
	}
	var zero mediator.Mediator
	_, err := zero.KindOf(sameKindA{})
	assert.ErrorIs(t, err, mediator.ErrNoKind)

	assert.Equal(t, []mediator.Info{{Kind: "named.a", Type: mediator.TypeCommand}}, m.Registered())
	assert.Nil(t, zero.Registered())
}

func TestValidateKind(t *testing.T) {
	for _, k := range []string{"a", "orders.placed", "Orders/Placed:v2", strings.Repeat("x", mediator.MaxKindLen)} {
		assert.NoError(t, mediator.ValidateKind(k), k)
	}
	for _, k := range []string{"", " ", "a b", "a\tb", "a\x00", "\xff", strings.Repeat("x", mediator.MaxKindLen+1)} {
		assert.ErrorIs(t, mediator.ValidateKind(k), mediator.ErrInvalidKind, "%q", k)
	}
}

func TestRequestTypeString(t *testing.T) {
	assert.Equal(t, "command", mediator.TypeCommand.String())
	assert.Equal(t, "query", mediator.TypeQuery.String())
	assert.Equal(t, "notification", mediator.TypeNotification.String())
	assert.Equal(t, "stream", mediator.TypeStream.String())
	assert.Equal(t, "unknown", mediator.RequestType(0).String())
}

func TestBuild(t *testing.T) {
	rec := &recorder{}
	m, err := mediator.Build(mediator.Config{PublishStrategy: mediator.JoinAllErrors()},
		[]mediator.Layer{{Behavior: rec}},
		[]mediator.Registration{
			mediator.Handle[createUser](userHandler{}),
			mediator.HandleNotification(mediator.NotificationHandlerFunc[userCreated](func(context.Context, userCreated) error { return errors.New("one") })),
			mediator.HandleNotification(mediator.NotificationHandlerFunc[userCreated](func(context.Context, userCreated) error { return errors.New("two") })),
			mediator.HandleStream(mediator.StreamHandlerFunc[countTo, int](func(context.Context, countTo) iter.Seq2[int, error] { return nil })),
		})
	require.NoError(t, err)
	s, err := mediator.Send(context.Background(), m, createUser{Name: "ada"})
	require.NoError(t, err)
	assert.Equal(t, "ada", s)
	err = mediator.Publish(context.Background(), m, userCreated{})
	assert.EqualError(t, err, "one\ntwo") // the configured strategy
	assert.Equal(t, []string{"command users.create", "notification users.created"}, rec.Seen())

	_, err = mediator.Build(mediator.Config{}, []mediator.Layer{{}}, nil)
	assert.ErrorContains(t, err, "nil Behavior")
	_, err = mediator.Build(mediator.Config{}, nil, []mediator.Registration{nil})
	assert.ErrorIs(t, err, mediator.ErrNilHandler)
	_, err = mediator.Build(mediator.Config{}, nil, []mediator.Registration{mediator.Handle[createUser](userHandler{}), mediator.Handle[createUser](userHandler{})})
	assert.ErrorIs(t, err, mediator.ErrDuplicate)
}
