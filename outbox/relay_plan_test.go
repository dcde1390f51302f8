package outbox

import (
	"database/sql"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/tailrace/tailrace/internal/testenv"
)

// TestRelayIdleThenBurstGenericPlan guards against the claim falling into a
// bad cached plan (issue 18). pgx keeps prepared statements per connection;
// after five executions PostgreSQL may switch a statement to a generic plan,
// and one built while the outbox was empty — the normal state of a quiet
// service — must still claim a large backlog quickly. The relay's pool here
// runs with plan_cache_mode=force_generic_plan, and the relay idles through
// more than six polls on the empty table before the backlog is committed; its
// drain must stay within a factor of a fresh relay's drain with default plans
// measured in the same test. With the claim written as
// "id IN (SELECT … LIMIT n)" the generic plan re-ran the subquery for every
// row and the burst drained at ~400 msg/s against ~20,000.
func TestRelayIdleThenBurstGenericPlan(t *testing.T) {
	n := 5000
	if os.Getenv("TAILRACE_RELAY_FULL") != "" {
		n = 20000
	}
	msgs := genMsgs(0, n, 100)

	drain := func(t *testing.T, db *sql.DB, idle bool) float64 {
		g := newRelayRig(t, db, PostgreSQL)
		pub := newRecPub()
		const poll = 50 * time.Millisecond
		if idle {
			vacuum(t, db, g.table)
			g.start(t, pub, RelayConfig{PollInterval: poll})
			// Then idle through well over six polls on the empty table, as a
			// quiet service does.
			time.Sleep(40 * poll)
		}
		start := time.Now()
		g.stageMany(t, msgs, 500) // the idle relay claims while they commit
		if !idle {
			start = time.Now()
			g.start(t, pub, RelayConfig{PollInterval: poll})
		}
		waitFor(t, 5*time.Minute, "the backlog", func() bool { return pub.n() >= len(msgs) })
		rate := float64(len(msgs)) / time.Since(start).Seconds()
		if l := makeLedger(msgs, ids(pub.snapshot()), keyMap(msgs), 0); !l.clean() {
			t.Fatalf("ledger: %s", l)
		}
		return rate
	}

	fresh := drain(t, testenv.NewPostgres(t).DB, false)
	generic := testenv.NewPostgresGenericPlans(t).DB
	burst := drain(t, generic, true)
	t.Logf("drain of %d: fresh relay, default plans %.0f msg/s; idle relay, generic plans %.0f msg/s (%.2fx)",
		n, fresh, burst, burst/fresh)
	// The burst is timed from its first commit, the fresh drain from the
	// relay's start; a trap costs 10-50x, so a generous factor catches it
	// on a loaded machine.
	if burst < fresh/6 {
		t.Fatalf("the idle relay with generic plans drained at %.0f msg/s, under a sixth of the fresh relay's %.0f msg/s: a statement depends on a custom plan",
			burst, fresh)
	}
}

// TestRelayClaimGenericPlan is the statement-level check behind
// TestRelayIdleThenBurstGenericPlan, on a pool of one connection, so that
// the claim always runs where it ran while the table was empty (the relay's
// own choice of connections can hide a trap: database/sql hands out the
// most recently used one). The outbox is vacuumed while empty, as
// autovacuum leaves a quiet service's outbox, the claim runs six times on
// it with plan_cache_mode=force_generic_plan, then n rows are committed and
// three claims of 256 run. The best of them must take about as long as on a
// fresh pool with default plans. A claim cached with a plan of the empty
// table took 0.7-12 s against ~10 ms at n = 20,000.
func TestRelayClaimGenericPlan(t *testing.T) {
	const n = 20000
	claim := func(t *testing.T, db *sql.DB, plant bool) time.Duration {
		ctx := t.Context()
		g := newRelayRig(t, db, PostgreSQL)
		q := newRelaySQL(PostgreSQL, g.table, DefaultRelayPartitions)
		all := make([]int, DefaultRelayPartitions)
		for i := range all {
			all[i] = i
		}
		run := func() (time.Duration, int) {
			start := time.Now()
			rows, err := q.claim(ctx, db, all, 256, 1, nil)
			if err != nil {
				t.Fatal(err)
			}
			return time.Since(start), len(rows)
		}
		if plant {
			db.SetMaxOpenConns(1)
			vacuum(t, db, g.table)
			for range 6 {
				run()
			}
		}
		g.stage(t, genMsgs(0, n, 100)...)
		best := time.Hour
		for range 3 {
			d, k := run()
			if k != 256 {
				t.Fatalf("claimed %d rows, want 256", k)
			}
			best = min(best, d)
		}
		return best
	}
	custom := claim(t, testenv.NewPostgres(t).DB, false)
	generic := claim(t, testenv.NewPostgresGenericPlans(t).DB, true)
	t.Logf("claim of 256 from %d rows: fresh pool, default plans %v; generic plans after claims on the empty table %v", n, custom, generic)
	if generic > 10*custom+50*time.Millisecond {
		t.Fatalf("the claim took %v after claims on the empty table with generic plans, against %v on a fresh pool", generic, custom)
	}
}

// vacuum runs VACUUM on the empty outbox table: it records that the table
// has no pages and no rows, the state autovacuum leaves an emptied outbox in
// on a quiet service. The planner then believes it empty, where for a table
// never vacuumed it assumes ten pages.
func vacuum(t *testing.T, db *sql.DB, table string) {
	t.Helper()
	mustExec(t, db, "VACUUM "+PostgreSQL.quote(table))
}

// TestCleanupGenericPlans: the batched deletes that run again and again on
// pooled connections (the relay's prune of retained rows, PurgeBefore of
// dead letters, the inbox's cleanup) stay fast with plans built while their
// table was empty. Each runs first on the empty table over a one-connection
// pool with plan_cache_mode=force_generic_plan, then cleans n rows; the time
// must stay within a factor of the same cleanup with default plans. Before
// issue 18 the inbox's "ctid IN (SELECT … LIMIT $2)" re-ran its subquery for
// every row of the table under such a plan.
func TestCleanupGenericPlans(t *testing.T) {
	const n = 20000
	ctx := t.Context()
	type cleaner struct {
		name  string
		setup func(t *testing.T, db *sql.DB) (fill func(), clean func() (int, error))
	}
	cleaners := []cleaner{
		{"prune", func(t *testing.T, db *sql.DB) (func(), func() (int, error)) {
			table := testenv.UniqueName("pr")
			if err := InitializeSchema(ctx, db, PostgreSQL, table); err != nil {
				t.Fatal(err)
			}
			q := newRelaySQL(PostgreSQL, table, 16)
			fill := func() {
				mustExec(t, db, `INSERT INTO `+q.t+` (uuid, message_id, kind, partition_key, key_hash, payload, metadata, relayed_at)
					SELECT i::text, i::text, 'k', 'p', 1, '{}', '{}', now() - interval '1 hour' FROM generate_series(1, `+strconv.Itoa(n)+`) i`)
			}
			return fill, func() (int, error) {
				total := 0
				for {
					k, err := q.prune(ctx, db, time.Minute, 1000)
					total += int(k)
					if err != nil || k < 1000 {
						return total, err
					}
				}
			}
		}},
		{"dead letters", func(t *testing.T, db *sql.DB) (func(), func() (int, error)) {
			table := testenv.UniqueName("dl")
			if err := InitializeSchema(ctx, db, PostgreSQL, table); err != nil {
				t.Fatal(err)
			}
			dl, err := NewDeadLetters(db, PostgreSQL, table)
			if err != nil {
				t.Fatal(err)
			}
			fill := func() {
				mustExec(t, db, `INSERT INTO `+PostgreSQL.quote(table+suffixDead)+` (id, uuid, message_id, kind, partition_key, key_hash, payload, metadata, attempts, last_error, created_at, dead_at)
					SELECT i, i::text, i::text, 'k', 'p', 1, '{}', '{}', 1, 'e', now(), now() - interval '1 hour' FROM generate_series(1, `+strconv.Itoa(n)+`) i`)
			}
			return fill, func() (int, error) { return dl.PurgeBefore(ctx, time.Now().Add(-time.Minute)) }
		}},
		{"inbox", func(t *testing.T, db *sql.DB) (func(), func() (int, error)) {
			table := testenv.UniqueName("ib")
			if err := InitializeInboxSchema(ctx, db, PostgreSQL, table); err != nil {
				t.Fatal(err)
			}
			in, err := NewInbox(db, nil, InboxConfig{Dialect: PostgreSQL, Table: table, CleanupBatch: 1000})
			if err != nil {
				t.Fatal(err)
			}
			fill := func() {
				mustExec(t, db, `INSERT INTO `+PostgreSQL.quote(table)+` (consumer, message_id, processed_at)
					SELECT 'c', i::text, now() - interval '1 hour' FROM generate_series(1, `+strconv.Itoa(n)+`) i`)
			}
			return fill, func() (int, error) { return in.cleanupOlderThan(ctx, time.Minute) }
		}},
	}
	for _, c := range cleaners {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			run := func(db *sql.DB, warm bool) time.Duration {
				fill, clean := c.setup(t, db)
				if warm {
					for range 6 { // planned on the empty table
						if _, err := clean(); err != nil {
							t.Fatal(err)
						}
					}
				}
				fill()
				start := time.Now()
				got, err := clean()
				if err != nil {
					t.Fatal(err)
				}
				if got != n {
					t.Fatalf("cleaned %d rows, want %d", got, n)
				}
				return time.Since(start)
			}
			fresh := run(testenv.NewPostgres(t).DB, false)
			g := testenv.NewPostgresGenericPlans(t).DB
			g.SetMaxOpenConns(1) // every statement on the connection that planned it empty
			generic := run(g, true)
			t.Logf("cleanup of %d rows: default plans %v, generic plans built on the empty table %v", n, fresh, generic)
			if generic > 6*fresh+time.Second {
				t.Fatalf("cleanup with generic plans took %v against %v with default plans: a statement depends on a custom plan", generic, fresh)
			}
		})
	}
}

func mustExec(t *testing.T, db *sql.DB, query string) {
	t.Helper()
	if _, err := db.Exec(query); err != nil {
		t.Fatal(err)
	}
}
