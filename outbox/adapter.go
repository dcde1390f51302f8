package outbox

import (
	"database/sql"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"

	wsql "github.com/ThreeDotsLabs/watermill-sql/v3/pkg/sql"
	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/tailrace/tailrace"
)

// stagingSchema is the watermill-sql SchemaAdapter of the outbox table: the
// watermill-sql publisher that Stage builds on the caller's transaction
// asks it for the INSERT. It writes the envelope the forwarder made (uuid,
// payload, metadata) plus the columns the relay orders and partitions by
// (message_id, kind, partition_key, key_hash).
//
// The forwarder gives the envelope empty metadata, so those columns come
// from the staging information Stage puts in the message context, which the
// envelope keeps; a message published by other code is decoded instead.
//
// SelectQuery and UnmarshalMessage let a stock watermill-sql subscriber read
// the table in id order. tailrace's relay does not use them: it claims rows
// by state, because on PostgreSQL and MySQL rows can commit out of id order
// and an offset-based reader would skip them. On SQLite (one writer at a
// time) they are safe with SQLiteOffsetsAdapter.
type stagingSchema struct {
	d      Dialect
	table  string
	prefix string // INSERT INTO ... VALUES
}

func newStagingSchema(d Dialect, table string) *stagingSchema {
	return &stagingSchema{
		d:      d,
		table:  table,
		prefix: "INSERT INTO " + d.quote(table) + " (uuid, message_id, kind, partition_key, key_hash, payload, metadata) VALUES ",
	}
}

// insertColumns is the number of bind parameters per row.
const insertColumns = 7

// envelope is the forwarder's JSON envelope, as far as staging needs it.
type envelope struct {
	DestinationTopic string            `json:"destination_topic"`
	UUID             string            `json:"uuid"`
	Payload          []byte            `json:"payload"`
	Metadata         map[string]string `json:"metadata"`
}

// InsertQuery returns one INSERT for all msgs, in order.
func (s *stagingSchema) InsertQuery(topic string, msgs message.Messages) (wsql.Query, error) {
	if topic != s.table {
		return wsql.Query{}, fmt.Errorf("outbox: schema adapter of %q asked to write to %q", s.table, topic)
	}
	if len(msgs) == 0 {
		return wsql.Query{}, fmt.Errorf("outbox: nothing to insert")
	}
	var b strings.Builder
	b.Grow(len(s.prefix) + len(msgs)*48)
	b.WriteString(s.prefix)
	args := make([]any, 0, len(msgs)*insertColumns)
	pg := s.d.Name() == "postgres"
	for i, m := range msgs {
		st, err := stagingInfo(m)
		if err != nil {
			return wsql.Query{}, err
		}
		hashed := st.partitionKey
		if hashed == "" {
			hashed = st.messageID
		}
		md := "{}"
		if len(m.Metadata) > 0 {
			raw, err := json.Marshal(m.Metadata)
			if err != nil {
				return wsql.Query{}, fmt.Errorf("outbox: marshal metadata of %s: %w", m.UUID, err)
			}
			md = string(raw)
		}
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteByte('(')
		if pg {
			n := i*insertColumns + 1
			for c := 0; c < insertColumns; c++ {
				if c > 0 {
					b.WriteByte(',')
				}
				b.WriteByte('$')
				b.WriteString(strconv.Itoa(n + c))
			}
		} else {
			b.WriteString("?,?,?,?,?,?,?")
		}
		b.WriteByte(')')
		args = append(args, m.UUID, st.messageID, st.kind, st.partitionKey, int64(keyHash(hashed)), []byte(m.Payload), md)
	}
	return wsql.Query{Query: b.String(), Args: args}, nil
}

// stagingInfo returns what Stage put in the message context, or decodes the
// envelope when the message did not come from Stage.
func stagingInfo(m *message.Message) (*staged, error) {
	if st, ok := m.Context().Value(stagedKey{}).(*staged); ok && st != nil {
		return st, nil
	}
	var e envelope
	if err := json.Unmarshal(m.Payload, &e); err != nil {
		return nil, fmt.Errorf("outbox: message %s is not a forwarder envelope: %w", m.UUID, err)
	}
	if e.UUID == "" || e.DestinationTopic == "" {
		return nil, fmt.Errorf("outbox: message %s is not a forwarder envelope (no uuid or destination_topic)", m.UUID)
	}
	return &staged{
		messageID:    e.UUID,
		kind:         e.Metadata[tailrace.MetaKind],
		partitionKey: e.Metadata[tailrace.MetaPartitionKey],
	}, nil
}

// SelectQuery reads the next rows after the consumer group's offset, in id
// order. See the type's doc for when that is safe.
func (s *stagingSchema) SelectQuery(topic string, consumerGroup string, offsets wsql.OffsetsAdapter) wsql.Query {
	next := offsets.NextOffsetQuery(topic, consumerGroup)
	q := "SELECT id, uuid, payload, metadata FROM " + s.d.quote(s.table) +
		" WHERE id > (" + next.Query + ") ORDER BY id ASC LIMIT 100"
	return wsql.Query{Query: q, Args: next.Args}
}

// UnmarshalMessage turns a row of SelectQuery into the envelope message.
func (s *stagingSchema) UnmarshalMessage(row wsql.Scanner) (wsql.Row, error) {
	var r wsql.Row
	var uuid string
	if err := row.Scan(&r.Offset, &uuid, &r.Payload, &r.Metadata); err != nil {
		return wsql.Row{}, fmt.Errorf("outbox: scan row: %w", err)
	}
	r.UUID = []byte(uuid)
	msg := message.NewMessage(uuid, r.Payload)
	if len(r.Metadata) > 0 {
		if err := json.Unmarshal(r.Metadata, &msg.Metadata); err != nil {
			return wsql.Row{}, fmt.Errorf("outbox: metadata of row %d: %w", r.Offset, err)
		}
	}
	r.Msg = msg
	return r, nil
}

// SchemaInitializingQueries returns the statements of SchemaSQL.
func (s *stagingSchema) SchemaInitializingQueries(string) []wsql.Query {
	stmts, _ := SchemaSQL(s.d, s.table) // the name was validated by New
	qs := make([]wsql.Query, len(stmts))
	for i, st := range stmts {
		qs[i] = wsql.Query{Query: st}
	}
	return qs
}

// SubscribeIsolationLevel is the level watermill-sql's subscriber reads at.
func (s *stagingSchema) SubscribeIsolationLevel() sql.IsolationLevel {
	switch s.d.Name() {
	case "postgres":
		return sql.LevelRepeatableRead
	case "mysql":
		return sql.LevelSerializable
	}
	return sql.LevelDefault
}

var _ wsql.SchemaAdapter = (*stagingSchema)(nil)
