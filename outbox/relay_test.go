package outbox

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/tailrace/tailrace"
	"github.com/tailrace/tailrace/internal/testenv"
)

// ---------------------------------------------------------------- test rig

// relayRig is one database with a fresh outbox table and a staging Outbox.
type relayRig struct {
	db    *sql.DB
	d     Dialect
	table string
	topic string // destination topic of staged messages
	ob    *Outbox
}

// relayDBs are the databases every relay test runs on. "postgres_generic"
// runs PostgreSQL with plan_cache_mode=force_generic_plan, the plans pgx's
// statement cache ends up with, so that a statement that is only fast with
// a custom plan cannot come back unnoticed (issue 18).
func relayDBs() map[string]func(t *testing.T) (*sql.DB, Dialect) {
	return map[string]func(t *testing.T) (*sql.DB, Dialect){
		"postgres":         func(t *testing.T) (*sql.DB, Dialect) { return testenv.NewPostgres(t).DB, PostgreSQL },
		"postgres_generic": func(t *testing.T) (*sql.DB, Dialect) { return testenv.NewPostgresGenericPlans(t).DB, PostgreSQL },
		"mysql":            func(t *testing.T) (*sql.DB, Dialect) { return testenv.NewMySQL(t).DB, MySQL },
		"sqlite":           func(t *testing.T) (*sql.DB, Dialect) { return testenv.NewSQLite(t).DB, SQLite },
	}
}

func newRelayRig(t testing.TB, db *sql.DB, d Dialect) *relayRig {
	t.Helper()
	table := testenv.UniqueName("rl")
	if err := InitializeSchema(context.Background(), db, d, table); err != nil {
		t.Fatal(err)
	}
	ob, err := New(db, nil, Config{Dialect: d, Table: table})
	if err != nil {
		t.Fatal(err)
	}
	return &relayRig{db: db, d: d, table: table, topic: "relay_dest", ob: ob}
}

// relayMsg is one test message: id (also the Watermill message UUID), key.
type relayMsg struct {
	id, key string
}

// stage stages msgs in one transaction through the real StageTx.
func (g *relayRig) stage(t testing.TB, msgs ...relayMsg) {
	t.Helper()
	ctx := context.Background()
	tx, err := g.db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := g.stageTx(ctx, tx, msgs...); err != nil {
		_ = tx.Rollback()
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
}

func (g *relayRig) stageTx(ctx context.Context, tx *sql.Tx, msgs ...relayMsg) error {
	vals := make([]any, len(msgs))
	for i, m := range msgs {
		vals[i] = Message{Value: map[string]string{"id": m.id}, Options: &StageOptions{
			Kind: "relay.test", Topic: g.topic, MessageID: m.id, PartitionKey: m.key,
		}}
	}
	return g.ob.StageTx(ctx, tx, vals...)
}

// stageMany stages msgs in transactions of up to per messages.
func (g *relayRig) stageMany(t testing.TB, msgs []relayMsg, per int) {
	t.Helper()
	for len(msgs) > 0 {
		n := min(per, len(msgs))
		g.stage(t, msgs[:n]...)
		msgs = msgs[n:]
	}
}

func (g *relayRig) count(t testing.TB, table string) int {
	t.Helper()
	var n int
	if err := g.db.QueryRow(`SELECT COUNT(*) FROM ` + g.d.quote(table)).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// start runs a relay on the rig and closes it when the test ends.
func (g *relayRig) start(t testing.TB, pub message.Publisher, cfg RelayConfig) *Relay {
	t.Helper()
	cfg.Dialect, cfg.Table = g.d, g.table
	if cfg.PollInterval == 0 {
		cfg.PollInterval = 100 * time.Millisecond
	}
	if cfg.LeaseTTL == 0 {
		cfg.LeaseTTL = 2 * time.Second
	}
	if cfg.InitialInterval == 0 {
		cfg.InitialInterval = 10 * time.Millisecond
	}
	if cfg.CloseTimeout == 0 {
		cfg.CloseTimeout = 10 * time.Second
	}
	r, err := NewRelay(g.db, pub, testLogger(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- r.Run(context.Background()) }()
	t.Cleanup(func() {
		_ = r.Close()
		select {
		case err := <-done:
			if err != nil {
				t.Logf("relay Run: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("relay Run did not return after Close")
		}
	})
	select {
	case <-r.Running():
	case err := <-done:
		t.Fatalf("relay stopped at start: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("relay did not start")
	}
	return r
}

func testLogger(t testing.TB) *slog.Logger {
	level := slog.LevelError + 4 // quiet unless asked
	if os.Getenv("TAILRACE_RELAY_LOG") != "" {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
}

func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// ------------------------------------------------------ recording publisher

type recorded struct {
	topic, id, key string
	at             time.Time
}

// recPub is a message.Publisher that records what it confirmed. fail, when
// set, decides per message (and attempt) whether the publish fails; delay
// adds latency so that messages overlap in flight.
type recPub struct {
	mu       sync.Mutex
	got      []recorded
	attempts map[string]int
	fail     func(id string, attempt int) error
	delay    func(id string) time.Duration
	block    chan struct{} // when set, publishes of ids in blockIDs wait on it
	blockIDs map[string]bool
}

func newRecPub() *recPub { return &recPub{attempts: map[string]int{}} }

func (p *recPub) Publish(topic string, msgs ...*message.Message) error {
	for _, m := range msgs {
		p.mu.Lock()
		p.attempts[m.UUID]++
		attempt := p.attempts[m.UUID]
		fail, delay, block := p.fail, p.delay, p.block != nil && p.blockIDs[m.UUID]
		p.mu.Unlock()
		if delay != nil {
			time.Sleep(delay(m.UUID))
		}
		if block {
			select {
			case <-p.block:
			case <-m.Context().Done():
				return m.Context().Err()
			}
		}
		if fail != nil {
			if err := fail(m.UUID, attempt); err != nil {
				return err
			}
		}
		p.mu.Lock()
		p.got = append(p.got, recorded{topic: topic, id: m.UUID, key: m.Metadata.Get(tailrace.MetaPartitionKey), at: time.Now()})
		p.mu.Unlock()
	}
	return nil
}

func (p *recPub) Close() error { return nil }

func (p *recPub) snapshot() []recorded {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.got)
}

func (p *recPub) n() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.got)
}

// --------------------------------------------------------------- the ledger

// ledger compares what was staged with what was delivered, by message id.
type ledger struct {
	lost, duplicated, unexpected []string
	stuck                        int
	orderViolations              []string
}

func (l ledger) String() string {
	return fmt.Sprintf("lost=%d duplicated=%d unexpected=%d stuck=%d order_violations=%d",
		len(l.lost), len(l.duplicated), len(l.unexpected), l.stuck, len(l.orderViolations))
}

func (l ledger) clean() bool {
	return len(l.lost)+len(l.duplicated)+len(l.unexpected)+l.stuck+len(l.orderViolations) == 0
}

// seqOf extracts the sequence number from an id "m-<seq>".
func seqOf(id string) int {
	n, _ := strconv.Atoi(id[strings.LastIndexByte(id, '-')+1:])
	return n
}

// makeLedger checks delivered against expected. Per key, the first
// deliveries must come in staging (sequence) order; redeliveries after a
// crash may repeat earlier ones.
func makeLedger(expected []relayMsg, delivered []string, keyOf func(string) string, stuck int) ledger {
	var l ledger
	want := make(map[string]bool, len(expected))
	for _, m := range expected {
		want[m.id] = true
	}
	seen := make(map[string]int, len(delivered))
	last := map[string]int{}
	for _, id := range delivered {
		seen[id]++
		if !want[id] {
			if seen[id] == 1 {
				l.unexpected = append(l.unexpected, id)
			}
			continue
		}
		if seen[id] == 2 {
			l.duplicated = append(l.duplicated, id)
		}
		if seen[id] > 1 {
			continue
		}
		if k := keyOf(id); k != "" {
			if s := seqOf(id); s < last[k] {
				l.orderViolations = append(l.orderViolations, fmt.Sprintf("key %s: %s after seq %d", k, id, last[k]))
			} else {
				last[k] = s
			}
		}
	}
	for _, m := range expected {
		if seen[m.id] == 0 {
			l.lost = append(l.lost, m.id)
		}
	}
	l.stuck = stuck
	return l
}

func ids(rs []recorded) []string {
	out := make([]string, len(rs))
	for i, r := range rs {
		out[i] = r.id
	}
	return out
}

func keyMap(msgs []relayMsg) func(string) string {
	m := make(map[string]string, len(msgs))
	for _, x := range msgs {
		m[x.id] = x.key
	}
	return func(id string) string { return m[id] }
}

// genMsgs makes n messages over keys keys (keyless when keys == 0), ids in
// staging order starting at seq from.
func genMsgs(from, n, keys int) []relayMsg {
	out := make([]relayMsg, n)
	for i := range out {
		k := ""
		if keys > 0 {
			k = fmt.Sprintf("k%d", (from+i)%keys)
		}
		out[i] = relayMsg{id: fmt.Sprintf("m-%07d", from+i), key: k}
	}
	return out
}

// ------------------------------------------------------------------- tests

func TestRelayConfigValidate(t *testing.T) {
	cfg := RelayConfig{Table: "Bad-Name", Partitions: -1, BatchSize: 10, MaxPending: 5, Multiplier: 0.5, Jitter: 2, Retention: -time.Second}
	cfg.setDefaults()
	err := cfg.Validate()
	if err == nil {
		t.Fatal("Validate accepted a bad config")
	}
	for _, want := range []string{"Dialect", "Table", "Partitions", "MaxPending", "Multiplier", "Jitter", "Retention"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not mention %s: %v", want, err)
		}
	}
	good := RelayConfig{Dialect: SQLite, Table: "tailrace_outbox"}
	good.setDefaults()
	if err := good.Validate(); err != nil {
		t.Fatal(err)
	}
	if good.Partitions != 16 || good.MaxInFlight != 512 || good.BatchSize != 256 || good.Owner == "" {
		t.Errorf("defaults: %+v", good)
	}
}

// TestRelayDeliversAll: keyed and keyless messages, publishes overlapping
// in flight; everything delivered once, per-key order kept, table emptied.
func TestRelayDeliversAll(t *testing.T) {
	for name, open := range relayDBs() {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			db, d := open(t)
			g := newRelayRig(t, db, d)
			msgs := append(genMsgs(0, 600, 20), genMsgs(600, 100, 0)...)
			g.stageMany(t, msgs[:300], 50)
			pub := newRecPub()
			pub.delay = func(id string) time.Duration { return time.Duration(seqOf(id)%3) * time.Millisecond }
			var notifier Notifier
			g.start(t, pub, RelayConfig{MaxInFlight: 64, BatchSize: 50, PollInterval: 5 * time.Second, Notifier: &notifier})
			// The rest while the relay runs, woken by the notifier (polling is slow).
			for i := 300; i < len(msgs); i += 25 {
				g.stage(t, msgs[i:i+25]...)
				notifier.Notify()
			}
			waitFor(t, 60*time.Second, "all messages", func() bool { return pub.n() >= len(msgs) })
			waitFor(t, 10*time.Second, "empty outbox", func() bool { return g.count(t, g.table) == 0 })
			time.Sleep(50 * time.Millisecond)
			l := makeLedger(msgs, ids(pub.snapshot()), keyMap(msgs), g.count(t, g.table))
			t.Logf("ledger: %s", l)
			if !l.clean() {
				t.Fatalf("ledger: %s; lost %v dup %v order %v", l, head(l.lost), head(l.duplicated), head(l.orderViolations))
			}
			for _, r := range pub.snapshot() {
				if r.topic != "relay_dest" {
					t.Fatalf("published to %q", r.topic)
				}
			}
		})
	}
}

func head(xs []string) []string {
	if len(xs) > 5 {
		return xs[:5]
	}
	return xs
}

// TestRelayRetriesThenSucceeds: a message fails twice; its key waits for
// it, other keys do not, and it is delivered on the third attempt.
func TestRelayRetriesThenSucceeds(t *testing.T) {
	for name, open := range relayDBs() {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			db, d := open(t)
			g := newRelayRig(t, db, d)
			msgs := genMsgs(0, 40, 4) // k0..k3
			g.stage(t, msgs...)
			flaky := msgs[4].id // k0's second message
			pub := newRecPub()
			pub.fail = func(id string, attempt int) error {
				if id == flaky && attempt <= 2 {
					return errors.New("broker says no")
				}
				return nil
			}
			g.start(t, pub, RelayConfig{InitialInterval: 200 * time.Millisecond, Jitter: -1, MaxAttempts: 5})
			waitFor(t, 30*time.Second, "all messages", func() bool { return pub.n() >= len(msgs) })
			got := pub.snapshot()
			l := makeLedger(msgs, ids(got), keyMap(msgs), 0)
			if !l.clean() {
				t.Fatalf("ledger: %s %v", l, l.orderViolations)
			}
			pub.mu.Lock()
			if a := pub.attempts[flaky]; a != 3 {
				t.Errorf("flaky message tried %d times, want 3", a)
			}
			pub.mu.Unlock()
			// Other keys did not wait for the flaky one: some k1..k3 message
			// after position of k0's first was delivered before the flaky.
			pos := slices.IndexFunc(got, func(r recorded) bool { return r.id == flaky })
			others := 0
			for _, r := range got[:pos] {
				if r.key != "k0" {
					others++
				}
			}
			if others < 20 {
				t.Errorf("only %d messages of other keys went before the retried one (want ≥ 20): keys are held back", others)
			}
			waitFor(t, 5*time.Second, "empty outbox", func() bool { return g.count(t, g.table) == 0 })
		})
	}
}

// TestRelayPoisonDeadLettered: a message that always fails is dead-lettered
// after MaxAttempts, other keys flow meanwhile, and the messages queued
// behind it on its key go out after it is dead-lettered. A permanent error
// and an envelope that cannot be unwrapped are dead-lettered at once.
func TestRelayPoisonDeadLettered(t *testing.T) {
	for name, open := range relayDBs() {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			db, d := open(t)
			g := newRelayRig(t, db, d)
			msgs := genMsgs(0, 60, 3)              // k0..k2
			poison, perm := msgs[3].id, msgs[7].id // k0, k1
			g.stage(t, msgs...)
			// A row whose payload is not an envelope, inserted behind the
			// staging API's back.
			q := newRelaySQL(d, g.table, 16)
			if _, err := db.Exec(`INSERT INTO `+q.t+` (uuid, message_id, kind, partition_key, key_hash, payload, metadata) VALUES (`+
				q.ph(1)+`, `+q.ph(2)+`, 'x', 'k2', `+q.ph(3)+`, `+q.ph(4)+`, '{}')`,
				"garbage-uuid", "garbage", keyHash("k2"), []byte("{not json")); err != nil {
				t.Fatal(err)
			}
			pub := newRecPub()
			pub.fail = func(id string, attempt int) error {
				switch id {
				case poison:
					return fmt.Errorf("poison attempt %d", attempt)
				case perm:
					return tailrace.Permanent(errors.New("schema rejected"))
				}
				return nil
			}
			g.start(t, pub, RelayConfig{InitialInterval: 30 * time.Millisecond, MaxAttempts: 4})
			want := len(msgs) - 2
			waitFor(t, 30*time.Second, "the healthy messages", func() bool { return pub.n() >= want })
			waitFor(t, 10*time.Second, "3 dead letters", func() bool { return g.count(t, g.table+suffixDead) == 3 })
			waitFor(t, 10*time.Second, "empty outbox", func() bool { return g.count(t, g.table) == 0 })

			got := pub.snapshot()
			var healthy []relayMsg
			for _, m := range msgs {
				if m.id != poison && m.id != perm {
					healthy = append(healthy, m)
				}
			}
			if l := makeLedger(healthy, ids(got), keyMap(msgs), 0); !l.clean() {
				t.Fatalf("ledger: %s %v %v", l, l.unexpected, l.orderViolations)
			}
			pub.mu.Lock()
			if a := pub.attempts[poison]; a != 4 {
				t.Errorf("poison tried %d times, want 4 (MaxAttempts)", a)
			}
			if a := pub.attempts[perm]; a != 1 {
				t.Errorf("permanent failure tried %d times, want 1", a)
			}
			pub.mu.Unlock()

			dl, err := NewDeadLetters(db, d, g.table)
			if err != nil {
				t.Fatal(err)
			}
			letters, err := dl.List(context.Background(), 0, 10)
			if err != nil {
				t.Fatal(err)
			}
			byMsg := map[string]DeadLetter{}
			for _, l := range letters {
				byMsg[l.MessageID] = l
			}
			if l := byMsg[poison]; l.Attempts != 4 || !strings.Contains(l.LastError, "poison attempt 4") || l.DeadAt.IsZero() || l.CreatedAt.IsZero() {
				t.Errorf("poison dead letter: %+v", l)
			}
			if l := byMsg[perm]; l.Attempts != 1 || !strings.Contains(l.LastError, "schema rejected") {
				t.Errorf("permanent dead letter: %+v", l)
			}
			if l := byMsg["garbage"]; l.Attempts != 1 || !strings.Contains(l.LastError, "envelope") {
				t.Errorf("garbage dead letter: %+v", l)
			}

			// Replay the poison: it goes through now that the broker accepts it.
			pub.mu.Lock()
			pub.fail = nil
			pub.mu.Unlock()
			if n, err := dl.Replay(context.Background(), byMsg[poison].ID); err != nil || n != 1 {
				t.Fatalf("Replay = %d, %v", n, err)
			}
			waitFor(t, 10*time.Second, "the replayed message", func() bool { return pub.n() >= want+1 })
			if n, err := dl.Purge(context.Background(), byMsg["garbage"].ID); err != nil || n != 1 {
				t.Fatalf("Purge = %d, %v", n, err)
			}
			if n, err := dl.PurgeBefore(context.Background(), time.Now().Add(time.Hour)); err != nil || n != 1 {
				t.Fatalf("PurgeBefore = %d, %v", n, err)
			}
			if n, _ := dl.Count(context.Background()); n != 0 {
				t.Fatalf("%d dead letters left", n)
			}
		})
	}
}

// TestRelayCloseMidDrain: Close while publishes are in flight, some of them
// hung: every row deleted was confirmed, every unconfirmed row is still in
// the outbox, and a new relay delivers the rest.
func TestRelayCloseMidDrain(t *testing.T) {
	for name, open := range relayDBs() {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			db, d := open(t)
			g := newRelayRig(t, db, d)
			msgs := genMsgs(0, 2000, 50)
			g.stageMany(t, msgs, 500)
			pub := newRecPub()
			pub.delay = func(string) time.Duration { return 2 * time.Millisecond }
			pub.block = make(chan struct{}) // never closed: those never confirm
			pub.blockIDs = map[string]bool{msgs[500].id: true, msgs[777].id: true}
			r := g.start(t, pub, RelayConfig{MaxInFlight: 32, CloseTimeout: 500 * time.Millisecond})
			waitFor(t, 30*time.Second, "a few hundred messages", func() bool { return pub.n() >= 600 })
			err := r.Close()
			if err == nil || !strings.Contains(err.Error(), "timed out") {
				t.Errorf("Close = %v, want a timeout with hung publishes", err)
			}
			confirmed := map[string]bool{}
			for _, x := range pub.snapshot() {
				confirmed[x.id] = true
			}
			rows, err := db.Query(`SELECT message_id FROM ` + d.quote(g.table))
			if err != nil {
				t.Fatal(err)
			}
			left := map[string]bool{}
			for rows.Next() {
				var id string
				if err := rows.Scan(&id); err != nil {
					t.Fatal(err)
				}
				left[id] = true
			}
			rows.Close()
			for _, m := range msgs {
				if !left[m.id] && !confirmed[m.id] {
					t.Fatalf("%s was deleted from the outbox but never confirmed", m.id)
				}
			}
			for id := range pub.blockIDs {
				if !left[id] {
					t.Errorf("hung message %s left the outbox", id)
				}
			}
			t.Logf("closed with %d confirmed, %d left in the outbox", len(confirmed), len(left))

			// A second relay finishes the job.
			pub2 := newRecPub()
			g.start(t, pub2, RelayConfig{})
			waitFor(t, 30*time.Second, "the rest", func() bool { return g.count(t, g.table) == 0 })
			all := append(ids(pub.snapshot()), ids(pub2.snapshot())...)
			l := makeLedger(msgs, all, keyMap(msgs), 0)
			t.Logf("ledger: %s", l)
			// A close that gave up on hung publishes is not a crash: the
			// messages it did not acknowledge are refused if the router
			// runs them late, so nothing is published twice.
			if !l.clean() {
				t.Fatalf("ledger: %s %v", l, l.orderViolations)
			}
		})
	}
}

// TestRelayOutOfOrderCommit: a transaction that began (and got its ids)
// earlier commits after a later one was relayed; it is relayed too.
func TestRelayOutOfOrderCommit(t *testing.T) {
	for name, open := range relayDBs() {
		if name == "sqlite" {
			continue // one writer at a time: there is no overlap to test
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			if name == "postgres" {
				testenv.LongTransaction(t)
			}
			db, d := open(t)
			g := newRelayRig(t, db, d)
			pub := newRecPub()
			g.start(t, pub, RelayConfig{PollInterval: 50 * time.Millisecond})
			ctx := context.Background()
			early, err := db.BeginTx(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			if err := g.stageTx(ctx, early, relayMsg{id: "m-0000001", key: "a"}); err != nil {
				t.Fatal(err)
			}
			g.stage(t, relayMsg{id: "m-0000002", key: "b"}) // later id, commits first
			waitFor(t, 10*time.Second, "the later message", func() bool { return pub.n() == 1 })
			g.stage(t, relayMsg{id: "m-0000003", key: "b"})
			waitFor(t, 10*time.Second, "the third message", func() bool { return pub.n() == 2 })
			if err := early.Commit(); err != nil {
				t.Fatal(err)
			}
			waitFor(t, 10*time.Second, "the early transaction's message", func() bool { return pub.n() == 3 })
			if got := ids(pub.snapshot()); got[2] != "m-0000001" {
				t.Fatalf("delivered %v", got)
			}
		})
	}
}

// TestRelayRetention: with Retention rows are stamped, then pruned.
func TestRelayRetention(t *testing.T) {
	g := newRelayRig(t, testenv.NewSQLite(t).DB, SQLite)
	msgs := genMsgs(0, 50, 5)
	g.stage(t, msgs...)
	pub := newRecPub()
	g.start(t, pub, RelayConfig{Retention: 300 * time.Millisecond, CleanupInterval: 100 * time.Millisecond})
	waitFor(t, 10*time.Second, "all messages", func() bool { return pub.n() == len(msgs) })
	var stamped int
	waitFor(t, 5*time.Second, "stamped rows", func() bool {
		_ = g.db.QueryRow(`SELECT COUNT(*) FROM ` + g.d.quote(g.table) + ` WHERE relayed_at IS NOT NULL`).Scan(&stamped)
		return stamped == len(msgs) || g.count(t, g.table) < len(msgs)
	})
	waitFor(t, 10*time.Second, "pruned rows", func() bool { return g.count(t, g.table) == 0 })
	if l := makeLedger(msgs, ids(pub.snapshot()), keyMap(msgs), 0); !l.clean() {
		t.Fatal(l)
	}
}

// TestRelayPartitionMismatch: a relay refuses to run next to a live relay
// with another partition count.
func TestRelayPartitionMismatch(t *testing.T) {
	g := newRelayRig(t, testenv.NewSQLite(t).DB, SQLite)
	g.start(t, newRecPub(), RelayConfig{Partitions: 16})
	// The older relay is the one registered first.
	waitFor(t, 10*time.Second, "the first relay's registration", func() bool { return g.count(t, g.table+suffixRelays) == 1 })
	r, err := NewRelay(g.db, newRecPub(), testLogger(t), RelayConfig{Dialect: SQLite, Table: g.table, Partitions: 8})
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() { errc <- r.Run(context.Background()) }()
	select {
	case err := <-errc:
		if !errors.Is(err, errPartitionMismatch) || !strings.Contains(err.Error(), "has 8") {
			t.Fatalf("Run = %v", err)
		}
	case <-time.After(15 * time.Second):
		_ = r.Close()
		t.Fatal("a relay with another partition count kept running")
	}
}

// TestRelayOutageBreaker: while every publish fails (the broker is down)
// the relay pauses and probes instead of burning every message's attempts;
// when the broker is back everything goes out and nothing is dead.
func TestRelayOutageBreaker(t *testing.T) {
	g := newRelayRig(t, testenv.NewSQLite(t).DB, SQLite)
	msgs := genMsgs(0, 400, 50)
	g.stage(t, msgs...)
	pub := newRecPub()
	var down sync.Mutex
	outage := true
	pub.fail = func(string, int) error {
		down.Lock()
		defer down.Unlock()
		if outage {
			return errors.New("not connected to AMQP")
		}
		return nil
	}
	g.start(t, pub, RelayConfig{MaxAttempts: 5, InitialInterval: 10 * time.Millisecond, MaxInFlight: 64})
	time.Sleep(2 * time.Second)
	pub.mu.Lock()
	tries := 0
	for _, a := range pub.attempts {
		tries += a
	}
	pub.mu.Unlock()
	// Without the breaker: 400 messages × 5 attempts in well under 2 s.
	if tries > 64+40 {
		t.Errorf("%d publish attempts during a 2 s outage; the breaker should probe one at a time", tries)
	}
	down.Lock()
	outage = false
	down.Unlock()
	waitFor(t, 30*time.Second, "everything after the outage", func() bool { return pub.n() == len(msgs) })
	if n := g.count(t, g.table+suffixDead); n != 0 {
		t.Fatalf("%d messages dead-lettered by a broker outage", n)
	}
	if l := makeLedger(msgs, ids(pub.snapshot()), keyMap(msgs), 0); !l.clean() {
		t.Fatal(l)
	}
	t.Logf("%d publish attempts during the outage", tries)
}

// TestRelayHotKeyDoesNotStarveOthers: a key with a long backlog behind a
// failing message cannot fill the relay's memory bound: its queue is
// capped, and the messages of other keys staged after its backlog flow.
func TestRelayHotKeyDoesNotStarveOthers(t *testing.T) {
	for name, open := range relayDBs() {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			db, d := open(t)
			g := newRelayRig(t, db, d)
			var hot []relayMsg
			for i := 0; i < 400; i++ {
				hot = append(hot, relayMsg{id: fmt.Sprintf("m-%07d", i), key: "hot"})
			}
			g.stageMany(t, hot, 200)
			others := genMsgs(400, 100, 10)
			g.stage(t, others...)
			pub := newRecPub()
			var mu sync.Mutex
			failing := true
			pub.fail = func(id string, _ int) error {
				mu.Lock()
				defer mu.Unlock()
				if id == hot[0].id && failing {
					return errors.New("hot head keeps failing")
				}
				return nil
			}
			g.start(t, pub, RelayConfig{MaxPending: 128, BatchSize: 32, MaxAttempts: 1000, InitialInterval: 20 * time.Millisecond, MaxInterval: 100 * time.Millisecond})
			waitFor(t, 30*time.Second, "the other keys while the hot key is stuck", func() bool { return pub.n() >= len(others) })
			if got := ids(pub.snapshot()); slices.Contains(got, hot[0].id) {
				t.Fatal("the failing message went through early")
			}
			mu.Lock()
			failing = false
			mu.Unlock()
			all := append(slices.Clone(hot), others...)
			waitFor(t, 60*time.Second, "the hot key after recovery", func() bool { return pub.n() >= len(all) })
			waitFor(t, 10*time.Second, "empty outbox", func() bool { return g.count(t, g.table) == 0 })
			if l := makeLedger(all, ids(pub.snapshot()), keyMap(all), 0); !l.clean() {
				t.Fatalf("ledger: %s %v", l, head(l.orderViolations))
			}
		})
	}
}

// TestRelayHonoursPersistedAttempts: a relay that takes over rows (after a
// restart or from another relay) waits for next_attempt_at and counts the
// attempts already recorded.
func TestRelayHonoursPersistedAttempts(t *testing.T) {
	g := newRelayRig(t, testenv.NewSQLite(t).DB, SQLite)
	msgs := genMsgs(0, 2, 1)
	g.stage(t, msgs...)
	// As a previous relay left it: 4 failed attempts, next one in 700 ms.
	next := time.Now().UTC().Add(700 * time.Millisecond).Format("2006-01-02T15:04:05.000Z")
	if _, err := g.db.Exec(`UPDATE `+SQLite.quote(g.table)+` SET attempts = 4, last_error = 'earlier', next_attempt_at = ? WHERE message_id = ?`, next, msgs[0].id); err != nil {
		t.Fatal(err)
	}
	pub := newRecPub()
	var firstTry time.Time
	var mu sync.Mutex
	pub.fail = func(id string, attempt int) error {
		if id == msgs[0].id {
			mu.Lock()
			if firstTry.IsZero() {
				firstTry = time.Now()
			}
			mu.Unlock()
			return errors.New("still failing")
		}
		return nil
	}
	start := time.Now()
	g.start(t, pub, RelayConfig{MaxAttempts: 5})
	waitFor(t, 10*time.Second, "the dead letter", func() bool { return g.count(t, g.table+suffixDead) == 1 })
	waitFor(t, 10*time.Second, "the message behind it", func() bool { return pub.n() == 1 })
	mu.Lock()
	defer mu.Unlock()
	if wait := firstTry.Sub(start); wait < 500*time.Millisecond {
		t.Errorf("retried %s after start, before the persisted next_attempt_at", wait)
	}
	pub.mu.Lock()
	defer pub.mu.Unlock()
	if a := pub.attempts[msgs[0].id]; a != 1 {
		t.Errorf("tried %d times; 4 earlier attempts + 1 = MaxAttempts 5", a)
	}
}
