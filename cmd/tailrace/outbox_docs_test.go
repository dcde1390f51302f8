package main

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/outbox"
)

// TestOperationsDocConsole runs every `tailrace outbox` command of the
// console blocks in docs/operations.md, in order, against the database the
// document describes (orders.db: three dead letters a broker refused, two
// messages waiting, no relay running), and compares the output with the
// document's. Times, durations and generated UUIDs differ from run to run
// and are compared as placeholders.
func TestOperationsDocConsole(t *testing.T) {
	doc, err := os.ReadFile("../../docs/operations.md")
	if err != nil {
		t.Fatal(err)
	}
	t.Chdir(t.TempDir())
	opsDocsFixture(t, "orders.db")
	n := 0
	for _, c := range opsConsole(string(doc)) {
		args := strings.Fields(c.cmd)
		if len(args) < 2 || args[0] != "tailrace" || args[1] != "outbox" {
			continue
		}
		n++
		var out bytes.Buffer
		stdin = strings.NewReader("")
		code := run(args[1:], &out, &out)
		if c.echoExit {
			out.WriteString("exit " + strconv.Itoa(code) + "\n")
		} else if code != 0 {
			t.Errorf("%s: exit %d\n%s", c.cmd, code, out.String())
			continue
		}
		if got, want := normalizeOps(out.String()), normalizeOps(c.want); got != want {
			t.Errorf("%s: output differs\n--- got\n%s--- want\n%s", c.cmd, out.String(), c.want)
		}
	}
	if n < 8 {
		t.Fatalf("only %d tailrace outbox commands found in docs/operations.md", n)
	}
}

var (
	opsTime = regexp.MustCompile(`\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)`)
	opsDur  = regexp.MustCompile(`\b\d+(\.\d+)?(h|m|s|ms|µs|ns)(\d+(\.\d+)?(h|m|s|ms|µs|ns))*\b`)
	opsUUID = regexp.MustCompile(`[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}`)
	opsNs   = regexp.MustCompile(`("\w+_ns": )\d+`)
)

func normalizeOps(s string) string {
	s = opsTime.ReplaceAllString(s, "<time>")
	s = opsUUID.ReplaceAllString(s, "<uuid>")
	s = opsNs.ReplaceAllString(s, "${1}<ns>")
	return opsDur.ReplaceAllString(s, "<dur>")
}

type opsCommand struct {
	cmd      string
	echoExit bool
	want     string
}

// opsConsole returns the commands of the ```console blocks of md, each with
// the lines printed under it.
func opsConsole(md string) []opsCommand {
	var out []opsCommand
	var cur *opsCommand
	in := false
	for _, line := range strings.Split(md, "\n") {
		switch {
		case !in && line == "```console":
			in = true
		case in && line == "```":
			if cur != nil {
				out = append(out, *cur)
				cur = nil
			}
			in = false
		case in && strings.HasPrefix(line, "$ "):
			if cur != nil {
				out = append(out, *cur)
			}
			c := opsCommand{cmd: strings.TrimPrefix(line, "$ ")}
			if before, ok := strings.CutSuffix(c.cmd, `; echo "exit $?"`); ok {
				c.cmd, c.echoExit = before, true
			}
			cur = &c
		case in && cur != nil:
			cur.want += line + "\n"
		}
	}
	return out
}

// brokerRefuses is a publisher that refuses every message for good.
type brokerRefuses struct{}

func (brokerRefuses) Publish(string, ...*message.Message) error {
	return tailrace.Permanent(errors.New(`no queue is bound to exchange "orders" (unroutable)`))
}
func (brokerRefuses) Close() error { return nil }

// opsDocsFixture builds the database of docs/operations.md: three
// orders.placed messages a relay dead-lettered because the broker refused
// them, then two orders.shipped messages staged with no relay running.
func opsDocsFixture(t *testing.T, path string) {
	ctx := context.Background()
	db, err := sql.Open("sqlite", "file:"+filepath.Clean(path)+"?_pragma=journal_mode(WAL)&_pragma=busy_timeout(5000)")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := outbox.InitializeSchema(ctx, db, outbox.SQLite, outbox.DefaultTable); err != nil {
		t.Fatal(err)
	}
	ob, err := outbox.New(db, nil, outbox.Config{Dialect: outbox.SQLite})
	if err != nil {
		t.Fatal(err)
	}
	stage := func(kind string, ids ...string) {
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, id := range ids {
			if err := ob.StageTx(ctx, tx, outbox.Message{Value: map[string]string{"order_id": id}, Options: &outbox.StageOptions{
				Kind: kind, MessageID: id + "-" + strings.TrimPrefix(kind, "orders."), PartitionKey: id,
				CorrelationID: "req-" + id, OccurredAt: time.Date(2026, 11, 23, 9, 0, 0, 0, time.UTC),
			}}); err != nil {
				t.Fatal(err)
			}
		}
		if err := tx.Commit(); err != nil {
			t.Fatal(err)
		}
	}
	stage("orders.placed", "ord-1001", "ord-1002", "ord-1003")
	relay, err := outbox.NewRelay(db, brokerRefuses{}, discardLogger(), outbox.RelayConfig{
		Dialect: outbox.SQLite, Table: outbox.DefaultTable, PollInterval: 20 * time.Millisecond, LeaseTTL: time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- relay.Run(ctx) }()
	dl, _ := outbox.NewDeadLetters(db, outbox.SQLite, outbox.DefaultTable)
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if n, _ := dl.Count(ctx); n == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the relay did not dead-letter the fixture's messages")
		}
	}
	_ = relay.Close()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	stage("orders.shipped", "ord-0998", "ord-0999")
}

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }
