package amqp

import (
	"errors"
	"fmt"
	"net/url"
	"strings"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"github.com/tailrace/tailrace/bus/internal/secret"
)

// RedactURL returns raw with its password replaced by "***"
// (amqp://user:***@host/vhost). It works on malformed input too — a bad
// %-escape, a missing scheme — so it is safe to call on whatever a user
// configured before it was validated.
func RedactURL(raw string) string { return secret.URL(raw) }

type scrubber = secret.Scrubber

func newScrubber(raw string) scrubber { return secret.NewScrubber(raw) }

// ErrInvalidURL is wrapped by every URL validation error. The messages show
// the URL with its password redacted and never quote the password.
var ErrInvalidURL = errors.New("bus/amqp: invalid URL")

// parseURL validates raw as an AMQP URI without ever putting its password in
// an error.
func parseURL(raw string) (amqp091.URI, error) {
	red := RedactURL(raw)
	if raw == "" {
		return amqp091.URI{}, fmt.Errorf("%w: empty", ErrInvalidURL)
	}
	scheme, rest, ok := strings.Cut(raw, "://")
	if !ok {
		return amqp091.URI{}, fmt.Errorf("%w %s: want amqp://user:password@host:port/vhost", ErrInvalidURL, red)
	}
	if scheme != "amqp" && scheme != "amqps" {
		return amqp091.URI{}, fmt.Errorf("%w %s: scheme must be amqp or amqps", ErrInvalidURL, red)
	}
	if i := strings.IndexAny(rest, "/?#"); i >= 0 {
		rest = rest[:i]
	}
	if at := strings.LastIndex(rest, "@"); at >= 0 {
		user, pass, _ := strings.Cut(rest[:at], ":")
		if _, err := url.PathUnescape(user); err != nil {
			return amqp091.URI{}, fmt.Errorf("%w %s: the user name has a malformed %%-escape", ErrInvalidURL, red)
		}
		if _, err := url.PathUnescape(pass); err != nil {
			return amqp091.URI{}, fmt.Errorf("%w %s: the password has a malformed %%-escape (escape %% as %%25)", ErrInvalidURL, red)
		}
	}
	uri, err := amqp091.ParseURI(raw)
	if err != nil {
		// amqp091 and net/url quote the URL in their errors: scrub it.
		return amqp091.URI{}, fmt.Errorf("%w %s: %s", ErrInvalidURL, red, newScrubber(raw).String(err.Error()))
	}
	return uri, nil
}
