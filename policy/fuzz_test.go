package policy

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tailrace/tailrace"
)

// FuzzLoad feeds arbitrary bytes to the loader: it must never panic, and
// whatever it accepts must resolve, explain and lint consistently.
//
//	go test -run '^$' -fuzz FuzzLoad -fuzztime 60s ./policy/
func FuzzLoad(f *testing.F) {
	_ = filepath.WalkDir("testdata", func(path string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasSuffix(path, ".json") && !strings.Contains(path, "fuzz") {
			if data, err := os.ReadFile(path); err == nil {
				f.Add(data)
			}
		}
		return nil
	})
	f.Add([]byte(`{"Rules":[{"Priority":1,"Match":{"Event":["A*","[","\\"]},"Publishers":[{"Key":"k","Destination":"d"}]}]}`))
	f.Add([]byte(`{"PublishingPolicies":{"PublishingPolicies":{}}}`))
	f.Add([]byte(`{"Default":{"Publishers":[{"Key":"k","Destination":"d"}]},"Rules":[{"Priority":-2147483648,"Continue":true,"Match":{},"Publishers":[{"Key":"k","Destination":"d"}]}]}`))
	lim := Limits{MaxRules: 200, MaxDepth: 12, MaxErrors: 20}
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := Parse("fuzz.json", data, &LoadOptions{Limits: lim, KnownPublishers: func(k string) bool { return k != "unknown" }})
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error")
			}
			return
		}
		if len(p.Version()) != 16 {
			t.Fatalf("version %q", p.Version())
		}
		// Attributes drawn from the document's own strings, so that rules
		// can match.
		words := strings.FieldsFunc(string(data), func(r rune) bool { return r == '"' || r == ',' || r == ' ' })
		for i := 0; i < len(words) && i < 8; i++ {
			attrs := map[string]string{tailrace.MetaKind: words[i], tailrace.MetaDomain: words[len(words)-1-i], tailrace.MetaTenantTier: words[i/2]}
			res, rerr := p.Resolve(attrs)
			e := p.Explain(attrs)
			if (rerr == nil) != e.Routed || strings.Join(e.Rules, ",") != res.RuleStamp() {
				t.Fatalf("explain %v disagrees with resolve %q %v", e.Rules, res.RuleStamp(), rerr)
			}
			_ = e.String()
		}
		for _, w := range p.Lint() {
			_ = w.String()
		}
	})
}
