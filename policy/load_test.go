package policy

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/tailrace/tailrace"
)

const minimal = `{"Rules": [{"Priority": 1, "Match": {}, "Publishers": [{"Key": "amqp", "Destination": "x"}]}]}`

func TestRuleErrorFields(t *testing.T) {
	_, err := Parse("p.json", []byte("{\"Rules\": [\n  {\"Name\": \"r\", \"Priority\": 1, \"Match\": {}, \"Publishers\": [{\"Key\": \"nope\", \"Destination\": \"x\"}]}]}"), testOpts())
	var re *RuleError
	if !errors.As(err, &re) {
		t.Fatalf("%T %v", err, err)
	}
	want := RuleError{File: "p.json", Line: 2, Col: 68, Rule: 0, Name: "r", Field: "Publishers[0].Key"}
	got := *re
	got.Err = nil
	if got != want {
		t.Errorf("got %+v\nwant %+v", got, want)
	}
	if !errors.Is(err, ErrUnknownPublisher) {
		t.Error("not ErrUnknownPublisher")
	}
}

func TestKnownPublishersNilSkipsCheck(t *testing.T) {
	src := strings.Replace(minimal, "amqp", "anything", 1)
	if _, err := Parse("p.json", []byte(src), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := Parse("p.json", []byte(src), testOpts()); !errors.Is(err, ErrUnknownPublisher) {
		t.Fatalf("want ErrUnknownPublisher, got %v", err)
	}
}

func TestAllErrorsAtOnceAcrossFiles(t *testing.T) {
	_, err := LoadSources([]Source{
		{Name: "a.json", Data: []byte(`{"Rules": [{"Priority": "x", "Match": {}, "Publishers": []}]}`)},
		{Name: "b.json", Data: []byte(`{"Rules": [`)},
		{Name: "c.json", Data: []byte(`{"Bogus": 1}`)},
	}, nil)
	var n int
	var files []string
	for _, e := range err.(interface{ Unwrap() []error }).Unwrap() {
		var re *RuleError
		if errors.As(e, &re) {
			n++
			files = append(files, re.File)
		}
	}
	if n != 4 || strings.Join(files, ",") != "a.json,a.json,b.json,c.json" {
		t.Fatalf("%d errors from %v:\n%v", n, files, err)
	}
	for _, s := range []error{ErrType, ErrEmpty, ErrSyntax, ErrUnknownField} {
		if !errors.Is(err, s) {
			t.Errorf("missing %v", s)
		}
	}
}

func TestLimits(t *testing.T) {
	rules := func(n int) string {
		var b strings.Builder
		b.WriteString(`{"Rules": [`)
		for i := range n {
			if i > 0 {
				b.WriteByte(',')
			}
			fmt.Fprintf(&b, `{"Priority": %d, "Match": {}, "Publishers": [{"Key": "k", "Destination": "d"}]}`, i)
		}
		b.WriteString(`]}`)
		return b.String()
	}
	deep := `{"X": ` + strings.Repeat("[", 100) + strings.Repeat("]", 100) + `}`
	cases := []struct {
		name string
		src  string
		lim  Limits
		want string
	}{
		{"file size", minimal, Limits{MaxFileBytes: 10}, "file larger than 10 bytes"},
		{"rules", rules(5), Limits{MaxRules: 4}, "more than 4 rules"},
		{"depth", deep, Limits{}, "nesting deeper than 16"},
		{"publishers", `{"Default": {"Publishers": [{"Key":"a","Destination":"1"},{"Key":"a","Destination":"2"},{"Key":"a","Destination":"3"}]}}`, Limits{MaxPublishers: 2}, "more than 2 publishers"},
		{"conditions", `{"Rules": [{"Priority": 1, "Match": {"a": "1", "b": "2", "c": "3"}, "Publishers": [{"Key": "k", "Destination": "d"}]}]}`, Limits{MaxConditions: 2}, "more than 2 conditions"},
		{"values", `{"Rules": [{"Priority": 1, "Match": {"a": ["1", "2", "3"]}, "Publishers": [{"Key": "k", "Destination": "d"}]}]}`, Limits{MaxValues: 2}, "more than 2 values"},
		{"string", `{"Rules": [{"Priority": 1, "Match": {"a": "` + strings.Repeat("x", 20) + `"}, "Publishers": [{"Key": "k", "Destination": "d"}]}]}`, Limits{MaxStringBytes: 10}, "value longer than 10 bytes"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Parse("p.json", []byte(c.src), &LoadOptions{Limits: c.lim})
			if !errors.Is(err, ErrLimit) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want %q", err, c.want)
			}
		})
	}
	t.Run("errors", func(t *testing.T) {
		var b strings.Builder
		b.WriteString(`{`)
		for i := range 50 {
			fmt.Fprintf(&b, `"bad%d": 1,`, i)
		}
		b.WriteString(`"Rules": []}`)
		_, err := Parse("p.json", []byte(b.String()), &LoadOptions{Limits: Limits{MaxErrors: 5}})
		if n := strings.Count(err.Error(), "\n"); n != 5 || !strings.Contains(err.Error(), "45 more errors not shown") {
			t.Fatalf("%d lines: %v", n+1, err)
		}
	})
	t.Run("default rules limit accepts 10000", func(t *testing.T) {
		if _, err := Parse("p.json", []byte(rules(10000)), nil); err != nil {
			t.Fatal(err)
		}
	})
}

func TestVersion(t *testing.T) {
	v := func(files ...string) string {
		t.Helper()
		var srcs []Source
		for i, f := range files {
			srcs = append(srcs, Source{Name: fmt.Sprint(i), Data: []byte(f)})
		}
		p, err := LoadSources(srcs, nil)
		if err != nil {
			t.Fatal(err)
		}
		return p.Version()
	}
	pascal := `{"Default": {"Publishers": [{"Key": "a", "Destination": "d"}]}, "Rules": [{"Name": "n", "Priority": 1, "Match": {"Event": "E"}, "Publishers": [{"Key": "a", "Destination": "x"}]}]}`
	camel := `{
	  "rules": [{"publishers": [{"destination": "x", "key": "a"}], "match": {"event": "E"}, "priority": 1, "name": "n"}],
	  "default": {"publishers": [{"key": "a", "destination": "d"}]}
	}`
	wrapped := `{"PublishingPolicies": ` + pascal + `}`
	split := []string{
		`{"Default": {"Publishers": [{"Key": "a", "Destination": "d"}]}}`,
		`{"Rules": [{"Name": "n", "Priority": 1, "Match": {"Event": "E"}, "Publishers": [{"Key": "a", "Destination": "x"}]}]}`,
	}
	base := v(pascal)
	if len(base) != 16 {
		t.Fatalf("version %q", base)
	}
	for name, got := range map[string]string{"camelCase and key order": v(camel), "wrapper": v(wrapped), "split in files": v(split...)} {
		if got != base {
			t.Errorf("%s changed the version", name)
		}
	}
	for name, src := range map[string]string{
		"priority":    strings.Replace(pascal, `"Priority": 1`, `"Priority": 2`, 1),
		"destination": strings.Replace(pascal, `"x"`, `"y"`, 1),
		"match":       strings.Replace(pascal, `"E"`, `"F"`, 1),
		"default":     strings.Replace(pascal, `"d"`, `"e"`, 1),
		"continue":    strings.Replace(pascal, `"Priority": 1`, `"Priority": 1, "Continue": true`, 1),
	} {
		if v(src) == base {
			t.Errorf("changing %s kept the version", name)
		}
	}
}

func TestPathsAndDirectories(t *testing.T) {
	dir := t.TempDir()
	write := func(name, s string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("b.json", minimal)
	write("a.json", strings.Replace(minimal, `"x"`, `"y"`, 1))
	write(".hidden.json", "garbage")
	write("notes.txt", "garbage")
	if err := os.Mkdir(filepath.Join(dir, "sub.json"), 0o755); err != nil {
		t.Fatal(err)
	}
	files, err := ExpandPaths([]string{dir, filepath.Join(dir, "b.json")})
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 2 || filepath.Base(files[0]) != "a.json" || filepath.Base(files[1]) != "b.json" {
		t.Fatalf("files %v", files)
	}
	p, err := Load([]string{dir}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if r, _ := p.Resolve(nil); r.Routes[0].Destination != "y" {
		t.Errorf("a.json should come first: %v", r.Routes)
	}
	empty := t.TempDir()
	if _, err := Load([]string{empty}, nil); !errors.Is(err, ErrNoFiles) {
		t.Errorf("empty dir: %v", err)
	}
	if _, err := Load([]string{filepath.Join(dir, "missing.json")}, nil); !errors.Is(err, ErrRead) || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing: %v", err)
	}
	if _, err := Load(nil, nil); !errors.Is(err, ErrNoFiles) {
		t.Errorf("no paths: %v", err)
	}
}

// randomPolicy builds a policy exercising every feature from a seed.
func randomPolicy(r *rand.Rand, n int) string {
	vals := []string{"A", "B", "C", "A*", "?", "[AB]", "*"}
	keys := []string{"Event", "Domain", "TenantTier", "region", "a", "b", "c", "d"}
	var b strings.Builder
	b.WriteString(`{"Default": {"Publishers": [{"Key": "k", "Destination": "default"}]}, "Rules": [`)
	for i := range n {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"Priority": %d, "Continue": %v, "Match": {`, r.IntN(5), r.IntN(4) == 0)
		first := true
		for _, k := range keys {
			if r.IntN(len(keys)/2) != 0 {
				continue
			}
			if !first {
				b.WriteByte(',')
			}
			first = false
			if r.IntN(2) == 0 {
				fmt.Fprintf(&b, `%q: %q`, k, vals[r.IntN(3)])
			} else {
				fmt.Fprintf(&b, `%q: [%q, %q]`, k, vals[r.IntN(len(vals))], vals[r.IntN(3)])
			}
		}
		fmt.Fprintf(&b, `}, "Publishers": [{"Key": "k", "Destination": "d%d"}, {"Key": "k", "Destination": "shared"}]}`, i)
	}
	b.WriteString(`]}`)
	return b.String()
}

// naive is the specification: try the rules in evaluation order, no index.
func naive(p *Policy, attrs map[string]string) []string {
	var names []string
	for _, r := range p.rules {
		if r.whyNot(attrs) == "" {
			names = append(names, r.Name)
			if !r.Continue {
				return names
			}
		}
	}
	if p.def != nil {
		names = append(names, "default")
	}
	return names
}

// TestIndexAgreesWithNaive checks that the Event index never changes the
// outcome, and that Explain agrees with Resolve.
func TestIndexAgreesWithNaive(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	vals := []string{"", "A", "B", "C", "AB", "Z"}
	indexed := 0
	for range 300 {
		p, err := Parse("r.json", []byte(randomPolicy(r, 1+r.IntN(20))), nil)
		if err != nil {
			t.Fatal(err)
		}
		indexed += len(p.idxKeys)
		for range 50 {
			attrs := map[string]string{}
			for _, k := range []string{tailrace.MetaKind, tailrace.MetaDomain, tailrace.MetaTenantTier, "region", "a", "b", "c", "d"} {
				if v := vals[r.IntN(len(vals))]; v != "" || r.IntN(2) == 0 {
					attrs[k] = v
				}
			}
			want := strings.Join(naive(p, attrs), ",")
			res, err := p.Resolve(attrs)
			if want == "" {
				if !errors.Is(err, ErrNoRoute) {
					t.Fatalf("want no route, got %v", res.RuleStamp())
				}
				continue
			}
			if got := res.RuleStamp(); got != want {
				t.Fatalf("attrs %v: got %s, want %s", attrs, got, want)
			}
			if e := p.Explain(attrs); strings.Join(e.Rules, ",") != want {
				t.Fatalf("explain %v, want %s", e.Rules, want)
			}
		}
	}
	if indexed < 300*3 {
		t.Errorf("the random policies barely use the index (%d keys)", indexed)
	}
}

func TestResolveAllocs(t *testing.T) {
	p, err := Load([]string{"testdata/semantics.json"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	seed, _ := Load([]string{"testdata/seed.json"}, nil)
	plain := map[string]string{tailrace.MetaKind: "ContentPublishedIntegrationEvent", tailrace.MetaTenantTier: "free"}
	if n := testing.AllocsPerRun(100, func() { _, _ = seed.Resolve(plain) }); n != 0 {
		t.Errorf("Resolve: %v allocs", n)
	}
	chain := map[string]string{tailrace.MetaKind: "OrderPlaced", tailrace.MetaDomain: "Orders"}
	var res Result
	if n := testing.AllocsPerRun(100, func() { _ = p.ResolveInto(chain, &res) }); n != 0 {
		t.Errorf("ResolveInto with Continue: %v allocs", n)
	}
}

func TestConcurrentResolve(t *testing.T) {
	p, err := Load([]string{"testdata/semantics.json"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var res Result
			for j := range 1000 {
				attrs := map[string]string{tailrace.MetaKind: []string{"OrderPlaced", "Content", "X"}[(i+j)%3], tailrace.MetaDomain: "Orders"}
				if err := p.ResolveInto(attrs, &res); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
}

func TestByteOrderMark(t *testing.T) {
	if _, err := Parse("bom.json", append([]byte{0xEF, 0xBB, 0xBF}, minimal...), nil); err != nil {
		t.Fatal(err)
	}
	_, err := Parse("bom.json", append([]byte{0xEF, 0xBB, 0xBF}, `{"Bad": 1}`...), nil)
	var re *RuleError
	if !errors.As(err, &re) || re.Line != 1 || re.Col != 5 {
		t.Fatalf("%v", err)
	}
}

func TestInvalidUTF8Rejected(t *testing.T) {
	doc := "{\"Rules\": [{\"Priority\": 1,\n \"Match\": {\"Event\": \"ok\xff\xfe\"}, \"Publishers\": [{\"Key\": \"amqp\", \"Destination\": \"x\"}]}]}"
	_, err := Parse("bad.json", []byte(doc), nil)
	var re *RuleError
	if !errors.As(err, &re) || !errors.Is(err, ErrSyntax) || re.Line != 2 || re.Col != 24 {
		t.Fatalf("got %v (%+v), want a syntax error at bad.json:2:24", err, re)
	}
	if !strings.Contains(err.Error(), "UTF-8") {
		t.Errorf("error does not say why: %v", err)
	}
	// Valid multi-byte UTF-8 is fine.
	ok := strings.Replace(minimal, `"x"`, `"café-€-😀"`, 1)
	if _, err := Parse("ok.json", []byte(ok), nil); err != nil {
		t.Fatal(err)
	}
}

// TestUnknownFieldSuggestion checks that a misspelt field name gets a
// "did you mean" with the closest defined name, at every level, and that a
// name close to nothing gets none.
func TestUnknownFieldSuggestion(t *testing.T) {
	cases := []struct{ src, want string }{
		{`{"Rules": [{"Priorty": 1, "Match": {}, "Publishers": [{"Key": "amqp", "Destination": "x"}]}]}`, `"Priorty" (did you mean "Priority"?)`},
		{`{"Rules": [{"Priority": 1, "Match": {}, "Publishers": [{"Key": "amqp", "Destinaton": "x"}]}]}`, `"Destinaton" (did you mean "Destination"?)`},
		{`{"Rules": [{"Priority": 1, "Mtach": {}, "Publishers": [{"Key": "amqp", "Destination": "x"}]}]}`, `"Mtach" (did you mean "Match"?)`},
		{`{"Rulez": []}`, `"Rulez" (did you mean "Rules"?)`},
		{`{"Rules": [{"priority": 1, "Match": {}, "Publishers": [{"Key": "amqp", "Destination": "x"}]}]}`, ""},
	}
	for _, c := range cases {
		_, err := Parse("p.json", []byte(c.src), nil)
		if !errors.Is(err, ErrUnknownField) && c.want != "" {
			t.Errorf("%s: %v", c.src, err)
			continue
		}
		if c.want != "" && !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v; want %s", c.src, err, c.want)
		}
	}
	if _, err := Parse("p.json", []byte(`{"Rules": [{"Priority": 1, "Zzz": 1, "Match": {}, "Publishers": [{"Key": "amqp", "Destination": "x"}]}]}`), nil); err == nil ||
		strings.Contains(err.Error(), "did you mean") {
		t.Errorf("no close name: %v", err)
	}
	if d := editDistance("priorty", "priority"); d != 1 {
		t.Errorf("editDistance = %d", d)
	}
	if d := editDistance("mtach", "match"); d != 1 {
		t.Errorf("editDistance swap = %d", d)
	}
}
