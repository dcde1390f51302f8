package outbox

import (
	"context"
	"database/sql"
	"errors"
	"log/slog"
	"time"
)

// NotifyPostgresInterval is the shortest time between two NOTIFYs sent by
// NotifyPostgres.
const NotifyPostgresInterval = 5 * time.Millisecond

// NotifyPostgres forwards the in-process commit signals of n to relays in
// other processes, as a PostgreSQL NOTIFY on the channel named after the
// outbox table (the channel the relay LISTENs on), sent after the commit and
// outside the staging transaction. It returns a function that stops it and
// waits for it to end.
//
// Why not NOTIFY inside the staging transaction (a trigger does that):
// PostgreSQL serializes the commits of all transactions that sent a NOTIFY
// (a database-wide lock held through the commit), so every staging
// transaction would wait for every other one's commit flush. Measured here
// with 8 senders: a NOTIFY in each transaction costs about half of the
// commit rate. Here one NOTIFY at a time is in flight per process, at most
// one per NotifyPostgresInterval, and signals that arrive meanwhile coalesce
// into the next one: a relay in another process learns of a commit within
// about that interval plus a round trip.
//
// Signals come from the Transaction behavior and from Enqueue's own
// transactions; code that commits its own StageTx transactions calls
// n.Notify() after the commit, or its messages wait for the relays' next
// poll. A failed NOTIFY is logged and dropped: the relays poll anyway.
func NotifyPostgres(db *sql.DB, table string, n *Notifier, logger *slog.Logger) (stop func(), err error) {
	var errs []error
	if db == nil {
		errs = append(errs, errors.New("outbox: NotifyPostgres needs a *sql.DB"))
	}
	if n == nil {
		errs = append(errs, errors.New("outbox: NotifyPostgres needs a *Notifier"))
	}
	if err := ValidateTableName(table); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	signals, unsubscribe := n.Subscribe()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-ctx.Done():
				return
			case <-signals:
			}
			start := time.Now()
			qctx, qcancel := context.WithTimeout(ctx, 5*time.Second)
			_, err := db.ExecContext(qctx, `SELECT pg_notify($1, '')`, table)
			qcancel()
			if err != nil && ctx.Err() == nil {
				logger.Warn("outbox: NOTIFY failed; relays in other processes find the messages at their next poll",
					"table", table, "err", err)
			}
			if rest := NotifyPostgresInterval - time.Since(start); rest > 0 {
				select {
				case <-ctx.Done():
					return
				case <-time.After(rest):
				}
			}
		}
	}()
	return func() {
		unsubscribe()
		cancel()
		<-done
	}, nil
}
