package policy

import (
	"fmt"
	"strings"
	"testing"

	"github.com/tailrace/tailrace"
)

// benchPolicy builds a policy of n rules shaped like a real one: most rules
// name exact events (some per tenant tier, some lists), a few use globs on
// the event or match on domain only, a Continue audit rule and a catch-all.
func benchPolicy(n int) []byte {
	var b strings.Builder
	b.WriteString(`{"Default": {"Publishers": [{"Key": "amqp", "Destination": "default"}]}, "Rules": [`)
	b.WriteString(`{"Name": "audit", "Priority": 100000, "Continue": true, "Match": {"Domain": "Audit"}, "Publishers": [{"Key": "nats", "Destination": "audit"}]}`)
	b.WriteString(`,{"Name": "catch-all", "Priority": -1, "Match": {}, "Publishers": [{"Key": "amqp", "Destination": "all"}]}`)
	for i := 2; i < n; i++ {
		b.WriteByte(',')
		switch {
		case i%100 == 0: // 1%: glob on the event
			fmt.Fprintf(&b, `{"Priority": %d, "Match": {"Event": "Batch%d*"}, "Publishers": [{"Key": "amqp", "Destination": "batch.%d"}]}`, i%50, i, i)
		case i%100 == 1: // 1%: domain only
			fmt.Fprintf(&b, `{"Priority": %d, "Match": {"Domain": "Domain%d"}, "Publishers": [{"Key": "amqp", "Destination": "domain.%d"}]}`, i%50, i, i)
		case i%3 == 0: // exact event + tier
			fmt.Fprintf(&b, `{"Priority": %d, "Match": {"Event": "Event%d", "TenantTier": ["enterprise", "gold"]}, "Publishers": [{"Key": "amqp", "Destination": "vip.%d"}, {"Key": "nats", "Destination": "vip.%d"}]}`, 500+i%50, i/3, i, i)
		default: // exact event (a list of two)
			fmt.Fprintf(&b, `{"Priority": %d, "Match": {"Event": ["Event%d", "Legacy%d"]}, "Publishers": [{"Key": "amqp", "Destination": "e.%d"}]}`, i%50, i/3, i, i)
		}
	}
	b.WriteString(`]}`)
	return []byte(b.String())
}

// BenchmarkResolve resolves a message whose event has both a tier rule and a
// plain rule, through the index, plus the glob and domain-only fallbacks.
//
//	go test -run '^$' -bench BenchmarkResolve -benchmem ./policy/
func BenchmarkResolve(b *testing.B) {
	for _, n := range []int{10, 1000, 10000} {
		p, err := Parse("bench.json", benchPolicy(n), nil)
		if err != nil {
			b.Fatal(err)
		}
		msgs := []map[string]string{
			{tailrace.MetaKind: "Event1", tailrace.MetaTenantTier: "gold", tailrace.MetaDomain: "Orders"},
			{tailrace.MetaKind: "Event2", tailrace.MetaTenantTier: "free"},
			{tailrace.MetaKind: "Unknown", tailrace.MetaDomain: "Orders"},
		}
		for i, m := range msgs {
			if _, err := p.Resolve(m); err != nil {
				b.Fatal(i, err)
			}
		}
		b.Run(fmt.Sprintf("rules=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				res, _ := p.Resolve(msgs[i%len(msgs)])
				if len(res.Routes) == 0 {
					b.Fatal("no route")
				}
				i++
			}
		})
	}
}

// BenchmarkResolveContinue measures a Continue chain into a reused Result.
func BenchmarkResolveContinue(b *testing.B) {
	p, err := Parse("bench.json", benchPolicy(1000), nil)
	if err != nil {
		b.Fatal(err)
	}
	m := map[string]string{tailrace.MetaKind: "Event1", tailrace.MetaDomain: "Audit"}
	var res Result
	b.ReportAllocs()
	for b.Loop() {
		if err := p.ResolveInto(m, &res); err != nil || len(res.Matched) != 2 {
			b.Fatal(err, res.Matched)
		}
	}
}

func BenchmarkLoad(b *testing.B) {
	data := benchPolicy(1000)
	b.ReportAllocs()
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		if _, err := Parse("bench.json", data, nil); err != nil {
			b.Fatal(err)
		}
	}
}
