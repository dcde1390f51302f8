package redisstream_test

import (
	"context"
	"errors"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/pubsub/tests"
	"github.com/redis/go-redis/v9"

	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/bus/redisstream"
	"github.com/tailrace/tailrace/internal/testenv"
)

// setup returns a redis:// URL and deletes every key starting with prefix
// when the test ends.
func setup(t *testing.T, prefix string) string {
	t.Helper()
	addr := testenv.RedisAddr(t)
	t.Cleanup(func() {
		cl := redis.NewClient(&redis.Options{Addr: addr})
		defer cl.Close()
		ctx := context.Background()
		iter := cl.Scan(ctx, 0, prefix+"*", 1000).Iterator()
		for iter.Next(ctx) {
			cl.Del(ctx, iter.Val())
		}
		if err := iter.Err(); err != nil {
			t.Logf("cleanup: %v", err)
		}
	})
	return "redis://" + addr + "/0"
}

func TestPublishKeepsMessagesWithoutConsumers(t *testing.T) {
	prefix := testenv.UniqueName("tr")
	url := setup(t, prefix)
	pub, err := redisstream.NewPublisher(redisstream.Config{URL: url}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	topic := prefix + ".orders"
	msg := message.NewMessage(watermill.NewUUID(), []byte("early"))
	if err := pub.Publish(topic, msg); err != nil {
		t.Fatal(err)
	}
	sub, err := redisstream.NewSubscriber(redisstream.Config{URL: url, ConsumerGroup: "g"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	msgs, err := sub.Subscribe(ctx, topic)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case got := <-msgs:
		got.Ack()
		if got.UUID != msg.UUID {
			t.Fatalf("got %s, want %s", got.UUID, msg.UUID)
		}
	case <-ctx.Done():
		t.Fatal("a group created after the publish did not get the message")
	}
}

func TestSecretsNeverLeak(t *testing.T) {
	const pw = "Tr0ub4dor%zz3"
	var out []string
	for _, url := range []string{
		"redis://:" + pw + "@127.0.0.1:6379/0",
		"redis://user:" + strings.ReplaceAll(pw, "%", "") + "@127.0.0.1:1/0",
		"redis://user:" + strings.ReplaceAll(pw, "%", "") + "@127.0.0.1:6379/notadb",
	} {
		_, err := redisstream.NewPublisher(redisstream.Config{URL: url, DialTimeout: time.Second, FailFast: true}, nil)
		if err == nil {
			t.Fatalf("NewPublisher(%s) succeeded", url)
		}
		_, err2 := redisstream.NewSubscriber(redisstream.Config{URL: url, DialTimeout: time.Second}, nil)
		out = append(out, err.Error(), err2.Error())
	}
	text := strings.Join(out, "\n")
	for _, s := range []string{pw, "Tr0ub4dor"} {
		if strings.Contains(text, s) {
			t.Errorf("errors contain %q:\n%s", s, text)
		}
	}
	if !strings.Contains(text, "***") {
		t.Errorf("no redacted URL in:\n%s", text)
	}
}

// Watermill's universal suite, twice: with a window of 1 the suite's
// ordering tests hold; with the default window entries are handed over
// before the previous ones are acked, so order is not what the suite checks.
func TestUniversalPubSub(t *testing.T) {
	t.Run("window1", func(t *testing.T) { universalPubSub(t, 1, true) })
	t.Run("window64", func(t *testing.T) { universalPubSub(t, 64, false) })
}

func universalPubSub(t *testing.T, maxInFlight int, ordered bool) {
	prefix := testenv.UniqueName("tr")
	url := setup(t, prefix)
	constructor := func(t *testing.T, group string) (message.Publisher, message.Subscriber) {
		pub, err := redisstream.NewPublisher(redisstream.Config{URL: url}, nil)
		if err != nil {
			t.Fatal(err)
		}
		// CloseTimeout short: the suite closes while holding unacked
		// messages and wants their contexts cancelled soon after.
		sub, err := redisstream.NewSubscriber(redisstream.Config{
			URL:           url,
			ConsumerGroup: group,
			BlockTime:     10 * time.Millisecond,
			ClaimInterval: 3 * time.Second,
			MaxIdleTime:   5 * time.Second,
			MaxInFlight:   maxInFlight,
			CloseTimeout:  250 * time.Millisecond,
		}, nil)
		if err != nil {
			t.Fatal(err)
		}
		return pub, sub
	}
	tests.TestPubSub(t,
		tests.Features{
			ConsumerGroups:                      true,
			ExactlyOnceDelivery:                 false,
			GuaranteedOrder:                     false,
			GuaranteedOrderWithSingleSubscriber: ordered,
			Persistent:                          true,
			NewSubscriberReceivesOldMessages:    true,
			ForceShort:                          true,
			GenerateTopicFunc: func(tctx tests.TestContext) string {
				return prefix + "_" + string(tctx.TestID)
			},
		},
		func(t *testing.T) (message.Publisher, message.Subscriber) {
			return constructor(t, watermill.NewShortUUID())
		},
		constructor,
	)
}

// Subscribe and Close called concurrently: Close returns only after every
// channel Subscribe returned is closed, and the race detector sees no race.
func TestConcurrentSubscribeAndClose(t *testing.T) {
	prefix := testenv.UniqueName("tr")
	url := setup(t, prefix)
	for round := range 10 {
		sub, err := redisstream.NewSubscriber(redisstream.Config{URL: url, ConsumerGroup: "g"}, nil)
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
				ch, err := sub.Subscribe(context.Background(), prefix+".t"+strconv.Itoa(i))
				if err != nil {
					return // closed first
				}
				mu.Lock()
				chans = append(chans, ch)
				mu.Unlock()
			}()
		}
		time.Sleep(time.Duration(round) * time.Millisecond)
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

// A publisher built while the server cannot be reached (a port nothing
// listens on yet): construction succeeds, Publish fails with an error
// marked tailrace.Unavailable; once a proxy to the real server listens on
// that port, Publish succeeds. FailFast keeps the error at construction.
func TestPublisherStartsWhileServerDown(t *testing.T) {
	prefix := testenv.UniqueName("tr")
	setup(t, prefix)
	real := testenv.RedisAddr(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close()
	cfg := redisstream.Config{URL: "redis://" + addr + "/0", DialTimeout: time.Second}
	ff := cfg
	ff.FailFast = true
	if p, err := redisstream.NewPublisher(ff, nil); err == nil {
		_ = p.Close()
		t.Fatal("FailFast: NewPublisher succeeded with no server")
	}
	pub, err := redisstream.NewPublisher(cfg, nil)
	if err != nil {
		t.Fatalf("NewPublisher with the server down: %v", err)
	}
	defer pub.Close()
	topic := prefix + ".down"
	err = pub.Publish(topic, message.NewMessage(watermill.NewUUID(), nil))
	if err == nil || !tailrace.IsUnavailable(err) {
		t.Fatalf("Publish while down: %v; want a failure marked unavailable", err)
	}
	ln, err = net.Listen("tcp", addr)
	if err != nil {
		t.Skipf("cannot listen on %s again: %v", addr, err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", real)
			if err != nil {
				_ = c.Close()
				continue
			}
			go func() { _, _ = io.Copy(s, c); _ = s.Close() }()
			go func() { _, _ = io.Copy(c, s); _ = c.Close() }()
		}
	}()
	up := time.Now()
	for {
		err = pub.Publish(topic, message.NewMessage(watermill.NewUUID(), nil))
		if err == nil {
			break
		}
		if !tailrace.IsUnavailable(err) || time.Since(up) > 15*time.Second {
			t.Fatalf("Publish after the server became reachable: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("published %s after the server became reachable", time.Since(up).Round(time.Millisecond))
	// A server error about the message (a key of the wrong type) is the
	// message's failure.
	cl := redis.NewClient(&redis.Options{Addr: real})
	defer cl.Close()
	if err := cl.Set(context.Background(), prefix+".string", "x", time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	err = pub.Publish(prefix+".string", message.NewMessage(watermill.NewUUID(), nil))
	var rerr redis.Error
	if !errors.As(err, &rerr) || tailrace.IsUnavailable(err) {
		t.Fatalf("XADD to a string key: %v (unavailable %v); want a redis error, not unavailable", err, tailrace.IsUnavailable(err))
	}
}
