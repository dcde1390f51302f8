package bench

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/components/forwarder"
	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/tailrace/tailrace/outbox"
)

// LatencyResult is commit → consumer receipt at a steady rate, one message
// per transaction.
type LatencyResult struct {
	Contender string  `json:"contender"`
	Publisher string  `json:"publisher"`
	Mode      string  `json:"mode"`
	Rate      int     `json:"rate_per_s"`
	Sent      int     `json:"sent"`
	Received  int     `json:"received"`
	P50ms     float64 `json:"p50_ms"`
	P95ms     float64 `json:"p95_ms"`
	P99ms     float64 `json:"p99_ms"`
	Maxms     float64 `json:"max_ms"`
}

// LatencyTailrace commits one message per transaction at rate/s for dur
// with a relay running. mode "listen": the senders signal a Notifier
// bridged to PostgreSQL by outbox.NotifyPostgres and the relay has no
// Notifier, so it is woken by LISTEN only (as a relay in another process
// is); "notifier": relay and senders share the in-process Notifier.
func LatencyTailrace(ctx context.Context, e Env, mode string, rate int, dur time.Duration) (LatencyResult, error) {
	res := LatencyResult{Contender: TailraceRelay, Publisher: string(TailracePublisher), Mode: mode, Rate: rate}
	s, err := e.NewSchema(ctx)
	if err != nil {
		return res, err
	}
	defer s.Drop()
	cons, err := NewConsumer(e.AMQPURL, "bench_lat")
	if err != nil {
		return res, err
	}
	defer cons.Close()
	pub, err := NewPublisher(e.AMQPURL, TailracePublisher)
	if err != nil {
		return res, err
	}
	defer pub.Close()
	table := "outbox_lat"
	if err := outbox.InitializeSchema(ctx, s.DB, outbox.PostgreSQL, table); err != nil {
		return res, err
	}
	ob, err := outbox.New(s.DB, nil, outbox.Config{Dialect: outbox.PostgreSQL, Table: table})
	if err != nil {
		return res, err
	}
	notifier := &outbox.Notifier{} // signalled by the senders after each commit
	relayNotifier := notifier
	if mode == "listen" {
		relayNotifier = nil
		stop, err := outbox.NotifyPostgres(s.DB, table, notifier, quietLogger())
		if err != nil {
			return res, err
		}
		defer stop()
	}
	rl, err := outbox.NewRelay(s.DB, pub, quietLogger(), outbox.RelayConfig{Dialect: outbox.PostgreSQL, Table: table, Notifier: relayNotifier})
	if err != nil {
		return res, err
	}
	go func() { _ = rl.Run(context.Background()) }()
	defer rl.Close()
	select {
	case <-rl.Running():
	case <-time.After(30 * time.Second):
		return res, fmt.Errorf("bench: relay did not start")
	}
	time.Sleep(500 * time.Millisecond) // leases taken
	commit := func(i int) error {
		id, payload := Payload(i)
		tx, err := s.DB.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		if err := ob.StageTx(ctx, tx, outbox.Message{Value: rawJSON(payload), Options: &outbox.StageOptions{
			Kind: "bench", Topic: cons.Queue, MessageID: id, PartitionKey: fmt.Sprintf("k%d", i%50),
		}}); err != nil {
			_ = tx.Rollback()
			return err
		}
		if err := tx.Commit(); err != nil {
			return err
		}
		notifier.Notify()
		return nil
	}
	return steady(res, cons, rate, dur, commit)
}

// LatencyStock does the same through Watermill's recipe and the stock
// forwarder, whose subscriber polls every poll.
func LatencyStock(ctx context.Context, e Env, pubKind Publisher, poll time.Duration, rate int, dur time.Duration) (LatencyResult, error) {
	res := LatencyResult{Contender: StockForwarder, Publisher: string(pubKind), Mode: "poll " + poll.String(), Rate: rate}
	r, err := newStockRig(ctx, e, pubKind, "bench_lat", poll)
	if err != nil {
		return res, err
	}
	defer r.close()
	s, cons, pub, sub, topic := r.schema, r.cons, r.pub, r.sub, r.topic
	fwd, err := forwarder.NewForwarder(sub, pub, watermill.NopLogger{}, forwarder.Config{ForwarderTopic: topic})
	if err != nil {
		return res, err
	}
	go func() { _ = fwd.Run(context.Background()) }()
	defer fwd.Close()
	select {
	case <-fwd.Running():
	case <-time.After(30 * time.Second):
		return res, fmt.Errorf("bench: forwarder did not start")
	}
	time.Sleep(500 * time.Millisecond)
	commit := func(i int) error {
		id, payload := Payload(i)
		return stageStock(ctx, s.DB, topic, cons.Queue, message.NewMessage(id, payload))
	}
	return steady(res, cons, rate, dur, commit)
}

// steady calls commit(i) rate times a second for dur, then waits (up to 30
// s) for the consumer and computes the percentiles.
func steady(res LatencyResult, cons *Consumer, rate int, dur time.Duration, commit func(i int) error) (LatencyResult, error) {
	total := int(dur.Seconds() * float64(rate))
	committed := make([]time.Time, total)
	tick := time.NewTicker(time.Second / time.Duration(rate))
	defer tick.Stop()
	for i := 0; i < total; i++ {
		<-tick.C
		if err := commit(i); err != nil {
			return res, err
		}
		committed[i] = time.Now()
	}
	res.Sent = total
	cons.WaitN(total, time.Now().Add(30*time.Second))
	res.Received = cons.N()
	lat := make([]float64, 0, total)
	for i, at := range committed {
		id, _ := Payload(i)
		if got, ok := cons.ReceivedAt(id); ok {
			lat = append(lat, float64(got.Sub(at).Microseconds())/1000)
		}
	}
	if len(lat) == 0 {
		return res, fmt.Errorf("bench: no message received")
	}
	slices.Sort(lat)
	pct := func(p int) float64 { return lat[min(len(lat)-1, len(lat)*p/100)] }
	res.P50ms, res.P95ms, res.P99ms, res.Maxms = pct(50), pct(95), pct(99), lat[len(lat)-1]
	return res, nil
}
