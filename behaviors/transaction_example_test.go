package behaviors_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	_ "modernc.org/sqlite"

	"github.com/tailrace/tailrace/behaviors"
	"github.com/tailrace/tailrace/mediator"
	"github.com/tailrace/tailrace/outbox"
)

type OpenAccount struct {
	mediator.Command[string]
	ID    string
	Owner string
}

func (OpenAccount) Kind() string { return "bank.open_account" }

type AccountOpened struct {
	ID    string `json:"id"`
	Owner string `json:"owner"`
}

func (AccountOpened) Kind() string           { return "bank.account_opened" }
func (e AccountOpened) PartitionKey() string { return e.ID }

// The Transaction behavior runs each command in one transaction: the
// handler's row and the event it stages commit together, or, when the
// handler fails, neither is left.
func ExampleTransaction() {
	dir, _ := os.MkdirTemp("", "tailrace-example")
	defer os.RemoveAll(dir)
	db, _ := sql.Open("sqlite", "file:"+filepath.Join(dir, "bank.db")+"?_pragma=journal_mode(WAL)&_pragma=busy_timeout(10000)&_txlock=immediate")
	defer db.Close()
	ctx := context.Background()
	_ = outbox.InitializeSchema(ctx, db, outbox.SQLite, outbox.DefaultTable)
	_, _ = db.ExecContext(ctx, `CREATE TABLE accounts (id TEXT PRIMARY KEY, owner TEXT NOT NULL)`)

	ob, _ := outbox.New(db, nil, outbox.Config{Dialect: outbox.SQLite})
	tx, _ := behaviors.NewTransaction(db, nil, behaviors.TransactionConfig{})
	m := mediator.New()
	m.Use(tx.Layer())
	mediator.RegisterFunc(m, func(ctx context.Context, c OpenAccount) (string, error) {
		tx, _ := outbox.TxFromContext(ctx)
		if _, err := tx.ExecContext(ctx, `INSERT INTO accounts (id, owner) VALUES (?, ?)`, c.ID, c.Owner); err != nil {
			return "", err
		}
		if err := ob.Stage(ctx, AccountOpened{ID: c.ID, Owner: c.Owner}); err != nil {
			return "", err
		}
		if c.Owner == "" {
			return "", errors.New("an account needs an owner")
		}
		return c.ID, nil
	})

	fmt.Println(mediator.Send(ctx, m, OpenAccount{ID: "acc-1", Owner: "ada"}))
	fmt.Println(mediator.Send(ctx, m, OpenAccount{ID: "acc-2"}))

	var accounts, staged int
	_ = db.QueryRow(`SELECT COUNT(*) FROM accounts`).Scan(&accounts)
	_ = db.QueryRow(`SELECT COUNT(*) FROM tailrace_outbox`).Scan(&staged)
	fmt.Println(accounts, "account,", staged, "staged event")
	// Output:
	// acc-1 <nil>
	//  an account needs an owner
	// 1 account, 1 staged event
}
