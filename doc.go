// Package tailrace holds the few names every part of the framework shares:
// the Kinder interface that gives a message type its stable kind, the
// metadata keys a staged message carries from the outbox to the broker and
// the consumer, the Permanent error marker that retrying components (the
// Retry behavior, the relay, consumers) honour, and the Unavailable marker
// with which publishers tell a failure of the transport (the broker is
// unreachable) from a failure of the message.
//
// The framework itself lives in the sub-packages:
//
//   - mediator: typed commands, queries, notifications and streams dispatched
//     through ordered behaviors.
//   - behaviors: the stock behaviors (Recover, Logging, Validation, Timeout,
//     Retry, Transaction, ...).
//   - outbox: staging messages in the caller's SQL transaction and the relay
//     that moves them to brokers.
//   - policy: the JSON routing policy.
//   - bus: publishers by key, the routing publisher, consumers and the inbox.
package tailrace
