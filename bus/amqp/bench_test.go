package amqp_test

import (
	"sync"
	"sync/atomic"
	"testing"

	"github.com/ThreeDotsLabs/watermill"
	wamqp "github.com/ThreeDotsLabs/watermill-amqp/v2/pkg/amqp"
	"github.com/ThreeDotsLabs/watermill/message"
	amqp091 "github.com/rabbitmq/amqp091-go"
)

// Publish throughput with publisher confirms, persistent messages and a
// durable queue, side by side with watermill-amqp's stock publisher
// (ConfirmDelivery on, one channel per concurrent publisher). Run:
//
//	go test -run '^$' -bench BenchmarkPublish -benchtime 20000x ./bus/amqp
//
// Each sub-benchmark reports msg/s; ratios within one run are what matter.
func BenchmarkPublish(b *testing.B) {
	payload := make([]byte, 256)

	run := func(b *testing.B, pub message.Publisher, topic string, workers, batch int) {
		b.Helper()
		var next atomic.Int64
		var wg sync.WaitGroup
		errs := make(chan error, workers)
		b.ResetTimer()
		for range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					n := int(next.Add(int64(batch)))
					if n-batch >= b.N {
						return
					}
					k := min(batch, b.N-(n-batch))
					msgs := make([]*message.Message, k)
					for i := range msgs {
						msgs[i] = message.NewMessage(watermill.NewUUID(), payload)
					}
					if err := pub.Publish(topic, msgs...); err != nil {
						errs <- err
						return
					}
				}
			}()
		}
		wg.Wait()
		b.StopTimer()
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msg/s")
		close(errs)
		for err := range errs {
			b.Fatal(err)
		}
	}

	for _, tc := range []struct {
		name           string
		workers, batch int
	}{
		{"sequential", 1, 1},
		{"concurrent-16", 16, 1},
		{"concurrent-64", 64, 1},
		{"concurrent-256", 256, 1},
		{"batch-100", 1, 100},
	} {
		b.Run("tailrace/"+tc.name, func(b *testing.B) {
			tb := setup(b)
			cfg := tb.config("q")
			cfg.Topology.DeclareQueues = true
			pub := newPublisher(b, cfg, nil)
			run(b, pub, "bench", tc.workers, tc.batch)
		})
	}

	// The ceiling: amqp091-go alone, one goroutine keeping 256 deferred
	// confirms in flight (no returns, no bookkeeping).
	b.Run("raw-amqp091-window-256", func(b *testing.B) {
		tb := setup(b)
		cfg := tb.config("q")
		cfg.Topology.DeclareQueues = true
		decl := newPublisher(b, cfg, nil)
		if err := decl.Publish("bench", message.NewMessage(watermill.NewUUID(), nil)); err != nil {
			b.Fatal(err)
		}
		conn, err := amqp091.Dial(tb.url)
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close()
		ch, err := conn.Channel()
		if err != nil {
			b.Fatal(err)
		}
		if err := ch.Confirm(false); err != nil {
			b.Fatal(err)
		}
		exchange := cfg.Topology.ExchangeName("bench")
		window := make([]*amqp091.DeferredConfirmation, 0, 256)
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			if len(window) == cap(window) {
				if !window[0].Wait() {
					b.Fatal("nack")
				}
				window = window[1:]
				if cap(window) < 256 {
					window = append(make([]*amqp091.DeferredConfirmation, 0, 256), window...)
				}
			}
			dc, err := ch.PublishWithDeferredConfirm(exchange, "bench", true, false, amqp091.Publishing{
				Body: payload, DeliveryMode: amqp091.Persistent, MessageId: watermill.NewUUID()})
			if err != nil {
				b.Fatal(err)
			}
			window = append(window, dc)
		}
		for _, dc := range window {
			dc.Wait()
		}
		b.StopTimer()
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msg/s")
	})

	for _, tc := range []struct {
		name           string
		workers, batch int
	}{
		{"sequential", 1, 1},
		{"concurrent-16", 16, 1},
		{"concurrent-64", 64, 1},
	} {
		b.Run("watermill-amqp-confirm/"+tc.name, func(b *testing.B) {
			tb := setup(b)
			cfg := tb.config("q")
			cfg.Topology.DeclareQueues = true
			// Our publisher declares the exchange and the bound queue.
			decl := newPublisher(b, cfg, nil)
			if err := decl.Publish("bench", message.NewMessage(watermill.NewUUID(), nil)); err != nil {
				b.Fatal(err)
			}
			wcfg := wamqp.NewDurablePubSubConfig(tb.url, nil)
			wcfg.Exchange.GenerateName = cfg.Topology.ExchangeName
			wcfg.Publish.ConfirmDelivery = true
			wcfg.Publish.ChannelPoolSize = tc.workers
			pub, err := wamqp.NewPublisher(wcfg, watermill.NopLogger{})
			if err != nil {
				b.Fatal(err)
			}
			defer pub.Close()
			run(b, pub, "bench", tc.workers, tc.batch)
		})
	}
}
