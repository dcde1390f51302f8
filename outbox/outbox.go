package outbox

import (
	"database/sql"
	"errors"
	"fmt"
	"log/slog"

	"github.com/ThreeDotsLabs/watermill"
	wsql "github.com/ThreeDotsLabs/watermill-sql/v3/pkg/sql"

	"github.com/tailrace/tailrace/internal/wlog"
)

// Defaults of Config.
const (
	// DefaultTable is the outbox table used when Config.Table is empty.
	DefaultTable = "tailrace_outbox"
	// DefaultMaxPayloadBytes is the largest marshalled payload accepted when
	// Config.MaxPayloadBytes is zero: 256 KiB, the limit of the smallest
	// common broker message (Azure Service Bus standard, Amazon SQS).
	DefaultMaxPayloadBytes = 256 << 10
	// MaxFieldLen is the longest kind, topic, message id, partition key,
	// domain, tenant and tenant tier accepted, in bytes: they are stored in
	// VARCHAR(255) columns on MySQL and travel as broker headers.
	MaxFieldLen = 255
)

// Errors returned by Stage, StageTx and Enqueue, wrapped in a message that
// names the offending message. Match them with errors.Is.
var (
	// ErrNoTx: Stage or Enqueue was called with a context that carries no
	// transaction (see ContextWithTx). Nothing was written.
	ErrNoTx = errors.New("outbox: no transaction in the context; run inside the Transaction behavior, use StageTx, or put one there with ContextWithTx")
	// ErrPayloadTooLarge: a marshalled payload is larger than
	// Config.MaxPayloadBytes. Nothing of the Stage call was written and the
	// caller's transaction is still usable.
	ErrPayloadTooLarge = errors.New("outbox: payload too large")
	// ErrNoKind: a staged value has no Kind() method and no Kind was given
	// in its StageOptions. Kinds are routed and persisted, so they never
	// come from the Go type name.
	ErrNoKind = errors.New("outbox: no kind")
	// ErrInvalidMessage: a staged message is malformed (nil value, field too
	// long or with control characters, reserved header key).
	ErrInvalidMessage = errors.New("outbox: invalid message")
)

// Config configures an Outbox. Only Dialect is required; every other field
// has a default.
type Config struct {
	// Dialect is the SQL dialect of the database. Required: PostgreSQL,
	// MySQL or SQLite.
	Dialect Dialect

	// Table is the outbox table the messages are staged into. It must pass
	// ValidateTableName. Default: DefaultTable ("tailrace_outbox"). The
	// table must exist: create it with InitializeSchema or SchemaSQL.
	Table string

	// CommandTable, when set, is where Enqueue and EnqueueTx write commands:
	// a table of its own (same schema; create it with InitializeSchema),
	// which a Worker (NewWorker) serves, running each command's handler
	// straight from the table with no broker. The relay on Table never sees
	// these commands, and no relay may run on CommandTable. Empty (the
	// default): commands go into Table with everything else, and the relay
	// publishes them (a routing policy sends them to a queue, and a
	// bus.Consumer runs them). It must pass ValidateTableName and differ
	// from Table.
	CommandTable string

	// MaxPayloadBytes is the largest marshalled payload accepted, in bytes.
	// A larger message fails at Stage with ErrPayloadTooLarge, so it can
	// never reach (and poison) the relay. The stored row is larger: the
	// envelope base64-encodes the payload (×4/3) and adds the metadata.
	// Default: DefaultMaxPayloadBytes (256 KiB). Negative is invalid.
	MaxPayloadBytes int

	// Marshaler turns a staged value into the payload. Default:
	// JSONMarshaler.
	Marshaler Marshaler

	// KindOf returns the kind of a staged value that has no explicit Kind in
	// its options. Default: the value's Kind() string method. Set it to a
	// mediator's KindOf to honour names registered with mediator.WithKind.
	KindOf func(v any) (string, error)

	// Notifier is signalled after Enqueue commits a transaction of its own.
	// Optional. (Inside a caller's transaction, whoever commits notifies:
	// the Transaction behavior does.)
	Notifier *Notifier

	// Observer, when set, is told how many messages each Stage, StageTx
	// and Enqueue call wrote (Metrics implements it). Optional.
	Observer Observer
}

func (c *Config) setDefaults() {
	if c.Table == "" {
		c.Table = DefaultTable
	}
	if c.MaxPayloadBytes == 0 {
		c.MaxPayloadBytes = DefaultMaxPayloadBytes
	}
	if c.Marshaler == nil {
		c.Marshaler = JSONMarshaler{}
	}
	if c.KindOf == nil {
		c.KindOf = kindMethod
	}
}

// Validate reports every problem of the configuration at once. The
// constructor calls it after filling in the defaults.
func (c Config) Validate() error {
	var errs []error
	if c.Dialect == nil {
		errs = append(errs, errors.New("outbox: Config.Dialect is required: use outbox.PostgreSQL, outbox.MySQL or outbox.SQLite"))
	}
	if err := ValidateTableName(c.Table); err != nil {
		errs = append(errs, fmt.Errorf("Config.Table: %w", err))
	}
	if c.CommandTable != "" {
		if err := ValidateTableName(c.CommandTable); err != nil {
			errs = append(errs, fmt.Errorf("Config.CommandTable: %w", err))
		} else if c.CommandTable == c.Table {
			errs = append(errs, fmt.Errorf("outbox: Config.CommandTable must differ from Config.Table (%q): a table is served by relays or by workers, not both", c.Table))
		}
	}
	if c.MaxPayloadBytes < 0 {
		errs = append(errs, fmt.Errorf("outbox: Config.MaxPayloadBytes is %d; it must not be negative (0 means the default, %d)", c.MaxPayloadBytes, DefaultMaxPayloadBytes))
	}
	return errors.Join(errs...)
}

// Outbox stages messages into the outbox table inside the caller's
// transaction. It is safe for concurrent use and holds no connection of its
// own: create one per outbox table at start-up and share it.
type Outbox struct {
	db      *sql.DB
	logger  *slog.Logger
	wlogger watermill.LoggerAdapter
	cfg     Config
	schema  *stagingSchema
	// commands is the staging schema of Config.CommandTable; schema when
	// there is none.
	commands *stagingSchema
}

// New returns an Outbox for the table described by cfg. db is used only by
// Enqueue when the context carries no transaction; it may be nil if every
// call runs inside one. A nil logger discards. New does not touch the
// database: create the table with InitializeSchema first.
func New(db *sql.DB, logger *slog.Logger, cfg Config) (*Outbox, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	o := &Outbox{
		db:      db,
		logger:  logger,
		wlogger: wlog.New(logger, false),
		cfg:     cfg,
		schema:  newStagingSchema(cfg.Dialect, cfg.Table),
	}
	o.commands = o.schema
	if cfg.CommandTable != "" {
		o.commands = newStagingSchema(cfg.Dialect, cfg.CommandTable)
	}
	return o, nil
}

// SchemaAdapter returns the watermill-sql SchemaAdapter of the outbox table,
// the one Stage writes through. With a watermill-sql Subscriber it lets
// Watermill's stock forwarder (components/forwarder) read the table, as a
// baseline or for tooling; see the adapter's notes on reading by offset
// (safe on SQLite with SQLiteOffsetsAdapter, not on PostgreSQL and MySQL,
// where rows can commit out of id order). tailrace's relay reads the table
// by state instead.
func (o *Outbox) SchemaAdapter() wsql.SchemaAdapter { return o.schema }

// Table returns the name of the outbox table.
func (o *Outbox) Table() string { return o.cfg.Table }

// CommandTable returns the table Enqueue writes into: Config.CommandTable,
// or the outbox table when that is not set.
func (o *Outbox) CommandTable() string { return o.commands.table }

// Dialect returns the dialect of the outbox database.
func (o *Outbox) Dialect() Dialect { return o.cfg.Dialect }
