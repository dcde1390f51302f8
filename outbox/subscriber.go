package outbox

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"

	"github.com/ThreeDotsLabs/watermill/message"
)

// subscriber is the relay's sink of the engine: the message.Subscriber the
// forwarder reads for its topic. Unlike watermill-sql's, which hands out one
// message and waits for its ack, it keeps up to MaxInFlight messages out at
// once (the router runs each in its own goroutine), holding back only the
// next message of a key whose previous one is not yet acknowledged.
//
// An Ack deletes the row in the next ack batch; a Nack is a failure of the
// row (retried after a backoff, or dead-lettered); the outage breaker is
// on, so a broker that is down costs messages no attempts but the probes'.
type subscriber struct {
	*engine
	out chan *message.Message
}

func newSubscriber(db *sql.DB, logger *slog.Logger, cfg RelayConfig) *subscriber {
	e := newEngine(db, logger, "outbox relay", cfg)
	e.breaker = true
	return &subscriber{engine: e, out: make(chan *message.Message, emitBatch)}
}

// Subscribe starts the relay's loops and returns the channel the router
// reads. It may be called once, with the relay's table as topic.
func (s *subscriber) Subscribe(ctx context.Context, topic string) (<-chan *message.Message, error) {
	if topic != s.cfg.Table {
		return nil, fmt.Errorf("outbox: relay subscriber serves topic %q, not %q", s.cfg.Table, topic)
	}
	if err := s.start(s.emitLoop); err != nil {
		return nil, err
	}
	go func() {
		select {
		case <-ctx.Done():
			_ = s.Close()
		case <-s.abandon:
		}
	}()
	return s.out, nil
}

// Close stops claiming and emitting, waits up to CloseTimeout for the
// messages in flight, deletes the rows of those acknowledged, and releases
// the leases of partitions with nothing left in flight.
func (s *subscriber) Close() error { return s.close() }

// emitBatch is how many rows the emitter takes per lock. With the buffered
// output channel it keeps the router fed even when the emitter and the
// router's loop get the CPU rarely (hundreds of publishing goroutines
// queue before them in the scheduler): handing over one message per
// scheduling round capped a drain at a third of MaxInFlight in flight.
const emitBatch = 64

func (s *subscriber) emitLoop() {
	defer close(s.out)
	batch := make([]*heldRow, 0, emitBatch)
	for {
		batch = s.take(batch[:0], emitBatch)
		if len(batch) == 0 {
			if !s.waitDispatch() {
				return
			}
			continue
		}
		for i, r := range batch {
			stopped := false
			select {
			case <-s.stopDispatch:
				stopped = true
			default:
				select {
				case s.out <- s.toMessage(r):
				case <-s.stopDispatch:
					stopped = true
				}
			}
			if stopped {
				s.unfly(batch[i:])
				return
			}
		}
	}
}

func (s *subscriber) toMessage(r *heldRow) *message.Message {
	msg := message.NewMessage(r.uuid, r.payload)
	if len(r.metadata) > 2 {
		var md map[string]string
		if json.Unmarshal(r.metadata, &md) == nil {
			for k, v := range md {
				msg.Metadata.Set(k, v)
			}
		}
	}
	h := &errHolder{}
	msg.SetContext(context.WithValue(s.ctx, errHolderKey{}, h))
	go s.await(r, msg, h)
	return msg
}

func (s *subscriber) await(r *heldRow, msg *message.Message, h *errHolder) {
	select {
	case <-msg.Acked():
		s.acked(r)
	case <-msg.Nacked():
		s.onNack(r, h.get())
	case <-s.abandon:
	}
}

func (s *subscriber) onNack(r *heldRow, cause error) {
	if err := checkEnvelope(r.payload); err != nil {
		s.failed(r, fmt.Errorf("outbox: the forwarder envelope cannot be unwrapped: %w", err), reasonUnwrappable)
		return
	}
	s.failed(r, cause, "")
}

// checkEnvelope reports whether payload is a forwarder envelope the
// forwarder can unwrap (the same checks it makes).
func checkEnvelope(payload []byte) error {
	var e struct {
		DestinationTopic string            `json:"destination_topic"`
		UUID             string            `json:"uuid"`
		Payload          []byte            `json:"payload"`
		Metadata         map[string]string `json:"metadata"`
	}
	if err := json.Unmarshal(payload, &e); err != nil {
		return err
	}
	if e.DestinationTopic == "" {
		return errors.New("no destination topic")
	}
	return nil
}
