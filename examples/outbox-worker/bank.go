package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"

	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/mediator"
	"github.com/tailrace/tailrace/outbox"
)

// Deposit is a command: it changes state, so the Transaction behavior runs
// its handler in a database transaction. Its Kind is the stable name it is
// stored, routed and decoded under; its PartitionKey makes the relay keep the
// commands of one account in the order they were enqueued; its Domain is a
// routing attribute (the policy matches on it).
type Deposit struct {
	mediator.Command[int64] // Send answers with the new balance, in cents.

	Account string `json:"account"`
	Cents   int64  `json:"cents"`
}

func (Deposit) Kind() string           { return "bank.deposit" }
func (Deposit) Domain() string         { return "bank" }
func (d Deposit) PartitionKey() string { return d.Account }

// Withdraw is a command like Deposit.
type Withdraw struct {
	mediator.Command[int64]
	Account string `json:"account"`
	Cents   int64  `json:"cents"`
}

func (Withdraw) Kind() string           { return "bank.withdraw" }
func (Withdraw) Domain() string         { return "bank" }
func (w Withdraw) PartitionKey() string { return w.Account }

// GetBalance is a query: the read side. Queries run outside the Transaction
// behavior (it applies to commands and notifications).
type GetBalance struct {
	mediator.Query[int64]
	Account string
}

func (GetBalance) Kind() string { return "bank.balance" }

// ErrInsufficientFunds is permanent: retrying a withdrawal the balance cannot
// cover will not make it succeed.
var ErrInsufficientFunds = errors.New("bank: insufficient funds")

// bank holds the handlers. They run their SQL on the transaction that the
// Transaction behavior put in the context, so the balance update commits
// with everything else the command does, or not at all.
type bank struct {
	db *sql.DB
}

// schema creates the accounts table (the same SQL on SQLite and PostgreSQL).
func (b *bank) schema(ctx context.Context) error {
	_, err := b.db.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS bank_accounts (
	id      TEXT   PRIMARY KEY,
	balance BIGINT NOT NULL
)`)
	return err
}

func (b *bank) deposit(ctx context.Context, c Deposit) (int64, error) {
	tx, ok := outbox.TxFromContext(ctx)
	if !ok {
		return 0, outbox.ErrNoTx
	}
	var balance int64
	err := tx.QueryRowContext(ctx, `INSERT INTO bank_accounts (id, balance) VALUES ($1, $2)
ON CONFLICT (id) DO UPDATE SET balance = bank_accounts.balance + excluded.balance
RETURNING balance`, c.Account, c.Cents).Scan(&balance)
	return balance, err
}

func (b *bank) withdraw(ctx context.Context, c Withdraw) (int64, error) {
	tx, ok := outbox.TxFromContext(ctx)
	if !ok {
		return 0, outbox.ErrNoTx
	}
	var balance int64
	err := tx.QueryRowContext(ctx, `UPDATE bank_accounts SET balance = balance - $1
WHERE id = $2 AND balance >= $1
RETURNING balance`, c.Cents, c.Account).Scan(&balance)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, tailrace.Permanent(fmt.Errorf("%w: account %s, withdrawal of %s", ErrInsufficientFunds, c.Account, dollars(c.Cents)))
	}
	return balance, err
}

func (b *bank) balance(ctx context.Context, q GetBalance) (int64, error) {
	var balance int64
	err := b.db.QueryRowContext(ctx, `SELECT balance FROM bank_accounts WHERE id = $1`, q.Account).Scan(&balance)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, nil
	}
	return balance, err
}

// register registers the handlers on m.
func (b *bank) register(m *mediator.Mediator) {
	mediator.RegisterFunc(m, b.deposit)
	mediator.RegisterFunc(m, b.withdraw)
	mediator.RegisterFunc(m, b.balance)
}

// dollars formats cents as $1234.56.
func dollars(cents int64) string {
	sign := ""
	if cents < 0 {
		sign, cents = "-", -cents
	}
	return fmt.Sprintf("%s$%d.%02d", sign, cents/100, cents%100)
}
