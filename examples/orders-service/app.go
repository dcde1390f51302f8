package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/tailrace/tailrace/behaviors"
	"github.com/tailrace/tailrace/bus"
	"github.com/tailrace/tailrace/bus/amqp"
	busnats "github.com/tailrace/tailrace/bus/nats"
	"github.com/tailrace/tailrace/mediator"
	"github.com/tailrace/tailrace/outbox"
	"github.com/tailrace/tailrace/policy"
)

// The publisher keys the policy names, the consumers' names, and the
// destinations the consumer role consumes (the ones policy.json routes to).
const (
	rabbitKey         = "rabbitmq"
	natsKey           = "nats"
	consumerName      = "orders-service"
	auditConsumerName = "orders-audit"
	auditDestination  = "orders.audit"
)

var eventDestinations = []string{"orders.events", "orders.events.priority"}

// App is the assembled service. wire.go builds it (wire_gen.go is the
// generated code); every provider below is a plain function and works by
// hand too. The parts that connect to a broker are built only for the
// roles that use them: the publishers for the relay and the consumers, the
// subscribers for the consumers. So a process with only the api role
// starts, and takes orders, while RabbitMQ and NATS are down: the orders'
// events wait in the outbox for a relay. The publishers themselves start
// while their broker is down too (they connect in the background), so a
// relay does not need the broker to start either; the consumers do. Run
// runs only the configured roles.
type App struct {
	cfg      Config
	logger   *slog.Logger
	db       *sql.DB
	m        *mediator.Mediator
	relay    *outbox.Relay
	consumer *bus.Consumer
	audit    AuditConsumer
	watcher  *policy.Watcher
	routing  *bus.RoutingPublisher
	notifier *outbox.Notifier
	metrics  *telemetry
	outboxH  *outbox.Health
	handler  http.Handler

	mu   sync.Mutex
	addr net.Addr
}

func newApp(cfg Config, logger *slog.Logger, db *sql.DB, m *mediator.Mediator, relay *outbox.Relay,
	consumer *bus.Consumer, audit AuditConsumer, watcher *policy.Watcher, routing *bus.RoutingPublisher, n *outbox.Notifier, t *telemetry,
	oh *outbox.Health) *App {
	a := &App{cfg: cfg, logger: logger, db: db, m: m, relay: relay, consumer: consumer, audit: audit, watcher: watcher, routing: routing, notifier: n, metrics: t,
		outboxH: oh}
	a.handler = a.routes()
	return a
}

// Handler returns the HTTP API.
func (a *App) Handler() http.Handler { return a.handler }

// Addr returns the address the API listens on once Run started it, or nil.
func (a *App) Addr() net.Addr {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.addr
}

// Run plays the configured roles until ctx is done, then shuts down
// gracefully: the HTTP server stops taking requests and finishes the ones in
// flight, the consumer finishes the messages being handled, and the relay
// stops claiming and waits for the publishes in flight, acknowledging
// nothing unconfirmed. Each step is bounded by Config.ShutdownTimeout.
func (a *App) Run(ctx context.Context) error {
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
	)
	fail := func(err error) {
		mu.Lock()
		errs = append(errs, err)
		mu.Unlock()
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	if a.cfg.Has(RoleRelay) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Run returns after ctx is done, once the relay has closed.
			if err := a.relay.Run(ctx); err != nil {
				fail(fmt.Errorf("relay: %w", err))
				cancel()
			}
		}()
	}
	if a.cfg.Has(RoleConsumer) {
		for _, c := range []*bus.Consumer{a.consumer, a.audit.Consumer} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := c.Run(ctx); err != nil {
					fail(fmt.Errorf("consumer %s: %w", c.Name(), err))
					cancel()
				}
			}()
		}
	}
	if a.cfg.Has(RoleAPI) {
		// Commits signal the in-process relay through the Notifier;
		// NotifyPostgres forwards the signal as a NOTIFY, after the commit,
		// to relays running in other processes (-roles relay,...).
		stopNotify, err := outbox.NotifyPostgres(a.db, outbox.DefaultTable, a.notifier, a.logger)
		if err != nil {
			cancel()
			wg.Wait()
			return errors.Join(append(errs, err)...)
		}
		defer stopNotify()
		ln, err := net.Listen("tcp", a.cfg.Addr)
		if err != nil {
			cancel()
			wg.Wait()
			return errors.Join(append(errs, err)...)
		}
		a.mu.Lock()
		a.addr = ln.Addr()
		a.mu.Unlock()
		srv := &http.Server{Handler: a.handler, ReadHeaderTimeout: 10 * time.Second}
		a.logger.Info("orders-service: listening", "addr", ln.Addr().String(), "roles", a.cfg.Roles)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				fail(fmt.Errorf("http: %w", err))
				cancel()
			}
		}()
		<-ctx.Done()
		sctx, scancel := context.WithTimeout(context.WithoutCancel(ctx), a.cfg.ShutdownTimeout)
		defer scancel()
		if err := srv.Shutdown(sctx); err != nil {
			fail(fmt.Errorf("http shutdown: %w", err))
		}
	} else {
		a.logger.Info("orders-service: running", "roles", a.cfg.Roles)
		<-ctx.Done()
	}
	a.logger.Info("orders-service: shutting down")
	wg.Wait()
	a.logger.Info("orders-service: stopped")
	return errors.Join(errs...)
}

// ---------------------------------------------------------------- providers

// provideMediatorConfig is the mediator's configuration: the defaults.
func provideMediatorConfig() mediator.Config { return mediator.Config{} }

func provideLoggingConfig() behaviors.LoggingConfig {
	return behaviors.LoggingConfig{ErrorLevelFor: errorLogLevel}
}
func provideRecoverConfig() behaviors.RecoverConfig       { return behaviors.RecoverConfig{} }
func provideValidationConfig() behaviors.ValidationConfig { return behaviors.ValidationConfig{} }

// provideNotifier is the in-process "committed" signal shared by the
// Transaction behavior and the relay.
func provideNotifier() *outbox.Notifier { return &outbox.Notifier{} }

// The configs below are the inputs of outbox.ProviderSet and
// behaviors.ProviderSet, which provide the *outbox.Outbox, the
// *outbox.Inbox, the *outbox.Relay, the *behaviors.Transaction and the
// *behaviors.Inbox from them.

// provideOutboxConfig: the metrics count the staged messages (Observer).
func provideOutboxConfig(n *outbox.Notifier, m *outbox.Metrics) outbox.Config {
	return outbox.Config{Dialect: outbox.PostgreSQL, Notifier: n, Observer: m}
}

// provideTransactionConfig wraps commands, and the events the consumer
// publishes into the mediator, in a transaction (the default Applies):
// Inbox needs one for both.
func provideTransactionConfig(n *outbox.Notifier) behaviors.TransactionConfig {
	return behaviors.TransactionConfig{Notifier: n}
}

// provideInboxStoreConfig is the inbox table, shared by the Inbox behavior
// and the audit consumer (which claims message ids itself).
func provideInboxStoreConfig() outbox.InboxConfig {
	return outbox.InboxConfig{Dialect: outbox.PostgreSQL}
}

func provideInboxConfig() behaviors.InboxConfig { return behaviors.InboxConfig{} }

// layers is the pipeline, at the suggested orders: Metrics → Logging →
// Recover → Validation → Transaction → Inbox → handler.
func layers(mt *behaviors.Metrics, l *behaviors.Logging, r *behaviors.Recover, v *behaviors.Validation, tx *behaviors.Transaction, in *behaviors.Inbox) []mediator.Layer {
	return []mediator.Layer{mt.Layer(), l.Layer(), r.Layer(), v.Layer(), tx.Layer(), in.Layer()}
}

func watermillLogger(logger *slog.Logger) watermill.LoggerAdapter {
	return watermill.NewSlogLogger(logger)
}

// provideAMQPConfig maps the service's topics to prefixed exchanges and
// queues; the publisher declares the queues too, so that events published
// while no consumer runs are kept.
func provideAMQPConfig(cfg Config) amqp.Config {
	prefixed := func(topic string) string { return cfg.AMQPPrefix + topic }
	return amqp.Config{URL: cfg.AMQPURL, ConnectionName: consumerName, Topology: amqp.Topology{
		ExchangeName: prefixed, QueueName: prefixed, DeclareQueues: true,
	}}
}

// provideNATSConfig: the audit consumers of every process share one durable
// JetStream consumer (a consumer group), so each event is audited by one of
// them.
func provideNATSConfig(cfg Config) busnats.Config {
	return busnats.Config{URL: cfg.NATSURL, Name: consumerName, ConsumerGroup: auditConsumerName}
}

// provideRegistry registers the publishers the policy may name, RabbitMQ
// and NATS JetStream, for the roles that publish: the relay (both) and the
// consumers (RabbitMQ, for poison messages). With only the api role the
// registry is empty: nothing in that process publishes to a broker. The
// publishers connect in the background when their broker is down.
func provideRegistry(cfg Config, ac amqp.Config, nc busnats.Config, logger watermill.LoggerAdapter) (*bus.Registry, func(), error) {
	reg := bus.NewRegistry()
	if !cfg.Has(RoleRelay) && !cfg.Has(RoleConsumer) {
		return reg, func() {}, nil
	}
	rabbit, err := amqp.NewPublisher(ac, logger)
	if err != nil {
		return nil, nil, err
	}
	reg.Register(rabbitKey, rabbit)
	if cfg.Has(RoleRelay) {
		nats, err := busnats.NewPublisher(nc, logger)
		if err != nil {
			return nil, nil, errors.Join(err, reg.Close())
		}
		reg.Register(natsKey, prefixedPublisher{Publisher: nats, prefix: cfg.NATSPrefix})
	}
	return reg, func() { _ = reg.Close() }, nil
}

// publisherKeys are the publisher keys the policy may name: the ones
// provideRegistry registers in a relay process.
var publisherKeys = []string{rabbitKey, natsKey}

// provideWatcherConfig loads the policy files, checking their publisher keys
// against publisherKeys (not the registry, which is empty in an api-only
// process).
func provideWatcherConfig(cfg Config) policy.WatcherConfig {
	return policy.WatcherConfig{Paths: cfg.PolicyPaths, Load: &policy.LoadOptions{
		KnownPublishers: func(key string) bool { return slices.Contains(publisherKeys, key) },
	}}
}

// provideRoutingConfig is the routing publisher's configuration (input of
// bus.ProviderSet): the defaults.
func provideRoutingConfig() bus.RoutingConfig { return bus.RoutingConfig{} }

// provideRelayConfig (input of outbox.ProviderSet; the relay publishes
// through the routing publisher, bound to message.Publisher in wire.go):
// the metrics count the relayed messages, the failed attempts and the
// publish durations (RelayMiddleware), and the dead letters (Observer).
func provideRelayConfig(cfg Config, n *outbox.Notifier, m *outbox.Metrics) outbox.RelayConfig {
	return outbox.RelayConfig{
		Dialect: outbox.PostgreSQL, Table: outbox.DefaultTable, Notifier: n,
		PollInterval: cfg.RelayPollInterval, CloseTimeout: cfg.ShutdownTimeout,
		Observer: m, Middlewares: []message.HandlerMiddleware{m.RelayMiddleware(outbox.DefaultTable)},
	}
}

// provideOutboxHealth is the outbox's health check, part of /healthz. In
// a process with the relay role it has the "publisher" component (is the
// relay's broker reachable; HealthConfig.Relay) and the relay's outage
// gauges are registered (Metrics.ObserveRelay). The count of live relays
// is not judged here (MinRelays -1): relays may run in other processes,
// and this one registers only once it runs; the backlog's age shows a
// missing relay.
func provideOutboxHealth(cfg Config, db *sql.DB, relay *outbox.Relay, m *outbox.Metrics) (*outbox.Health, func(), error) {
	hc := outbox.HealthConfig{Dialect: outbox.PostgreSQL, Table: outbox.DefaultTable, MinRelays: -1}
	cleanup := func() {}
	if cfg.Has(RoleRelay) {
		hc.Relay = relay
		reg, err := m.ObserveRelay(outbox.DefaultTable, relay)
		if err != nil {
			return nil, nil, err
		}
		cleanup = func() { _ = reg.Unregister() }
	}
	h, err := outbox.NewHealth(db, hc)
	if err != nil {
		cleanup()
		return nil, nil, err
	}
	return h, cleanup, nil
}

// AuditConsumer is the consumer of the audit subject on NATS: a type of its
// own so that Wire tells it from the main consumer.
type AuditConsumer struct{ *bus.Consumer }

// provideAuditConsumer consumes the order events routed to NATS by the
// policy's Continue rule "audit", outside the mediator (HandleFunc): it
// claims each message id in the inbox itself and appends to the audit
// table, in one transaction.
// Without the consumer role it builds nothing.
func provideAuditConsumer(cfg Config, nc busnats.Config, s *service, reg *bus.Registry, m *mediator.Mediator, t *telemetry, logger *slog.Logger) (AuditConsumer, func(), error) {
	if !cfg.Has(RoleConsumer) {
		return AuditConsumer{}, func() {}, nil
	}
	metrics, err := bus.ConsumerMetrics(t.provider, auditConsumerName)
	if err != nil {
		return AuditConsumer{}, nil, err
	}
	sub, err := busnats.NewSubscriber(nc, watermill.NewSlogLogger(logger))
	if err != nil {
		return AuditConsumer{}, nil, err
	}
	poison, err := reg.Lookup(rabbitKey)
	if err != nil {
		return AuditConsumer{}, nil, errors.Join(err, sub.Close())
	}
	c, err := bus.NewConsumer(m, logger, bus.ConsumerConfig{
		Name: auditConsumerName, PoisonPublisher: poison, CloseTimeout: cfg.ShutdownTimeout,
		Middlewares: []message.HandlerMiddleware{metrics},
	})
	if err != nil {
		return AuditConsumer{}, nil, errors.Join(err, sub.Close())
	}
	c.HandleFunc(OrderCreated{}.Kind(), s.audit)
	c.HandleFunc(OrderCancelled{}.Kind(), s.audit)
	if err := c.Subscribe(auditDestination, prefixedSubscriber{Subscriber: sub, prefix: cfg.NATSPrefix}); err != nil {
		return AuditConsumer{}, nil, errors.Join(err, sub.Close())
	}
	return AuditConsumer{c}, func() { _ = sub.Close() }, nil
}

// prefixedPublisher and prefixedSubscriber put Config.NATSPrefix in front of
// every NATS subject, so that several deployments (or tests) can share one
// server; the policy names subjects without it.
type prefixedPublisher struct {
	message.Publisher
	prefix string
}

func (p prefixedPublisher) Publish(topic string, msgs ...*message.Message) error {
	return p.Publisher.Publish(p.prefix+topic, msgs...)
}

type prefixedSubscriber struct {
	message.Subscriber
	prefix string
}

func (s prefixedSubscriber) Subscribe(ctx context.Context, topic string) (<-chan *message.Message, error) {
	return s.Subscriber.Subscribe(ctx, s.prefix+topic)
}

// provideSubscriber is the RabbitMQ subscriber of the consumer role; nil
// without it (it needs the broker at construction).
func provideSubscriber(c Config, cfg amqp.Config, logger watermill.LoggerAdapter) (*amqp.Subscriber, func(), error) {
	if !c.Has(RoleConsumer) {
		return nil, func() {}, nil
	}
	sub, err := amqp.NewSubscriber(cfg, logger)
	if err != nil {
		return nil, nil, err
	}
	return sub, func() { _ = sub.Close() }, nil
}

// provideConsumer consumes the order events into the mediator; what fails
// for good goes to the poison queue on RabbitMQ. Each handling attempt is
// measured (bus.ConsumerMetrics). Nil without the consumer role.
func provideConsumer(cfg Config, m *mediator.Mediator, sub *amqp.Subscriber, reg *bus.Registry, t *telemetry, logger *slog.Logger) (*bus.Consumer, error) {
	if !cfg.Has(RoleConsumer) {
		return nil, nil
	}
	poison, err := reg.Lookup(rabbitKey)
	if err != nil {
		return nil, err
	}
	metrics, err := bus.ConsumerMetrics(t.provider, consumerName)
	if err != nil {
		return nil, err
	}
	c, err := bus.NewConsumer(m, logger, bus.ConsumerConfig{
		Name: consumerName, PoisonPublisher: poison, CloseTimeout: cfg.ShutdownTimeout,
		Middlewares: []message.HandlerMiddleware{metrics},
	})
	if err != nil {
		return nil, err
	}
	bus.HandleEvent[OrderCreated](c)
	bus.HandleEvent[OrderCancelled](c)
	for _, d := range eventDestinations {
		if err := c.Subscribe(d, sub); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// initSchema creates the outbox, inbox and service tables if they are
// missing. A service with migrations takes the statements from
// outbox.SchemaSQL and outbox.InboxSchemaSQL instead.
func initSchema(ctx context.Context, db *sql.DB) error {
	if err := outbox.InitializeSchema(ctx, db, outbox.PostgreSQL, outbox.DefaultTable); err != nil {
		return err
	}
	if err := outbox.InitializeInboxSchema(ctx, db, outbox.PostgreSQL, outbox.DefaultInboxTable); err != nil {
		return err
	}
	for _, s := range schemaSQL {
		if _, err := db.ExecContext(ctx, s); err != nil {
			return fmt.Errorf("orders-service: schema: %w", err)
		}
	}
	return nil
}
