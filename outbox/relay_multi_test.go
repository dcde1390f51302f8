package outbox

import (
	"context"
	"database/sql"
	"fmt"
	"log/slog"
	neturl "net/url"
	"os"
	"runtime/pprof"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tailrace/tailrace/internal/testenv"
)

// kill stops r like a crash (tests only): no ack flush, no lease release.
func (r *Relay) kill() {
	r.sub.abort()
	_ = r.Close()
}

// mergeByTime merges the records of several publishers in time order.
func mergeByTime(pubs ...*recPub) []recorded {
	var all []recorded
	for _, p := range pubs {
		all = append(all, p.snapshot()...)
	}
	slices.SortStableFunc(all, func(a, b recorded) int { return a.at.Compare(b.at) })
	return all
}

// TestRelayThreeRelays: three relays on one PostgreSQL outbox, started one
// after another while messages are being staged: the partitions are shared
// out, nothing is lost or duplicated, and per-key order holds across
// hand-overs.
func TestRelayThreeRelays(t *testing.T) {
	pg := testenv.NewPostgres(t)
	g := newRelayRig(t, pg.DB, PostgreSQL)
	msgs := genMsgs(0, 3000, 60)
	pubs := []*recPub{newRecPub(), newRecPub(), newRecPub()}
	relays := make([]*Relay, 3)
	for _, p := range pubs {
		p.delay = func(string) time.Duration { return 200 * time.Microsecond }
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // stage while relays come and go
		defer wg.Done()
		for i := 0; i < len(msgs); i += 30 {
			g.stage(t, msgs[i:i+30]...)
			time.Sleep(3 * time.Millisecond)
		}
	}()
	for i := range relays {
		relays[i] = g.start(t, pubs[i], RelayConfig{LeaseTTL: time.Second, MaxInFlight: 64, Owner: fmt.Sprintf("relay-%d", i)})
		time.Sleep(700 * time.Millisecond)
	}
	wg.Wait()
	total := func() int { return pubs[0].n() + pubs[1].n() + pubs[2].n() }
	waitFor(t, 60*time.Second, "all messages", func() bool { return total() >= len(msgs) })
	time.Sleep(200 * time.Millisecond)
	l := makeLedger(msgs, ids(mergeByTime(pubs...)), keyMap(msgs), g.count(t, g.table))
	t.Logf("ledger: %s; per relay: %d / %d / %d", l, pubs[0].n(), pubs[1].n(), pubs[2].n())
	if !l.clean() {
		t.Fatalf("ledger: %s; dup %v; order %v", l, head(l.duplicated), head(l.orderViolations))
	}
	// Every relay got a share by the end.
	waitFor(t, 10*time.Second, "a fair share each", func() bool {
		counts := map[string]int{}
		rows, err := g.db.Query(`SELECT owner FROM ` + PostgreSQL.quote(g.table+suffixLeases) + ` WHERE expires_at > now()`)
		if err != nil {
			t.Fatal(err)
		}
		defer rows.Close()
		for rows.Next() {
			var o string
			_ = rows.Scan(&o)
			counts[o]++
		}
		return len(counts) == 3 && counts["relay-0"] <= 6 && counts["relay-1"] <= 6 && counts["relay-2"] <= 6 &&
			counts["relay-0"]+counts["relay-1"]+counts["relay-2"] == 16
	})
}

// TestRelayTakeover: a relay dies mid-drain without releasing anything; a
// second one takes its partitions over when the leases expire and relays
// everything, duplicates bounded by what the first had in flight.
func TestRelayTakeover(t *testing.T) {
	for name, open := range relayDBs() {
		if name == "sqlite" {
			continue
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			db, d := open(t)
			g := newRelayRig(t, db, d)
			msgs := genMsgs(0, 1500, 40)
			g.stageMany(t, msgs, 500)
			pubA := newRecPub()
			pubA.delay = func(string) time.Duration { return time.Millisecond }
			const ttl = time.Second
			a := g.start(t, pubA, RelayConfig{LeaseTTL: ttl, MaxInFlight: 32, Owner: "relay-a"})
			waitFor(t, 30*time.Second, "relay A to be mid-drain", func() bool { return pubA.n() >= 300 })
			a.kill()
			killed := time.Now()
			nA := pubA.n()

			pubB := newRecPub()
			g.start(t, pubB, RelayConfig{LeaseTTL: ttl, Owner: "relay-b"})
			waitFor(t, 30*time.Second, "relay B to relay the rest", func() bool { return g.count(t, g.table) == 0 })
			took := pubB.snapshot()[0].at.Sub(killed)
			l := makeLedger(msgs, append(ids(pubA.snapshot()), ids(pubB.snapshot())...), keyMap(msgs), 0)
			t.Logf("ledger: %s; A relayed %d before the kill, B took over after %s", l, nA, took.Round(time.Millisecond))
			if len(l.lost)+len(l.unexpected)+len(l.orderViolations) > 0 {
				t.Fatalf("ledger: %s %v", l, head(l.orderViolations))
			}
			// Duplicates: at most what A had in flight plus acks not yet
			// deleted, which the relay caps at two batches.
			if limit := 32 + 2*DefaultRelayBatchSize; len(l.duplicated) > limit {
				t.Errorf("%d duplicates; the bound is MaxInFlight + 2 × BatchSize = %d", len(l.duplicated), limit)
			}
			if took > ttl+ttl/3+2*time.Second {
				t.Errorf("takeover took %s with LeaseTTL %s", took, ttl)
			}
		})
	}
}

// TestRelayLeaseLostStopsEmitting: when another owner takes a partition
// (here: the lease row is stolen), the relay stops relaying it.
func TestRelayLeaseStolen(t *testing.T) {
	g := newRelayRig(t, testenv.NewSQLite(t).DB, SQLite)
	pub := newRecPub()
	g.start(t, pub, RelayConfig{LeaseTTL: 600 * time.Millisecond, Partitions: 1, Owner: "victim"})
	waitFor(t, 5*time.Second, "the lease", func() bool {
		var n int
		_ = g.db.QueryRow(`SELECT COUNT(*) FROM ` + SQLite.quote(g.table+suffixLeases) + ` WHERE owner = 'victim'`).Scan(&n)
		return n == 1
	})
	// Steal it for a long time.
	if _, err := g.db.Exec(`UPDATE ` + SQLite.quote(g.table+suffixLeases) + ` SET owner = 'thief', expires_at = '9999-01-01T00:00:00.000Z'`); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second) // two ticks: the victim noticed
	g.stage(t, genMsgs(0, 10, 2)...)
	time.Sleep(700 * time.Millisecond)
	if n := pub.n(); n != 0 {
		t.Fatalf("relayed %d messages of a partition it no longer owns", n)
	}
	var claimed int
	_ = g.db.QueryRow(`SELECT COUNT(*) FROM ` + SQLite.quote(g.table) + ` WHERE claim_token IS NOT NULL`).Scan(&claimed)
	if claimed != 0 {
		t.Fatalf("%d rows claimed without a lease", claimed)
	}
	// The thief gives it back (expires): the victim takes it again.
	if _, err := g.db.Exec(`UPDATE ` + SQLite.quote(g.table+suffixLeases) + ` SET expires_at = '2000-01-01T00:00:00.000Z'`); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "the messages after the lease came back", func() bool { return pub.n() == 10 })
	_ = context.Background
}

// countingHandler counts slog records at Warn and above.
type countingHandler struct {
	slog.Handler
	n *atomic.Int64
}

func (h countingHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= slog.LevelWarn || h.Handler.Enabled(ctx, l)
}

func (h countingHandler) Handle(ctx context.Context, r slog.Record) error {
	if r.Level >= slog.LevelWarn {
		h.n.Add(1)
	}
	if !h.Handler.Enabled(ctx, r.Level) {
		return nil
	}
	return h.Handler.Handle(ctx, r)
}

func (h countingHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return countingHandler{h.Handler.WithAttrs(as), h.n}
}

func (h countingHandler) WithGroup(g string) slog.Handler {
	return countingHandler{h.Handler.WithGroup(g), h.n}
}

// TestRelayDatabaseCut: the relay's connections to PostgreSQL are cut (a
// proxy resets them and refuses new ones) for 3 s mid-drain. The relay
// retries with backoff — a bounded number of warnings, no hot loop — and
// finishes the drain when the database is back; nothing is lost.
func TestRelayDatabaseCut(t *testing.T) {
	pg := testenv.NewPostgres(t)
	g := newRelayRig(t, pg.DB, PostgreSQL)
	msgs := genMsgs(0, 3000, 100)
	g.stageMany(t, msgs, 1000)
	// Slow enough that the cut lands mid-drain.

	u, err := neturl.Parse(pg.URL)
	if err != nil {
		t.Fatal(err)
	}
	proxy := newCutProxy(t, u.Host)
	u.Host = proxy.ln.Addr().String()
	db, err := sql.Open("pgx", u.String())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	db.SetMaxOpenConns(8)

	var warnings atomic.Int64
	logger := slog.New(countingHandler{testLogger(t).Handler(), &warnings})
	pub := newRecPub()
	pub.delay = func(string) time.Duration { return 5 * time.Millisecond }
	r, err := NewRelay(db, pub, logger, RelayConfig{Dialect: PostgreSQL, Table: g.table, LeaseTTL: 2 * time.Second,
		MaxInFlight: 16, BatchSize: 100, MaxPending: 400, PollInterval: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- r.Run(context.Background()) }()
	defer func() { _ = r.Close(); <-done }()

	waitFor(t, 30*time.Second, "the drain to start", func() bool { return pub.n() >= 300 })
	proxy.cut()
	before := warnings.Load()
	time.Sleep(3 * time.Second)
	during := warnings.Load() - before
	proxy.restore()
	t.Logf("%d warnings during a 3 s database cut, at %d of %d delivered", during, pub.n(), len(msgs))
	if during == 0 {
		t.Error("no warning during a database cut: the relay did not notice (or the cut missed the drain)")
	}
	if during > 60 {
		t.Errorf("%d warnings in 3 s: the relay is looping on database errors", during)
	}
	deadline := time.Now().Add(60 * time.Second)
	for g.count(t, g.table) > 0 {
		if time.Now().After(deadline) {
			if f := os.Getenv("TAILRACE_RELAY_DUMP"); f != "" {
				w, _ := os.Create(f)
				_ = pprof.Lookup("goroutine").WriteTo(w, 2)
				_ = w.Close()
			}
			r.sub.mu.Lock()
			t.Logf("relay state: pending=%d inflight=%d ready=%d acks=%d outage=%v wantRoom=%v", r.sub.sched.pending, r.sub.sched.inflight, len(r.sub.sched.ready), len(r.sub.acks), r.sub.outage, r.sub.wantRoom)
			for p := range r.sub.sched.parts {
				ps := r.sub.sched.parts[p]
				t.Logf("partition %d: owned=%v draining=%v valid_for=%s inMem=%d inFlight=%d parked=%d", p, ps.owned, ps.draining, time.Until(ps.validUntil).Round(time.Millisecond), ps.inMem, ps.inFlight, len(ps.parked))
			}
			r.sub.mu.Unlock()
			t.Fatalf("the drain did not finish after the cut: %d rows left", g.count(t, g.table))
		}
		time.Sleep(20 * time.Millisecond)
	}
	l := makeLedger(msgs, ids(pub.snapshot()), keyMap(msgs), 0)
	t.Logf("ledger: %s", l)
	if len(l.lost)+len(l.unexpected)+len(l.orderViolations) > 0 {
		t.Fatalf("ledger: %s %v", l, head(l.orderViolations))
	}
}
