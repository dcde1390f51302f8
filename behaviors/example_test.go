package behaviors_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"

	"github.com/tailrace/tailrace/behaviors"
	"github.com/tailrace/tailrace/mediator"
)

type RegisterUser struct {
	mediator.Command[int]
	Email string
}

func (RegisterUser) Kind() string { return "users.register" }

func (c RegisterUser) Validate() error {
	if c.Email == "" {
		return behaviors.FieldError{Field: "email", Message: "required"}
	}
	return nil
}

// The stock behaviors at their suggested orders: the order of the Use
// arguments does not matter.
func Example() {
	// A logger without timestamps and durations, for a stable output.
	logger := slog.New(slog.NewTextHandler(os.Stdout, &slog.HandlerOptions{
		ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
			if a.Key == slog.TimeKey || a.Key == "duration" {
				return slog.Attr{}
			}
			return a
		},
	}))
	logging, _ := behaviors.NewLogging(logger, behaviors.LoggingConfig{Level: slog.LevelInfo})
	recov, _ := behaviors.NewRecover(behaviors.RecoverConfig{})
	validation, _ := behaviors.NewValidation(behaviors.ValidationConfig{})
	retry, _ := behaviors.NewRetry(behaviors.RetryConfig{})
	timeout, _ := behaviors.NewTimeout(behaviors.TimeoutConfig{})

	m := mediator.New()
	m.Use(timeout.Layer(), retry.Layer(), validation.Layer(), recov.Layer(), logging.Layer())
	mediator.RegisterFunc(m, func(ctx context.Context, c RegisterUser) (int, error) {
		if c.Email == "crash@example.com" {
			panic("bug")
		}
		return 42, nil
	})

	ctx := context.Background()
	id, err := mediator.Send(ctx, m, RegisterUser{Email: "ada@example.com"})
	fmt.Println(id, err)

	_, err = mediator.Send(ctx, m, RegisterUser{})
	var ve *behaviors.ValidationError
	fmt.Println(errors.As(err, &ve), ve.Fields)

	_, err = mediator.Send(ctx, m, RegisterUser{Email: "crash@example.com"})
	var pe *behaviors.PanicError
	fmt.Println(errors.As(err, &pe), pe.Value)
	// Output:
	// level=INFO msg="mediator dispatch" kind=users.register type=command outcome=ok
	// 42 <nil>
	// level=ERROR msg="mediator dispatch" kind=users.register type=command outcome=error error="behaviors: invalid \"users.register\": email: required"
	// true [email: required]
	// level=ERROR msg="mediator dispatch" kind=users.register type=command outcome=error error="behaviors: \"users.register\" panicked: bug"
	// true bug
}
