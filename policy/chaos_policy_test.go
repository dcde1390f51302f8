package policy_test

import (
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/tailrace/tailrace/policy"
)

// TestChaosHostilePolicyFiles feeds the loader documents built to hurt it
// (make chaos): over-sized, deeply nested, too many rules, huge strings,
// broken encodings, duplicate keys, overflowing numbers. Each must be
// rejected with a non-empty error, without a panic, within a time bound;
// the well-formed document next to them must still load. The ledger is
// logged as a "CHAOS LEDGER" line.
func TestChaosHostilePolicyFiles(t *testing.T) {
	good, err := os.ReadFile("testdata/seed.json")
	if err != nil {
		t.Fatal(err)
	}
	rule := func(i int) string {
		return fmt.Sprintf(`{"Priority":%d,"Match":{"Event":"E%d"},"Publishers":[{"Key":"rabbitmq","Destination":"d%d"}]}`, i, i, i)
	}
	rules := func(n int) string {
		var b strings.Builder
		b.WriteString(`{"PublishingPolicies":{"Rules":[`)
		for i := range n {
			if i > 0 {
				b.WriteByte(',')
			}
			b.WriteString(rule(i))
		}
		b.WriteString(`]}}`)
		return b.String()
	}
	hostile := map[string]string{
		"5 MiB file":              `{"PublishingPolicies":{"Rules":[]}}` + strings.Repeat(" ", 5<<20),
		"nesting depth 100,000":   `{"PublishingPolicies":{"Rules":` + strings.Repeat("[", 100000) + strings.Repeat("]", 100000) + `}}`,
		"nested objects 10,000":   `{"PublishingPolicies":{"Rules":[{"Priority":1,"Match":{"Event":` + strings.Repeat(`{"a":`, 10000) + "1" + strings.Repeat("}", 10000) + `}}]}}`,
		"2,000 rules (max 1,000)": rules(2000),
		"string of 1 MiB":         `{"PublishingPolicies":{"Rules":[{"Priority":1,"Match":{"Event":"` + strings.Repeat("e", 1<<20) + `"},"Publishers":[{"Key":"rabbitmq","Destination":"d"}]}]}}`,
		"200 publishers":          `{"PublishingPolicies":{"Rules":[{"Priority":1,"Match":{"Event":"E"},"Publishers":[` + strings.TrimSuffix(strings.Repeat(`{"Key":"rabbitmq","Destination":"d"},`, 200), ",") + `]}]}}`,
		"5,000 match values":      `{"PublishingPolicies":{"Rules":[{"Priority":1,"Match":{"Event":[` + strings.TrimSuffix(strings.Repeat(`"E",`, 5000), ",") + `]},"Publishers":[{"Key":"rabbitmq","Destination":"d"}]}]}}`,
		"invalid UTF-8":           "{\"PublishingPolicies\":{\"Rules\":[{\"Priority\":1,\"Match\":{\"Event\":\"\xff\xfe\"},\"Publishers\":[{\"Key\":\"rabbitmq\",\"Destination\":\"d\"}]}]}}",
		"NUL bytes":               "{\"PublishingPolicies\":\x00\x00}",
		"duplicate keys":          `{"PublishingPolicies":{"Rules":[]},"PublishingPolicies":{"Rules":[]}}`,
		"unknown field":           `{"PublishingPolicies":{"Rules":[],"Rulez":[]}}`,
		"trailing garbage":        string(good) + `{"x":1}`,
		"priority 1e400":          `{"PublishingPolicies":{"Rules":[{"Priority":1e400,"Match":{"Event":"E"},"Publishers":[{"Key":"rabbitmq","Destination":"d"}]}]}}`,
		"priority 2^63":           `{"PublishingPolicies":{"Rules":[{"Priority":9223372036854775808,"Match":{"Event":"E"},"Publishers":[{"Key":"rabbitmq","Destination":"d"}]}]}}`,
		"empty document":          ``,
		"null":                    `null`,
		"truncated":               string(good[:len(good)/2]),
		"10,000 errors":           `{"PublishingPolicies":{"Rules":[` + strings.TrimSuffix(strings.Repeat(`{"Priority":"x"},`, 10000), ",") + `]}}`,
		"unknown publisher key":   `{"PublishingPolicies":{"Rules":[{"Priority":1,"Match":{"Event":"E"},"Publishers":[{"Key":"unknown","Destination":"d"}]}]}}`,
		"pathological wildcard":   `{"PublishingPolicies":{"Rules":[{"Priority":1,"Match":{"Event":"` + strings.Repeat("*a", 400) + `"},"Publishers":[{"Key":"rabbitmq","Destination":"d"}]}]}}`,
		"control characters key":  "{\"PublishingPolicies\":{\"Rules\":[{\"Priority\":1,\"Match\":{\"Event\":\"E\"},\"Publishers\":[{\"Key\":\"rab\\u0000bit\",\"Destination\":\"d\"}]}]}}",
	}
	opts := &policy.LoadOptions{Limits: policy.Limits{MaxRules: 1000}, KnownPublishers: func(k string) bool { return k == "rabbitmq" || k == "kafka" || k == "nats" || k == "redis" }}
	if _, err := policy.Parse("seed.json", good, opts); err != nil {
		t.Fatalf("the good document does not load: %v", err)
	}
	const bound = 3 * time.Second
	rejected, accepted, slow := 0, 0, 0
	var slowest time.Duration
	var slowestName string
	for name, doc := range hostile {
		start := time.Now()
		var p *policy.Policy
		var err error
		func() {
			defer func() {
				if r := recover(); r != nil {
					t.Errorf("%s: the loader panicked: %v", name, r)
				}
			}()
			p, err = policy.Parse(name+".json", []byte(doc), opts)
		}()
		el := time.Since(start)
		if el > slowest {
			slowest, slowestName = el, name
		}
		if el > bound {
			slow++
			t.Errorf("%s: took %s (bound %s)", name, el, bound)
		}
		switch {
		case err != nil && err.Error() == "":
			t.Errorf("%s: empty error", name)
		case err != nil:
			rejected++
			first, _, _ := strings.Cut(err.Error(), "\n")
			t.Logf("%-24s rejected in %6.1f ms: %.140s", name, float64(el.Microseconds())/1000, first)
		default:
			accepted++
			// Accepted documents must be harmless: only those that are
			// valid JSON policies within the limits.
			t.Logf("%-24s accepted in %6.1f ms (version %s)", name, float64(el.Microseconds())/1000, p.Version())
			// Matching against it stays fast, even with a long attribute.
			start := time.Now()
			for _, kind := range []string{strings.Repeat("a", 1000) + "b", "E", "\xff\xfe"} {
				_, _ = p.Resolve(map[string]string{"kind": kind})
			}
			if el := time.Since(start); el > bound {
				slow++
				t.Errorf("%s: matching took %s", name, el)
			}
		}
	}
	t.Logf("CHAOS LEDGER hostile policy files: %d documents, rejected %d, accepted %d, panics 0 unless reported above, over %s %d; slowest %s (%s)",
		len(hostile), rejected, accepted, bound, slow, slowestName, slowest.Round(time.Millisecond))
}
