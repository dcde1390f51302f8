package policy_test

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/policy"
)

const orders = `{
  "Default": {"Publishers": [{"Key": "rabbitmq", "Destination": "events"}]},
  "Rules": [
    {"Name": "audit", "Priority": 1000, "Continue": true, "Match": {"Domain": "Billing"},
     "Publishers": [{"Key": "nats", "Destination": "audit.billing"}]},
    {"Name": "vip-orders", "Priority": 100, "Match": {"Event": "Order*", "TenantTier": "enterprise"},
     "Publishers": [{"Key": "rabbitmq", "Destination": "x.orders.vip"}]},
    {"Name": "orders", "Priority": 50, "Match": {"Event": ["OrderPlaced", "OrderShipped"]},
     "Publishers": [{"Key": "rabbitmq", "Destination": "x.orders"}, {"Key": "nats", "Destination": "orders"}]}
  ]
}`

// Resolve a message's metadata to its routes, and stamp the message for
// audit.
func Example() {
	registered := map[string]bool{"rabbitmq": true, "nats": true}
	p, err := policy.Parse("orders.json", []byte(orders), &policy.LoadOptions{
		KnownPublishers: func(key string) bool { return registered[key] },
	})
	if err != nil {
		panic(err)
	}
	meta := map[string]string{tailrace.MetaKind: "OrderPlaced", tailrace.MetaTenantTier: "free"}
	res, err := p.Resolve(meta)
	if err != nil {
		panic(err)
	}
	for _, r := range res.Routes {
		fmt.Println(r.Key, "->", r.Destination)
	}
	meta[tailrace.MetaPolicyRule] = res.RuleStamp()
	fmt.Println("rule:", meta[tailrace.MetaPolicyRule], "version set:", res.Version == p.Version())
	// Output:
	// rabbitmq -> x.orders
	// nats -> orders
	// rule: orders version set: true
}

// A Continue rule adds its routes and lets the next rules decide.
func ExamplePolicy_Resolve_continue() {
	p, _ := policy.Parse("orders.json", []byte(orders), nil)
	res, _ := p.Resolve(map[string]string{tailrace.MetaKind: "OrderShipped", tailrace.MetaDomain: "Billing", tailrace.MetaTenantTier: "enterprise"})
	fmt.Println(res.RuleStamp())
	fmt.Println(res.Routes)
	res, _ = p.Resolve(map[string]string{tailrace.MetaKind: "InvoiceSent"})
	fmt.Println(res.RuleStamp(), res.Routes)
	// Output:
	// audit,vip-orders
	// [{nats audit.billing} {rabbitmq x.orders.vip}]
	// default [{rabbitmq events}]
}

// Errors carry the file, line, column, rule and field; all are reported at
// once.
func ExampleParse_errors() {
	_, err := policy.Parse("bad.json", []byte(`{"Rules": [
  {"Name": "x", "Priority": "high", "Match": {"Event": "Order["}, "Publishers": []}
]}`), nil)
	fmt.Println(err)
	// Output:
	// policy: bad.json:2:29: rule 0 "x": Priority: wrong type: want an integer, got a string
	// policy: bad.json:2:56: rule 0 "x": Match.Event: invalid glob: "Order[": syntax error in pattern
	// policy: bad.json:2:81: rule 0 "x": Publishers: empty value: Publishers must list at least one publisher
}

// Explain says which rule decides and why the rules before it did not.
func ExamplePolicy_Explain() {
	p, _ := policy.Parse("orders.json", []byte(orders), nil)
	e := p.Explain(map[string]string{tailrace.MetaKind: "OrderPlaced", tailrace.MetaTenantTier: "free"})
	for _, s := range e.Steps {
		if s.Matched {
			fmt.Println(s.Rule, "matched, routes:", s.Routes)
		} else {
			fmt.Println(s.Rule, "no match:", s.Reason)
		}
	}
	fmt.Println("decision:", e.Decision.Rule)
	// Output:
	// audit no match: Domain: message has no domain
	// vip-orders no match: TenantTier (tenant_tier): "free" does not match "enterprise"
	// orders matched, routes: [{rabbitmq x.orders} {nats orders}]
	// decision: orders
}

// Lint warns about rules that can never apply and about equal priorities
// that leave the choice to load order.
func ExamplePolicy_Lint() {
	p, _ := policy.Parse("p.json", []byte(`{
  "Default": {"Publishers": [{"Key": "k", "Destination": "d"}]},
  "Rules": [
    {"Name": "contents", "Priority": 600, "Match": {"Domain": "Contents"}, "Publishers": [{"Key": "k", "Destination": "c"}]},
    {"Name": "logs", "Priority": 600, "Match": {"Event": "LogEvent"}, "Publishers": [{"Key": "k", "Destination": "l"}]},
    {"Name": "logs-too", "Priority": 500, "Match": {"Event": "LogEvent", "Domain": "Ops"}, "Publishers": [{"Key": "k", "Destination": "o"}]}
  ]
}`), nil)
	for _, w := range p.Lint() {
		fmt.Println(w.Kind, w.Rule)
	}
	// Output:
	// equal-priority logs
	// shadowed logs-too
}

// A Watcher keeps the last good policy when the files become invalid, and
// says so to health checks.
func ExampleWatcher() {
	dir, _ := os.MkdirTemp("", "policy")
	defer os.RemoveAll(dir)
	file := filepath.Join(dir, "routing.json")
	write := func(s string) { _ = os.WriteFile(file, []byte(s), 0o644) }
	write(`{"Default": {"Publishers": [{"Key": "amqp", "Destination": "v1"}]}}`)

	w, err := policy.NewWatcher(slog.New(slog.DiscardHandler), policy.WatcherConfig{Paths: []string{dir}})
	if err != nil {
		panic(err)
	}
	defer w.Close()
	dest := func() string { r, _ := w.Policy().Resolve(nil); return r.Routes[0].Destination }
	fmt.Println(dest(), w.Healthy())

	write(`{"Default": {"Publishers": [{"Key": "amqp", "Destination": "v2"}]`) // truncated
	_ = w.Reload()                                                             // or wait for the file event
	fmt.Println(dest(), w.Healthy() != nil)

	write(`{"Default": {"Publishers": [{"Key": "amqp", "Destination": "v2"}]}}`)
	_ = w.Reload()
	fmt.Println(dest(), w.Healthy())
	// Output:
	// v1 <nil>
	// v1 true
	// v2 <nil>
}
