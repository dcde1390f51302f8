package main

import (
	"context"
	"database/sql"
	"errors"
	"log/slog"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/bus"
	"github.com/tailrace/tailrace/mediator"
	"github.com/tailrace/tailrace/outbox"
)

// startCommandWorker starts the command worker of the default run: an
// outbox.Worker that claims the commands from the command table and sends
// each through the mediator, no broker in between. Transaction deletes a
// command's row in the handler's own transaction, so each command runs
// exactly once; commands of one account run in order, other accounts in
// parallel. A command that fails for good goes to the dead-letter table
// (bank_commands_dead). stop closes the worker and waits for it.
func startCommandWorker(ctx context.Context, db *sql.DB, dialect outbox.Dialect, notifier *outbox.Notifier,
	m *mediator.Mediator, logger *slog.Logger) (stop func() error, err error) {
	worker, err := outbox.NewWorker(db, m, logger, outbox.WorkerConfig{
		Dialect: dialect, Table: commandTable, Notifier: notifier,
		Name: "bank-worker", CloseTimeout: 5 * time.Second,
	})
	if err != nil {
		return nil, err
	}
	outbox.HandleCommand[Deposit](worker)
	outbox.HandleCommand[Withdraw](worker)

	done := make(chan error, 1)
	go func() { done <- worker.Run(context.WithoutCancel(ctx)) }()
	select {
	case <-worker.Running():
	case err := <-done:
		return nil, err
	}
	return func() error { return errors.Join(worker.Close(), <-done) }, nil
}

// startWorker starts the command worker of the broker run (-amqp): a bus
// consumer that decodes each message of bank.commands by its kind and sends
// it through the mediator, where Transaction and Inbox wrap the handler.
// Messages that fail for good go to the poison topic, where the sample only
// logs them. stop closes the consumer and waits for it.
func startWorker(ctx context.Context, m *mediator.Mediator, sub message.Subscriber, poison message.Publisher, logger *slog.Logger) (stop func() error, err error) {
	consumer, err := bus.NewConsumer(m, logger, bus.ConsumerConfig{Name: "bank-worker", PoisonPublisher: poison})
	if err != nil {
		return nil, err
	}
	bus.HandleCommand[Deposit](consumer)
	bus.HandleCommand[Withdraw](consumer)
	if err := consumer.Subscribe(commandsTopic, sub); err != nil {
		return nil, err
	}

	// A service would keep poisoned messages for someone to look at (a
	// durable queue, an alert); the sample logs them.
	poisoned, err := sub.Subscribe(ctx, bus.DefaultPoisonTopic)
	if err != nil {
		return nil, err
	}
	go func() {
		for msg := range poisoned {
			logger.Error("outbox-worker: poisoned message",
				"kind", msg.Metadata.Get(tailrace.MetaKind), "reason", msg.Metadata.Get(bus.MetaPoisonReason))
			msg.Ack()
		}
	}()

	done := make(chan error, 1)
	go func() { done <- consumer.Run(context.WithoutCancel(ctx)) }()
	select {
	case <-consumer.Running():
	case err := <-done:
		return nil, err
	}
	return func() error { return errors.Join(consumer.Close(), <-done) }, nil
}
