package main

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"log/slog"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/internal/testenv"
	"github.com/tailrace/tailrace/outbox"
)

// refusePub refuses every message permanently: the relay dead-letters all.
type refusePub struct{}

func (refusePub) Publish(string, ...*message.Message) error {
	return tailrace.Permanent(errors.New("refusePub: no route"))
}
func (refusePub) Close() error { return nil }

// outboxCLIRig is an outbox table with dead letters made by a real relay.
type outboxCLIRig struct {
	db    *sql.DB
	d     outbox.Dialect
	url   string // what --db gets
	table string
	ob    *outbox.Outbox
}

func (g *outboxCLIRig) stage(t *testing.T, kind string, n int) {
	t.Helper()
	ctx := context.Background()
	tx, err := g.db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := range n {
		if err := g.ob.StageTx(ctx, tx, outbox.Message{Value: map[string]int{"n": i}, Options: &outbox.StageOptions{Kind: kind}}); err != nil {
			t.Fatal(err)
		}
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
}

// runOutbox runs the CLI with stdin as the confirmation input.
func runOutbox(t *testing.T, in string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	stdin = strings.NewReader(in)
	defer func() { stdin = nil }()
	var out, errb bytes.Buffer
	code = run(args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestOutboxCLI(t *testing.T) {
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
			return m.DB, outbox.MySQL, "mysql://" + m.DSN
		},
	}
	for name, open := range dbs {
		t.Run(name, func(t *testing.T) {
			db, d, url := open(t)
			ctx := context.Background()
			table := testenv.UniqueName("cli")
			if err := outbox.InitializeSchema(ctx, db, d, table); err != nil {
				t.Fatal(err)
			}
			ob, err := outbox.New(db, nil, outbox.Config{Dialect: d, Table: table})
			if err != nil {
				t.Fatal(err)
			}
			g := &outboxCLIRig{db: db, d: d, url: url, table: table, ob: ob}
			base := []string{"--db", url, "--table", table}
			cmd := func(sub string, rest ...string) []string {
				return append(append([]string{"outbox", sub}, base...), rest...)
			}

			// A relay that refuses everything dead-letters 5 + 3 messages.
			relay, err := outbox.NewRelay(db, refusePub{}, slog.New(slog.DiscardHandler), outbox.RelayConfig{
				Dialect: d, Table: table, PollInterval: 20 * time.Millisecond, DisableListen: true, LeaseTTL: time.Second,
			})
			if err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- relay.Run(ctx) }()
			defer relay.Close()
			g.stage(t, "orders.placed", 5)
			g.stage(t, "orders.cancelled", 3)
			dl, _ := outbox.NewDeadLetters(db, d, table)
			for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
				if n, _ := dl.Count(ctx); n == 8 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("relay did not dead-letter 8 messages")
				}
			}

			// status --json while the relay runs.
			code, out, errs := runOutbox(t, "", cmd("status", "--json")...)
			if code != 0 {
				t.Fatalf("status: %d %s", code, errs)
			}
			var st struct {
				Pending     int `json:"pending"`
				DeadLetters int `json:"dead_letters"`
				Relays      []struct {
					Owner string `json:"owner"`
					Live  bool   `json:"live"`
				} `json:"relays"`
				Leases []struct {
					Live bool `json:"live"`
				} `json:"leases"`
			}
			if err := json.Unmarshal([]byte(out), &st); err != nil {
				t.Fatalf("status --json: %v\n%s", err, out)
			}
			if st.DeadLetters != 8 || len(st.Relays) != 1 || !st.Relays[0].Live || st.Relays[0].Owner != relay.Owner() || len(st.Leases) == 0 {
				t.Fatalf("status --json: %s", out)
			}
			_ = relay.Close()
			if err := <-done; err != nil {
				t.Fatalf("relay: %v", err)
			}

			// status in text, with a backlog and no relay.
			g.stage(t, "orders.placed", 2)
			code, out, _ = runOutbox(t, "", cmd("status")...)
			for _, want := range []string{"outbox " + table, "pending:        2 (0 retrying)", "oldest pending: ", " ago (staged ",
				"dead letters:   8 (latest ", "relays:         0 live, 0 registered"} {
				if code != 0 || !strings.Contains(out, want) {
					t.Fatalf("status: want %q in\n%s", want, out)
				}
			}

			// dead: text with a limit, JSON with a filter.
			code, out, _ = runOutbox(t, "", cmd("dead", "--limit", "2")...)
			if code != 0 || !strings.Contains(out, "ID  KIND") || !strings.Contains(out, "refusePub: no route") ||
				!strings.Contains(out, "2 of 8 dead letter(s) shown") {
				t.Fatalf("dead: %d\n%s", code, out)
			}
			code, out, _ = runOutbox(t, "", cmd("dead", "--kind", "orders.cancelled", "--since", "1h", "--json")...)
			var dead struct {
				Total   int `json:"total"`
				Letters []struct {
					ID        int64             `json:"id"`
					Kind      string            `json:"kind"`
					Attempts  int               `json:"attempts"`
					LastError string            `json:"last_error"`
					Metadata  map[string]string `json:"metadata"`
				} `json:"dead_letters"`
			}
			if err := json.Unmarshal([]byte(out), &dead); err != nil || code != 0 || dead.Total != 3 || len(dead.Letters) != 3 ||
				dead.Letters[0].Kind != "orders.cancelled" || dead.Letters[0].Attempts != 1 || !strings.Contains(dead.Letters[0].LastError, "no route") ||
				dead.Letters[0].Metadata["kind"] != "orders.cancelled" {
				t.Fatalf("dead --json: %d %v\n%s", code, err, out)
			}
			cancelled := dead.Letters

			// replay by id, twice: exactly once.
			id := strings.TrimSpace(strings.Fields(strings.Split(mustRun(t, cmd("dead", "--limit", "1")...), "\n")[1])[0])
			if _, out, _ = runOutbox(t, "", cmd("replay", id)...); !strings.Contains(out, "replayed 1 dead letter(s)") {
				t.Fatalf("replay id: %s", out)
			}
			if _, out, _ = runOutbox(t, "", cmd("replay", id, "--json")...); strings.TrimSpace(out) != "{\n  \"replayed\": 0\n}" {
				t.Fatalf("replay id again: %s", out)
			}
			// replay by kind in batches of 2: progress on stderr.
			code, out, errs = runOutbox(t, "", cmd("replay", "--kind", "orders.placed", "--batch", "2")...)
			if code != 0 || !strings.Contains(out, "replayed 4 dead letter(s)") || errs != "replayed 2/4\nreplayed 4/4\n" {
				t.Fatalf("replay --kind: %d\n%s\n%s", code, out, errs)
			}
			out = mustRun(t, cmd("status", "--json")...)
			_ = json.Unmarshal([]byte(out), &st)
			if st.Pending != 7 || st.DeadLetters != 3 {
				t.Fatalf("after replay: %s", out)
			}

			// purge: needs a selector, asks, honours the answer.
			if code, _, errs = runOutbox(t, "", cmd("purge")...); code != 2 || !strings.Contains(errs, "purge needs ids") {
				t.Fatalf("purge without selector: %d %s", code, errs)
			}
			if code, _, errs = runOutbox(t, "", cmd("replay")...); code != 2 || !strings.Contains(errs, "replay needs ids") {
				t.Fatalf("replay without selector: %d %s", code, errs)
			}
			code, _, errs = runOutbox(t, "n\n", cmd("purge", "--all")...)
			if code != 1 || !strings.Contains(errs, "Delete 3 dead letter(s) of "+table+" for good? [y/N]") || !strings.Contains(errs, "not confirmed") {
				t.Fatalf("purge declined: %d %s", code, errs)
			}
			if _, out, _ = runOutbox(t, "", cmd("purge", "--older-than", "1h", "--yes")...); !strings.Contains(out, "purged 0") {
				t.Fatalf("purge --older-than: %s", out)
			}
			if _, out, _ = runOutbox(t, "", cmd("purge", "--yes", itoa(cancelled[0].ID))...); !strings.Contains(out, "purged 1 dead letter(s)") {
				t.Fatalf("purge id: %s", out)
			}
			code, out, _ = runOutbox(t, "yes\n", cmd("purge", "--kind", "orders.cancelled", "--json")...)
			if code != 0 || strings.TrimSpace(out) != "{\n  \"purged\": 2\n}" {
				t.Fatalf("purge confirmed: %d %s", code, out)
			}
		})
	}
}

func mustRun(t *testing.T, args ...string) string {
	t.Helper()
	code, out, errs := runOutbox(t, "", args...)
	if code != 0 {
		t.Fatalf("%v: exit %d: %s", args, code, errs)
	}
	return out
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

func TestOutboxCLIErrors(t *testing.T) {
	t.Setenv("TAILRACE_DB", "")
	cases := []struct {
		args []string
		code int
		want string
	}{
		{[]string{"outbox", "status"}, 2, "--db is required"},
		{[]string{"outbox", "status", "--db", t.TempDir() + "/missing.db"}, 2, "missing.db"},
		{[]string{"outbox", "status", "--db", "redis://x:secret@host"}, 2, "unknown database URL scheme"},
		{[]string{"outbox", "status", "--db", "user:secret@tcp(127.0.0.1:1)/db?bogus=%"}, 2, "does not parse"},
		{[]string{"outbox", "dead", "--db", "x.db", "--since", "yesterday"}, 2, "want a duration"},
		{[]string{"outbox", "replay", "--db", "x.db", "abc"}, 2, `dead letter id "abc"`},
		{[]string{"outbox"}, 2, "needs a subcommand"},
	}
	for _, c := range cases {
		code, _, errs := runOutbox(t, "", c.args...)
		if code != c.code || !strings.Contains(errs, c.want) || strings.Contains(errs, "secret") {
			t.Errorf("%v: exit %d, stderr %q; want %d and %q", c.args, code, errs, c.code, c.want)
		}
	}
}
