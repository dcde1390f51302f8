package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/behaviors"
	"github.com/tailrace/tailrace/bus"
	"github.com/tailrace/tailrace/mediator"
	"github.com/tailrace/tailrace/outbox"
)

// OrderID identifies an order.
type OrderID string

// CreateOrder places an order. Its handler writes the order row and stages
// OrderCreated in the same transaction.
type CreateOrder struct {
	mediator.Command[OrderID]

	Customer    string `json:"customer"`
	AmountCents int64  `json:"amount_cents"`
}

func (CreateOrder) Kind() string { return "orders.create" }

// Validate implements behaviors.Validatable: the Validation behavior rejects
// an invalid order before a transaction is opened.
func (c CreateOrder) Validate() error {
	var errs []error
	if strings.TrimSpace(c.Customer) == "" {
		errs = append(errs, behaviors.FieldError{Field: "customer", Message: "required"})
	}
	if c.AmountCents <= 0 {
		errs = append(errs, behaviors.FieldError{Field: "amount_cents", Message: "must be positive"})
	}
	return errors.Join(errs...)
}

// CancelOrder cancels an order that was created and not cancelled yet.
type CancelOrder struct {
	mediator.Command[struct{}]

	ID OrderID `json:"id"`
}

func (CancelOrder) Kind() string { return "orders.cancel" }

// GetOrder reads an order and the events the consumer received about it.
type GetOrder struct {
	mediator.Query[Order]

	ID OrderID
}

func (GetOrder) Kind() string { return "orders.get" }

// Order is the read model GetOrder returns.
type Order struct {
	ID          OrderID `json:"id"`
	Customer    string  `json:"customer"`
	AmountCents int64   `json:"amount_cents"`
	Status      string  `json:"status"`
	Tenant      string  `json:"tenant,omitempty"`
	// Events are the events the consumer role handled for this order, in
	// the order it handled them, with the policy rule that routed each.
	Events []ReceivedEvent `json:"events"`
	// Audit lists the kinds of the events the audit consumer received
	// from NATS for this order.
	Audit []string `json:"audit"`
}

// ReceivedEvent is one event the consumer handled.
type ReceivedEvent struct {
	Kind string `json:"kind"`
	Rule string `json:"rule"`
}

// OrderCreated is staged by CreateOrder. The routing policy matches its
// Domain and the tenant tier the request carried.
type OrderCreated struct {
	mediator.Notification

	ID          OrderID `json:"id"`
	Customer    string  `json:"customer"`
	AmountCents int64   `json:"amount_cents"`
}

func (OrderCreated) Kind() string           { return "orders.created" }
func (OrderCreated) Domain() string         { return "orders" }
func (e OrderCreated) PartitionKey() string { return string(e.ID) }

// OrderCancelled is staged by CancelOrder.
type OrderCancelled struct {
	mediator.Notification

	ID OrderID `json:"id"`
}

func (OrderCancelled) Kind() string           { return "orders.cancelled" }
func (OrderCancelled) Domain() string         { return "orders" }
func (e OrderCancelled) PartitionKey() string { return string(e.ID) }

// Errors of the order handlers. Both are permanent: retrying cannot help.
var (
	ErrNotFound       = errors.New("orders: no such order")
	ErrNotCancellable = errors.New("orders: order is already cancelled")
)

// schemaSQL creates the service's tables (PostgreSQL).
var schemaSQL = []string{
	`CREATE TABLE IF NOT EXISTS orders (
	id           TEXT        PRIMARY KEY,
	customer     TEXT        NOT NULL,
	amount_cents BIGINT      NOT NULL,
	status       TEXT        NOT NULL,
	tenant       TEXT        NOT NULL DEFAULT '',
	created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
)`,
	`CREATE TABLE IF NOT EXISTS order_events (
	seq      BIGSERIAL PRIMARY KEY,
	order_id TEXT      NOT NULL,
	kind     TEXT      NOT NULL,
	rule     TEXT      NOT NULL
)`,
	`CREATE INDEX IF NOT EXISTS order_events_order ON order_events (order_id, seq)`,
	`CREATE TABLE IF NOT EXISTS order_audit (
	seq      BIGSERIAL PRIMARY KEY,
	order_id TEXT      NOT NULL,
	kind     TEXT      NOT NULL
)`,
	`CREATE INDEX IF NOT EXISTS order_audit_order ON order_audit (order_id, seq)`,
}

// service holds the handlers: commands and the query for the API role,
// event handlers for the consumer role.
type service struct {
	db    *sql.DB
	ob    *outbox.Outbox
	inbox *outbox.Inbox
}

func newService(db *sql.DB, ob *outbox.Outbox, inbox *outbox.Inbox) *service {
	return &service{db: db, ob: ob, inbox: inbox}
}

func (s *service) create(ctx context.Context, c CreateOrder) (OrderID, error) {
	tx, ok := outbox.TxFromContext(ctx)
	if !ok {
		return "", outbox.ErrNoTx
	}
	id := OrderID(watermill.NewUUID())
	tenant, _ := outbox.TenantFromContext(ctx)
	if _, err := tx.ExecContext(ctx, `INSERT INTO orders (id, customer, amount_cents, status, tenant) VALUES ($1, $2, $3, 'created', $4)`,
		id, c.Customer, c.AmountCents, tenant); err != nil {
		return "", err
	}
	// Staged in the same transaction: published if and only if the order
	// row commits.
	if err := s.ob.Stage(ctx, OrderCreated{ID: id, Customer: c.Customer, AmountCents: c.AmountCents}); err != nil {
		return "", err
	}
	return id, nil
}

func (s *service) cancel(ctx context.Context, c CancelOrder) (struct{}, error) {
	tx, ok := outbox.TxFromContext(ctx)
	if !ok {
		return struct{}{}, outbox.ErrNoTx
	}
	var status string
	err := tx.QueryRowContext(ctx, `SELECT status FROM orders WHERE id = $1 FOR UPDATE`, c.ID).Scan(&status)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return struct{}{}, tailrace.Permanent(fmt.Errorf("%w: %s", ErrNotFound, c.ID))
	case err != nil:
		return struct{}{}, err
	case status == "cancelled":
		return struct{}{}, tailrace.Permanent(fmt.Errorf("%w: %s", ErrNotCancellable, c.ID))
	}
	if _, err := tx.ExecContext(ctx, `UPDATE orders SET status = 'cancelled' WHERE id = $1`, c.ID); err != nil {
		return struct{}{}, err
	}
	return struct{}{}, s.ob.Stage(ctx, OrderCancelled{ID: c.ID})
}

func (s *service) get(ctx context.Context, q GetOrder) (Order, error) {
	o := Order{Events: []ReceivedEvent{}, Audit: []string{}}
	err := s.db.QueryRowContext(ctx, `SELECT id, customer, amount_cents, status, tenant FROM orders WHERE id = $1`, q.ID).
		Scan(&o.ID, &o.Customer, &o.AmountCents, &o.Status, &o.Tenant)
	if errors.Is(err, sql.ErrNoRows) {
		return Order{}, fmt.Errorf("%w: %s", ErrNotFound, q.ID)
	}
	if err != nil {
		return Order{}, err
	}
	rows, err := s.db.QueryContext(ctx, `SELECT kind, rule FROM order_events WHERE order_id = $1 ORDER BY seq`, q.ID)
	if err != nil {
		return Order{}, err
	}
	defer rows.Close()
	for rows.Next() {
		var e ReceivedEvent
		if err := rows.Scan(&e.Kind, &e.Rule); err != nil {
			return Order{}, err
		}
		o.Events = append(o.Events, e)
	}
	if err := rows.Err(); err != nil {
		return Order{}, err
	}
	audit, err := s.db.QueryContext(ctx, `SELECT kind FROM order_audit WHERE order_id = $1 ORDER BY seq`, q.ID)
	if err != nil {
		return Order{}, err
	}
	defer audit.Close()
	for audit.Next() {
		var k string
		if err := audit.Scan(&k); err != nil {
			return Order{}, err
		}
		o.Audit = append(o.Audit, k)
	}
	return o, audit.Err()
}

// received records an event the consumer handled, with the policy rule that
// routed it, in the transaction the Transaction behavior opened, where the
// Inbox behavior recorded the message id: a redelivered event is recorded
// once.
func (s *service) received(ctx context.Context, id OrderID, kind string) error {
	tx, ok := outbox.TxFromContext(ctx)
	if !ok {
		return outbox.ErrNoTx
	}
	var rule string
	if msg, ok := bus.MessageFromContext(ctx); ok {
		rule = msg.Metadata.Get(tailrace.MetaPolicyRule)
	}
	_, err := tx.ExecContext(ctx, `INSERT INTO order_events (order_id, kind, rule) VALUES ($1, $2, $3)`, id, kind, rule)
	return err
}

func (s *service) onCreated(ctx context.Context, e OrderCreated) error {
	return s.received(ctx, e.ID, e.Kind())
}

func (s *service) onCancelled(ctx context.Context, e OrderCancelled) error {
	return s.received(ctx, e.ID, e.Kind())
}

// audit handles an event the policy also routed to NATS, without the
// mediator: it claims the message id in the inbox and appends to the audit
// table in one transaction, so a redelivered event is audited once.
func (s *service) audit(ctx context.Context, msg *message.Message) error {
	var e struct {
		ID OrderID `json:"id"`
	}
	if err := json.Unmarshal(msg.Payload, &e); err != nil || e.ID == "" {
		return tailrace.Permanent(fmt.Errorf("orders: audit: no order id in %s", msg.UUID))
	}
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer func() { _ = tx.Rollback() }()
	first, err := s.inbox.ClaimTx(ctx, tx, auditConsumerName, msg.UUID)
	if err != nil || !first {
		return err
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO order_audit (order_id, kind) VALUES ($1, $2)`,
		e.ID, msg.Metadata.Get(tailrace.MetaKind)); err != nil {
		return err
	}
	return tx.Commit()
}

// registrations lists the handlers for mediator.Build.
func registrations(s *service) []mediator.Registration {
	return []mediator.Registration{
		mediator.Handle[CreateOrder](mediator.HandlerFunc[CreateOrder, OrderID](s.create)),
		mediator.Handle[CancelOrder](mediator.HandlerFunc[CancelOrder, struct{}](s.cancel)),
		mediator.Handle[GetOrder](mediator.HandlerFunc[GetOrder, Order](s.get)),
		mediator.HandleNotification[OrderCreated](mediator.NotificationHandlerFunc[OrderCreated](s.onCreated)),
		mediator.HandleNotification[OrderCancelled](mediator.NotificationHandlerFunc[OrderCancelled](s.onCancelled)),
	}
}
