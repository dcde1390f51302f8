// Package bus is where messages leave a service and where they come back in:
// the publishers a routing policy can send to, by key; the publisher the
// relay forwards to, which routes each message; and the consumers that feed
// messages from brokers back into the mediator.
//
// It exists because the relay (the Watermill forwarder draining the outbox)
// publishes to exactly one message.Publisher, while a service's messages go
// to several places — RabbitMQ for commands, NATS for integration events, an
// in-process channel in tests — and because brokers deliver at least once,
// so what comes back in must be decoded by kind and deduplicated.
//
//   - Registry names the publishers ("rabbit", "nats", "local") so a policy
//     file can refer to them, the policy loader can reject a key nobody
//     registered (Registry.HasPublisher), and one Close shuts them all down.
//   - RoutingPublisher is the one publisher the relay gets: it asks the
//     policy for each message's routes and publishes a copy to each,
//     tracking delivery per route.
//   - Consumer runs a Watermill Router that decodes messages by kind and
//     dispatches them into the mediator, with retries and a poison queue;
//     the Inbox behavior makes the handlers' effects happen once.
//
// Each transport lives in its own sub-package, so a service links only the
// client libraries it uses, and each is a thin, configured constructor over
// the Watermill package made for that broker: a Config with defaults and a
// Validate that reports every problem at once, NewPublisher(cfg, logger) and
// NewSubscriber(cfg, logger) returning Watermill's interfaces, and a doc
// comment that states what the transport guarantees:
//
//   - bus/amqp: RabbitMQ, publisher confirms always on and pipelined,
//     unroutable messages reported as failures, durable topology.
//   - bus/nats: NATS JetStream, PubAck per message, deduplicated by id.
//   - bus/redisstream: Redis Streams.
//   - bus/sqlbus: a PostgreSQL database used as the broker.
//   - bus/gochannel: in-process, the embedded default.
//
// None of them lets a URL's password reach a log line or an error.
// docs/bus.md compares their guarantees and shows how to configure them.
package bus
