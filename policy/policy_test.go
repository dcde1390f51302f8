package policy

import (
	"encoding/json"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the golden files under testdata/")

var testPublishers = map[string]bool{"rabbitmq": true, "kafka": true, "amqp": true, "nats": true}

func testOpts() *LoadOptions {
	return &LoadOptions{KnownPublishers: func(k string) bool { return testPublishers[k] }}
}

type resolveCase struct {
	Name    string            `json:"name"`
	Attrs   map[string]string `json:"attrs"`
	Rule    string            `json:"rule"`
	Rules   []string          `json:"rules"`
	Routes  []string          `json:"routes"`
	NoRoute bool              `json:"noRoute"`
}

// TestResolveTable runs testdata/cases/*.json: each names policy paths (under
// testdata/) and the expected outcome of Resolve, ResolveInto and Explain
// for a list of messages.
func TestResolveTable(t *testing.T) {
	files, _ := filepath.Glob("testdata/cases/*.json")
	if len(files) == 0 {
		t.Fatal("no cases")
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			var suite struct {
				Paths []string      `json:"paths"`
				Cases []resolveCase `json:"cases"`
			}
			data, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			if err := json.Unmarshal(data, &suite); err != nil {
				t.Fatal(err)
			}
			var paths []string
			for _, p := range suite.Paths {
				paths = append(paths, filepath.Join("testdata", p))
			}
			p, err := Load(paths, testOpts())
			if err != nil {
				t.Fatal(err)
			}
			var reused Result
			for _, c := range suite.Cases {
				t.Run(c.Name, func(t *testing.T) {
					res, err := p.Resolve(c.Attrs)
					checkResult(t, c, res, err)
					err = p.ResolveInto(c.Attrs, &reused)
					checkResult(t, c, reused, err)
					e := p.Explain(c.Attrs)
					if e.Routed == c.NoRoute {
						t.Errorf("Explain routed=%v", e.Routed)
					}
					if !c.NoRoute && (e.Decision == nil || e.Decision.Rule != c.Rule) {
						t.Errorf("Explain decision %+v, want %s", e.Decision, c.Rule)
					}
				})
			}
		})
	}
}

func checkResult(t *testing.T, c resolveCase, res Result, err error) {
	t.Helper()
	if c.NoRoute {
		if !errors.Is(err, ErrNoRoute) || res.Rule != nil || len(res.Routes) != 0 {
			t.Fatalf("want ErrNoRoute, got %v %+v", err, res)
		}
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	if res.Rule == nil || res.Rule.Name != c.Rule {
		t.Errorf("rule %v, want %s", res.Rule, c.Rule)
	}
	wantRules := c.Rules
	if wantRules == nil {
		wantRules = []string{c.Rule}
	}
	var got []string
	for _, m := range res.Matched {
		got = append(got, m.Name)
	}
	if strings.Join(got, ",") != strings.Join(wantRules, ",") {
		t.Errorf("matched %v, want %v", got, wantRules)
	}
	if res.RuleStamp() != strings.Join(wantRules, ",") {
		t.Errorf("stamp %q", res.RuleStamp())
	}
	got = got[:0]
	for _, r := range res.Routes {
		got = append(got, r.Key+" "+r.Destination)
	}
	if strings.Join(got, "|") != strings.Join(c.Routes, "|") {
		t.Errorf("routes %q, want %q", got, c.Routes)
	}
	if res.Version == "" {
		t.Error("no version")
	}
}

// TestInvalidGolden loads each file and directory under testdata/invalid and
// compares every error reported with its .err golden file.
func TestInvalidGolden(t *testing.T) {
	entries, err := os.ReadDir("testdata/invalid")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		name := e.Name()
		if strings.HasSuffix(name, ".err") {
			continue
		}
		t.Run(name, func(t *testing.T) {
			p, err := Load([]string{filepath.Join("testdata/invalid", name)}, testOpts())
			if err == nil {
				t.Fatalf("loaded %d rules, want errors", len(p.Rules()))
			}
			var re *RuleError
			if !errors.As(err, &re) {
				t.Fatalf("not a *RuleError: %T", err)
			}
			golden(t, filepath.Join("testdata/invalid", strings.TrimSuffix(name, ".json")+".err"), err.Error()+"\n")
		})
	}
}

// TestLintGolden compares Lint's warnings with testdata/lint/*.warn, and
// lints the seed.
func TestLintGolden(t *testing.T) {
	files, _ := filepath.Glob("testdata/lint/*.json")
	files = append(files, "testdata/seed.json")
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			p, err := Load([]string{f}, testOpts())
			if err != nil {
				t.Fatal(err)
			}
			var b strings.Builder
			for _, w := range p.Lint() {
				b.WriteString(w.String() + "\n")
			}
			golden(t, strings.TrimSuffix(f, ".json")+".warn", b.String())
		})
	}
}

func golden(t *testing.T, path, got string) {
	t.Helper()
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if got != string(want) {
		t.Errorf("%s differs:\n--- got\n%s--- want\n%s", path, got, want)
	}
}
