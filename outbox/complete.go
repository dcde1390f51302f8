package outbox

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"sync/atomic"
)

// ErrNotClaimed is returned by CompleteInTx when the command's row is no
// longer claimed by the worker running it: its partition moved to another
// worker (which runs the command itself), or the row is already gone. The
// transaction must roll back, so that the command's effects are not
// committed twice; the worker then drops the row without counting an
// attempt.
var ErrNotClaimed = errors.New("outbox: the command's row is no longer claimed by this worker")

// completion is what a Worker puts in the context of a command's handler:
// how to delete the command's row inside the handler's transaction.
type completion struct {
	kind string
	run  func(ctx context.Context, tx *sql.Tx) error
	done atomic.Bool // the row was deleted in a transaction (that may still roll back)
}

type completionKey struct{}

func withCompletion(ctx context.Context, c *completion) context.Context {
	return context.WithValue(ctx, completionKey{}, c)
}

// CompleteInTx deletes, in tx, the outbox row of the worker command being
// handled in ctx, so that the command's completion commits, or rolls back,
// with the handler's own writes: River's JobCompleteTx, built in. kind is
// the kind of the request the transaction was opened for; the row is
// completed only by the transaction of the command itself (not by one a
// nested dispatch of another kind opened). Without a worker command in ctx
// it does nothing and returns nil.
//
// The Transaction behavior (package behaviors) calls it just before COMMIT,
// so handlers never need to. Code that runs a worker command's handler in
// a transaction of its own calls it before committing that transaction.
// On ErrNotClaimed (or any error) roll the transaction back.
func CompleteInTx(ctx context.Context, tx *sql.Tx, kind string) error {
	c, ok := ctx.Value(completionKey{}).(*completion)
	if !ok || c == nil || c.kind != kind {
		return nil
	}
	if tx == nil {
		return ErrNoTx
	}
	if err := c.run(ctx, tx); err != nil {
		if errors.Is(err, ErrNotClaimed) {
			return err
		}
		return fmt.Errorf("outbox: complete command in its transaction: %w", err)
	}
	c.done.Store(true)
	return nil
}
