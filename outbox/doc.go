// Package outbox makes "change my data and publish a message" one atomic
// step: the transactional outbox.
//
// It exists because a service cannot commit to its database and publish to a
// broker atomically. Publish first and then fail to commit, and consumers act
// on something that never happened; commit first and then crash (or find the
// broker down) before publishing, and the message is lost. The outbox writes
// the message into a table of the service's own database, in the same
// transaction as the domain rows; a relay publishes it after the commit, and
// keeps trying until the broker confirms it. A message therefore exists if
// and only if its transaction committed, and it is published at least once.
//
// # Staging
//
// An Outbox (New) stages messages inside the caller's transaction:
//
//   - Stage(ctx, msgs...) uses the transaction in the context: the one the
//     Transaction behavior (package behaviors) opened for the command being
//     handled, or one put there with ContextWithTx. Without one it returns
//     ErrNoTx.
//   - StageTx(ctx, tx, msgs...) takes any *sql.Tx the caller owns.
//   - Enqueue(ctx, cmd) stages a command for a worker to execute later,
//     joining the transaction in the context or committing one of its own;
//     it goes into Config.CommandTable when set, for a Worker.
//
// Staged messages are visible to the relay only after the transaction
// commits, and are gone if it rolls back. Bad input (no kind, a payload over
// Config.MaxPayloadBytes, a reserved header) fails at Stage, before any SQL,
// and leaves the transaction usable.
//
// Staging is Watermill's outbox recipe: the forwarder's publisher
// (components/forwarder) wraps each message in its JSON envelope, and a
// watermill-sql publisher built on the caller's *sql.Tx inserts it through
// this package's SchemaAdapter, which also fills the columns the relay
// orders and partitions by (kind, partition key and its hash, message id).
//
// # What a message carries
//
// The payload is the value marshalled by Config.Marshaler (JSON by
// default). The metadata (keys in package tailrace) holds the kind (from the
// value's Kind() method, never its Go type name), the partition key, domain,
// tenant and tenant tier, the correlation and causation ids, the time of
// staging, the W3C traceparent of the current OpenTelemetry span, and the
// caller's own headers. Per-type defaults come from optional methods of the
// value (PartitionKey, Domain, OutboxOptions), per-call overrides from a
// Message with StageOptions, and request-scoped values from the context
// (WithCorrelationID, WithCausationID, WithTenant).
//
// # Databases
//
// PostgreSQL (pgx), MySQL/MariaDB (go-sql-driver/mysql) and SQLite
// (modernc.org/sqlite, pure Go), the embedded default. Create the tables with
// InitializeSchema at start-up, or put the statements of SchemaSQL into your
// migrations; table names are validated (ValidateTableName) before any SQL
// is built. For SQLite the package also provides the watermill-sql adapters
// upstream lacks (SQLiteSchema, SQLiteOffsetsAdapter), proven with
// Watermill's universal Pub/Sub test suite.
//
// # The relay and the worker
//
// One engine claims committed rows in batches, keeps order per partition
// key, shares the table's partitions among processes through leases,
// retries with backoff and dead-letters what keeps failing. It has two
// sinks:
//
//   - the relay (NewRelay) unwraps the envelopes with Watermill's forwarder
//     and publishes them to brokers: at least once, deleted only after the
//     broker confirmed;
//   - the worker (NewWorker) runs the commands of a command table
//     (Config.CommandTable, where Enqueue writes) straight through the
//     mediator, with no broker: exactly once when the handler runs in the
//     Transaction behavior, which deletes the command's row in the
//     handler's own transaction (CompleteInTx), at least once otherwise.
//
// A table is served by relays or by workers, never both. See docs/outbox.md.
package outbox
