package outbox

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
)

// Enqueue stages cmd, a command, for a worker to execute later (the seed
// sample's dispatcher.EnqueueAsync): the caller does not wait for the
// handler. It returns once the command is durably staged. cmd is a value or
// a Message (value plus options); its kind, payload and metadata are those
// Stage writes, plus tailrace.MetaCommand = "true", which marks it as a command for
// the routing policy and for the worker that executes it.
//
// Which transaction: if ctx carries one (inside the Transaction behavior,
// or after ContextWithTx), Enqueue joins it, and the command is staged only
// if that transaction commits: enqueueing is atomic with the caller's own
// writes. Otherwise Enqueue runs a short transaction of its own on the
// Outbox's *sql.DB, commits it, and signals Config.Notifier; it returns
// ErrNoTx if the Outbox has no *sql.DB.
//
// Where it goes: into Config.CommandTable when set, for a Worker that runs
// it straight from that table (exactly once when its handler runs in the
// Transaction behavior; see Worker); otherwise into the outbox table, for
// the relay to publish to a broker, where a consumer runs it at least once
// (make its handler idempotent, or run it behind the inbox).
func (o *Outbox) Enqueue(ctx context.Context, cmd any) error {
	if tx, ok := TxFromContext(ctx); ok {
		return o.EnqueueTx(ctx, tx, cmd)
	}
	if o.db == nil {
		return ErrNoTx
	}
	// Validate and marshal before opening the transaction.
	msgs, err := o.prepare(ctx, []any{cmd}, true)
	if err != nil {
		return err
	}
	tx, err := o.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("outbox: enqueue: begin: %w", err)
	}
	if err := o.writeTo(ctx, tx, o.commands, msgs); err != nil {
		if rerr := tx.Rollback(); rerr != nil && !errors.Is(rerr, sql.ErrTxDone) {
			err = errors.Join(err, fmt.Errorf("outbox: enqueue: rollback: %w", rerr))
		}
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("outbox: enqueue: commit: %w", err)
	}
	o.cfg.Notifier.Notify()
	return nil
}

// EnqueueTx is Enqueue on an explicit transaction: the command is staged in
// tx, visible to the relay or worker only after tx commits and gone if it
// rolls back.
// Whoever commits tx should signal the Notifier (the Transaction behavior
// does).
func (o *Outbox) EnqueueTx(ctx context.Context, tx *sql.Tx, cmd any) error {
	if tx == nil {
		return ErrNoTx
	}
	msgs, err := o.prepare(ctx, []any{cmd}, true)
	if err != nil {
		return err
	}
	return o.writeTo(ctx, tx, o.commands, msgs)
}
