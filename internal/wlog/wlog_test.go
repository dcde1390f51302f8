package wlog

import (
	"bytes"
	"errors"
	"log/slog"
	"strings"
	"testing"

	"github.com/ThreeDotsLabs/watermill"
)

func TestLevelsAndFields(t *testing.T) {
	var buf bytes.Buffer
	l := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	a := New(l, true).With(watermill.LogFields{"component": "relay"})

	a.Trace("trace line", watermill.LogFields{"k": "v"})
	a.Info("info line", nil)
	a.Debug("debug line", watermill.LogFields{"n": 3})
	a.Error("error line", errors.New("boom"), watermill.LogFields{"topic": "t"})

	out := buf.String()
	if strings.Contains(out, "trace line") {
		t.Errorf("trace logged at debug level:\n%s", out)
	}
	for _, want := range []string{
		"level=DEBUG msg=\"info line\" component=relay",
		"level=DEBUG msg=\"debug line\" component=relay n=3",
		"level=ERROR msg=\"error line\" component=relay topic=t error=boom",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("missing %q in:\n%s", want, out)
		}
	}
}

func TestInfoStaysInfo(t *testing.T) {
	var buf bytes.Buffer
	a := New(slog.New(slog.NewTextHandler(&buf, nil)), false)
	a.Info("hello", nil)
	if !strings.Contains(buf.String(), "level=INFO msg=hello") {
		t.Errorf("got %q", buf.String())
	}
}

// A disabled level must not allocate: the router calls Trace twice per
// message.
func TestDisabledLevelDoesNotAllocate(t *testing.T) {
	a := New(slog.New(slog.DiscardHandler), false)
	fields := watermill.LogFields{"message_uuid": "x", "handler_name": "h"}
	if n := testing.AllocsPerRun(100, func() { a.Trace("Received message", fields) }); n != 0 {
		t.Errorf("Trace at a disabled level: %v allocs, want 0", n)
	}
}

func BenchmarkTraceDisabled(b *testing.B) {
	fields := watermill.LogFields{"message_uuid": "x", "handler_name": "h"}
	l := slog.New(slog.NewTextHandler(&bytes.Buffer{}, nil)) // Info: Trace is off
	b.Run("watermill.NewSlogLogger", func(b *testing.B) {
		a := watermill.NewSlogLogger(l)
		b.ReportAllocs()
		for b.Loop() {
			a.Trace("Received message", fields)
		}
	})
	b.Run("wlog", func(b *testing.B) {
		a := New(l, false)
		b.ReportAllocs()
		for b.Loop() {
			a.Trace("Received message", fields)
		}
	})
}
