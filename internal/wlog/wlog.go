// Package wlog adapts a *slog.Logger to Watermill's LoggerAdapter, checking
// the level before anything is built.
//
// watermill.NewSlogLogger converts a call's fields into slog arguments
// before slog looks at the level, so a router pays for its two per-message
// Trace calls (a slice, boxed values, a deep slog frame that grows the
// handler goroutine's stack) even when nothing is logged. The relay and the
// bus consumer run one handler per message; this adapter makes a disabled
// level cost one Enabled call.
package wlog

import (
	"context"
	"log/slog"

	"github.com/ThreeDotsLabs/watermill"
)

// Adapter is a watermill.LoggerAdapter over a *slog.Logger.
type Adapter struct {
	l *slog.Logger
	// infoAsDebug moves Watermill's Info (router and subscriber
	// lifecycle chatter) down to Debug.
	infoAsDebug bool
}

var _ watermill.LoggerAdapter = (*Adapter)(nil)

// New returns an adapter logging to l (nil: slog.Default()). With
// infoAsDebug, Watermill's Info lines are logged at Debug.
func New(l *slog.Logger, infoAsDebug bool) *Adapter {
	if l == nil {
		l = slog.Default()
	}
	return &Adapter{l: l, infoAsDebug: infoAsDebug}
}

func (a *Adapter) log(level slog.Level, msg string, err error, fields watermill.LogFields) {
	ctx := context.Background()
	if !a.l.Enabled(ctx, level) {
		return
	}
	args := appendFields(make([]any, 0, 2*len(fields)+2), fields)
	if err != nil {
		args = append(args, "error", err)
	}
	a.l.Log(ctx, level, msg, args...)
}

// Error logs at slog.LevelError with the error under the key "error".
func (a *Adapter) Error(msg string, err error, fields watermill.LogFields) {
	a.log(slog.LevelError, msg, err, fields)
}

// Info logs at slog.LevelInfo, or slog.LevelDebug with infoAsDebug.
func (a *Adapter) Info(msg string, fields watermill.LogFields) {
	level := slog.LevelInfo
	if a.infoAsDebug {
		level = slog.LevelDebug
	}
	a.log(level, msg, nil, fields)
}

// Debug logs at slog.LevelDebug.
func (a *Adapter) Debug(msg string, fields watermill.LogFields) {
	a.log(slog.LevelDebug, msg, nil, fields)
}

// Trace logs at watermill.LevelTrace (slog.LevelDebug - 4).
func (a *Adapter) Trace(msg string, fields watermill.LogFields) {
	a.log(watermill.LevelTrace, msg, nil, fields)
}

// With returns an adapter that adds fields to every line.
func (a *Adapter) With(fields watermill.LogFields) watermill.LoggerAdapter {
	if len(fields) == 0 {
		return a
	}
	args := appendFields(make([]any, 0, 2*len(fields)), fields)
	return &Adapter{l: a.l.With(args...), infoAsDebug: a.infoAsDebug}
}

// appendFields appends fields to dst as slog key-value arguments.
func appendFields(dst []any, fields watermill.LogFields) []any {
	for k, v := range fields {
		dst = append(dst, k, v)
	}
	return dst
}
