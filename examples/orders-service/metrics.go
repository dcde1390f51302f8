package main

import (
	"context"
	"database/sql"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"

	"github.com/tailrace/tailrace/behaviors"
	"github.com/tailrace/tailrace/outbox"
)

// telemetry is the service's OpenTelemetry MeterProvider, read by a
// Prometheus exporter into a registry of its own (not the global default,
// so that two Apps in one process — the tests — do not collide). GET
// /metrics serves the registry.
type telemetry struct {
	provider *sdkmetric.MeterProvider
	registry *prometheus.Registry
}

// handler serves the registry in the Prometheus text format.
func (t *telemetry) handler() http.Handler {
	return promhttp.HandlerFor(t.registry, promhttp.HandlerOpts{})
}

// provideTelemetry builds the MeterProvider; the cleanup shuts it down.
func provideTelemetry() (*telemetry, func(), error) {
	reg := prometheus.NewRegistry()
	exp, err := otelprom.New(otelprom.WithRegisterer(reg))
	if err != nil {
		return nil, nil, err
	}
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(exp))
	return &telemetry{provider: mp, registry: reg}, func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = mp.Shutdown(ctx)
	}, nil
}

// provideOutboxMetrics creates the outbox instruments: the counters fed by
// the outbox's and the relay's Observer and by the relay's middleware, and
// the gauges of the outbox table (pending, oldest pending age, dead letters,
// live relays), read from the database at each scrape.
func provideOutboxMetrics(t *telemetry, db *sql.DB) (*outbox.Metrics, func(), error) {
	m, err := outbox.NewMetrics(t.provider)
	if err != nil {
		return nil, nil, err
	}
	reg, err := m.ObserveTable(db, outbox.PostgreSQL, outbox.DefaultTable)
	if err != nil {
		return nil, nil, err
	}
	return m, func() { _ = reg.Unregister() }, nil
}

// provideBehaviorMetrics is the mediator's Metrics behavior (the duration
// and outcome of every dispatch); it also reports the messages the Inbox
// behavior skipped as duplicates.
func provideBehaviorMetrics(t *telemetry, in *behaviors.Inbox) (*behaviors.Metrics, func(), error) {
	m, err := behaviors.NewMetrics(behaviors.MetricsConfig{MeterProvider: t.provider})
	if err != nil {
		return nil, nil, err
	}
	reg, err := m.ObserveInbox(in, consumerName)
	if err != nil {
		return nil, nil, err
	}
	return m, func() { _ = reg.Unregister() }, nil
}
