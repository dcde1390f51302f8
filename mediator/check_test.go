package mediator_test

import (
	"context"
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tailrace/tailrace/mediator"
)

type checkedCmd struct{ mediator.Command[int] }

func (checkedCmd) Kind() string { return "checked.cmd" }

type checkedEvt struct{ mediator.Notification }

func (checkedEvt) Kind() string { return "checked.evt" }

// A layer's Check sees each pipeline it is part of, with the layers in
// order, and its error refuses the registration or the Use that would build
// a pipeline it rejects; the mediator is left as it was.
func TestLayerCheckRefusesAPipeline(t *testing.T) {
	errNoEvents := errors.New("no events here")
	pass := mediator.BehaviorFunc(func(ctx context.Context, req any, info mediator.Info, next mediator.Next) (any, error) {
		return next(ctx, req)
	})
	var seen [][]int
	checked := mediator.Layer{Order: 20, Behavior: pass, Check: func(info mediator.Info, pipeline []mediator.Layer) error {
		var orders []int
		for _, l := range pipeline {
			orders = append(orders, l.Order)
		}
		seen = append(seen, orders)
		if info.Type == mediator.TypeNotification {
			return errNoEvents
		}
		return nil
	}}
	outer := mediator.Layer{Order: 10, Behavior: pass}

	m := mediator.New(mediator.WithLayers(checked, outer))
	require.NoError(t, mediator.RegisterSafely(m, mediator.HandlerFunc[checkedCmd, int](func(context.Context, checkedCmd) (int, error) { return 1, nil })))
	assert.Equal(t, [][]int{{10, 20}}, seen)
	onEvt := mediator.NotificationHandlerFunc[checkedEvt](func(context.Context, checkedEvt) error { return nil })
	err := mediator.RegisterNotificationSafely(m, onEvt)
	require.ErrorIs(t, err, errNoEvents)
	assert.Contains(t, err.Error(), `notification "checked.evt"`)
	// Refused means not registered: publishing finds no handler.
	require.NoError(t, mediator.Publish(context.Background(), m, checkedEvt{}))
	n, err := mediator.Send(context.Background(), m, checkedCmd{})
	require.NoError(t, err)
	assert.Equal(t, 1, n)

	// Added after the registration, the layer is refused by Use.
	m = mediator.New()
	mediator.RegisterNotification(m, onEvt)
	require.ErrorIs(t, m.UseSafely(checked), errNoEvents)
	assert.Panics(t, func() { m.Use(checked) })
}
