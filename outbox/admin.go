package outbox

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Admin answers the operator's questions about one outbox table — how deep
// is it, how old is its oldest message, which relays hold which partitions,
// what died and why — and replays or purges dead letters. It is what the
// `tailrace outbox` commands and the health check build on. Every query is
// cheap (primary-key or indexed lookups, counts of the outbox and
// dead-letter tables) and read-only, except Replay and Purge.
//
// An Admin holds no connection of its own and is safe for concurrent use.
type Admin struct {
	db   *sql.DB
	q    *relaySQL
	dead *DeadLetters
}

// NewAdmin returns the Admin of the outbox table named table (see
// InitializeSchema) in db.
func NewAdmin(db *sql.DB, d Dialect, table string) (*Admin, error) {
	dl, err := NewDeadLetters(db, d, table)
	if err != nil {
		return nil, err
	}
	return &Admin{db: db, q: newRelaySQL(d, table, 1), dead: dl}, nil
}

// Table is the outbox table this Admin works on.
func (a *Admin) Table() string { return a.q.table }

// DeadLetters is the dead-letter store of the table.
func (a *Admin) DeadLetters() *DeadLetters { return a.dead }

// Status is a snapshot of one outbox table. Times are the database's.
type Status struct {
	Table string `json:"table"`
	// Now is the database's clock when the snapshot was taken; ages are
	// measured against it, so the clock of the caller does not matter.
	Now time.Time `json:"now"`
	// Pending counts the messages not yet relayed (committed, waiting,
	// in flight or waiting for a retry).
	Pending int `json:"pending"`
	// Retrying counts the pending messages that failed at least once.
	Retrying int `json:"retrying"`
	// Relayed counts relayed rows kept for RelayConfig.Retention.
	Relayed int `json:"relayed"`
	// OldestPendingAt is when the oldest pending message (lowest id) was
	// staged; zero when nothing is pending. OldestPendingAge is Now minus it.
	OldestPendingAt  time.Time     `json:"oldest_pending_at,omitzero"`
	OldestPendingAge time.Duration `json:"oldest_pending_age_ns"`
	// OldestFreshAge is the age of the oldest pending message that never
	// failed (waiting for the relay, not for a retry); zero when none.
	OldestFreshAge time.Duration `json:"oldest_fresh_age_ns"`
	// DeadLetters counts the messages in the dead-letter table;
	// LastDeadAt is when the latest one died.
	DeadLetters int       `json:"dead_letters"`
	LastDeadAt  time.Time `json:"last_dead_at,omitzero"`
	// Relays lists the relays registered on the table, live or expired,
	// oldest first; Leases the partition leases, by partition.
	Relays []RelayInfo `json:"relays"`
	Leases []LeaseInfo `json:"leases"`
}

// LiveRelays counts the relays whose heartbeat has not expired.
func (s Status) LiveRelays() int {
	n := 0
	for _, r := range s.Relays {
		if r.Live {
			n++
		}
	}
	return n
}

// LiveLeases counts the partition leases that have not expired.
func (s Status) LiveLeases() int {
	n := 0
	for _, l := range s.Leases {
		if l.Live {
			n++
		}
	}
	return n
}

// RelayInfo is one row of the relays table: a relay's heartbeat.
type RelayInfo struct {
	Owner      string    `json:"owner"`
	Partitions int       `json:"partitions"`
	StartedAt  time.Time `json:"started_at"`
	// ExpiresAt is when the heartbeat runs out (refreshed every
	// LeaseTTL/3 while the relay runs); Live is ExpiresAt > Now.
	ExpiresAt time.Time `json:"expires_at"`
	Live      bool      `json:"live"`
}

// LeaseInfo is one partition lease.
type LeaseInfo struct {
	Partition int       `json:"partition"`
	Owner     string    `json:"owner"`
	ExpiresAt time.Time `json:"expires_at"`
	Live      bool      `json:"live"`
}

// Status reads a snapshot of the table: a few small queries, not one
// transaction, so the figures may disagree by what moved in between.
func (a *Admin) Status(ctx context.Context) (Status, error) {
	st := Status{Table: a.q.table, Relays: []RelayInfo{}, Leases: []LeaseInfo{}}
	wrap := func(what string, err error) error {
		return fmt.Errorf("outbox: status of %q: %s: %w", a.q.table, what, err)
	}
	now, err := a.dbNow(ctx)
	if err != nil {
		return st, wrap("read the database clock", err)
	}
	st.Now = now
	if err := a.pending(ctx, &st); err != nil {
		return st, wrap("count pending messages", err)
	}
	if err := a.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM `+a.q.t+` WHERE relayed_at IS NOT NULL`).Scan(&st.Relayed); err != nil {
		return st, wrap("count relayed rows", err)
	}
	var last any
	if err := a.db.QueryRowContext(ctx, `SELECT COUNT(*), MAX(dead_at) FROM `+a.q.dead).Scan(&st.DeadLetters, &last); err != nil {
		return st, wrap("count dead letters", err)
	}
	st.LastDeadAt = asTime(last)
	if st.Relays, err = a.relays(ctx, now); err != nil {
		return st, wrap("list relays", err)
	}
	if st.Leases, err = a.leases(ctx, now); err != nil {
		return st, wrap("list leases", err)
	}
	return st, nil
}

// dbNow reads the database clock in the representation of the time columns.
func (a *Admin) dbNow(ctx context.Context) (time.Time, error) {
	var v any
	if err := a.db.QueryRowContext(ctx, `SELECT `+a.q.now()).Scan(&v); err != nil {
		return time.Time{}, err
	}
	t := asTime(v)
	if t.IsZero() {
		return t, fmt.Errorf("unexpected value %v (%T) for the current time", v, v)
	}
	return t, nil
}

// pending fills Pending, Retrying and the oldest pending message. The
// oldest is the lowest id, read through the primary key: rows are numbered
// at INSERT, so it is the oldest to within the length of a transaction.
func (a *Admin) pending(ctx context.Context, st *Status) error {
	if err := a.db.QueryRowContext(ctx, `SELECT COUNT(*), COALESCE(SUM(CASE WHEN attempts > 0 THEN 1 ELSE 0 END), 0) FROM `+
		a.q.t+` WHERE relayed_at IS NULL`).Scan(&st.Pending, &st.Retrying); err != nil {
		return err
	}
	if st.Pending == 0 {
		return nil
	}
	var created any
	err := a.db.QueryRowContext(ctx, `SELECT created_at FROM `+a.q.t+` WHERE relayed_at IS NULL ORDER BY id LIMIT 1`, freshPlan(a.db)...).Scan(&created)
	if errors.Is(err, sql.ErrNoRows) {
		return nil
	}
	if err != nil {
		return err
	}
	st.OldestPendingAt = asTime(created)
	if !st.OldestPendingAt.IsZero() {
		st.OldestPendingAge = max(0, st.Now.Sub(st.OldestPendingAt))
	}
	st.OldestFreshAge = st.OldestPendingAge
	if st.Retrying > 0 {
		st.OldestFreshAge = 0
		if st.Pending > st.Retrying {
			err := a.db.QueryRowContext(ctx, `SELECT created_at FROM `+a.q.t+` WHERE relayed_at IS NULL AND attempts = 0 ORDER BY id LIMIT 1`, freshPlan(a.db)...).Scan(&created)
			if err != nil && !errors.Is(err, sql.ErrNoRows) {
				return err
			}
			if t := asTime(created); err == nil && !t.IsZero() {
				st.OldestFreshAge = max(0, st.Now.Sub(t))
			}
		}
	}
	return nil
}

func (a *Admin) relays(ctx context.Context, now time.Time) ([]RelayInfo, error) {
	rows, err := a.db.QueryContext(ctx, `SELECT owner, partitions, started_at, expires_at FROM `+a.q.relays+` ORDER BY started_at, owner`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := []RelayInfo{}
	for rows.Next() {
		var r RelayInfo
		var started, expires any
		if err := rows.Scan(&r.Owner, &r.Partitions, &started, &expires); err != nil {
			return nil, err
		}
		r.StartedAt, r.ExpiresAt = asTime(started), asTime(expires)
		r.Live = r.ExpiresAt.After(now)
		out = append(out, r)
	}
	return out, rows.Err()
}

func (a *Admin) leases(ctx context.Context, now time.Time) ([]LeaseInfo, error) {
	rows, err := a.db.QueryContext(ctx, `SELECT partition_no, owner, expires_at FROM `+a.q.leases+` ORDER BY partition_no`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := []LeaseInfo{}
	for rows.Next() {
		var l LeaseInfo
		var expires any
		if err := rows.Scan(&l.Partition, &l.Owner, &expires); err != nil {
			return nil, err
		}
		l.ExpiresAt = asTime(expires)
		l.Live = l.ExpiresAt.After(now)
		out = append(out, l)
	}
	return out, rows.Err()
}

// DeadFilter selects dead letters. Fields combine with AND; the zero value
// selects every dead letter (Replay and Purge refuse it: see Empty).
type DeadFilter struct {
	// IDs selects these ids only.
	IDs []int64
	// Kind selects one message kind.
	Kind string
	// Since selects letters that died at or after it; Before those that
	// died before it.
	Since, Before time.Time
	// Groups selects the letters of these failure groups (DeadGroup.ID).
	// With IDs as well, a letter is selected when it is in either (the
	// other fields still apply to both). The group of a letter is computed
	// from its row, so a filter with Groups reads every letter the other
	// fields select.
	Groups []string
	// All must be set to select every dead letter on purpose with Replay
	// or Purge when no other field is set.
	All bool
}

// Empty reports whether f has no selector at all (not even All).
func (f DeadFilter) Empty() bool {
	return len(f.IDs) == 0 && f.Kind == "" && f.Since.IsZero() && f.Before.IsZero() && len(f.Groups) == 0 && !f.All
}

// ErrNoSelector is returned by Replay and Purge for an empty DeadFilter: a
// command that would touch every dead letter must say so (DeadFilter.All).
var ErrNoSelector = errors.New("outbox: no dead letters selected: give ids, a kind, a time bound, or All")

// where returns the WHERE clause (without "WHERE") and its arguments, with
// bind markers from position next.
func (a *Admin) where(f DeadFilter, afterID int64) (string, []any) {
	var conds []string
	var args []any
	add := func(cond string, arg any) {
		args = append(args, arg)
		conds = append(conds, strings.ReplaceAll(cond, "?", a.q.ph(len(args))))
	}
	add("id > ?", afterID)
	if len(f.IDs) > 0 {
		conds = append(conds, "id IN ("+intList(f.IDs)+")")
	}
	if f.Kind != "" {
		add("kind = ?", f.Kind)
	}
	if !f.Since.IsZero() {
		add("dead_at >= ?", a.timeArg(f.Since))
	}
	if !f.Before.IsZero() {
		add("dead_at < ?", a.timeArg(f.Before))
	}
	return strings.Join(conds, " AND "), args
}

// timeArg binds t against a time column (SQLite stores RFC 3339 text).
func (a *Admin) timeArg(t time.Time) any {
	if a.q.sq {
		return t.UTC().Format("2006-01-02T15:04:05.000Z")
	}
	return t.UTC()
}

// CountDead counts the dead letters f selects.
func (a *Admin) CountDead(ctx context.Context, f DeadFilter) (int, error) {
	if len(f.Groups) > 0 {
		n := 0
		err := a.scanDead(ctx, f, 0, func(DeadLetter, string, string) bool { n++; return true })
		return n, err
	}
	w, args := a.where(f, 0)
	var n int
	if err := a.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM `+a.q.dead+` WHERE `+w, args...).Scan(&n); err != nil {
		return 0, fmt.Errorf("outbox: count dead letters: %w", err)
	}
	return n, nil
}

// ListDead returns up to limit dead letters f selects with ids above
// afterID, by id (page with the last id returned). limit <= 0 means 100.
func (a *Admin) ListDead(ctx context.Context, f DeadFilter, afterID int64, limit int) ([]DeadLetter, error) {
	if limit <= 0 {
		limit = 100
	}
	if len(f.Groups) > 0 {
		out := []DeadLetter{}
		err := a.scanDead(ctx, f, afterID, func(l DeadLetter, _, _ string) bool {
			out = append(out, l)
			return len(out) < limit
		})
		return out, err
	}
	return a.listDeadSQL(ctx, f, afterID, limit)
}

// deadIDs returns up to limit ids f selects above afterID.
func (a *Admin) deadIDs(ctx context.Context, f DeadFilter, afterID int64, limit int) ([]int64, error) {
	if len(f.Groups) > 0 {
		return a.groupedIDs(ctx, f, afterID, limit)
	}
	w, args := a.where(f, afterID)
	args = append(args, limit)
	return selectIDs(ctx, a.db, `SELECT id FROM `+a.q.dead+` WHERE `+w+` ORDER BY id LIMIT `+a.q.ph(len(args)), args...)
}

// BatchOptions tunes a long Replay or Purge. A nil *BatchOptions means the
// defaults.
type BatchOptions struct {
	// Size is how many dead letters one transaction moves or deletes.
	// Default 500.
	Size int
	// Progress, when set, is told after each batch how many letters are
	// done out of total (counted up front: the table may change
	// meanwhile, so done may end above or below it).
	Progress func(done, total int)
}

// DefaultAdminBatch is the default BatchOptions.Size.
const DefaultAdminBatch = 500

// Replay moves the dead letters f selects back into the outbox, in id
// order, in batches (one transaction each), as new rows with their
// attempts reset; the relay sends them again, keeping their message ids
// (consumers' inboxes still deduplicate on them). It returns how many were
// moved.
//
// Replay is idempotent: a dead letter is moved back exactly once, even when
// two Replays of it run at the same time — each row is taken out of the
// dead-letter table under a row lock (DELETE ... RETURNING on PostgreSQL,
// SELECT ... FOR UPDATE on MySQL, SQLite's single writer) and inserted by
// whoever deleted it. Replaying it again finds nothing and moves nothing.
// An empty filter returns ErrNoSelector.
func (a *Admin) Replay(ctx context.Context, f DeadFilter, opts *BatchOptions) (int, error) {
	return a.batches(ctx, f, opts, a.dead.Replay)
}

// Purge deletes the dead letters f selects for good, in batches, and
// returns how many. An empty filter returns ErrNoSelector.
func (a *Admin) Purge(ctx context.Context, f DeadFilter, opts *BatchOptions) (int, error) {
	return a.batches(ctx, f, opts, a.dead.Purge)
}

func (a *Admin) batches(ctx context.Context, f DeadFilter, opts *BatchOptions, do func(context.Context, ...int64) (int, error)) (int, error) {
	if f.Empty() {
		return 0, ErrNoSelector
	}
	var o BatchOptions
	if opts != nil {
		o = *opts
	}
	if o.Size <= 0 {
		o.Size = DefaultAdminBatch
	}
	total, err := a.CountDead(ctx, f)
	if err != nil {
		return 0, err
	}
	done := 0
	var after int64
	for {
		ids, err := a.deadIDs(ctx, f, after, o.Size)
		if err != nil {
			return done, fmt.Errorf("outbox: select dead letters: %w", err)
		}
		if len(ids) == 0 {
			return done, nil
		}
		n, err := do(ctx, ids...)
		done += n
		if err != nil {
			return done, err
		}
		after = ids[len(ids)-1]
		if o.Progress != nil {
			o.Progress(done, total)
		}
	}
}
