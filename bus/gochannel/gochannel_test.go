package gochannel_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/pubsub/tests"

	"github.com/tailrace/tailrace/bus/gochannel"
)

func TestNoSubscriberIsAnError(t *testing.T) {
	ps, err := gochannel.New(gochannel.Config{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ps.Close()
	if err := ps.Publish("orders", message.NewMessage(watermill.NewUUID(), nil)); !errors.Is(err, gochannel.ErrNoSubscribers) {
		t.Fatalf("Publish without subscribers: got %v, want ErrNoSubscribers", err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	msgs, err := ps.Subscribe(ctx, "orders")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- ps.Publish("orders", message.NewMessage(watermill.NewUUID(), []byte("x"))) }()
	msg := <-msgs
	select {
	case err := <-done:
		t.Fatalf("Publish returned (%v) before the ack", err)
	case <-time.After(50 * time.Millisecond):
	}
	msg.Ack()
	if err := <-done; err != nil {
		t.Fatalf("Publish: %v", err)
	}

	cancel()
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := ps.Publish("orders", message.NewMessage(watermill.NewUUID(), nil))
		if errors.Is(err, gochannel.ErrNoSubscribers) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Publish after the subscriber left: got %v, want ErrNoSubscribers", err)
		}
		time.Sleep(time.Millisecond)
	}

	lax, _ := gochannel.New(gochannel.Config{AllowNoSubscribers: true}, nil)
	defer lax.Close()
	if err := lax.Publish("orders", message.NewMessage(watermill.NewUUID(), nil)); err != nil {
		t.Fatalf("AllowNoSubscribers: %v", err)
	}
}

// The universal suite publishes before it subscribes and reads only after
// publishing, so it runs on a persistent PubSub that does not wait for acks,
// with a large buffer — the configuration Watermill's own GoChannel tests
// use. The defaults (wait for acks, no subscriber is an error) are covered by
// TestNoSubscriberIsAnError.
func TestUniversalPubSub(t *testing.T) {
	tests.TestPubSub(t,
		tests.Features{
			ConsumerGroups:        false,
			ExactlyOnceDelivery:   true,
			GuaranteedOrder:       false,
			Persistent:            false,
			RequireSingleInstance: true,
		},
		func(t *testing.T) (message.Publisher, message.Subscriber) {
			ps, err := gochannel.New(gochannel.Config{Persistent: true, NoWaitForAck: true, OutputBuffer: 10000}, nil)
			if err != nil {
				t.Fatal(err)
			}
			return ps, ps
		},
		nil,
	)
}
