package outbox

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	wnats "github.com/ThreeDotsLabs/watermill-nats/v2/pkg/nats"
	"github.com/ThreeDotsLabs/watermill-redisstream/pkg/redisstream"
	nc "github.com/nats-io/nats.go"
	"github.com/redis/go-redis/v9"

	busnats "github.com/tailrace/tailrace/bus/nats"
)

// The relay process's broker-cut scenario on NATS JetStream and Redis
// Streams: the relay publishes through bus/nats or bus/redisstream via a TCP
// proxy that is cut for a few seconds mid-drain; the parent reads the
// stream directly (unproxied) and keeps the ledger by message id.

// cutOutage is how long the NATS and Redis cuts last: a few seconds in make
// test, longer with TAILRACE_RELAY_FULL=1.
func cutOutage() time.Duration {
	if os.Getenv("TAILRACE_RELAY_FULL") == "1" {
		return 15 * time.Second
	}
	return 3 * time.Second
}

// TestRelayBrokerCutNATS: the relay process loses NATS under load (every
// connection reset, reconnects refused) for 3 s — 15 s with
// TAILRACE_RELAY_FULL=1 — through a proxy; the shared server keeps running.
// Nothing is lost, stuck or reordered per key. JetStream drops a re-publish
// whose Nats-Msg-Id it already stored, so a retry after a lost PubAck adds
// no copy to the stream.
func TestRelayBrokerCutNATS(t *testing.T) {
	f := newFaultRigOn(t, relayFaultSize(3000), "postgres", "nats")
	relayBrokerCut(t, f, cutOutage())
}

// TestRelayBrokerCutRedis: the same against Redis Streams. An XADD whose
// reply the cut swallowed is appended again when retried (Redis has no
// idempotent append): duplicates are allowed, loss and reordering are not.
func TestRelayBrokerCutRedis(t *testing.T) {
	f := newFaultRigOn(t, relayFaultSize(3000), "postgres", "redis")
	relayBrokerCut(t, f, cutOutage())
}

// streamConsumer records the message ids read from a stream, in order.
type streamConsumer struct {
	what string
	mu   sync.Mutex
	got  []string
	bad  int // entries without a message id
}

func (c *streamConsumer) add(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if id == "" {
		c.bad++
		return
	}
	c.got = append(c.got, id)
}

func (c *streamConsumer) n() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.got)
}

func (c *streamConsumer) ids() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.got...)
}

func (c *streamConsumer) note() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return fmt.Sprintf("%s: %d entries read, %d without a message id", c.what, len(c.got)+c.bad, c.bad)
}

// consumeNATS creates the JetStream stream bus/nats would provision for
// topic (file storage, subject = topic) and reads it from the start with an
// ordered consumer: every stored message once, in stream order. The stream
// is deleted when the test ends.
func consumeNATS(t testing.TB, url, topic string) *streamConsumer {
	t.Helper()
	conn, err := nc.Connect(url, nc.MaxReconnects(-1))
	if err != nil {
		t.Fatal(err)
	}
	js, err := conn.JetStream()
	if err != nil {
		conn.Close()
		t.Fatal(err)
	}
	stream := busnats.StreamName(topic)
	if _, err := js.AddStream(&nc.StreamConfig{
		Name: stream, Subjects: []string{topic}, Storage: nc.FileStorage, Retention: nc.LimitsPolicy,
	}); err != nil {
		conn.Close()
		t.Fatal(err)
	}
	c := &streamConsumer{what: "JetStream ordered consumer"}
	sub, err := js.Subscribe(topic, func(m *nc.Msg) {
		c.add(m.Header.Get(wnats.WatermillUUIDHdr))
	}, nc.OrderedConsumer(), nc.DeliverAll())
	if err != nil {
		_ = js.DeleteStream(stream)
		conn.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = sub.Unsubscribe()
		if err := js.DeleteStream(stream); err != nil {
			t.Logf("delete stream %s: %v", stream, err)
		}
		conn.Close()
	})
	return c
}

// consumeRedis reads the stream topic from its first entry with XREAD until
// the test ends, then deletes it.
func consumeRedis(t testing.TB, url, topic string) *streamConsumer {
	t.Helper()
	opts, err := redis.ParseURL(url)
	if err != nil {
		t.Fatal(err)
	}
	cl := redis.NewClient(opts)
	c := &streamConsumer{what: "XREAD"}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		last := "0-0"
		for ctx.Err() == nil {
			res, err := cl.XRead(ctx, &redis.XReadArgs{Streams: []string{topic, last}, Count: 1000, Block: 200 * time.Millisecond}).Result()
			if err != nil {
				if !errors.Is(err, redis.Nil) && ctx.Err() == nil {
					time.Sleep(100 * time.Millisecond) // the shared server is not cut; retry
				}
				continue
			}
			for _, s := range res {
				for _, m := range s.Messages {
					id, _ := m.Values[redisstream.UUIDHeaderKey].(string)
					c.add(id)
					last = m.ID
				}
			}
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-done
		if err := cl.Del(context.Background(), topic).Err(); err != nil {
			t.Logf("delete stream %s: %v", topic, err)
		}
		_ = cl.Close()
	})
	return c
}
