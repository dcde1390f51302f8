package amqp

import (
	"errors"
	"strings"
	"testing"
)

func TestRedactURL(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"amqp://user:secret@host:5672/vh", "amqp://user:***@host:5672/vh"},
		{"amqp://user:s%zzecret@host/", "amqp://user:***@host/"},
		{"amqp://us%er:p@ss@host/", "amqp://us%er:***@host/"},
		{"amqp://user@host/", "amqp://user@host/"},
		{"amqp://host/", "amqp://host/"},
		{"user:secret@host", "user:***@host"},
		{"amqps://u:p%2Fw@h?heartbeat=5", "amqps://u:***@h?heartbeat=5"},
		{"", ""},
	} {
		if got := RedactURL(tc.in); got != tc.want {
			t.Errorf("RedactURL(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestParseURLNeverQuotesThePassword(t *testing.T) {
	const secret = "Sup3rSecr%zzet"
	for _, raw := range []string{
		"amqp://user:" + secret + "@127.0.0.1:5672/",     // malformed escape in the password
		"amqp://user:" + secret + "@127.0.0.1:5672/%zz",  // malformed escape in the vhost
		"amqp://user:" + secret + "@127.0.0.1:notaport/", // bad port
		"http://user:" + secret + "@127.0.0.1/",          // wrong scheme
		"user:" + secret + "@127.0.0.1",                  // no scheme
		"amqp://user:" + secret + "@[::1/",               // bad host
	} {
		_, err := parseURL(raw)
		if err == nil {
			t.Errorf("parseURL(%s) accepted it", RedactURL(raw))
			continue
		}
		if !errors.Is(err, ErrInvalidURL) {
			t.Errorf("error %q does not wrap ErrInvalidURL", err)
		}
		for _, part := range []string{secret, "Sup3r", "ecr%zz", "%zzet"} {
			if strings.Contains(err.Error(), part) {
				t.Errorf("error leaks %q: %s", part, err)
			}
		}
	}
	if _, err := parseURL("amqp://user:p%25ss@127.0.0.1:5672/"); err != nil {
		t.Errorf("a valid escaped password was refused: %v", err)
	}
}

func TestScrubber(t *testing.T) {
	raw := "amqp://user:hunter2@host/"
	s := newScrubber(raw)
	err := s.Error(errors.New(`parse "` + raw + `": boom, hunter2`))
	if strings.Contains(err.Error(), "hunter2") {
		t.Fatalf("scrubbed error still has the password: %s", err)
	}
	if !strings.Contains(err.Error(), "amqp://user:***@host/") {
		t.Fatalf("scrubbed error lost the redacted URL: %s", err)
	}
}

func TestZeroConfigValidatesBesidesTheURL(t *testing.T) {
	if err := (Config{URL: "amqp://guest:guest@127.0.0.1:5672/"}).Validate(); err != nil {
		t.Fatalf("a Config with only a URL: %v", err)
	}
}
