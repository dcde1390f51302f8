package bus_test

import (
	"context"
	"fmt"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/bus"
	"github.com/tailrace/tailrace/bus/gochannel"
	"github.com/tailrace/tailrace/policy"
)

// A routing publisher fans a message out to the routes the policy gives it
// and stamps the policy version and rule on every copy. The relay is what
// normally calls Publish; here we call it by hand.
func ExampleRoutingPublisher() {
	local, _ := gochannel.New(gochannel.Config{NoWaitForAck: true, OutputBuffer: 8}, nil)
	defer local.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	orders, _ := local.Subscribe(ctx, "orders")
	audit, _ := local.Subscribe(ctx, "audit")

	reg := bus.NewRegistry()
	reg.Register("local", local)
	pol, err := policy.Parse("routing.json", []byte(`{
	  "Rules": [
	    {"Name": "audit", "Priority": 100, "Continue": true, "Match": {"Domain": "sales"},
	     "Publishers": [{"Key": "local", "Destination": "audit"}]},
	    {"Name": "orders", "Priority": 10, "Match": {"Event": "orders.*"},
	     "Publishers": [{"Key": "local", "Destination": "orders"}]}
	  ]}`), &policy.LoadOptions{KnownPublishers: reg.HasPublisher})
	if err != nil {
		fmt.Println(err)
		return
	}
	rp, _ := bus.NewRoutingPublisher(reg, policy.Static(pol), nil, bus.RoutingConfig{})

	msg := message.NewMessage(watermill.NewUUID(), []byte(`{"id":"o-1"}`))
	msg.Metadata.Set(tailrace.MetaKind, "orders.placed")
	msg.Metadata.Set(tailrace.MetaDomain, "sales")
	// The topic argument is the staged destination; this policy's routes
	// name their own.
	if err := rp.Publish("orders.placed", msg); err != nil {
		fmt.Println(err)
	}
	for _, ch := range []<-chan *message.Message{orders, audit} {
		m := <-ch
		m.Ack()
		fmt.Println(m.Metadata.Get(tailrace.MetaKind), "rule:", m.Metadata.Get(tailrace.MetaPolicyRule),
			"same policy:", m.Metadata.Get(tailrace.MetaPolicyVersion) == pol.Version())
	}

	// A message no rule routes fails permanently: the relay dead-letters it.
	other := message.NewMessage(watermill.NewUUID(), []byte(`{}`))
	other.Metadata.Set(tailrace.MetaKind, "billing.invoiced")
	err = rp.Publish("billing.invoiced", other)
	fmt.Println("permanent:", tailrace.IsPermanent(err))
	// Output:
	// orders.placed rule: audit,orders same policy: true
	// orders.placed rule: audit,orders same policy: true
	// permanent: true
}
