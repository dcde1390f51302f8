package outbox

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"strings"
	"time"
)

// Defaults of InboxConfig.
const (
	// DefaultInboxTable is the inbox table used when InboxConfig.Table is
	// empty.
	DefaultInboxTable = "tailrace_inbox"
	// DefaultInboxRetention is how long a processed message id is kept:
	// a redelivery later than that is handled again. Brokers redeliver
	// within minutes; a week also covers a dead letter replayed by hand.
	DefaultInboxRetention = 7 * 24 * time.Hour
	// DefaultInboxCleanupInterval is how often RunCleanup deletes expired
	// ids.
	DefaultInboxCleanupInterval = time.Minute
	// DefaultInboxCleanupBatch is the most rows one cleanup statement
	// deletes.
	DefaultInboxCleanupBatch = 1000
)

// Suffix of the inbox's processed_at index.
const suffixInboxAt = "_at"

// InboxConfig configures an Inbox.
type InboxConfig struct {
	// Dialect of the database holding the inbox. Required.
	Dialect Dialect
	// Table is the inbox table. It must pass ValidateTableName. Default
	// DefaultInboxTable ("tailrace_inbox"). Create it with
	// InitializeInboxSchema or InboxSchemaSQL.
	Table string
	// Retention is how long a processed message id is remembered. A
	// message delivered again after that is handled again, so it must
	// exceed the longest redelivery delay of the brokers (and the time a
	// dead letter may wait before a replay). Default DefaultInboxRetention
	// (7 days).
	Retention time.Duration
	// CleanupInterval is how often RunCleanup deletes the ids older than
	// Retention. Default DefaultInboxCleanupInterval (1 min).
	CleanupInterval time.Duration
	// CleanupBatch is the most rows one DELETE removes, so that cleanup
	// never holds long locks; Cleanup repeats until nothing is left.
	// Default DefaultInboxCleanupBatch (1,000).
	CleanupBatch int
}

func (c *InboxConfig) setDefaults() {
	if c.Table == "" {
		c.Table = DefaultInboxTable
	}
	if c.Retention == 0 {
		c.Retention = DefaultInboxRetention
	}
	if c.CleanupInterval == 0 {
		c.CleanupInterval = DefaultInboxCleanupInterval
	}
	if c.CleanupBatch == 0 {
		c.CleanupBatch = DefaultInboxCleanupBatch
	}
}

// Validate reports every problem of c at once. NewInbox calls it after
// filling in the defaults.
func (c InboxConfig) Validate() error {
	var errs []error
	if c.Dialect == nil {
		errs = append(errs, errors.New("outbox: InboxConfig.Dialect is required: PostgreSQL, MySQL or SQLite"))
	}
	if err := ValidateTableName(c.Table); err != nil {
		errs = append(errs, fmt.Errorf("outbox: InboxConfig.Table: %w", err))
	}
	if c.Retention < 0 {
		errs = append(errs, fmt.Errorf("outbox: InboxConfig.Retention must not be negative, got %v", c.Retention))
	}
	if c.CleanupInterval < 0 {
		errs = append(errs, fmt.Errorf("outbox: InboxConfig.CleanupInterval must not be negative, got %v", c.CleanupInterval))
	}
	if c.CleanupBatch < 0 {
		errs = append(errs, fmt.Errorf("outbox: InboxConfig.CleanupBatch must not be negative, got %d", c.CleanupBatch))
	}
	return errors.Join(errs...)
}

// Inbox records the ids of the messages a consumer has processed, in the
// same database transaction as the handler's effects, so that a message
// delivered again has its effects once: the idempotent consumer. The
// behaviors.Inbox behavior uses it around every handler a bus consumer
// dispatches to; code without the mediator calls ClaimTx itself.
//
// An id is recorded per consumer (a name: the consumer, queue or handler),
// so that two consumers of one message in one database each handle it once.
//
// Concurrent deliveries of one message are safe: the second ClaimTx waits on
// the first one's uncommitted row (a unique key) and returns false once that
// transaction commits, or true if it rolls back.
//
// An Inbox is safe for concurrent use. Create one per inbox table and share
// it.
type Inbox struct {
	db     *sql.DB
	logger *slog.Logger
	cfg    InboxConfig

	claimSQL, processedSQL, cleanupSQL string
	// cleanupSelectSQL, on PostgreSQL, selects the ctids of a batch of old
	// rows; cleanupSQL then deletes them by a literal list (cleanupBatch).
	cleanupSelectSQL string
}

// NewInbox returns the inbox stored in cfg.Table of db. db is used by
// Processed, Cleanup and RunCleanup; it may be nil if only ClaimTx and
// Claim are used. A nil logger discards. NewInbox does not touch the
// database: create the table with InitializeInboxSchema first.
func NewInbox(db *sql.DB, logger *slog.Logger, cfg InboxConfig) (*Inbox, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	i := &Inbox{db: db, logger: logger, cfg: cfg}
	d, t := cfg.Dialect, cfg.Dialect.quote(cfg.Table)
	switch d.Name() {
	case "postgres":
		i.claimSQL = `INSERT INTO ` + t + ` (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING`
		i.processedSQL = `SELECT 1 FROM ` + t + ` WHERE consumer = $1 AND message_id = $2`
		i.cleanupSelectSQL = `SELECT ctid::text FROM ` + t + ` WHERE processed_at < now() - $1 * interval '1 microsecond' LIMIT $2`
		i.cleanupSQL = `DELETE FROM ` + t + ` WHERE ctid = ANY(%s::tid[]) AND processed_at < now() - $1 * interval '1 microsecond'`
	case "mysql":
		i.claimSQL = `INSERT IGNORE INTO ` + t + ` (consumer, message_id) VALUES (?, ?)`
		i.processedSQL = `SELECT 1 FROM ` + t + ` WHERE consumer = ? AND message_id = ?`
		i.cleanupSQL = `DELETE FROM ` + t + ` WHERE processed_at < NOW(6) - INTERVAL ? MICROSECOND ORDER BY processed_at LIMIT ?`
	case "sqlite":
		i.claimSQL = `INSERT OR IGNORE INTO ` + t + ` (consumer, message_id) VALUES (?, ?)`
		i.processedSQL = `SELECT 1 FROM ` + t + ` WHERE consumer = ? AND message_id = ?`
		i.cleanupSQL = `DELETE FROM ` + t + ` WHERE rowid IN (SELECT rowid FROM ` + t + ` WHERE processed_at < ? LIMIT ?)`
	default:
		return nil, fmt.Errorf("outbox: unknown dialect %q", d.Name())
	}
	return i, nil
}

// Table returns the name of the inbox table.
func (i *Inbox) Table() string { return i.cfg.Table }

// Dialect returns the dialect of the inbox database.
func (i *Inbox) Dialect() Dialect { return i.cfg.Dialect }

// Retention returns how long processed ids are kept.
func (i *Inbox) Retention() time.Duration { return i.cfg.Retention }

func validateInboxKey(consumer, messageID string) error {
	switch {
	case messageID == "":
		return fmt.Errorf("%w: empty message id for the inbox", ErrInvalidMessage)
	case len(messageID) > MaxFieldLen:
		return fmt.Errorf("%w: message id longer than %d bytes", ErrInvalidMessage, MaxFieldLen)
	case len(consumer) > MaxFieldLen:
		return fmt.Errorf("%w: consumer name longer than %d bytes", ErrInvalidMessage, MaxFieldLen)
	}
	return nil
}

// ClaimTx records in tx that consumer processes the message messageID, and
// reports whether this is the first time: true means "run the handler in
// tx"; false means the message was already processed (by a committed
// transaction) and the handler must be skipped.
//
// The guarantee, in plain words: the id is recorded only if tx commits, with
// the handler's effects; if tx rolls back, the message will be handled again
// on its next delivery. When another transaction holds an uncommitted claim
// of the same id, ClaimTx waits for it to end (the database's unique key
// wait), so two concurrent deliveries never both see true and commit.
func (i *Inbox) ClaimTx(ctx context.Context, tx *sql.Tx, consumer, messageID string) (bool, error) {
	if tx == nil {
		return false, ErrNoTx
	}
	if err := validateInboxKey(consumer, messageID); err != nil {
		return false, err
	}
	res, err := tx.ExecContext(ctx, i.claimSQL, consumer, messageID)
	if err != nil {
		return false, fmt.Errorf("outbox: inbox %s: claim message %s for %q: %w", i.cfg.Table, messageID, consumer, err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return false, fmt.Errorf("outbox: inbox %s: claim message %s: %w", i.cfg.Table, messageID, err)
	}
	return n == 1, nil
}

// Claim is ClaimTx on the transaction carried by ctx (ContextWithTx; the
// Transaction behavior puts it there). Without one it returns ErrNoTx: a
// claim outside the handler's transaction would not be atomic with its
// effects.
func (i *Inbox) Claim(ctx context.Context, consumer, messageID string) (bool, error) {
	tx, ok := TxFromContext(ctx)
	if !ok {
		return false, ErrNoTx
	}
	return i.ClaimTx(ctx, tx, consumer, messageID)
}

// Processed reports whether consumer has a committed record of messageID.
// It is for diagnostics and tests: the decision to run a handler must be
// ClaimTx's, inside the handler's transaction.
func (i *Inbox) Processed(ctx context.Context, consumer, messageID string) (bool, error) {
	if i.db == nil {
		return false, errors.New("outbox: Inbox.Processed needs the *sql.DB given to NewInbox")
	}
	var one int
	err := i.db.QueryRowContext(ctx, i.processedSQL, consumer, messageID).Scan(&one)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("outbox: inbox %s: %w", i.cfg.Table, err)
	}
	return true, nil
}

// Cleanup deletes the ids recorded more than Retention ago, CleanupBatch
// rows per statement (each its own short transaction) until none is left,
// and returns how many it deleted.
func (i *Inbox) Cleanup(ctx context.Context) (int, error) {
	return i.cleanupOlderThan(ctx, i.cfg.Retention)
}

func (i *Inbox) cleanupOlderThan(ctx context.Context, age time.Duration) (int, error) {
	if i.db == nil {
		return 0, errors.New("outbox: Inbox.Cleanup needs the *sql.DB given to NewInbox")
	}
	var arg any
	if i.cfg.Dialect.Name() == "sqlite" {
		// processed_at is RFC 3339 UTC text with milliseconds (sqliteNow).
		arg = time.Now().Add(-age).UTC().Format("2006-01-02T15:04:05.000Z")
	} else {
		arg = age.Microseconds()
	}
	total := 0
	for {
		n, more, err := i.cleanupBatch(ctx, arg)
		if err != nil {
			return total, fmt.Errorf("outbox: inbox %s: cleanup: %w", i.cfg.Table, err)
		}
		total += int(n)
		if !more {
			return total, nil
		}
		if err := ctx.Err(); err != nil {
			return total, err
		}
	}
}

// cleanupBatch deletes up to CleanupBatch old ids; more reports whether a
// full batch was found.
//
// On PostgreSQL it selects the rows' ctids first and deletes them by a
// literal list (a TID scan): a DELETE … WHERE ctid IN (SELECT … LIMIT $2) is
// a join whose cached generic plan, built while the table was small and
// with the LIMIT unknown, may re-run the subquery for every row of the
// table (see relaySQL.idAmong). The DELETE repeats the age condition, so a
// ctid reused by another row in between (after VACUUM FULL) is left alone
// unless that row is old too.
func (i *Inbox) cleanupBatch(ctx context.Context, arg any) (n int64, more bool, err error) {
	if i.cleanupSelectSQL == "" {
		res, err := i.db.ExecContext(ctx, i.cleanupSQL, arg, i.cfg.CleanupBatch)
		if err != nil {
			return 0, false, err
		}
		n, err := res.RowsAffected()
		return n, n >= int64(i.cfg.CleanupBatch), err
	}
	rows, err := i.db.QueryContext(ctx, i.cleanupSelectSQL, freshPlan(i.db, arg, i.cfg.CleanupBatch)...)
	if err != nil {
		return 0, false, err
	}
	var tids []string
	for rows.Next() {
		var tid string
		if err := rows.Scan(&tid); err != nil {
			rows.Close()
			return 0, false, err
		}
		if !tidText.MatchString(tid) {
			rows.Close()
			return 0, false, fmt.Errorf("unexpected ctid %q", tid)
		}
		tids = append(tids, `"`+tid+`"`)
	}
	rows.Close()
	if err := rows.Err(); err != nil || len(tids) == 0 {
		return 0, false, err
	}
	list := "'{" + strings.Join(tids, ",") + "}'"
	res, err := i.db.ExecContext(ctx, fmt.Sprintf(i.cleanupSQL, list), arg)
	if err != nil {
		return 0, false, err
	}
	n, err = res.RowsAffected()
	return n, len(tids) >= i.cfg.CleanupBatch, err
}

// tidText is how PostgreSQL prints a ctid; checked before one is spliced
// into SQL text.
var tidText = regexp.MustCompile(`^\(\d+,\d+\)$`)

// RunCleanup runs Cleanup every CleanupInterval until ctx is done, logging
// failures (it goes on after them), and returns nil then.
func (i *Inbox) RunCleanup(ctx context.Context) error {
	t := time.NewTicker(i.cfg.CleanupInterval)
	defer t.Stop()
	for {
		n, err := i.Cleanup(ctx)
		switch {
		case err != nil && ctx.Err() == nil:
			i.logger.LogAttrs(ctx, slog.LevelError, "inbox cleanup failed",
				slog.String("inbox_table", i.cfg.Table), slog.String("error", err.Error()))
		case n > 0:
			i.logger.LogAttrs(ctx, slog.LevelDebug, "inbox cleanup",
				slog.String("inbox_table", i.cfg.Table), slog.Int("deleted", n))
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// InboxSchemaSQL returns the statements that create the inbox table named
// table, for users who run their own migrations. Every statement is
// idempotent (IF NOT EXISTS). The name is validated first.
func InboxSchemaSQL(d Dialect, table string) ([]string, error) {
	if d == nil {
		return nil, errors.New("outbox: nil Dialect; use outbox.PostgreSQL, outbox.MySQL or outbox.SQLite")
	}
	if err := ValidateTableName(table); err != nil {
		return nil, err
	}
	t, idx := d.quote(table), d.quote(table+suffixInboxAt)
	switch d.Name() {
	case "postgres":
		return []string{
			`CREATE TABLE IF NOT EXISTS ` + t + ` (
	consumer     TEXT        NOT NULL,
	message_id   TEXT        NOT NULL,
	processed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
	PRIMARY KEY (consumer, message_id)
)`,
			`CREATE INDEX IF NOT EXISTS ` + idx + ` ON ` + t + ` (processed_at)`,
		}, nil
	case "mysql":
		return []string{
			`CREATE TABLE IF NOT EXISTS ` + t + ` (
	consumer     VARCHAR(255) NOT NULL,
	message_id   VARCHAR(255) NOT NULL,
	processed_at DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
	PRIMARY KEY (consumer, message_id),
	KEY ` + idx + ` (processed_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin`,
		}, nil
	case "sqlite":
		return []string{
			`CREATE TABLE IF NOT EXISTS ` + t + ` (
	consumer     TEXT NOT NULL,
	message_id   TEXT NOT NULL,
	processed_at TEXT NOT NULL DEFAULT ` + sqliteNow + `,
	PRIMARY KEY (consumer, message_id)
)`,
			`CREATE INDEX IF NOT EXISTS ` + idx + ` ON ` + t + ` (processed_at)`,
		}, nil
	}
	return nil, fmt.Errorf("outbox: unknown dialect %q", d.Name())
}

// InitializeInboxSchema creates the inbox table named table if it does not
// exist. Like InitializeSchema it runs on a *sql.DB, not in a transaction.
func InitializeInboxSchema(ctx context.Context, db *sql.DB, d Dialect, table string) error {
	stmts, err := InboxSchemaSQL(d, table)
	if err != nil {
		return err
	}
	for _, s := range stmts {
		if _, err := db.ExecContext(ctx, s); err != nil {
			return fmt.Errorf("outbox: initialize inbox schema for %q: %w\nstatement: %s", table, err, s)
		}
	}
	return nil
}

// Context of a message being consumed: the bus consumer puts the message id
// and its own name there, the Inbox behavior reads them.
type (
	messageIDKey struct{}
	consumerKey  struct{}
)

// WithMessageID returns a copy of ctx carrying the id of the message being
// handled. Bus consumers set it; the Inbox behavior deduplicates on it.
func WithMessageID(ctx context.Context, id string) context.Context {
	return context.WithValue(ctx, messageIDKey{}, id)
}

// MessageIDFromContext returns the id set with WithMessageID, or "".
func MessageIDFromContext(ctx context.Context) string {
	s, _ := ctx.Value(messageIDKey{}).(string)
	return s
}

// WithConsumer returns a copy of ctx carrying the name of the consumer
// handling the message (the inbox records ids per consumer).
func WithConsumer(ctx context.Context, name string) context.Context {
	return context.WithValue(ctx, consumerKey{}, name)
}

// ConsumerFromContext returns the name set with WithConsumer, or "".
func ConsumerFromContext(ctx context.Context) string {
	s, _ := ctx.Value(consumerKey{}).(string)
	return s
}
