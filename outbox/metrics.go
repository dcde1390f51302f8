package outbox

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/tailrace/tailrace"
)

// Names of the outbox metrics (OpenTelemetry instrument names; a Prometheus
// exporter turns the dots into underscores and adds a unit suffix, e.g.
// tailrace_outbox_relay_publish_duration_seconds).
const (
	// MetricPending (gauge, {message}): messages not yet relayed, read from
	// the database at collection time.
	MetricPending = "tailrace.outbox.pending"
	// MetricOldestPendingAge (gauge, s): age of the oldest pending message,
	// on the database clock; 0 when nothing is pending. The outbox's lag.
	MetricOldestPendingAge = "tailrace.outbox.oldest_pending.age"
	// MetricDeadLetters (gauge, {message}): messages in the dead-letter
	// table.
	MetricDeadLetters = "tailrace.outbox.dead_letters"
	// MetricLiveRelays (gauge, {relay}): relays whose heartbeat is live.
	MetricLiveRelays = "tailrace.outbox.relays.live"
	// MetricStaged (counter, {message}): messages written by Stage and
	// Enqueue, counted when written (a transaction that then rolls back
	// is counted too). Fed through Observer.Staged.
	MetricStaged = "tailrace.outbox.staged"
	// MetricRelayed (counter, {message}): messages the relay published and
	// the publisher confirmed.
	MetricRelayed = "tailrace.outbox.relayed"
	// MetricRelayFailures (counter, {attempt}): publish attempts that
	// failed (each retry counts).
	MetricRelayFailures = "tailrace.outbox.relay.failures"
	// MetricDeadLettered (counter, {message}): messages the relay moved to
	// the dead-letter table. Fed through Observer.DeadLettered.
	MetricDeadLettered = "tailrace.outbox.dead_lettered"
	// MetricPublishDuration (histogram, s): how long one relay publish
	// took, envelope unwrapping and broker confirmation included.
	MetricPublishDuration = "tailrace.outbox.relay.publish.duration"
	// MetricRelayOutage (gauge, 1): 1 while the relay's output is in
	// outage mode (Relay.Output), 0 otherwise. Fed by ObserveRelay.
	MetricRelayOutage = "tailrace.outbox.relay.outage"
	// MetricRelayOutageDuration (gauge, s): how long the current outage
	// of the relay's output has lasted; 0 when there is none. Fed by
	// ObserveRelay.
	MetricRelayOutageDuration = "tailrace.outbox.relay.outage.duration"
	// MetricRelayWaiting (gauge, {message}): messages the relay holds,
	// claimed and not yet delivered. Fed by ObserveRelay.
	MetricRelayWaiting = "tailrace.outbox.relay.waiting"
)

// Attribute keys of the outbox metrics.
const (
	// AttrTable is the outbox table: on every outbox metric.
	AttrTable = attribute.Key("outbox.table")
	// AttrKind is the message kind (tailrace.MetaKind): on the relay
	// counters and the publish histogram.
	AttrKind = attribute.Key("message.kind")
	// AttrOutcome is "ok" or "error": on the publish histogram.
	AttrOutcome = attribute.Key("outcome")
	// AttrReason is why a message was dead-lettered: "attempts",
	// "permanent" or "unwrappable".
	AttrReason = attribute.Key("reason")
)

// meterName is the instrumentation scope of the outbox metrics.
const meterName = "github.com/tailrace/tailrace/outbox"

// Observer receives the outbox events that only the staging code and the
// relay see: Config.Observer and RelayConfig.Observer. Metrics implements
// it. Calls must be cheap and must not block.
type Observer interface {
	// Staged is called after one Stage, StageTx or Enqueue call wrote n
	// messages into table (its transaction may still roll back).
	Staged(ctx context.Context, table string, n int)
	// DeadLettered is called after the relay moved a message of kind from
	// table to the dead-letter table; reason is "attempts", "permanent"
	// or "unwrappable".
	DeadLettered(ctx context.Context, table, kind, reason string)
}

// Metrics records the outbox metrics with OpenTelemetry: counters fed by
// the relay's forwarder (RelayMiddleware) and by the Observer hooks, and
// gauges read from the database at collection time (ObserveTable). One
// Metrics serves any number of outbox tables; every measurement carries
// the table as AttrTable. Safe for concurrent use.
type Metrics struct {
	meter                                  metric.Meter
	staged, relayed, failures, deadLettred metric.Int64Counter
	publish                                metric.Float64Histogram
	pending, deadLetters, relays           metric.Int64ObservableGauge
	oldest                                 metric.Float64ObservableGauge
	outage, waiting                        metric.Int64ObservableGauge
	outageFor                              metric.Float64ObservableGauge
}

// NewMetrics creates the outbox instruments on mp (the global
// MeterProvider, otel.GetMeterProvider, when nil).
func NewMetrics(mp metric.MeterProvider) (*Metrics, error) {
	if mp == nil {
		mp = otel.GetMeterProvider()
	}
	m := &Metrics{meter: mp.Meter(meterName)}
	var errs []error
	check := func(err error) {
		if err != nil {
			errs = append(errs, err)
		}
	}
	var err error
	m.staged, err = m.meter.Int64Counter(MetricStaged, metric.WithUnit("{message}"),
		metric.WithDescription("Messages written into the outbox by Stage and Enqueue."))
	check(err)
	m.relayed, err = m.meter.Int64Counter(MetricRelayed, metric.WithUnit("{message}"),
		metric.WithDescription("Messages the relay published and the publisher confirmed."))
	check(err)
	m.failures, err = m.meter.Int64Counter(MetricRelayFailures, metric.WithUnit("{attempt}"),
		metric.WithDescription("Relay publish attempts that failed."))
	check(err)
	m.deadLettred, err = m.meter.Int64Counter(MetricDeadLettered, metric.WithUnit("{message}"),
		metric.WithDescription("Messages the relay moved to the dead-letter table."))
	check(err)
	m.publish, err = m.meter.Float64Histogram(MetricPublishDuration, metric.WithUnit("s"),
		metric.WithDescription("Duration of one relay publish, broker confirmation included."),
		metric.WithExplicitBucketBoundaries(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
	check(err)
	m.pending, err = m.meter.Int64ObservableGauge(MetricPending, metric.WithUnit("{message}"),
		metric.WithDescription("Messages in the outbox not yet relayed."))
	check(err)
	m.oldest, err = m.meter.Float64ObservableGauge(MetricOldestPendingAge, metric.WithUnit("s"),
		metric.WithDescription("Age of the oldest message not yet relayed; 0 when none is pending."))
	check(err)
	m.deadLetters, err = m.meter.Int64ObservableGauge(MetricDeadLetters, metric.WithUnit("{message}"),
		metric.WithDescription("Messages in the dead-letter table."))
	check(err)
	m.relays, err = m.meter.Int64ObservableGauge(MetricLiveRelays, metric.WithUnit("{relay}"),
		metric.WithDescription("Relays whose heartbeat has not expired."))
	check(err)
	m.outage, err = m.meter.Int64ObservableGauge(MetricRelayOutage, metric.WithUnit("1"),
		metric.WithDescription("1 while the relay's output is in outage mode (publishing fails for a reason that is not the messages'), else 0."))
	check(err)
	m.outageFor, err = m.meter.Float64ObservableGauge(MetricRelayOutageDuration, metric.WithUnit("s"),
		metric.WithDescription("How long the current outage of the relay's output has lasted; 0 when there is none."))
	check(err)
	m.waiting, err = m.meter.Int64ObservableGauge(MetricRelayWaiting, metric.WithUnit("{message}"),
		metric.WithDescription("Messages the relay holds, claimed and not yet delivered."))
	check(err)
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("outbox: create metrics: %w", err)
	}
	return m, nil
}

// Staged implements Observer.
func (m *Metrics) Staged(ctx context.Context, table string, n int) {
	m.staged.Add(context.WithoutCancel(ctx), int64(n), metric.WithAttributeSet(attribute.NewSet(AttrTable.String(table))))
}

// DeadLettered implements Observer.
func (m *Metrics) DeadLettered(ctx context.Context, table, kind, reason string) {
	m.deadLettred.Add(context.WithoutCancel(ctx), 1, metric.WithAttributes(AttrTable.String(table), AttrKind.String(kind), AttrReason.String(reason)))
}

// RelayMiddleware returns a forwarder middleware for the relay of table
// (RelayConfig.Middlewares) that counts relayed messages and failed
// attempts and records the publish duration, by message kind.
func (m *Metrics) RelayMiddleware(table string) message.HandlerMiddleware {
	tableAttr := AttrTable.String(table)
	return func(h message.HandlerFunc) message.HandlerFunc {
		return func(msg *message.Message) ([]*message.Message, error) {
			start := time.Now()
			out, err := h(msg)
			d := time.Since(start).Seconds()
			ctx := context.WithoutCancel(msg.Context())
			kind := EnvelopeMetadata(msg.Payload).Get(tailrace.MetaKind)
			attrs := metric.WithAttributes(tableAttr, AttrKind.String(kind))
			if err != nil {
				m.failures.Add(ctx, 1, attrs)
				m.publish.Record(ctx, d, metric.WithAttributes(tableAttr, AttrKind.String(kind), AttrOutcome.String("error")))
			} else {
				m.relayed.Add(ctx, 1, attrs)
				m.publish.Record(ctx, d, metric.WithAttributes(tableAttr, AttrKind.String(kind), AttrOutcome.String("ok")))
			}
			return out, err
		}
	}
}

// EnvelopeMetadata returns the metadata of the message inside a forwarder
// envelope (what a relay middleware sees: the outbox row's payload), or
// nil when payload is not an envelope.
func EnvelopeMetadata(payload []byte) message.Metadata {
	var e struct {
		Metadata map[string]string `json:"metadata"`
	}
	if json.Unmarshal(payload, &e) != nil {
		return nil
	}
	return e.Metadata
}

// metricsTimeout bounds the queries of one collection.
const metricsTimeout = 5 * time.Second

// ObserveTable registers the gauges of the outbox table in db: at each
// collection a few cheap queries (see Admin.Status, without the lease
// list) give the pending count, the oldest pending age, the dead letters
// and the live relays. Unregister the returned registration when the
// database is closed. A collection that cannot query the database reports
// nothing for the table and returns the error to the SDK, which logs it.
func (m *Metrics) ObserveTable(db *sql.DB, d Dialect, table string) (metric.Registration, error) {
	a, err := NewAdmin(db, d, table)
	if err != nil {
		return nil, err
	}
	set := metric.WithAttributeSet(attribute.NewSet(AttrTable.String(table)))
	return m.meter.RegisterCallback(func(ctx context.Context, o metric.Observer) error {
		ctx, cancel := context.WithTimeout(ctx, metricsTimeout)
		defer cancel()
		g, err := a.gauges(ctx)
		if err != nil {
			return err
		}
		o.ObserveInt64(m.pending, int64(g.Pending), set)
		o.ObserveFloat64(m.oldest, g.OldestPendingAge.Seconds(), set)
		o.ObserveInt64(m.deadLetters, int64(g.DeadLetters), set)
		o.ObserveInt64(m.relays, int64(g.LiveRelays()), set)
		return nil
	}, m.pending, m.oldest, m.deadLetters, m.relays)
}

// ObserveRelay registers the outage gauges of a relay running in this
// process (a *Relay) on outbox table: MetricRelayOutage,
// MetricRelayOutageDuration and MetricRelayWaiting, read from Relay.Output
// at each collection (no database query). Unregister the returned
// registration when the relay is closed.
func (m *Metrics) ObserveRelay(table string, r RelayOutput) (metric.Registration, error) {
	if r == nil {
		return nil, errors.New("outbox: ObserveRelay: relay is nil")
	}
	set := metric.WithAttributeSet(attribute.NewSet(AttrTable.String(table)))
	return m.meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		st := r.Output()
		down := int64(0)
		if st.Down {
			down = 1
		}
		o.ObserveInt64(m.outage, down, set)
		o.ObserveFloat64(m.outageFor, st.For.Seconds(), set)
		o.ObserveInt64(m.waiting, int64(st.Waiting), set)
		return nil
	}, m.outage, m.outageFor, m.waiting)
}

// gauges is Status without the relayed count, the lease list and the
// relay rows beyond what LiveRelays needs.
func (a *Admin) gauges(ctx context.Context) (Status, error) {
	st := Status{Table: a.q.table}
	now, err := a.dbNow(ctx)
	if err != nil {
		return st, err
	}
	st.Now = now
	if err := a.pending(ctx, &st); err != nil {
		return st, err
	}
	if err := a.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM `+a.q.dead).Scan(&st.DeadLetters); err != nil {
		return st, err
	}
	st.Relays, err = a.relays(ctx, now)
	return st, err
}
