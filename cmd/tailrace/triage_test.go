package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/internal/testenv"
	"github.com/tailrace/tailrace/outbox"
)

// variedRefusal refuses every message for good, with errors that differ
// from message to message only in numbers (as a broker's do): orders.placed
// "no queue bound", orders.cancelled "access refused".
type variedRefusal struct{ n atomic.Int64 }

func (p *variedRefusal) Publish(topic string, msgs ...*message.Message) error {
	n := p.n.Add(1)
	if msgs[0].Metadata.Get("kind") == "orders.cancelled" {
		return tailrace.Permanent(fmt.Errorf("access refused to exchange %q (channel %d, 10.0.0.%d:5672)", topic, n, n%7))
	}
	return tailrace.Permanent(fmt.Errorf("no queue is bound to exchange %q (delivery tag %d, id 9f8e7d6c5b4a)", topic, n*1000))
}
func (*variedRefusal) Close() error { return nil }

// TestOutboxCLITriage covers dead-letter triage on every dialect: groups,
// show with its size cap, replay and purge by group, and unknown ids and
// groups named with exit status 1.
func TestOutboxCLITriage(t *testing.T) {
	dbs := map[string]func(t *testing.T) (*sql.DB, outbox.Dialect, string){
		"sqlite": func(t *testing.T) (*sql.DB, outbox.Dialect, string) {
			s := testenv.NewSQLite(t)
			return s.DB, outbox.SQLite, s.Path
		},
		"postgres": func(t *testing.T) (*sql.DB, outbox.Dialect, string) {
			p := testenv.NewPostgres(t)
			return p.DB, outbox.PostgreSQL, p.URL
		},
		"mysql": func(t *testing.T) (*sql.DB, outbox.Dialect, string) {
			m := testenv.NewMySQL(t)
			return m.DB, outbox.MySQL, m.DSN
		},
	}
	for name, open := range dbs {
		t.Run(name, func(t *testing.T) {
			db, d, url := open(t)
			ctx := context.Background()
			table := testenv.UniqueName("tri")
			if err := outbox.InitializeSchema(ctx, db, d, table); err != nil {
				t.Fatal(err)
			}
			ob, err := outbox.New(db, nil, outbox.Config{Dialect: d, Table: table})
			if err != nil {
				t.Fatal(err)
			}
			g := &outboxCLIRig{db: db, d: d, url: url, table: table, ob: ob}
			cmd := func(sub ...string) []string {
				return append(append([]string{"outbox"}, sub...), "--db", url, "--table", table)
			}
			relay, err := outbox.NewRelay(db, &variedRefusal{}, slog.New(slog.DiscardHandler), outbox.RelayConfig{
				Dialect: d, Table: table, PollInterval: 20 * time.Millisecond, DisableListen: true, LeaseTTL: time.Second,
			})
			if err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- relay.Run(ctx) }()
			g.stage(t, "orders.placed", 6)
			g.stage(t, "orders.cancelled", 3)
			dl, _ := outbox.NewDeadLetters(db, d, table)
			for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
				if n, _ := dl.Count(ctx); n == 9 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("relay did not dead-letter 9 messages")
				}
			}
			_ = relay.Close()
			if err := <-done; err != nil {
				t.Fatal(err)
			}

			// Groups: two, despite nine different error texts.
			var groups struct {
				Groups []outbox.DeadGroup `json:"groups"`
			}
			out := mustRun(t, cmd("dead", "--group", "--json")...)
			if err := json.Unmarshal([]byte(out), &groups); err != nil || len(groups.Groups) != 2 {
				t.Fatalf("dead --group --json: %v\n%s", err, out)
			}
			placed, cancelled := groups.Groups[0], groups.Groups[1]
			if placed.Count != 6 || placed.Kind != "orders.placed" || cancelled.Count != 3 || cancelled.Kind != "orders.cancelled" ||
				!strings.Contains(placed.Error, "delivery tag <n>, id <hex>") || placed.Destination == "" ||
				placed.FirstDeadAt.IsZero() || placed.LastDeadAt.Before(placed.FirstDeadAt) {
				t.Fatalf("groups: %+v", groups.Groups)
			}
			out = mustRun(t, cmd("dead", "--group")...)
			for _, want := range []string{"GROUP", placed.ID + "  6 ", cancelled.ID + "  3 ", "2 group(s), 9 dead letter(s)"} {
				if !strings.Contains(out, want) {
					t.Fatalf("dead --group: want %q in\n%s", want, out)
				}
			}
			if out := mustRun(t, cmd("dead", cancelled.ID, "--json")...); !strings.Contains(out, `"total": 3`) {
				t.Fatalf("dead GROUP: %s", out)
			}

			// show: headers and payload, the cap, an unknown id.
			out = mustRun(t, cmd("dead", "show", itoa(placed.SampleID))...)
			for _, want := range []string{"kind:          orders.placed", "group:         " + placed.ID, "headers:\n", "  kind: orders.placed\n",
				"payload (7 bytes, text):\n{\"n\":0}\n"} {
				if !strings.Contains(out, want) {
					t.Fatalf("dead show: want %q in\n%s", want, out)
				}
			}
			out = mustRun(t, cmd("dead", "show", itoa(placed.SampleID), "--max-bytes", "3", "--json")...)
			var shown showJSON
			if err := json.Unmarshal([]byte(out), &shown); err != nil || shown.Payload != `{"n` || !shown.Truncated || shown.PayloadBytes != 7 ||
				shown.Headers["kind"] != "orders.placed" {
				t.Fatalf("dead show --max-bytes 3 --json: %v\n%s", err, out)
			}
			if code, _, errs := runOutbox(t, "", cmd("dead", "show", "999999")...); code != 1 || !strings.Contains(errs, "no dead letter with id 999999") {
				t.Fatalf("dead show unknown: %d %s", code, errs)
			}

			// replay by group, with an unknown id and group named: exit 1,
			// the known ones replayed all the same.
			code, out, errs := runOutbox(t, "", cmd("replay", cancelled.ID, "999998", "g0000000000")...)
			if code != 1 || !strings.Contains(out, "replayed 3 dead letter(s)") ||
				!strings.Contains(errs, "no dead letter with id 999998") || !strings.Contains(errs, "no dead letter in group g0000000000") {
				t.Fatalf("replay group + unknown: %d\n%s%s", code, out, errs)
			}
			if code, _, errs := runOutbox(t, "", cmd("replay", "999999")...); code != 1 || !strings.Contains(errs, "no dead letter with id 999999") {
				t.Fatalf("replay unknown id: %d %s", code, errs)
			}
			// purge by --group.
			code, out, _ = runOutbox(t, "", cmd("purge", "--group", placed.ID, "--yes", "--json")...)
			if code != 0 || strings.TrimSpace(out) != "{\n  \"purged\": 6\n}" {
				t.Fatalf("purge --group: %d %s", code, out)
			}
			if n, _ := dl.Count(ctx); n != 0 {
				t.Fatalf("%d dead letters left", n)
			}
			if code, _, errs := runOutbox(t, "", cmd("purge", "--group", "nope", "--yes")...); code != 2 || !strings.Contains(errs, "is not a group id") {
				t.Fatalf("purge bad group: %d %s", code, errs)
			}
		})
	}
}

func TestNormalizeError(t *testing.T) {
	a := outbox.NormalizeError(`no queue is bound to exchange "orders" (delivery tag 17, msg 0f8c2f6e-0b7e-4f0e-9d43-2c8a1f1b2a3c, 3fa2c1b0d9e8)`)
	b := outbox.NormalizeError("no queue is bound to exchange \"orders\"\n  (delivery tag 1234, msg 11111111-2222-3333-4444-555555555555, abcdef0123)")
	if a != b || a != `no queue is bound to exchange "orders" (delivery tag <n>, msg <uuid>, <hex>)` {
		t.Fatalf("%q\n%q", a, b)
	}
	if outbox.NormalizeError("deadbeefcafe exchange") != "deadbeefcafe exchange" {
		t.Fatal("a word of hex letters was masked")
	}
}
