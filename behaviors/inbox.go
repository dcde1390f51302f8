package behaviors

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"

	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/mediator"
	"github.com/tailrace/tailrace/outbox"
)

// OrderInbox is the suggested Order of the Inbox behavior: just inside
// Transaction (OrderTransaction 600), so that the message id is recorded in
// the handler's transaction.
const OrderInbox = OrderTransaction + 50

// ErrInboxNoTx: a consumed message reached the Inbox behavior without a
// transaction in its context. Transaction must wrap Inbox (a lower Order)
// and apply to the request type. Returned marked tailrace.Permanent.
var ErrInboxNoTx = errors.New("behaviors: Inbox needs the Transaction behavior outside it (Order below OrderInbox) for this request type")

// InboxConfig configures Inbox.
type InboxConfig struct {
	// Applies decides which dispatches are deduplicated. It is called once
	// per request type by the Layer's Scope, and per dispatch by Handle.
	// Default: commands and notifications (what bus consumers dispatch);
	// queries and streams pass through. A transaction must be open around
	// every type Inbox applies to: TransactionConfig.Applies covers the
	// same types by default, and the Layer refuses, when the mediator
	// builds the type's pipeline, a type it wraps without a TxOpener
	// (Transaction) outside it.
	Applies func(info mediator.Info) bool
	// Consumer is the consumer name the ids are recorded under when the
	// context carries none (outbox.WithConsumer; bus consumers set it).
	// Default "".
	Consumer string
}

func (c *InboxConfig) setDefaults() {
	if c.Applies == nil {
		c.Applies = func(info mediator.Info) bool {
			return info.Type == mediator.TypeCommand || info.Type == mediator.TypeNotification
		}
	}
}

// Validate reports every problem of c at once.
func (c InboxConfig) Validate() error {
	if len(c.Consumer) > outbox.MaxFieldLen {
		return fmt.Errorf("behaviors: InboxConfig.Consumer is longer than %d bytes", outbox.MaxFieldLen)
	}
	return nil
}

// Inbox makes consumers idempotent: a message delivered again has its
// handler's effects once.
//
// It acts only on dispatches whose context carries a message id
// (outbox.WithMessageID — bus consumers put the id of the message they
// consume there); everything else passes through. For those it records the
// id, under the consumer's name (outbox.WithConsumer), in the transaction
// the Transaction behavior opened (outbox.Inbox.ClaimTx), then:
//
//   - first delivery: runs the handler in that transaction, so the record
//     and the handler's effects commit together, or roll back together (and
//     the next delivery runs the handler again);
//   - already processed: skips the handler and returns (nil, nil): Send
//     returns the zero response and no error, and the consumer acknowledges
//     the message;
//   - a concurrent delivery of the same message waits on the first one's
//     claim and then skips (or runs, if the first rolled back).
//
// Order, required: Transaction outside, Inbox inside (OrderTransaction <
// OrderInbox), so the claim runs in the handler's transaction. Without a
// transaction Inbox fails with ErrInboxNoTx (permanent). Put Retry outside
// Transaction as usual: each attempt claims again in its own transaction.
//
// A handler that dispatches again (nested Send or Publish) with the same
// context is not deduplicated a second time: the message was claimed once,
// by the outermost dispatch.
type Inbox struct {
	store   *outbox.Inbox
	logger  *slog.Logger
	cfg     InboxConfig
	skipped atomic.Int64
}

// NewInbox returns an Inbox behavior recording ids in store. A nil logger
// discards.
func NewInbox(store *outbox.Inbox, logger *slog.Logger, cfg InboxConfig) (*Inbox, error) {
	cfg.setDefaults()
	err := cfg.Validate()
	if store == nil {
		err = errors.Join(errors.New("behaviors: NewInbox needs an *outbox.Inbox"), err)
	}
	if err != nil {
		return nil, err
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	return &Inbox{store: store, logger: logger, cfg: cfg}, nil
}

// Layer returns b at OrderInbox, scoped by InboxConfig.Applies. Its Check
// refuses (with an error wrapping ErrInboxNoTx) to build the pipeline of a
// type the Inbox wraps when no TxOpener (the Transaction behavior) wraps it
// further out: every consumed message of that type would fail. The
// mediator reports it at registration (Register panics, RegisterSafely and
// Build return it) or at Use.
func (b *Inbox) Layer() mediator.Layer {
	return mediator.Layer{Order: OrderInbox, Behavior: b, Scope: mediator.Where(b.cfg.Applies), Check: b.checkPipeline}
}

// TxOpener is implemented by behaviors that open a transaction and put it
// in the context (outbox.WithTx) for the layers inside them, as Transaction
// does. A behavior of your own that does the same implements it, so that
// Inbox accepts it.
type TxOpener interface {
	mediator.Behavior
	OpensTx()
}

// OpensTx marks Transaction as a TxOpener.
func (*Transaction) OpensTx() {}

// checkPipeline is the Inbox layer's mediator.Layer.Check.
func (b *Inbox) checkPipeline(info mediator.Info, pipeline []mediator.Layer) error {
	for _, l := range pipeline {
		if l.Behavior == mediator.Behavior(b) {
			return fmt.Errorf("%w: no transaction behavior (TxOpener) wraps it outside the Inbox, so every consumed message would fail; "+
				"make TransactionConfig.Applies cover %ss (the default does) or InboxConfig.Applies leave them out", ErrInboxNoTx, info.Type)
		}
		if _, ok := l.Behavior.(TxOpener); ok {
			return nil
		}
	}
	return nil
}

// Skipped returns how many duplicate deliveries Inbox skipped.
func (b *Inbox) Skipped() int64 { return b.skipped.Load() }

// inboxClaimedKey marks a context whose message id was claimed already, so
// that nested dispatches pass through.
type inboxClaimedKey struct{}

// Handle implements mediator.Behavior.
func (b *Inbox) Handle(ctx context.Context, req any, info mediator.Info, next mediator.Next) (any, error) {
	id := outbox.MessageIDFromContext(ctx)
	if id == "" || !b.cfg.Applies(info) {
		return next(ctx, req)
	}
	if claimed, _ := ctx.Value(inboxClaimedKey{}).(string); claimed == id {
		return next(ctx, req) // nested dispatch inside the handler
	}
	tx, ok := outbox.TxFromContext(ctx)
	if !ok {
		return nil, tailrace.Permanent(fmt.Errorf("%w (kind %q, message %s)", ErrInboxNoTx, info.Kind, id))
	}
	consumer := outbox.ConsumerFromContext(ctx)
	if consumer == "" {
		consumer = b.cfg.Consumer
	}
	first, err := b.store.ClaimTx(ctx, tx, consumer, id)
	if err != nil {
		if errors.Is(err, outbox.ErrInvalidMessage) {
			err = tailrace.Permanent(err)
		}
		return nil, err
	}
	if !first {
		b.skipped.Add(1)
		b.logger.LogAttrs(ctx, slog.LevelDebug, "inbox: duplicate message skipped",
			slog.String("kind", info.Kind), slog.String("message_id", id), slog.String("consumer", consumer))
		return nil, nil
	}
	return next(context.WithValue(ctx, inboxClaimedKey{}, id), req)
}
