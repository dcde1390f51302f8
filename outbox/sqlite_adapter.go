package outbox

import (
	"database/sql"
	"encoding/json"
	"fmt"
	"strings"

	wsql "github.com/ThreeDotsLabs/watermill-sql/v3/pkg/sql"
	"github.com/ThreeDotsLabs/watermill/message"
)

// SQLiteSchema is a watermill-sql SchemaAdapter for SQLite (watermill-sql
// ships adapters for MySQL and PostgreSQL only). With SQLiteOffsetsAdapter
// it makes watermill-sql's Publisher and Subscriber a durable Pub/Sub in an
// embedded database file; it passes Watermill's universal Pub/Sub test
// suite (see sqlite_adapter_test.go for the features it claims).
//
// One table per topic, "watermill_<topic>" by default, with an
// autoincrement offset. Because SQLite has one writer at a time, offsets
// become visible in commit order, so reading by offset never skips a
// message (the problem PostgreSQL's adapter solves with transaction ids).
//
// Open the database the Subscriber uses with BEGIN IMMEDIATE transactions
// (modernc.org/sqlite: "_txlock=immediate" in the DSN): the subscriber
// reads and then acknowledges in one transaction, and a deferred SQLite
// transaction that read a snapshot cannot write once another connection has
// committed (SQLITE_BUSY_SNAPSHOT); the acknowledgement would fail and the
// messages come again. Use WAL journal mode and a busy timeout (for example
// "_pragma=journal_mode(WAL)&_pragma=busy_timeout(30000)").
//
// The cost of that lock: SQLite has one writer per database file, and a
// subscriber holds the write lock from reading a batch until its consumer
// acknowledged it. While a subscriber waits for a consumer that does not
// read (at most SubscriberConfig.AckDeadline), every writer of the file
// waits too. So keep AckDeadline well below the busy timeout, and set
// SubscriberConfig.PollInterval above 100 ms, SQLite's longest busy-wait
// step, so that a subscriber which just gave up leaves the waiting writers a
// window before it takes the lock again. This Pub/Sub suits an embedded
// application and tests; a busy service belongs on a server database.
type SQLiteSchema struct {
	// GenerateMessagesTableName returns the quoted table of a topic.
	// Default: "watermill_<topic>", double-quoted.
	GenerateMessagesTableName func(topic string) string

	// SubscribeBatchSize is how many messages one query reads. Default 100.
	SubscribeBatchSize int
}

// MessagesTable returns the quoted table name of topic.
func (s SQLiteSchema) MessagesTable(topic string) string {
	if s.GenerateMessagesTableName != nil {
		return s.GenerateMessagesTableName(topic)
	}
	return `"watermill_` + topic + `"`
}

// SchemaInitializingQueries creates the topic's table.
func (s SQLiteSchema) SchemaInitializingQueries(topic string) []wsql.Query {
	return []wsql.Query{{Query: `CREATE TABLE IF NOT EXISTS ` + s.MessagesTable(topic) + ` (
	"offset"   INTEGER PRIMARY KEY AUTOINCREMENT,
	uuid       TEXT NOT NULL,
	created_at TEXT NOT NULL DEFAULT ` + sqliteNow + `,
	payload    BLOB,
	metadata   TEXT
)`}}
}

// InsertQuery inserts msgs with one statement, in order.
func (s SQLiteSchema) InsertQuery(topic string, msgs message.Messages) (wsql.Query, error) {
	if len(msgs) == 0 {
		return wsql.Query{}, fmt.Errorf("outbox: nothing to insert")
	}
	q := `INSERT INTO ` + s.MessagesTable(topic) + ` (uuid, payload, metadata) VALUES ` +
		strings.TrimSuffix(strings.Repeat("(?,?,?),", len(msgs)), ",")
	args := make([]any, 0, 3*len(msgs))
	for _, m := range msgs {
		md, err := json.Marshal(m.Metadata)
		if err != nil {
			return wsql.Query{}, fmt.Errorf("outbox: marshal metadata of %s: %w", m.UUID, err)
		}
		args = append(args, m.UUID, []byte(m.Payload), string(md))
	}
	return wsql.Query{Query: q, Args: args}, nil
}

func (s SQLiteSchema) batchSize() int {
	if s.SubscribeBatchSize <= 0 {
		return 100
	}
	return s.SubscribeBatchSize
}

// SelectQuery reads the messages after the consumer group's offset.
func (s SQLiteSchema) SelectQuery(topic string, consumerGroup string, offsets wsql.OffsetsAdapter) wsql.Query {
	next := offsets.NextOffsetQuery(topic, consumerGroup)
	q := `SELECT "offset", uuid, payload, metadata FROM ` + s.MessagesTable(topic) +
		` WHERE "offset" > (` + next.Query + `) ORDER BY "offset" ASC LIMIT ` + fmt.Sprint(s.batchSize())
	return wsql.Query{Query: q, Args: next.Args}
}

// UnmarshalMessage turns a row of SelectQuery into a message.
func (s SQLiteSchema) UnmarshalMessage(row wsql.Scanner) (wsql.Row, error) {
	var r wsql.Row
	var uuid string
	var md sql.NullString
	if err := row.Scan(&r.Offset, &uuid, &r.Payload, &md); err != nil {
		return wsql.Row{}, fmt.Errorf("outbox: scan message row: %w", err)
	}
	r.UUID = []byte(uuid)
	msg := message.NewMessage(uuid, r.Payload)
	if md.Valid && md.String != "" {
		r.Metadata = []byte(md.String)
		if err := json.Unmarshal(r.Metadata, &msg.Metadata); err != nil {
			return wsql.Row{}, fmt.Errorf("outbox: metadata of message %s: %w", uuid, err)
		}
	}
	r.Msg = msg
	return r, nil
}

// SubscribeIsolationLevel is the default: SQLite transactions are always
// serializable.
func (s SQLiteSchema) SubscribeIsolationLevel() sql.IsolationLevel { return sql.LevelDefault }

// SQLiteOffsetsAdapter is a watermill-sql OffsetsAdapter for SQLite, one
// offsets table per topic ("watermill_offsets_<topic>" by default) with a
// row per consumer group. See SQLiteSchema for how to open the database.
//
// Each consumer group gets every message once, in order, while subscribers
// run on a database opened with "_txlock=immediate": a subscriber's
// read-and-acknowledge transaction then holds SQLite's write lock, so two
// subscribers of one group cannot take the same messages. As with every
// watermill-sql adapter, a crash between a handler's Ack and the commit of
// the offset redelivers the message.
type SQLiteOffsetsAdapter struct {
	// GenerateMessagesOffsetsTableName returns the quoted offsets table of a
	// topic. Default: "watermill_offsets_<topic>", double-quoted.
	GenerateMessagesOffsetsTableName func(topic string) string
}

// MessagesOffsetsTable returns the quoted offsets table name of topic.
func (a SQLiteOffsetsAdapter) MessagesOffsetsTable(topic string) string {
	if a.GenerateMessagesOffsetsTableName != nil {
		return a.GenerateMessagesOffsetsTableName(topic)
	}
	return `"watermill_offsets_` + topic + `"`
}

// SchemaInitializingQueries creates the topic's offsets table.
func (a SQLiteOffsetsAdapter) SchemaInitializingQueries(topic string) []wsql.Query {
	return []wsql.Query{{Query: `CREATE TABLE IF NOT EXISTS ` + a.MessagesOffsetsTable(topic) + ` (
	consumer_group TEXT    NOT NULL PRIMARY KEY,
	offset_acked   INTEGER NOT NULL DEFAULT 0
)`}}
}

// NextOffsetQuery returns the group's last acknowledged offset (0 if none).
func (a SQLiteOffsetsAdapter) NextOffsetQuery(topic, consumerGroup string) wsql.Query {
	return wsql.Query{
		Query: `SELECT COALESCE((SELECT offset_acked FROM ` + a.MessagesOffsetsTable(topic) + ` WHERE consumer_group = ?), 0)`,
		Args:  []any{consumerGroup},
	}
}

// AckMessageQuery stores row's offset as the group's acknowledged offset.
func (a SQLiteOffsetsAdapter) AckMessageQuery(topic string, row wsql.Row, consumerGroup string) wsql.Query {
	return wsql.Query{
		Query: `INSERT INTO ` + a.MessagesOffsetsTable(topic) + ` (consumer_group, offset_acked) VALUES (?, ?)
ON CONFLICT (consumer_group) DO UPDATE SET offset_acked = excluded.offset_acked`,
		Args: []any{consumerGroup, row.Offset},
	}
}

// ConsumedMessageQuery returns no query: the write lock taken at BEGIN
// IMMEDIATE already keeps other subscribers of the group out.
func (a SQLiteOffsetsAdapter) ConsumedMessageQuery(string, wsql.Row, string, []byte) wsql.Query {
	return wsql.Query{}
}

// BeforeSubscribingQueries returns nothing: the group's row is created by
// its first acknowledgement.
func (a SQLiteOffsetsAdapter) BeforeSubscribingQueries(string, string) []wsql.Query { return nil }

var (
	_ wsql.SchemaAdapter  = SQLiteSchema{}
	_ wsql.OffsetsAdapter = SQLiteOffsetsAdapter{}
)
