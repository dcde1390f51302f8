package outbox

import (
	"context"
	"database/sql"
	"fmt"
	"reflect"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/ThreeDotsLabs/watermill"
	wsql "github.com/ThreeDotsLabs/watermill-sql/v3/pkg/sql"
	"github.com/ThreeDotsLabs/watermill/components/forwarder"
	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/tailrace/tailrace"
)

// StageOptions overrides, for one staged message, what would otherwise come
// from the value's methods, the context or the defaults. Empty fields are
// not overrides. A nil *StageOptions means no overrides.
type StageOptions struct {
	// Kind is the stable name of the message (tailrace.MetaKind). Default:
	// the value's Kind() method, or Config.KindOf.
	Kind string
	// Topic is the destination topic written into the forwarder envelope.
	// Default: the kind. The routing policy chooses the real destinations
	// when the relay publishes.
	Topic string
	// MessageID is the id consumers deduplicate on. Default: a new UUID.
	// Set it to make staging idempotent across retries of the caller.
	MessageID string
	// PartitionKey orders messages: the relay delivers messages with the
	// same key in commit order. Default: the value's PartitionKey() method;
	// none means no order relative to other messages.
	PartitionKey string
	// Domain is the business domain (tailrace.MetaDomain). Default: the
	// value's Domain() method.
	Domain string
	// Tenant and TenantTier default to the ones in the context (WithTenant).
	Tenant     string
	TenantTier string
	// CorrelationID defaults to the one in the context (WithCorrelationID);
	// without one, all messages of one Stage call share a new id.
	CorrelationID string
	// CausationID defaults to the one in the context (WithCausationID).
	CausationID string
	// OccurredAt defaults to the time of the Stage call.
	OccurredAt time.Time
	// Headers are extra metadata entries. Keys must not be empty or one of
	// the keys tailrace sets (the tailrace.Meta... constants).
	Headers map[string]string
}

// Message pairs a value to stage with options for it. Pass a Message (or a
// *Message) to Stage instead of the bare value when the value's own methods
// and the context do not say everything.
type Message struct {
	// Value is marshalled into the payload by Config.Marshaler. Required.
	Value any
	// Options overrides the defaults; nil overrides nothing.
	Options *StageOptions
}

// Per-type defaults: a staged value may implement any of these, and
// tailrace.Kinder for its kind.
type (
	// PartitionKeyer gives the partition key of a message, typically the id
	// of the aggregate it belongs to.
	PartitionKeyer interface{ PartitionKey() string }
	// Domainer gives the business domain of a message type.
	Domainer interface{ Domain() string }
	// OptionsProvider gives several defaults at once. Fields set in it win
	// over the single-purpose methods above; per-call StageOptions win over
	// it.
	OptionsProvider interface{ OutboxOptions() StageOptions }
)

// reserved are the metadata keys tailrace sets; user headers cannot use them.
var reserved = map[string]bool{
	tailrace.MetaKind: true, tailrace.MetaDomain: true, tailrace.MetaTenant: true,
	tailrace.MetaTenantTier: true, tailrace.MetaPartitionKey: true,
	tailrace.MetaCorrelationID: true, tailrace.MetaCausationID: true,
	tailrace.MetaOccurredAt: true, tailrace.MetaTraceparent: true,
	tailrace.MetaPolicyVersion: true, tailrace.MetaPolicyRule: true,
	tailrace.MetaCommand: true,
}

// Stage writes msgs into the outbox table inside the transaction carried by
// ctx (see ContextWithTx; the Transaction behavior puts it there). Each
// argument is a value to stage or a Message (value plus options).
//
// The guarantee, in plain words: the messages become visible to the relay
// only when that transaction commits, and they are gone if it rolls back.
// Stage itself never commits. Outside a transaction it returns ErrNoTx and
// writes nothing.
//
// All messages of one call are validated and marshalled first and written
// with one INSERT, in argument order; if any is invalid (no kind, payload
// over the limit, bad header) nothing is written and the transaction stays
// usable. An error from the INSERT itself may leave the transaction
// aborted (PostgreSQL): the caller should roll back, which the Transaction
// behavior does when the handler returns the error.
func (o *Outbox) Stage(ctx context.Context, msgs ...any) error {
	tx, ok := TxFromContext(ctx)
	if !ok {
		return ErrNoTx
	}
	return o.StageTx(ctx, tx, msgs...)
}

// StageTx is Stage on an explicit transaction, for code that owns its
// *sql.Tx (no mediator, or a unit of work of its own). The same guarantee
// holds: visible to the relay only after tx commits; gone on rollback.
func (o *Outbox) StageTx(ctx context.Context, tx *sql.Tx, msgs ...any) error {
	if tx == nil {
		return ErrNoTx
	}
	if len(msgs) == 0 {
		return nil
	}
	prepared, err := o.prepare(ctx, msgs, false)
	if err != nil {
		return err
	}
	return o.write(ctx, tx, prepared)
}

// prepared is one message ready to be wrapped and written.
type prepared struct {
	topic string
	msg   *message.Message
}

// staged travels in the message context from Stage through the forwarder's
// envelope (which keeps the context) to the schema adapter's InsertQuery,
// which needs the columns the envelope's empty metadata does not carry.
type staged struct {
	messageID    string
	kind         string
	partitionKey string
}

type stagedKey struct{}

// prepare resolves, validates and marshals every message; it writes nothing.
func (o *Outbox) prepare(ctx context.Context, msgs []any, command bool) ([]prepared, error) {
	now := time.Now().UTC()
	corr := CorrelationIDFromContext(ctx)
	if corr == "" {
		corr = watermill.NewUUID()
	}
	caus := CausationIDFromContext(ctx)
	tenant, tier := TenantFromContext(ctx)
	tp := traceparent(ctx)

	out := make([]prepared, 0, len(msgs))
	for i, m := range msgs {
		var v any
		var call *StageOptions
		switch x := m.(type) {
		case Message:
			v, call = x.Value, x.Options
		case *Message:
			if x == nil {
				return nil, fmt.Errorf("%w: message %d is a nil *outbox.Message", ErrInvalidMessage, i)
			}
			v, call = x.Value, x.Options
		default:
			v = m
		}
		if isNil(v) {
			return nil, fmt.Errorf("%w: message %d has a nil value", ErrInvalidMessage, i)
		}

		// Defaults, lowest precedence first.
		o2 := StageOptions{
			CorrelationID: corr, CausationID: caus,
			Tenant: tenant, TenantTier: tier,
			OccurredAt: now,
		}
		if p, ok := v.(PartitionKeyer); ok {
			o2.PartitionKey = p.PartitionKey()
		}
		if d, ok := v.(Domainer); ok {
			o2.Domain = d.Domain()
		}
		if p, ok := v.(OptionsProvider); ok {
			def := p.OutboxOptions()
			merge(&o2, &def)
		}
		merge(&o2, call)

		if o2.Kind == "" {
			k, err := o.cfg.KindOf(v)
			if err != nil {
				return nil, fmt.Errorf("message %d (%T): %w", i, v, err)
			}
			o2.Kind = k
		}
		if o2.Topic == "" {
			o2.Topic = o2.Kind
		}
		if o2.MessageID == "" {
			o2.MessageID = watermill.NewUUID()
		}
		if err := validateOptions(&o2); err != nil {
			return nil, fmt.Errorf("message %d (kind %q): %w", i, o2.Kind, err)
		}

		payload, err := o.cfg.Marshaler.Marshal(v)
		if err != nil {
			return nil, fmt.Errorf("outbox: marshal message %d (kind %q): %w", i, o2.Kind, err)
		}
		if len(payload) > o.cfg.MaxPayloadBytes {
			return nil, fmt.Errorf("%w: message %d (kind %q, id %s) is %d bytes, the limit is %d (Config.MaxPayloadBytes)",
				ErrPayloadTooLarge, i, o2.Kind, o2.MessageID, len(payload), o.cfg.MaxPayloadBytes)
		}

		md := make(message.Metadata, 8+len(o2.Headers))
		for k, val := range o2.Headers {
			md[k] = val
		}
		md[tailrace.MetaKind] = o2.Kind
		md[tailrace.MetaOccurredAt] = o2.OccurredAt.UTC().Format(time.RFC3339Nano)
		md[tailrace.MetaCorrelationID] = o2.CorrelationID
		setIf(md, tailrace.MetaDomain, o2.Domain)
		setIf(md, tailrace.MetaTenant, o2.Tenant)
		setIf(md, tailrace.MetaTenantTier, o2.TenantTier)
		setIf(md, tailrace.MetaPartitionKey, o2.PartitionKey)
		setIf(md, tailrace.MetaCausationID, o2.CausationID)
		setIf(md, tailrace.MetaTraceparent, tp)
		if command {
			md[tailrace.MetaCommand] = "true"
		}

		wm := message.NewMessage(o2.MessageID, payload)
		wm.Metadata = md
		wm.SetContext(context.WithValue(ctx, stagedKey{}, &staged{
			messageID: o2.MessageID, kind: o2.Kind, partitionKey: o2.PartitionKey,
		}))
		out = append(out, prepared{topic: o2.Topic, msg: wm})
	}
	return out, nil
}

// Limits of one INSERT statement: PostgreSQL accepts at most 65,535 bind
// parameters and MySQL at most max_allowed_packet bytes (16 MiB by default
// on MariaDB). A Stage call over either limit is written with several
// statements, in order, in the same transaction.
const (
	maxRowsPerInsert  = 1000
	maxBytesPerInsert = 8 << 20
)

// write is Watermill's outbox recipe: the forwarder's publisher wraps each
// message into an envelope addressed to its destination topic and publishes
// it to the outbox table's topic through a watermill-sql publisher built on
// the caller's transaction, whose schema adapter writes our columns. A
// batching publisher between the two turns one Stage call into one INSERT.
func (o *Outbox) write(ctx context.Context, tx *sql.Tx, msgs []prepared) error {
	return o.writeTo(ctx, tx, o.schema, msgs)
}

// writeTo is write into the table of schema (the outbox or the command
// table).
func (o *Outbox) writeTo(ctx context.Context, tx *sql.Tx, schema *stagingSchema, msgs []prepared) error {
	table := schema.table
	pub, err := wsql.NewPublisher(txExecutor{ctx: ctx, tx: tx}, wsql.PublisherConfig{SchemaAdapter: schema}, o.wlogger)
	if err != nil {
		return fmt.Errorf("outbox: %w", err)
	}
	batch := &batchPublisher{msgs: make([]*message.Message, 0, len(msgs))}
	fwd := forwarder.NewPublisher(batch, forwarder.PublisherConfig{ForwarderTopic: table})
	for _, p := range msgs {
		if err := fwd.Publish(p.topic, p.msg); err != nil {
			return fmt.Errorf("outbox: wrap message %s: %w", p.msg.UUID, err)
		}
	}
	start, size := 0, 0
	for i, m := range batch.msgs {
		size += len(m.Payload)
		if i+1 == len(batch.msgs) || i+1-start == maxRowsPerInsert || size+len(batch.msgs[i+1].Payload) > maxBytesPerInsert {
			if err := pub.Publish(table, batch.msgs[start:i+1]...); err != nil {
				return fmt.Errorf("outbox: stage into %q: %w", table, err)
			}
			start, size = i+1, 0
		}
	}
	if o.cfg.Observer != nil {
		o.cfg.Observer.Staged(ctx, table, len(msgs))
	}
	return nil
}

// batchPublisher collects the envelopes the forwarder publishes.
type batchPublisher struct {
	msgs []*message.Message
}

func (b *batchPublisher) Publish(_ string, msgs ...*message.Message) error {
	b.msgs = append(b.msgs, msgs...)
	return nil
}

func (b *batchPublisher) Close() error { return nil }

// txExecutor runs the watermill-sql publisher's statements on the caller's
// transaction under the caller's context (the publisher itself passes
// context.Background()).
type txExecutor struct {
	ctx context.Context
	tx  *sql.Tx
}

func (e txExecutor) Exec(query string, args ...any) (sql.Result, error) {
	return e.tx.ExecContext(e.ctx, query, args...)
}

func (e txExecutor) Query(query string, args ...any) (*sql.Rows, error) {
	return e.tx.QueryContext(e.ctx, query, args...)
}

func (e txExecutor) QueryRow(query string, args ...any) *sql.Row {
	return e.tx.QueryRowContext(e.ctx, query, args...)
}

func (e txExecutor) ExecContext(_ context.Context, query string, args ...any) (sql.Result, error) {
	return e.tx.ExecContext(e.ctx, query, args...)
}

func (e txExecutor) QueryContext(_ context.Context, query string, args ...any) (*sql.Rows, error) {
	return e.tx.QueryContext(e.ctx, query, args...)
}

func (e txExecutor) QueryRowContext(_ context.Context, query string, args ...any) *sql.Row {
	return e.tx.QueryRowContext(e.ctx, query, args...)
}

// merge copies the non-empty fields of src over dst.
func merge(dst, src *StageOptions) {
	if src == nil {
		return
	}
	for _, f := range []struct{ d, s *string }{
		{&dst.Kind, &src.Kind}, {&dst.Topic, &src.Topic}, {&dst.MessageID, &src.MessageID},
		{&dst.PartitionKey, &src.PartitionKey}, {&dst.Domain, &src.Domain},
		{&dst.Tenant, &src.Tenant}, {&dst.TenantTier, &src.TenantTier},
		{&dst.CorrelationID, &src.CorrelationID}, {&dst.CausationID, &src.CausationID},
	} {
		if *f.s != "" {
			*f.d = *f.s
		}
	}
	if !src.OccurredAt.IsZero() {
		dst.OccurredAt = src.OccurredAt
	}
	if len(src.Headers) > 0 {
		h := make(map[string]string, len(dst.Headers)+len(src.Headers))
		for k, v := range dst.Headers {
			h[k] = v
		}
		for k, v := range src.Headers {
			h[k] = v
		}
		dst.Headers = h
	}
}

func validateOptions(o *StageOptions) error {
	if err := validateName("kind", o.Kind); err != nil {
		return err
	}
	if err := validateName("topic", o.Topic); err != nil {
		return err
	}
	for _, f := range []struct{ name, v string }{
		{"message id", o.MessageID}, {"partition key", o.PartitionKey}, {"domain", o.Domain},
		{"tenant", o.Tenant}, {"tenant tier", o.TenantTier},
		{"correlation id", o.CorrelationID}, {"causation id", o.CausationID},
	} {
		if err := validateField(f.name, f.v); err != nil {
			return err
		}
	}
	for k, v := range o.Headers {
		if k == "" {
			return fmt.Errorf("%w: a header has an empty key", ErrInvalidMessage)
		}
		if reserved[k] {
			return fmt.Errorf("%w: header %q is set by tailrace; use StageOptions fields or another key", ErrInvalidMessage, k)
		}
		if !utf8.ValidString(k) || !utf8.ValidString(v) {
			return fmt.Errorf("%w: header %q is not valid UTF-8", ErrInvalidMessage, k)
		}
	}
	return nil
}

// validateName checks a kind or topic: 1 to MaxFieldLen bytes of printable
// characters without spaces.
func validateName(what, s string) error {
	if s == "" {
		return fmt.Errorf("%w: empty %s", ErrInvalidMessage, what)
	}
	if len(s) > MaxFieldLen {
		return fmt.Errorf("%w: %s %.40q… is %d bytes, the limit is %d", ErrInvalidMessage, what, s, len(s), MaxFieldLen)
	}
	for _, r := range s {
		if r == utf8.RuneError || unicode.IsSpace(r) || !unicode.IsPrint(r) {
			return fmt.Errorf("%w: %s %q contains a space, control or invalid character", ErrInvalidMessage, what, s)
		}
	}
	return nil
}

// validateField checks an optional field: at most MaxFieldLen bytes of
// UTF-8 without control characters.
func validateField(what, s string) error {
	if len(s) > MaxFieldLen {
		return fmt.Errorf("%w: %s %.40q… is %d bytes, the limit is %d", ErrInvalidMessage, what, s, len(s), MaxFieldLen)
	}
	for _, r := range s {
		if r == utf8.RuneError || unicode.IsControl(r) {
			return fmt.Errorf("%w: %s %q contains a control or invalid character", ErrInvalidMessage, what, s)
		}
	}
	return nil
}

func setIf(md message.Metadata, k, v string) {
	if v != "" {
		md[k] = v
	}
}

// kindMethod is the default Config.KindOf: the value's Kind() method.
func kindMethod(v any) (string, error) {
	if k, ok := v.(tailrace.Kinder); ok {
		return k.Kind(), nil
	}
	return "", fmt.Errorf("%w for %T: add a Kind() string method, set StageOptions.Kind, or set Config.KindOf", ErrNoKind, v)
}

func isNil(v any) bool {
	if v == nil {
		return true
	}
	rv := reflect.ValueOf(v)
	switch rv.Kind() {
	case reflect.Pointer, reflect.Map, reflect.Slice, reflect.Interface, reflect.Func, reflect.Chan:
		return rv.IsNil()
	}
	return false
}
