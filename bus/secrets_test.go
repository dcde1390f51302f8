package bus_test

import (
	"bytes"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"

	busamqp "github.com/tailrace/tailrace/bus/amqp"
	busnats "github.com/tailrace/tailrace/bus/nats"
	"github.com/tailrace/tailrace/bus/redisstream"
)

// lockedBuffer is a log sink shared with the constructors' goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestConstructorsNoSecret gives every bus constructor that takes a URL a
// marker password in URLs that cannot work — unreachable, malformed escapes,
// a missing host — and checks that neither the error nor a log line (at
// debug level) holds it. No server is needed: nothing listens on port 1.
func TestConstructorsNoSecret(t *testing.T) {
	const mark = "Zq7MARKER9x"
	urls := func(scheme string) []string {
		return []string{
			scheme + "://u:" + mark + "@127.0.0.1:1/",
			scheme + "://u:" + mark + "%zz@127.0.0.1:1/",
			scheme + "://u:%" + mark + "@127.0.0.1:1/",
			scheme + "://u:" + mark + "@127.0.0.1:notaport/",
			scheme + "://u:" + mark + "@[::1/",
			scheme + ":/u:" + mark + "@127.0.0.1:1",
			"u:" + mark + "@127.0.0.1:1",
		}
	}
	type ctor struct {
		name   string
		scheme string
		open   func(url string, l watermill.LoggerAdapter) error
	}
	closeIt := func(c interface{ Close() error }, err error) error {
		if err == nil {
			_ = c.Close()
		}
		return err
	}
	ctors := []ctor{
		{"amqp.NewPublisher", "amqp", func(u string, l watermill.LoggerAdapter) error {
			p, err := busamqp.NewPublisher(busamqp.Config{URL: u, DialTimeout: 2 * time.Second}, l)
			return closeIt(p, err)
		}},
		{"amqp.NewSubscriber", "amqp", func(u string, l watermill.LoggerAdapter) error {
			s, err := busamqp.NewSubscriber(busamqp.Config{URL: u, DialTimeout: 2 * time.Second}, l)
			return closeIt(s, err)
		}},
		{"nats.NewPublisher", "nats", func(u string, l watermill.LoggerAdapter) error {
			p, err := busnats.NewPublisher(busnats.Config{URL: u, ConnectTimeout: 2 * time.Second}, l)
			return closeIt(p, err)
		}},
		{"nats.NewSubscriber", "nats", func(u string, l watermill.LoggerAdapter) error {
			s, err := busnats.NewSubscriber(busnats.Config{URL: u, ConnectTimeout: 2 * time.Second}, l)
			return closeIt(s, err)
		}},
		{"redisstream.NewPublisher", "redis", func(u string, l watermill.LoggerAdapter) error {
			p, err := redisstream.NewPublisher(redisstream.Config{URL: u, DialTimeout: 2 * time.Second}, l)
			return closeIt(p, err)
		}},
		{"redisstream.NewSubscriber", "redis", func(u string, l watermill.LoggerAdapter) error {
			s, err := redisstream.NewSubscriber(redisstream.Config{URL: u, DialTimeout: 2 * time.Second}, l)
			return closeIt(s, err)
		}},
	}
	for _, c := range ctors {
		for i, u := range urls(c.scheme) {
			logs := &lockedBuffer{}
			l := watermill.NewSlogLogger(slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
			err := c.open(u, l)
			msg := ""
			if err != nil {
				msg = err.Error()
			}
			if strings.Contains(msg+logs.String(), "MARKER") {
				t.Errorf("%s, URL %d: the password is printed:\nerror: %s\nlog:\n%s", c.name, i, msg, logs.String())
			}
		}
	}
}
