package policy

import (
	"bytes"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tailrace/tailrace"
)

// syncBuffer is a log sink safe for the watcher's goroutine.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func policyWith(dest string) string {
	return `{"Rules": [{"Name": "all", "Priority": 1, "Match": {}, "Publishers": [{"Key": "amqp", "Destination": "` + dest + `"}]}]}`
}

// writeAtomic writes like editors and deployment tools do: a temporary
// file renamed over the old one.
func writeAtomic(t *testing.T, path, data string) {
	t.Helper()
	tmp := filepath.Join(filepath.Dir(path), ".tmp-"+filepath.Base(path))
	if err := os.WriteFile(tmp, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func destOf(p *Policy) string {
	r, err := p.Resolve(map[string]string{tailrace.MetaKind: "X"})
	if err != nil {
		return err.Error()
	}
	return r.Routes[0].Destination
}

func TestWatcher(t *testing.T) {
	for _, mode := range []string{"directory", "file"} {
		t.Run(mode, func(t *testing.T) {
			dir := t.TempDir()
			file := filepath.Join(dir, "routing.json")
			if err := os.WriteFile(file, []byte(policyWith("v1")), 0o644); err != nil {
				t.Fatal(err)
			}
			path := dir
			if mode == "file" {
				path = file
			}
			var logs syncBuffer
			var reloads, rejects atomic.Int32
			w, err := NewWatcher(slog.New(slog.NewTextHandler(&logs, nil)), WatcherConfig{
				Paths:    []string{path},
				Debounce: 20 * time.Millisecond,
				OnReload: func(p *Policy, err error) {
					if err != nil {
						rejects.Add(1)
					} else {
						reloads.Add(1)
					}
				},
			})
			if err != nil {
				t.Fatal(err)
			}
			defer w.Close()

			// Readers resolve all along, as the routing publisher would.
			stop := make(chan struct{})
			var wg sync.WaitGroup
			for range 2 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					var res Result
					for {
						select {
						case <-stop:
							return
						default:
						}
						if err := w.Policy().ResolveInto(map[string]string{tailrace.MetaKind: "X"}, &res); err != nil {
							t.Error(err)
							return
						}
					}
				}()
			}
			defer func() { close(stop); wg.Wait() }()

			if got := destOf(w.Policy()); got != "v1" {
				t.Fatalf("initial %s", got)
			}
			v1 := w.Policy().Version()

			writeAtomic(t, file, policyWith("v2"))
			eventually(t, "the valid change", func() bool { return destOf(w.Policy()) == "v2" })
			v2 := w.Policy().Version()
			if s := w.Status(); s.Version != v2 || s.Reloads != 1 || s.LastError != nil || v1 == v2 {
				t.Fatalf("status %+v", s)
			}

			// A bad change: the last good policy stays, the error is visible.
			writeAtomic(t, file, "{\n  \"Rules\": [ oops ]\n}")
			eventually(t, "the error", func() bool { return w.Healthy() != nil })
			if got := destOf(w.Policy()); got != "v2" {
				t.Fatalf("bad file replaced the policy: %s", got)
			}
			herr := w.Healthy()
			if !errors.Is(herr, ErrSyntax) || !strings.Contains(herr.Error(), "routing.json:2:14") || !strings.Contains(herr.Error(), "still serving version "+v2) {
				t.Fatalf("Healthy: %v", herr)
			}
			if s := w.Status(); s.Failures < 1 || s.LastErrorAt.IsZero() || s.Version != v2 {
				t.Fatalf("status %+v", s)
			}
			eventually(t, "the log", func() bool { return strings.Contains(logs.String(), "reload rejected; keeping the last good policy") })

			// Fixed: swapped in, error cleared.
			writeAtomic(t, file, policyWith("v3"))
			eventually(t, "the fix", func() bool { return destOf(w.Policy()) == "v3" })
			eventually(t, "health", func() bool { return w.Healthy() == nil })
			if reloads.Load() != 2 || rejects.Load() < 1 {
				t.Errorf("OnReload: %d reloads, %d rejects", reloads.Load(), rejects.Load())
			}

			// Reload with unchanged files keeps the version and counts nothing.
			if err := w.Reload(); err != nil {
				t.Fatal(err)
			}
			if s := w.Status(); s.Reloads != 2 {
				t.Errorf("unchanged reload counted: %+v", s)
			}

			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			if err := w.Close(); err != nil {
				t.Fatal("second Close:", err)
			}
			// After Close, changes are ignored and Policy still works.
			writeAtomic(t, file, policyWith("v4"))
			time.Sleep(100 * time.Millisecond)
			if got := destOf(w.Policy()); got != "v3" {
				t.Errorf("closed watcher reloaded: %s", got)
			}
		})
	}
}

func TestWatcherDebounce(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "p.json")
	if err := os.WriteFile(file, []byte(policyWith("v0")), 0o644); err != nil {
		t.Fatal(err)
	}
	var reloads atomic.Int32
	w, err := NewWatcher(slog.New(slog.DiscardHandler), WatcherConfig{
		Paths: []string{dir}, Debounce: 600 * time.Millisecond,
		OnReload: func(*Policy, error) { reloads.Add(1) },
	})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	for i := range 5 {
		writeAtomic(t, file, policyWith("burst"+string(rune('a'+i))))
		time.Sleep(5 * time.Millisecond)
	}
	eventually(t, "the burst", func() bool { return destOf(w.Policy()) == "burste" })
	time.Sleep(700 * time.Millisecond)
	if n := reloads.Load(); n != 1 {
		t.Errorf("%d reloads for one burst, want 1", n)
	}
}

func TestWatcherInvalidStart(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "p.json"), []byte("{"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := NewWatcher(nil, WatcherConfig{Paths: []string{dir}}); !errors.Is(err, ErrSyntax) {
		t.Fatalf("got %v", err)
	}
	if _, err := NewWatcher(nil, WatcherConfig{Debounce: -1}); err == nil || !strings.Contains(err.Error(), "Paths is empty") || !strings.Contains(err.Error(), "negative") {
		t.Fatalf("got %v", err)
	}
}

func TestStatic(t *testing.T) {
	p, err := Parse("p.json", []byte(policyWith("s")), nil)
	if err != nil {
		t.Fatal(err)
	}
	var prov Provider = Static(p)
	if prov.Policy() != p {
		t.Fatal("Static")
	}
	var _ Provider = (*Watcher)(nil)
}
