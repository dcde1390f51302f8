package behaviors

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/tailrace/tailrace/mediator"
)

// DefaultLogMessage is the default LoggingConfig.Message.
const DefaultLogMessage = "mediator dispatch"

// LoggingConfig configures Logging.
type LoggingConfig struct {
	// Message is the log message. Default DefaultLogMessage.
	Message string
	// Level is the level of successful dispatches. Default slog.LevelDebug.
	Level slog.Leveler
	// ErrorLevel is the level of failed (or panicking) dispatches. Default
	// slog.LevelError.
	ErrorLevel slog.Leveler
	// ErrorLevelFor, when set, chooses the level of a dispatch that
	// returned an error, from the error: an application logs the failures
	// its callers expect and handle — not found, a conflict, invalid input
	// — below ERROR, and the rest at ErrorLevel. It is not consulted for
	// panics (always ErrorLevel). Default nil: every failure at ErrorLevel.
	ErrorLevelFor func(error) slog.Level
	// LogRequest adds the request itself as the "request" attribute.
	// Default false: requests may carry personal data or secrets, so
	// payloads are never logged unless asked for.
	LogRequest bool
}

func (c *LoggingConfig) setDefaults() {
	if c.Message == "" {
		c.Message = DefaultLogMessage
	}
	if c.Level == nil {
		c.Level = slog.LevelDebug
	}
	if c.ErrorLevel == nil {
		c.ErrorLevel = slog.LevelError
	}
}

// Validate reports every problem of c at once. Every field has a usable
// default, so only an explicitly odd configuration fails.
func (c LoggingConfig) Validate() error {
	var errs []error
	if c.Level != nil && c.ErrorLevel != nil && c.ErrorLevel.Level() < c.Level.Level() {
		errs = append(errs, errors.New("behaviors: LoggingConfig.ErrorLevel is below Level"))
	}
	return errors.Join(errs...)
}

// Logging logs one record per dispatch, after it ends, with the attributes
// kind, type (command, query, notification, stream), duration, outcome (ok,
// error or panic) and, on failure, error. It never logs the request unless
// LoggingConfig.LogRequest is set, and never the response. A panic is
// logged with outcome=panic and keeps propagating (Logging does not recover;
// put Recover inside it to log panics as errors).
type Logging struct {
	logger *slog.Logger
	cfg    LoggingConfig
}

// NewLogging returns a Logging behavior writing to logger (slog.Default()
// if nil).
func NewLogging(logger *slog.Logger, cfg LoggingConfig) (*Logging, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if logger == nil {
		logger = slog.Default()
	}
	return &Logging{logger: logger, cfg: cfg}, nil
}

// Layer returns l at OrderLogging, wrapping every dispatch.
func (l *Logging) Layer() mediator.Layer {
	return mediator.Layer{Order: OrderLogging, Behavior: l}
}

// Handle implements mediator.Behavior.
func (l *Logging) Handle(ctx context.Context, req any, info mediator.Info, next mediator.Next) (res any, err error) {
	start := time.Now()
	returned := false
	defer func() {
		outcome, level := "ok", l.cfg.Level.Level()
		switch {
		case !returned:
			outcome, level = "panic", l.cfg.ErrorLevel.Level()
		case err != nil:
			outcome, level = "error", l.cfg.ErrorLevel.Level()
			if l.cfg.ErrorLevelFor != nil {
				level = l.cfg.ErrorLevelFor(err)
			}
		}
		if !l.logger.Enabled(ctx, level) {
			return
		}
		attrs := make([]slog.Attr, 0, 6)
		attrs = append(attrs,
			slog.String("kind", info.Kind),
			slog.String("type", info.Type.String()),
			slog.Duration("duration", time.Since(start)),
			slog.String("outcome", outcome),
		)
		if err != nil {
			attrs = append(attrs, slog.String("error", err.Error()))
		}
		if l.cfg.LogRequest {
			attrs = append(attrs, slog.Any("request", req))
		}
		l.logger.LogAttrs(ctx, level, l.cfg.Message, attrs...)
	}()
	res, err = next(ctx, req)
	returned = true
	return res, err
}
