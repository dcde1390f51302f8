package outbox

import (
	"context"
	"database/sql/driver"
	"errors"
	"time"

	"github.com/jackc/pgx/v5"
)

// listenLoop holds one pooled PostgreSQL connection in LISTEN on the
// channel named after the outbox table (NotifyPostgres, in the processes
// that stage, NOTIFYs it after their commits) and wakes the claimer on every notification. It reconnects with
// backoff; while it is down the relay still polls.
func (e *engine) listenLoop() {
	defer e.leaseWG.Done()
	bo := newDBBackoff()
	for {
		start := time.Now()
		err := e.listenOnce()
		select {
		case <-e.stopLease:
			return
		default:
		}
		if errors.Is(err, errNotPgx) {
			e.log.Info(e.name+": the database/sql driver is not pgx; LISTEN is off, the relay polls", "poll_interval", e.cfg.PollInterval)
			return
		}
		if time.Since(start) > time.Minute {
			bo.Reset()
		}
		d := bo.NextBackOff()
		e.log.Warn(e.name+": LISTEN connection lost; reconnecting", "err", err, "retry_in", d)
		if !sleep(d, e.stopLease) {
			return
		}
	}
}

var errNotPgx = errors.New("outbox: not a pgx connection")

func (e *engine) listenOnce() error {
	ctx, cancel := context.WithCancel(e.ctx)
	defer cancel()
	go func() {
		select {
		case <-e.stopLease:
			cancel()
		case <-ctx.Done():
		}
	}()
	conn, err := e.db.Conn(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	var loopErr error
	err = conn.Raw(func(dc any) error {
		c, ok := dc.(interface{ Conn() *pgx.Conn })
		if !ok {
			loopErr = errNotPgx
			return nil
		}
		pc := c.Conn()
		if _, err := pc.Exec(ctx, "LISTEN "+e.q.t); err != nil {
			loopErr = err
			return driver.ErrBadConn
		}
		// Commits made while we were not listening.
		wake(e.claimWake)
		for {
			if _, err := pc.WaitForNotification(ctx); err != nil {
				loopErr = err
				// The connection is LISTENing (or broken): never give it
				// back to the pool.
				return driver.ErrBadConn
			}
			wake(e.claimWake)
		}
	})
	if loopErr != nil {
		return loopErr
	}
	return err
}
