package outbox

import (
	"context"
	"database/sql"
)

type txKey struct{}

// ContextWithTx returns a copy of ctx that carries tx. Stage and Enqueue
// write into the transaction found this way; the Transaction behavior puts
// its transaction there for the handlers it wraps.
func ContextWithTx(ctx context.Context, tx *sql.Tx) context.Context {
	return context.WithValue(ctx, txKey{}, tx)
}

// TxFromContext returns the transaction ContextWithTx put in ctx, if any.
func TxFromContext(ctx context.Context) (*sql.Tx, bool) {
	tx, ok := ctx.Value(txKey{}).(*sql.Tx)
	return tx, ok && tx != nil
}
