package wireexample_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tailrace/tailrace/behaviors"
	"github.com/tailrace/tailrace/mediator"
	"github.com/tailrace/tailrace/mediator/internal/wireexample"
)

func exercise(t *testing.T, m *mediator.Mediator, store *wireexample.Store, logs *bytes.Buffer) {
	t.Helper()
	ctx := context.Background()
	id, err := mediator.Send(ctx, m, wireexample.CreateUser{Name: "ada"})
	require.NoError(t, err)
	assert.Equal(t, 1, id)
	require.NoError(t, mediator.Publish(ctx, m, wireexample.UserCreated{ID: id}))
	assert.Equal(t, []string{"ada"}, store.Users)
	assert.Equal(t, []int{1}, store.Welcome)

	// The behaviors provided through the sets are in the pipeline.
	_, err = mediator.Send(ctx, m, wireexample.CreateUser{})
	var ve *behaviors.ValidationError
	require.True(t, errors.As(err, &ve), "%v", err)
	assert.Contains(t, logs.String(), "kind=users.create")
	assert.Contains(t, logs.String(), "outcome=error")
	assert.Contains(t, logs.String(), "kind=users.created")
}

func TestWire(t *testing.T) {
	var logs bytes.Buffer
	logger := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	store := &wireexample.Store{}
	m, err := wireexample.NewMediator(logger, store, mediator.Config{}, behaviors.LoggingConfig{}, behaviors.RecoverConfig{}, behaviors.ValidationConfig{})
	require.NoError(t, err)
	exercise(t, m, store, &logs)

	// A bad config surfaces as the injector's error.
	_, err = wireexample.NewMediator(logger, store, mediator.Config{}, behaviors.LoggingConfig{}, behaviors.RecoverConfig{MaxStackBytes: -1}, behaviors.ValidationConfig{})
	assert.ErrorContains(t, err, "MaxStackBytes")
}

// The same assembly by hand, without Wire.
func TestByHand(t *testing.T) {
	var logs bytes.Buffer
	logger := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	store := &wireexample.Store{}
	logging, err := behaviors.NewLogging(logger, behaviors.LoggingConfig{})
	require.NoError(t, err)
	recov, err := behaviors.NewRecover(behaviors.RecoverConfig{})
	require.NoError(t, err)
	validation, err := behaviors.NewValidation(behaviors.ValidationConfig{})
	require.NoError(t, err)

	m := mediator.New()
	m.Use(logging.Layer(), recov.Layer(), validation.Layer())
	mediator.Register(m, wireexample.NewCreateUserHandler(store))
	mediator.RegisterNotification(m, wireexample.NewWelcomeHandler(store))
	exercise(t, m, store, &logs)
}
