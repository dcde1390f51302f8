package outbox

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strconv"
	"time"
)

// DeadLetter is a message the relay gave up on: it failed MaxAttempts times,
// failed with a permanent error (tailrace.Permanent), or its row could not be
// unwrapped. It stays in <table>_dead until replayed or purged.
type DeadLetter struct {
	// ID is the message's outbox row id (kept from the outbox table).
	ID           int64
	UUID         string
	MessageID    string
	Kind         string
	PartitionKey string
	// Payload is the forwarder envelope as it was staged.
	Payload   []byte
	Metadata  []byte
	Attempts  int
	LastError string
	CreatedAt time.Time
	DeadAt    time.Time
}

// DeadLetters lists, replays and purges the dead letters of one outbox
// table. It is what the admin CLI builds on.
type DeadLetters struct {
	db *sql.DB
	q  *relaySQL
}

// NewDeadLetters returns the dead-letter store of table.
func NewDeadLetters(db *sql.DB, d Dialect, table string) (*DeadLetters, error) {
	if db == nil {
		return nil, errors.New("outbox: NewDeadLetters: db is nil")
	}
	if d == nil {
		return nil, errors.New("outbox: NewDeadLetters: nil Dialect; use outbox.PostgreSQL, outbox.MySQL or outbox.SQLite")
	}
	if err := ValidateTableName(table); err != nil {
		return nil, err
	}
	return &DeadLetters{db: db, q: newRelaySQL(d, table, 1)}, nil
}

// Count returns the number of dead letters.
func (d *DeadLetters) Count(ctx context.Context) (int, error) {
	var n int
	err := d.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM `+d.q.dead).Scan(&n)
	return n, err
}

// List returns up to limit dead letters with ids above afterID, by id; page
// with the last id returned.
func (d *DeadLetters) List(ctx context.Context, afterID int64, limit int) ([]DeadLetter, error) {
	if limit <= 0 {
		limit = 100
	}
	rows, err := d.db.QueryContext(ctx, `SELECT id, uuid, message_id, kind, partition_key, payload, metadata, attempts, last_error, created_at, dead_at FROM `+
		d.q.dead+` WHERE id > `+d.q.ph(1)+` ORDER BY id LIMIT `+d.q.ph(2), afterID, limit)
	if err != nil {
		return nil, fmt.Errorf("outbox: list dead letters: %w", err)
	}
	defer rows.Close()
	var out []DeadLetter
	for rows.Next() {
		var l DeadLetter
		var created, dead any
		if err := rows.Scan(&l.ID, &l.UUID, &l.MessageID, &l.Kind, &l.PartitionKey, &l.Payload, &l.Metadata,
			&l.Attempts, &l.LastError, &created, &dead); err != nil {
			return nil, fmt.Errorf("outbox: list dead letters: %w", err)
		}
		l.CreatedAt, l.DeadAt = asTime(created), asTime(dead)
		out = append(out, l)
	}
	return out, rows.Err()
}

// Replay moves the given dead letters back into the outbox, in id order, as
// new rows (new ids, attempts reset); the relay sends them again. It returns
// how many were moved; unknown ids, and ids another Replay moved first, are
// ignored, so concurrent replays of the same ids move each dead letter once.
// Ids are moved in transactions of up to 1000: an error may leave the
// earlier chunks moved (the count says how many).
func (d *DeadLetters) Replay(ctx context.Context, ids ...int64) (int, error) {
	n := 0
	for len(ids) > 0 {
		k := min(len(ids), 1000)
		m, err := d.replayChunk(ctx, ids[:k])
		n += m
		if err != nil {
			return n, err
		}
		ids = ids[k:]
	}
	return n, nil
}

// replayChunk moves up to 1000 dead letters back into the outbox in one
// transaction. It is safe to run concurrently with itself on the same ids:
// each dead letter is moved once.
func (d *DeadLetters) replayChunk(ctx context.Context, ids []int64) (int, error) {
	const cols = `uuid, message_id, kind, partition_key, key_hash, payload, metadata`
	in := intList(ids)
	wrap := func(err error) (int, error) { return 0, fmt.Errorf("outbox: replay dead letters: %w", err) }
	if d.q.pg {
		// The DELETE takes the row locks; a concurrent replay of the same
		// rows waits, then finds them gone and inserts nothing.
		res, err := d.db.ExecContext(ctx, `WITH moved AS (DELETE FROM `+d.q.dead+` WHERE id IN (`+in+`) RETURNING id, `+cols+`)`+
			` INSERT INTO `+d.q.t+` (`+cols+`) SELECT `+cols+` FROM moved ORDER BY id`)
		if err != nil {
			return wrap(err)
		}
		n, _ := res.RowsAffected()
		return int(n), nil
	}
	tx, err := d.db.BeginTx(ctx, nil)
	if err != nil {
		return wrap(err)
	}
	defer func() { _ = tx.Rollback() }()
	if d.q.my {
		rows, err := tx.QueryContext(ctx, `SELECT id FROM `+d.q.dead+` WHERE id IN (`+in+`) ORDER BY id FOR UPDATE`)
		if err != nil {
			return wrap(err)
		}
		var locked []int64
		for rows.Next() {
			var id int64
			if err := rows.Scan(&id); err != nil {
				rows.Close()
				return wrap(err)
			}
			locked = append(locked, id)
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return wrap(err)
		}
		if len(locked) == 0 {
			return 0, nil
		}
		in = intList(locked)
	}
	// SQLite: the INSERT is the transaction's first statement, so it takes
	// the write lock before reading: a concurrent replay sees the rows gone.
	res, err := tx.ExecContext(ctx, `INSERT INTO `+d.q.t+` (`+cols+`) SELECT `+cols+` FROM `+d.q.dead+` WHERE id IN (`+in+`) ORDER BY id`)
	if err != nil {
		return wrap(err)
	}
	n, _ := res.RowsAffected()
	if _, err := tx.ExecContext(ctx, `DELETE FROM `+d.q.dead+` WHERE id IN (`+in+`)`); err != nil {
		return wrap(err)
	}
	if err := tx.Commit(); err != nil {
		return wrap(err)
	}
	return int(n), nil
}

// Purge deletes the given dead letters for good and returns how many.
func (d *DeadLetters) Purge(ctx context.Context, ids ...int64) (int, error) {
	n := 0
	for len(ids) > 0 {
		k := min(len(ids), 1000)
		res, err := d.db.ExecContext(ctx, `DELETE FROM `+d.q.dead+` WHERE id IN (`+intList(ids[:k])+`)`)
		if err != nil {
			return n, fmt.Errorf("outbox: purge dead letters: %w", err)
		}
		m, _ := res.RowsAffected()
		n += int(m)
		ids = ids[k:]
	}
	return n, nil
}

// purgeBatch is how many dead letters one statement of PurgeBefore deletes.
const purgeBatch = 1000

// purgeBatch deletes up to purgeBatch dead letters that died before the
// time in arg. Outside MySQL it selects their ids first and deletes them by
// a literal list: a DELETE … WHERE id IN (SELECT … LIMIT n) is a join whose
// cached generic plan, built while the table was small, scans the whole
// table for every batch (see relaySQL.idAmong).
func (d *DeadLetters) purgeBatch(ctx context.Context, arg any) (int64, error) {
	lim := strconv.Itoa(purgeBatch)
	if d.q.my {
		res, err := d.db.ExecContext(ctx, `DELETE FROM `+d.q.dead+` WHERE dead_at < ? ORDER BY dead_at LIMIT `+lim, arg)
		if err != nil {
			return 0, err
		}
		return res.RowsAffected()
	}
	ids, err := selectIDs(ctx, d.db, `SELECT id FROM `+d.q.dead+` WHERE dead_at < `+d.q.ph(1)+` LIMIT `+lim, freshPlan(d.db, arg)...)
	if err != nil || len(ids) == 0 {
		return 0, err
	}
	res, err := d.db.ExecContext(ctx, `DELETE FROM `+d.q.dead+` WHERE id IN (`+intList(ids)+`) AND dead_at < `+d.q.ph(1), arg)
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

// PurgeBefore deletes dead letters that died before t, in batches, and
// returns how many.
func (d *DeadLetters) PurgeBefore(ctx context.Context, t time.Time) (int, error) {
	var arg any = t.UTC()
	if d.q.sq {
		arg = t.UTC().Format("2006-01-02T15:04:05.000Z")
	}
	n := 0
	for {
		m, err := d.purgeBatch(ctx, arg)
		if err != nil {
			return n, fmt.Errorf("outbox: purge dead letters: %w", err)
		}
		n += int(m)
		if m < purgeBatch {
			return n, nil
		}
	}
}
