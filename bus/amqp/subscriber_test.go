package amqp_test

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"

	busamqp "github.com/tailrace/tailrace/bus/amqp"
)

// Subscribe and Close called concurrently: Close returns only after every
// channel Subscribe returned is closed, and the race detector sees no race.
func TestSubscriberConcurrentSubscribeAndClose(t *testing.T) {
	b := setup(t)
	cfg := b.config("concurrent")
	for round := range 5 {
		sub, err := busamqp.NewSubscriber(cfg, nil)
		if err != nil {
			t.Fatal(err)
		}
		var mu sync.Mutex
		var chans []<-chan *message.Message
		var wg sync.WaitGroup
		for i := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ch, err := sub.Subscribe(context.Background(), "t"+strconv.Itoa(i))
				if err != nil {
					return // closed first
				}
				mu.Lock()
				chans = append(chans, ch)
				mu.Unlock()
			}()
		}
		time.Sleep(time.Duration(round*5) * time.Millisecond)
		if err := sub.Close(); err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		for i, ch := range chans {
			select {
			case _, ok := <-ch:
				if ok {
					t.Fatalf("round %d: message on channel %d after Close", round, i)
				}
			default:
				t.Fatalf("round %d: channel %d not closed when Close returned", round, i)
			}
		}
		mu.Unlock()
		wg.Wait()
	}
}

// When Subscribe's ctx is done the channel closes even if nobody reads it
// any more, and a message waiting to be handed over goes back to the queue.
func TestSubscriberChannelClosesOnCtxWithoutReader(t *testing.T) {
	b := setup(t)
	cfg := b.config("ctx")
	sub, err := busamqp.NewSubscriber(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	if err := sub.SubscribeInitialize("orders"); err != nil {
		t.Fatal(err)
	}
	pub := newPublisher(t, cfg, nil)
	ids := []string{watermill.NewUUID(), watermill.NewUUID()}
	for _, id := range ids {
		if err := pub.Publish("orders", message.NewMessage(id, []byte("x"))); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	ch, err := sub.Subscribe(ctx, "orders")
	if err != nil {
		t.Fatal(err)
	}
	var held *message.Message
	select {
	case held = <-ch: // handed over, never acked
	case <-time.After(10 * time.Second):
		t.Fatal("no message")
	}
	time.Sleep(200 * time.Millisecond) // the second one waits to be handed over
	cancel()
	select {
	case _, ok := <-ch:
		if ok {
			// A message handed over at the moment of cancel is allowed;
			// the channel must still close.
			select {
			case _, ok = <-ch:
			case <-time.After(5 * time.Second):
			}
		}
		if ok {
			t.Fatal("channel still delivering after ctx is done")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("channel not closed 5s after ctx is done, with nobody reading it")
	}
	if held.Context().Err() == nil {
		t.Fatal("held message's context not cancelled with Subscribe's ctx")
	}

	// Close requeues the held message; the other was nacked when the channel
	// closed. Both are back in the queue for the next subscriber.
	if err := sub.Close(); err != nil {
		t.Fatal(err)
	}
	sub2, err := busamqp.NewSubscriber(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer sub2.Close()
	ch2, err := sub2.Subscribe(context.Background(), "orders")
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]bool{}
	for len(got) < 2 {
		select {
		case msg := <-ch2:
			got[msg.UUID] = true
			msg.Ack()
		case <-time.After(10 * time.Second):
			t.Fatalf("got %v, want both %v back", got, ids)
		}
	}
	if _, err := sub.Subscribe(context.Background(), "orders"); !errors.Is(err, busamqp.ErrSubscriberClosed) {
		t.Fatalf("Subscribe after Close: %v, want ErrSubscriberClosed", err)
	}
}

// With Prefetch n, n messages are handed over before any is acked, and
// each is settled on its own: acked in reverse order, or one nacked, the
// queue ends with exactly the nacked one redelivered.
func TestSubscriberSeveralInFlightSettledOutOfOrder(t *testing.T) {
	b := setup(t)
	cfg := b.config("window")
	cfg.Prefetch = 4
	sub, err := busamqp.NewSubscriber(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	if err := sub.SubscribeInitialize("orders"); err != nil {
		t.Fatal(err)
	}
	pub := newPublisher(t, cfg, nil)
	var ids []string
	for range 6 {
		id := watermill.NewUUID()
		ids = append(ids, id)
		if err := pub.Publish("orders", message.NewMessage(id, []byte("x"))); err != nil {
			t.Fatal(err)
		}
	}
	ch, err := sub.Subscribe(context.Background(), "orders")
	if err != nil {
		t.Fatal(err)
	}
	next := func() *message.Message {
		t.Helper()
		select {
		case m := <-ch:
			return m
		case <-time.After(10 * time.Second):
			t.Fatal("no message")
			return nil
		}
	}
	var held []*message.Message
	for i := range 4 { // four unacked at once, in queue order
		m := next()
		if m.UUID != ids[i] {
			t.Fatalf("message %d is %s, want %s", i, m.UUID, ids[i])
		}
		held = append(held, m)
	}
	select {
	case m := <-ch:
		t.Fatalf("a fifth message %s beyond the prefetch of 4", m.UUID)
	case <-time.After(200 * time.Millisecond):
	}
	// Settle out of order: ack 3, 2, 0 and nack 1.
	held[3].Ack()
	held[2].Ack()
	held[0].Ack()
	held[1].Nack()
	got := map[string]int{}
	for range 3 { // 4, 5 and the nacked 1, in some order
		m := next()
		got[m.UUID]++
		m.Ack()
	}
	if got[ids[1]] != 1 || got[ids[4]] != 1 || got[ids[5]] != 1 {
		t.Fatalf("after settling got %v; want %s (nacked), %s and %s once each", got, ids[1], ids[4], ids[5])
	}
	select {
	case m := <-ch:
		t.Fatalf("unexpected redelivery of %s", m.UUID)
	case <-time.After(300 * time.Millisecond):
	}
}

// A subscription whose connection drops reconnects and goes on consuming.
func TestSubscriberReconnects(t *testing.T) {
	b := setup(t)
	cfg := b.config("reconnect")
	px := newProxy(t, hostOf(b.url))
	subCfg := cfg
	subCfg.URL = strings.Replace(b.url, hostOf(b.url), px.addr(), 1)
	subCfg.ReconnectInitial = 20 * time.Millisecond
	subCfg.ReconnectMax = 200 * time.Millisecond
	sub, err := busamqp.NewSubscriber(subCfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	ch, err := sub.Subscribe(context.Background(), "orders")
	if err != nil {
		t.Fatal(err)
	}
	pub := newPublisher(t, cfg, nil)
	for round := range 2 {
		id := watermill.NewUUID()
		if err := pub.Publish("orders", message.NewMessage(id, []byte("x"))); err != nil {
			t.Fatal(err)
		}
	wait:
		for {
			select {
			case m := <-ch:
				m.Ack() // an earlier one may come again: its ack may have been lost with the connection
				if m.UUID == id {
					break wait
				}
			case <-time.After(20 * time.Second):
				t.Fatalf("round %d: no message", round)
			}
		}
		px.dropAll()
	}
}
