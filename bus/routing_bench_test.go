package bus_test

import (
	"testing"

	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/tailrace/tailrace/bus"
	"github.com/tailrace/tailrace/policy"
)

type nopPublisher struct{}

func (nopPublisher) Publish(string, ...*message.Message) error { return nil }
func (nopPublisher) Close() error                              { return nil }

const benchPolicy = `{
  "Rules": [
    {"Name": "vip", "Priority": 1000, "Match": {"Event": "content.published", "TenantTier": ["enterprise", "gold"]},
     "Publishers": [{"Key": "rabbit", "Destination": "x.content.vip"}]},
    {"Name": "content", "Priority": 600, "Match": {"Domain": "Contents"},
     "Publishers": [{"Key": "rabbit", "Destination": "x.content"}, {"Key": "nats", "Destination": "content"}, {"Key": "local", "Destination": "content"}]},
    {"Name": "logs", "Priority": 600, "Match": {"Event": "log.*"},
     "Publishers": [{"Key": "rabbit", "Destination": "x.logs"}]}
  ],
  "Default": {"Publishers": [{"Key": "rabbit", "Destination": "default"}]}
}`

// BenchmarkRouting compares publishing through the RoutingPublisher (policy
// resolve, stamps, per-route tracking) with calling the publisher directly.
// The publisher does nothing, so the figures are the routing overhead.
func BenchmarkRouting(b *testing.B) {
	reg := bus.NewRegistry()
	for _, k := range []string{"rabbit", "nats", "local"} {
		reg.Register(k, nopPublisher{})
	}
	pol, err := policy.Parse("bench.json", []byte(benchPolicy), nil)
	if err != nil {
		b.Fatal(err)
	}
	rp, err := bus.NewRoutingPublisher(reg, policy.Static(pol), nil, bus.RoutingConfig{})
	if err != nil {
		b.Fatal(err)
	}
	b.Run("direct", func(b *testing.B) {
		m := newMsg("content.published")
		var p message.Publisher = nopPublisher{}
		b.ReportAllocs()
		for b.Loop() {
			if err := p.Publish("x.content.vip", m); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("routed-1-route", func(b *testing.B) {
		m := newMsg("content.published")
		m.Metadata.Set("tenant_tier", "gold")
		b.ReportAllocs()
		for b.Loop() {
			if err := rp.Publish("content.published", m); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("routed-default", func(b *testing.B) {
		m := newMsg("other")
		b.ReportAllocs()
		for b.Loop() {
			if err := rp.Publish("other", m); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("routed-3-routes", func(b *testing.B) {
		m := newMsg("content.updated")
		m.Metadata.Set("domain", "Contents")
		b.ReportAllocs()
		for b.Loop() {
			if err := rp.Publish("content.updated", m); err != nil {
				b.Fatal(err)
			}
		}
	})
}
