package secret

import (
	"errors"
	"strings"
	"testing"
)

func TestURL(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"nats://user:secret@host:4222", "nats://user:***@host:4222"},
		{"redis://:s%zzecret@host:6379/0", "redis://:***@host:6379/0"},
		{"nats://token@host", "nats://token@host"},
		{"host:4222", "host:4222"},
		{"amqp:/user:secret@host", "amqp:/user:***@host"}, // one slash: still user info
		{"user:secret@host", "user:***@host"},
	} {
		if got := URL(tc.in); got != tc.want {
			t.Errorf("URL(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestParseNeverQuotesThePassword(t *testing.T) {
	const pw = "Sup3rSecr%zzet"
	for _, raw := range []string{
		"redis://user:" + pw + "@127.0.0.1:6379/0",
		"nats://user:" + pw + "@127.0.0.1:4222/%zz",
		"nats://user:" + pw + "@[::1",
		"nats://us%zzer:" + pw + "@host",
	} {
		_, err := Parse(raw)
		if err == nil {
			t.Errorf("Parse(%s) accepted it", URL(raw))
			continue
		}
		for _, part := range []string{pw, "Sup3r", "%zzet"} {
			if strings.Contains(err.Error(), part) {
				t.Errorf("error leaks %q: %v", part, err)
			}
		}
	}
	if u, err := Parse("nats://u:p%25w@host:4222"); err != nil || u.Host != "host:4222" {
		t.Errorf("valid URL: %v %v", u, err)
	}
}

func TestScrubberKeepsTheChain(t *testing.T) {
	base := errors.New("dial nats://u:hunter22@h failed")
	err := NewScrubber("nats://u:hunter22@h").Error(base)
	if strings.Contains(err.Error(), "hunter22") || !errors.Is(err, base) {
		t.Fatalf("got %v", err)
	}
}
