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

// A subscriber is handed up to MaxInFlight messages before any ack, in
// publish order, and each Publish returns when its own message is acked,
// whatever the order of the acks; a nacked message comes again.
func TestSeveralInFlightSettledOutOfOrder(t *testing.T) {
	ps, err := gochannel.New(gochannel.Config{MaxInFlight: 3}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ps.Close()
	msgs, err := ps.Subscribe(context.Background(), "t")
	if err != nil {
		t.Fatal(err)
	}
	const n = 4
	published := make([]chan error, n)
	ids := make([]string, n)
	var held []*message.Message
	for i := range n {
		ids[i] = watermill.NewUUID()
		published[i] = make(chan error, 1)
		msg := message.NewMessage(ids[i], nil)
		go func() { published[i] <- ps.Publish("t", msg) }()
		if i == n-1 {
			break // the fourth waits for a slot
		}
		// The first three are handed over without any ack.
		select {
		case m := <-msgs:
			if m.UUID != ids[i] {
				t.Fatalf("message %d is %s, want %s", i, m.UUID, ids[i])
			}
			held = append(held, m)
		case <-time.After(10 * time.Second):
			t.Fatalf("message %d not handed over while %d are unacked", i, i)
		}
	}
	select {
	case m := <-msgs:
		t.Fatalf("a fourth message %s beyond MaxInFlight 3", m.UUID)
	case <-time.After(100 * time.Millisecond):
	}
	// Ack the third first: its Publish returns, the others still wait.
	held[2].Ack()
	if err := <-published[2]; err != nil {
		t.Fatal(err)
	}
	for _, i := range []int{0, 1} {
		select {
		case err := <-published[i]:
			t.Fatalf("Publish %d returned (%v) before its ack", i, err)
		default:
		}
	}
	// A slot is free: the fourth comes. Nack the first: it comes again.
	fourth := <-msgs
	if fourth.UUID != ids[3] {
		t.Fatalf("got %s, want the fourth %s", fourth.UUID, ids[3])
	}
	held[0].Nack()
	again := <-msgs
	if again.UUID != ids[0] {
		t.Fatalf("got %s, want the nacked %s again", again.UUID, ids[0])
	}
	for _, m := range []*message.Message{again, held[1], fourth} {
		m.Ack()
	}
	for _, i := range []int{0, 1, 3} {
		if err := <-published[i]; err != nil {
			t.Fatalf("Publish %d: %v", i, err)
		}
	}
}
