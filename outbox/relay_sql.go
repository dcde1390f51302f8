package outbox

import (
	"cmp"
	"context"
	"database/sql"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"
)

// relaySQL builds and runs the relay's statements for one dialect, table and
// partition count. Every identifier in it passed ValidateTableName; every
// number spliced into SQL text is an int the relay computed itself.
type relaySQL struct {
	d          Dialect
	pg, my, sq bool
	table      string // unquoted
	t          string // quoted outbox table
	dead       string // quoted dead-letter table
	leases     string // quoted leases table
	relays     string // quoted relays table
	parts      int
}

func newRelaySQL(d Dialect, table string, partitions int) *relaySQL {
	return &relaySQL{
		d:      d,
		pg:     d.Name() == "postgres",
		my:     d.Name() == "mysql",
		sq:     d.Name() == "sqlite",
		table:  table,
		t:      d.quote(table),
		dead:   d.quote(table + suffixDead),
		leases: d.quote(table + suffixLeases),
		relays: d.quote(table + suffixRelays),
		parts:  partitions,
	}
}

// execOutbox runs a statement that writes to the outbox table. On MySQL it
// runs in a READ COMMITTED transaction: under InnoDB's default REPEATABLE
// READ an UPDATE or DELETE locks every row it examines, and when the
// optimizer scans (a small table, an index on claim_token) it waits on the
// record lock of a row an open transaction has just inserted, holding the
// whole relay back until that transaction ends (found by
// TestChaosLongTransaction). READ COMMITTED skips rows whose only version is
// uncommitted instead of waiting for them.
func (q *relaySQL) execOutbox(ctx context.Context, db *sql.DB, query string, args ...any) (sql.Result, error) {
	if !q.my {
		return db.ExecContext(ctx, query, args...)
	}
	tx, err := db.BeginTx(ctx, q.writeTxOptions())
	if err != nil {
		return nil, err
	}
	res, err := tx.ExecContext(ctx, query, args...)
	if err != nil {
		_ = tx.Rollback()
		return nil, err
	}
	return res, tx.Commit()
}

// writeTxOptions are the options of the relay's own transactions that write
// to the outbox table: READ COMMITTED on MySQL (see execOutbox).
func (q *relaySQL) writeTxOptions() *sql.TxOptions {
	if q.my {
		return &sql.TxOptions{Isolation: sql.LevelReadCommitted}
	}
	return nil
}

// ph is the i-th (1-based) bind marker.
func (q *relaySQL) ph(i int) string {
	if q.pg {
		return "$" + strconv.Itoa(i)
	}
	return "?"
}

// now is the database's current time, comparable with the time columns.
func (q *relaySQL) now() string {
	switch {
	case q.pg:
		return "now()"
	case q.my:
		return "NOW(6)"
	default:
		return sqliteNow
	}
}

// nowPlus is the database's current time plus the duration bound at marker i
// (bind durArg(d) there). d may be negative.
func (q *relaySQL) nowPlus(i int) string {
	switch {
	case q.pg:
		return "(now() + " + q.ph(i) + "::bigint * interval '1 microsecond')"
	case q.my:
		return "(NOW(6) + INTERVAL " + q.ph(i) + " MICROSECOND)"
	default:
		return "(strftime('%Y-%m-%dT%H:%M:%fZ','now'," + q.ph(i) + "))"
	}
}

func (q *relaySQL) durArg(d time.Duration) any {
	if q.sq {
		return fmt.Sprintf("%+.6f seconds", d.Seconds())
	}
	return d.Microseconds()
}

// partFilter restricts a statement to the rows of the given partitions; an
// empty string when they are all of them.
func (q *relaySQL) partFilter(parts []int) string {
	if len(parts) >= q.parts {
		return ""
	}
	return " AND key_hash % " + strconv.Itoa(q.parts) + " IN (" + intList(parts) + ")"
}

func intList[T int | int64](xs []T) string {
	var b strings.Builder
	for i, x := range xs {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(strconv.FormatInt(int64(x), 10))
	}
	return b.String()
}

// claimedRow is one row a claim returned.
type claimedRow struct {
	id       int64
	uuid     string
	kind     string
	key      string
	keyHash  int64
	payload  []byte
	metadata []byte
	attempts int
	nextAt   time.Time
}

const claimColumns = "id, uuid, kind, partition_key, key_hash, payload, metadata, attempts, next_attempt_at"

// claim marks up to n unclaimed rows of the given partitions, oldest id
// first, with token and returns them sorted by id. Rows are selected by
// claim_token IS NULL, never by an offset, so a transaction that commits
// after rows with higher ids were relayed is still picked up.
//
// skipKeys are partition keys not to claim now (their queue in memory is
// full); their rows stay unclaimed, in order, for a later claim.
func (q *relaySQL) claim(ctx context.Context, db *sql.DB, parts []int, n int, token int64, skipKeys []string) ([]claimedRow, error) {
	filter := q.partFilter(parts)
	var skipArgs []any
	if len(skipKeys) > 0 {
		start := 3
		if q.my {
			start = 1
		}
		filter += " AND partition_key NOT IN (" + placeholders(q.d, start, len(skipKeys)) + ")"
		for _, k := range skipKeys {
			skipArgs = append(skipArgs, k)
		}
	}
	var rows *sql.Rows
	var err error
	if q.my {
		// MySQL cannot LIMIT inside IN (subquery) nor RETURNING: select, then
		// mark by id. Safe because only the lease owner claims these
		// partitions; the UPDATE leaves rows someone else claimed alone.
		rows, err = db.QueryContext(ctx, `SELECT `+claimColumns+` FROM `+q.t+
			` WHERE claim_token IS NULL`+filter+` ORDER BY id LIMIT ?`, append(skipArgs, n)...)
		if err != nil {
			return nil, err
		}
		out, err := scanClaimed(rows)
		if err != nil || len(out) == 0 {
			return out, err
		}
		ids := make([]int64, len(out))
		for i, r := range out {
			ids[i] = r.id
		}
		// The predicate is on the primary key alone, so InnoDB locks exactly
		// the selected (committed) rows. With "claim_token IS NULL" in the
		// WHERE clause the optimizer may scan the (claim_token, id) index
		// and wait on the record lock of a row an open transaction just
		// inserted, holding the whole relay back until that transaction
		// ends (found by TestChaosLongTransaction). IF keeps a row claimed
		// by someone else unchanged, and unchanged rows do not count as
		// affected, so the race check below still sees it.
		res, err := q.execOutbox(ctx, db, `UPDATE `+q.t+` SET claim_token = IF(claim_token IS NULL, ?, claim_token) WHERE id IN (`+intList(ids)+`)`, token)
		if err != nil {
			return nil, err
		}
		if k, _ := res.RowsAffected(); k != int64(len(ids)) {
			// Someone else claimed some of them (two relays believing they
			// own one partition): give back what we got and let the lease
			// loop sort it out.
			_, _ = q.execOutbox(ctx, db, `UPDATE `+q.t+` SET claim_token = NULL WHERE claim_token = ? AND id IN (`+intList(ids)+`)`, token)
			return nil, fmt.Errorf("outbox: claim raced with another relay on %d of %d rows", int64(len(ids))-k, len(ids))
		}
		return out, nil
	}
	rows, err = db.QueryContext(ctx, q.claimSQL(filter), freshPlan(db, q.claimArgs(token, n, skipArgs)...)...)
	if err != nil {
		return nil, err
	}
	out, err := scanClaimed(rows)
	if err != nil {
		return nil, err
	}
	slices.SortFunc(out, func(a, b claimedRow) int { return cmp.Compare(a.id, b.id) })
	return out, nil
}

// claimSQL is the claim's statement outside MySQL: $1 token, $2 limit,
// filter as claim builds it.
func (q *relaySQL) claimSQL(filter string) string {
	return `UPDATE ` + q.t + ` SET claim_token = ` + q.ph(1) +
		` WHERE claim_token IS NULL AND ` + q.idAmong(`SELECT id FROM `+q.t+` WHERE claim_token IS NULL`+filter+
		` ORDER BY id LIMIT `+q.ph(2)) + ` RETURNING ` + claimColumns
}

// idAmong is a condition that id is one of the ids the subquery sub (which
// selects a column named id, with a LIMIT) returns.
//
// On PostgreSQL it is "id = ANY(ARRAY(sub))": the subquery runs once, as an
// InitPlan, and the claim then looks its ids up through the pending-rows
// partial index, whose condition is the claim's own (claim_token IS NULL) —
// in the generic plan too. "id IN (sub)" is a semi join whose plan depends on
// the table's statistics when the statement was planned: pgx caches prepared
// statements per connection and after five executions PostgreSQL may keep a
// generic plan, and one built while the outbox table was empty (a quiet
// service) is a nested loop that re-runs the LIMIT subquery for every row of
// the table — 1–2 s per claim of a 20,000-row backlog instead of
// milliseconds (issue 18, TestRelayIdleThenBurstGenericPlan).
//
// Without a condition that matches a small index, "= ANY" of an InitPlan's
// array can get a sequential scan instead (seen for the prune): statements
// other than the claim select their ids first and use a literal list.
//
// SQLite evaluates "IN (sub)" by running the subquery once into a temporary
// index, and does not cache plans by parameter; MySQL cannot use LIMIT in an
// IN subquery at all (its statements select first, then update by id).
func (q *relaySQL) idAmong(sub string) string {
	if q.pg {
		return "id = ANY(ARRAY(" + sub + "))"
	}
	return "id IN (" + sub + ")"
}

// claimArgs orders the claim's arguments: by number on PostgreSQL ($1
// token, $2 limit, $3… keys), by position in the text elsewhere (the keys
// come before the limit).
func (q *relaySQL) claimArgs(token int64, n int, skip []any) []any {
	if q.pg {
		return append([]any{token, n}, skip...)
	}
	return append(append([]any{token}, skip...), n)
}

func scanClaimed(rows *sql.Rows) ([]claimedRow, error) {
	defer rows.Close()
	var out []claimedRow
	for rows.Next() {
		var r claimedRow
		var next any
		if err := rows.Scan(&r.id, &r.uuid, &r.kind, &r.key, &r.keyHash, &r.payload, &r.metadata, &r.attempts, &next); err != nil {
			return nil, err
		}
		r.nextAt = asTime(next)
		out = append(out, r)
	}
	return out, rows.Err()
}

// asTime converts a time column as the drivers return it (time.Time from
// pgx and go-sql-driver/mysql with parseTime, RFC 3339 text from SQLite).
func asTime(v any) time.Time {
	switch x := v.(type) {
	case time.Time:
		return x
	case string:
		t, _ := time.Parse(time.RFC3339Nano, x)
		return t
	case []byte:
		t, _ := time.Parse(time.RFC3339Nano, string(x))
		return t
	}
	return time.Time{}
}

// unclaim gives rows back (claim_token = NULL) if they still carry token.
func (q *relaySQL) unclaim(ctx context.Context, db *sql.DB, ids []int64, token int64) error {
	for len(ids) > 0 {
		n := min(len(ids), 1000)
		if _, err := q.execOutbox(ctx, db, `UPDATE `+q.t+` SET claim_token = NULL WHERE claim_token = `+q.ph(1)+
			` AND id IN (`+intList(ids[:n])+`)`, freshPlan(db, token)...); err != nil {
			return err
		}
		ids = ids[n:]
	}
	return nil
}

// unclaimExcept gives back every unrelayed row claimed with token except
// the ids in held.
func (q *relaySQL) unclaimExcept(ctx context.Context, db *sql.DB, token int64, held []int64) (int64, error) {
	s := `UPDATE ` + q.t + ` SET claim_token = NULL WHERE claim_token = ` + q.ph(1) + ` AND relayed_at IS NULL`
	if len(held) > 0 {
		s += ` AND id NOT IN (` + intList(held) + `)`
	}
	res, err := q.execOutbox(ctx, db, s, freshPlan(db, token)...)
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

// resetClaims gives back every claimed, unrelayed row of parts: what a dead
// or stalled previous owner had in flight. With except != 0 rows claimed
// with that token are kept (the periodic sweep keeps the caller's own).
func (q *relaySQL) resetClaims(ctx context.Context, db *sql.DB, parts []int, except int64) (int64, error) {
	if len(parts) == 0 {
		return 0, nil
	}
	s := `UPDATE ` + q.t + ` SET claim_token = NULL WHERE claim_token IS NOT NULL AND relayed_at IS NULL` + q.partFilter(parts)
	var args []any
	if except != 0 {
		s += ` AND claim_token <> ` + q.ph(1)
		args = append(args, except)
	}
	res, err := q.execOutbox(ctx, db, s, freshPlan(db, args...)...)
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

// ack deletes relayed rows or, with retention, stamps relayed_at.
func (q *relaySQL) ack(ctx context.Context, db *sql.DB, ids []int64, retain bool) error {
	var s string
	switch {
	case retain:
		s = `UPDATE ` + q.t + ` SET relayed_at = ` + q.now() + ` WHERE id IN (` + intList(ids) + `)`
	case q.my:
		// InnoDB: a DELETE … WHERE id IN (…) on a small table is planned as
		// a full scan, which waits for the row lock of every uncommitted
		// INSERT it passes — a long transaction that staged messages would
		// stall every acknowledgement, and so the relay. Looking the ids up
		// one by one through the primary key touches only the acked rows.
		s = `DELETE o FROM JSON_TABLE('[` + intList(ids) + `]', '$[*]' COLUMNS (id BIGINT PATH '$')) AS acked` +
			` STRAIGHT_JOIN ` + q.t + ` AS o ON o.id = acked.id`
	default:
		s = `DELETE FROM ` + q.t + ` WHERE id IN (` + intList(ids) + `)`
	}
	_, err := q.execOutbox(ctx, db, s)
	return err
}

// prune deletes up to n rows relayed more than retention ago.
//
// Outside MySQL it selects the ids first and deletes them by a literal list
// (as ack does): a DELETE … WHERE id IN (SELECT … LIMIT n) is a join whose
// cached generic plan, built while the table was small, scans the whole
// table for every batch (see idAmong).
func (q *relaySQL) prune(ctx context.Context, db *sql.DB, retention time.Duration, n int) (int64, error) {
	if q.my {
		res, err := q.execOutbox(ctx, db, `DELETE FROM `+q.t+` WHERE relayed_at < `+q.nowPlus(1)+
			` ORDER BY relayed_at LIMIT `+strconv.Itoa(n), q.durArg(-retention))
		if err != nil {
			return 0, err
		}
		return res.RowsAffected()
	}
	ids, err := selectIDs(ctx, db, `SELECT id FROM `+q.t+` WHERE relayed_at IS NOT NULL AND relayed_at < `+
		q.nowPlus(1)+` LIMIT `+strconv.Itoa(n), freshPlan(db, q.durArg(-retention))...)
	if err != nil || len(ids) == 0 {
		return 0, err
	}
	res, err := q.execOutbox(ctx, db, `DELETE FROM `+q.t+` WHERE id IN (`+intList(ids)+`) AND relayed_at IS NOT NULL`)
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

// selectIDs runs a query that returns one integer column.
func selectIDs(ctx context.Context, db *sql.DB, query string, args ...any) ([]int64, error) {
	rows, err := db.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var ids []int64
	for rows.Next() {
		var id int64
		if err := rows.Scan(&id); err != nil {
			return nil, err
		}
		ids = append(ids, id)
	}
	return ids, rows.Err()
}

// retryLater records a failed attempt.
func (q *relaySQL) retryLater(ctx context.Context, db *sql.DB, id int64, attempts int, lastErr string, delay time.Duration) error {
	_, err := q.execOutbox(ctx, db, `UPDATE `+q.t+` SET attempts = `+q.ph(1)+`, last_error = `+q.ph(2)+
		`, next_attempt_at = `+q.nowPlus(3)+` WHERE id = `+q.ph(4), attempts, lastErr, q.durArg(delay), id)
	return err
}

// bury moves a row to the dead-letter table in one transaction.
func (q *relaySQL) bury(ctx context.Context, db *sql.DB, id int64, attempts int, lastErr string) error {
	tx, err := db.BeginTx(ctx, q.writeTxOptions())
	if err != nil {
		return err
	}
	defer func() { _ = tx.Rollback() }()
	a, e := q.ph(1), q.ph(2)
	if q.pg {
		a, e = a+"::integer", e+"::text"
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO `+q.dead+
		` (id, uuid, message_id, kind, partition_key, key_hash, payload, metadata, attempts, last_error, created_at)`+
		` SELECT id, uuid, message_id, kind, partition_key, key_hash, payload, metadata, `+a+`, `+e+`, created_at FROM `+q.t+
		` WHERE id = `+q.ph(3), attempts, lastErr, id); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, `DELETE FROM `+q.t+` WHERE id = `+q.ph(1), id); err != nil {
		return err
	}
	return tx.Commit()
}

// ------------------------------------------------------------ relays, leases

// heartbeat registers or refreshes the relay row of owner.
func (q *relaySQL) heartbeat(ctx context.Context, db *sql.DB, owner string, ttl time.Duration) error {
	var s string
	switch {
	case q.my:
		s = `INSERT INTO ` + q.relays + ` (owner, partitions, expires_at) VALUES (?, ?, ` + q.nowPlus(3) +
			`) ON DUPLICATE KEY UPDATE expires_at = VALUES(expires_at), partitions = VALUES(partitions)`
	default:
		s = `INSERT INTO ` + q.relays + ` (owner, partitions, expires_at) VALUES (` + q.ph(1) + `, ` + q.ph(2) + `, ` + q.nowPlus(3) +
			`) ON CONFLICT (owner) DO UPDATE SET expires_at = excluded.expires_at, partitions = excluded.partitions`
	}
	_, err := db.ExecContext(ctx, s, owner, q.parts, q.durArg(ttl))
	return err
}

type liveRelay struct {
	owner      string
	partitions int
}

// liveRelays lists the relays whose heartbeat has not expired, oldest
// first.
func (q *relaySQL) liveRelays(ctx context.Context, db *sql.DB) ([]liveRelay, error) {
	rows, err := db.QueryContext(ctx, `SELECT owner, partitions FROM `+q.relays+` WHERE expires_at > `+q.now()+` ORDER BY started_at, owner`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []liveRelay
	for rows.Next() {
		var r liveRelay
		if err := rows.Scan(&r.owner, &r.partitions); err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

func (q *relaySQL) unregister(ctx context.Context, db *sql.DB, owner string) error {
	_, err := db.ExecContext(ctx, `DELETE FROM `+q.relays+` WHERE owner = `+q.ph(1), owner)
	return err
}

// forgetDeadRelays deletes relay rows that expired long ago.
func (q *relaySQL) forgetDeadRelays(ctx context.Context, db *sql.DB, after time.Duration) error {
	_, err := db.ExecContext(ctx, `DELETE FROM `+q.relays+` WHERE expires_at < `+q.nowPlus(1), q.durArg(-after))
	return err
}

// renew extends every lease owner holds and returns the partitions it holds.
func (q *relaySQL) renew(ctx context.Context, db *sql.DB, owner string, ttl time.Duration) error {
	_, err := db.ExecContext(ctx, `UPDATE `+q.leases+` SET expires_at = `+q.nowPlus(1)+` WHERE owner = `+q.ph(2), q.durArg(ttl), owner)
	return err
}

type leaseRow struct {
	partition int
	owner     string
	live      bool
}

func (q *relaySQL) listLeases(ctx context.Context, db *sql.DB) ([]leaseRow, error) {
	rows, err := db.QueryContext(ctx, `SELECT partition_no, owner, CASE WHEN expires_at > `+q.now()+` THEN 1 ELSE 0 END FROM `+q.leases)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []leaseRow
	for rows.Next() {
		var r leaseRow
		var live int
		if err := rows.Scan(&r.partition, &r.owner, &live); err != nil {
			return nil, err
		}
		r.live = live == 1
		out = append(out, r)
	}
	return out, rows.Err()
}

// acquire takes partition p for owner if nobody holds a live lease on it.
func (q *relaySQL) acquire(ctx context.Context, db *sql.DB, p int, owner string, token int64, ttl time.Duration) (bool, error) {
	var ins string
	switch {
	case q.my:
		ins = `INSERT INTO ` + q.leases + ` (partition_no, owner, token, expires_at) VALUES (?, ?, ?, ` + q.nowPlus(4) +
			`) ON DUPLICATE KEY UPDATE partition_no = partition_no`
	default:
		ins = `INSERT INTO ` + q.leases + ` (partition_no, owner, token, expires_at) VALUES (` + q.ph(1) + `, ` + q.ph(2) + `, ` +
			q.ph(3) + `, ` + q.nowPlus(4) + `) ON CONFLICT (partition_no) DO NOTHING`
	}
	res, err := db.ExecContext(ctx, ins, p, owner, token, q.durArg(ttl))
	if err != nil {
		return false, err
	}
	if n, _ := res.RowsAffected(); n == 1 {
		return true, nil
	}
	res, err = db.ExecContext(ctx, `UPDATE `+q.leases+` SET owner = `+q.ph(1)+`, token = `+q.ph(2)+`, expires_at = `+q.nowPlus(3)+
		` WHERE partition_no = `+q.ph(4)+` AND (expires_at <= `+q.now()+` OR owner = `+q.ph(5)+`)`,
		owner, token, q.durArg(ttl), p, owner)
	if err != nil {
		return false, err
	}
	n, _ := res.RowsAffected()
	return n == 1, nil
}

// release gives up owner's leases on parts.
func (q *relaySQL) release(ctx context.Context, db *sql.DB, owner string, parts []int) error {
	if len(parts) == 0 {
		return nil
	}
	_, err := db.ExecContext(ctx, `DELETE FROM `+q.leases+` WHERE owner = `+q.ph(1)+` AND partition_no IN (`+intList(parts)+`)`, owner)
	return err
}
