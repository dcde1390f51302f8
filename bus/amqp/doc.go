// Package amqp publishes to and consumes from RabbitMQ, for the tailrace bus.
//
// It exists because watermill-amqp's publisher, used as is, can lose
// messages silently: publisher confirms are off by default, and even with
// them on it reports success for a message that no queue receives (it does
// not listen for basic.return). It also waits for each confirm before sending
// the next message, which caps a relay at a few thousand messages per second.
//
// The Publisher here is written over amqp091-go directly:
//
//   - confirms are always on, and Publish returns nil only once the broker
//     has confirmed every message;
//   - every message is published mandatory, and a basic.return turns into a
//     *ReturnedError (ErrUnroutable): unroutable is a failure, never a
//     silent success;
//   - messages are pipelined: concurrent Publish calls (and the messages of
//     one call) share one channel with up to Config.MaxInFlight unconfirmed;
//   - exchanges (and optionally queues) are durable, messages persistent,
//     declared up front or on first use (Topology.Declare);
//   - it reconnects by itself with bounded backoff, and a Publish during an
//     outage fails fast (ErrNotConnected) rather than hanging;
//   - the URL's password never appears in a log line or a returned error,
//     even for a malformed URL (RedactURL).
//
// The Subscriber is this package's own too (on amqp091), configured from the
// same Config so both sides agree on names: it hands over up to Prefetch
// messages before their acks and settles each on its own, which a
// concurrent bus.Consumer needs (watermill-amqp's waits for each ack before
// the next message). Both pass Watermill's universal Pub/Sub suite.
//
// By default a topic maps to a durable fanout exchange of the same name, and
// subscribers consume a durable queue of the same name; see Topology to
// change that (one queue per consumer group, a topic exchange, the default
// exchange).
package amqp
