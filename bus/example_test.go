package bus_test

import (
	"context"
	"fmt"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/tailrace/tailrace/bus"
	"github.com/tailrace/tailrace/bus/gochannel"
)

// A registry names the service's publishers; a policy refers to the keys, and
// the loader checks them with HasPublisher.
func ExampleRegistry() {
	local, err := gochannel.New(gochannel.Config{}, nil)
	if err != nil {
		panic(err)
	}
	reg := bus.NewRegistry()
	reg.Register("local", local)
	defer reg.Close() // closes every publisher

	fmt.Println(reg.Keys(), reg.HasPublisher("local"), reg.HasPublisher("rabbit"))

	// A consumer on the in-process bus.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	msgs, err := local.Subscribe(ctx, "orders.placed")
	if err != nil {
		panic(err)
	}
	go func() {
		for msg := range msgs {
			fmt.Printf("received %s\n", msg.Payload)
			msg.Ack()
		}
	}()

	pub, err := reg.Lookup("local")
	if err != nil {
		panic(err)
	}
	// Publish returns once the subscriber has acked.
	if err := pub.Publish("orders.placed", message.NewMessage(watermill.NewUUID(), []byte(`{"order":42}`))); err != nil {
		panic(err)
	}
	_, err = reg.Lookup("rabbit")
	fmt.Println(err)
	// Output:
	// [local] true false
	// received {"order":42}
	// bus: unknown publisher key: "rabbit"
}
