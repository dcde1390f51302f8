package wireexample

import (
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/tailrace/tailrace/policy"
)

func TestNewProvider(t *testing.T) {
	dir := t.TempDir()
	src := `{"Default": {"Publishers": [{"Key": "amqp", "Destination": "events"}]}}`
	if err := os.WriteFile(filepath.Join(dir, "routing.json"), []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	prov, cleanup, err := NewProvider(slog.New(slog.DiscardHandler), policy.WatcherConfig{Paths: []string{dir}})
	if err != nil {
		t.Fatal(err)
	}
	defer cleanup()
	res, err := prov.Policy().Resolve(nil)
	if err != nil || res.Routes[0].Destination != "events" {
		t.Fatal(res, err)
	}
	if _, _, err := NewProvider(nil, policy.WatcherConfig{}); err == nil {
		t.Fatal("empty config accepted")
	}
}
