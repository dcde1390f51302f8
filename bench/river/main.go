// Command river measures tailrace's outbox.Worker side by side with River,
// the PostgreSQL job queue a Go user picks for "enqueue in my transaction, a
// worker runs it", in one invocation on the same PostgreSQL server.
//
// It is its own module (bench/river/go.mod, with a replace directive to the
// repository root) so that River is a dependency of this benchmark only:
// the library's packages never import it.
//
//	cd bench/river && go run . -rounds 3
//
// Sections:
//
//   - throughput: N commands (default 20,000), each enqueued in its own
//     committed transaction by 8 goroutines, timed from the first enqueue
//     until every handler ran once; (a) a no-op handler against a River
//     no-op worker, (b) a handler inserting one domain row in its own
//     transaction (tailrace: the Transaction behavior, which also deletes
//     the command's row in it) against a River worker doing the same insert
//     and JobCompleteTx in one transaction. River runs MaxWorkers 1000.
//     Rounds interleave the contenders; each run gets a database of its own.
//   - latency: one command every 1/rate s for -latency-for, each in its own
//     transaction; the time from the return of COMMIT to the handler being
//     entered, p50 and p99.
//   - idle: transactions per second on a database of its own while the
//     worker or River client runs with nothing to do, from
//     pg_stat_database (xact_commit + xact_rollback; every autocommit
//     statement, and every ping pgx makes before reusing an idle
//     connection, is one transaction), read from another database after
//     the contender's connections closed (a closing backend flushes its
//     statistics); a start-and-stop with no idle time is measured alone
//     and subtracted.
//     (both runs idle 2 s first, so start-up work is done in both).
//
// TAILRACE_POSTGRES_URL overrides the server (default the local one); the
// user must be allowed to CREATE DATABASE.
package main

import (
	"context"
	"database/sql"
	"flag"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	_ "github.com/jackc/pgx/v5/stdlib"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/rivermigrate"

	"github.com/tailrace/tailrace/behaviors"
	"github.com/tailrace/tailrace/mediator"
	"github.com/tailrace/tailrace/outbox"
)

var (
	baseURL     = envOr("TAILRACE_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/test?sslmode=disable")
	flagN       = flag.Int("n", 20000, "commands per throughput run")
	flagSenders = flag.Int("senders", 8, "goroutines enqueueing")
	flagRounds  = flag.Int("rounds", 3, "interleaved rounds of the throughput runs")
	flagPool    = flag.Int("pool", 40, "connections per contender (sql.DB MaxOpenConns; pgxpool MaxConns)")
	flagConc    = flag.Int("concurrency", 32, "tailrace WorkerConfig.Concurrency")
	flagRiverW  = flag.Int("river-workers", 1000, "River MaxWorkers")
	flagRate    = flag.Int("rate", 200, "latency: commands per second")
	flagLatFor  = flag.Duration("latency-for", 10*time.Second, "latency: how long per contender")
	flagIdleFor = flag.Duration("idle-for", 30*time.Second, "idle: how long per contender")
	flagSect    = flag.String("sections", "throughput,latency,idle", "what to run")
	flagCases   = flag.String("cases", "a,b", "throughput cases: a (no-op), b (insert + completion in one transaction)")
)

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func main() {
	flag.Parse()
	ctx := context.Background()
	want := map[string]bool{}
	for _, s := range strings.Split(*flagSect, ",") {
		want[strings.TrimSpace(s)] = true
	}
	fmt.Printf("tailrace outbox.Worker vs River %s, %s, pool %d, tailrace Concurrency %d, River MaxWorkers %d, load %s\n",
		"v0.51.2", time.Now().UTC().Format(time.RFC3339), *flagPool, *flagConc, *flagRiverW, loadavg())
	if want["throughput"] {
		throughput(ctx)
	}
	if want["latency"] {
		latency(ctx)
	}
	if want["idle"] {
		idle(ctx)
	}
	fmt.Printf("load after: %s\n", loadavg())
}

func loadavg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	return strings.Join(strings.Fields(string(b))[:min(3, len(strings.Fields(string(b))))], " ")
}

// ------------------------------------------------------------------ databases

var dbSeq atomic.Int64

// newDatabase creates a database of its own and returns its URL and a drop
// func.
func newDatabase(ctx context.Context) (string, func()) {
	name := fmt.Sprintf("tr_bench_%d_%d", os.Getpid(), dbSeq.Add(1))
	admin := must(sql.Open("pgx", baseURL))
	defer admin.Close()
	check(exec(ctx, admin, "CREATE DATABASE "+name))
	u := must(url.Parse(baseURL))
	u.Path = "/" + name
	return u.String(), func() {
		a := must(sql.Open("pgx", baseURL))
		defer a.Close()
		_ = exec(context.Background(), a, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)")
	}
}

func exec(ctx context.Context, db *sql.DB, q string) error {
	_, err := db.ExecContext(ctx, q)
	return err
}

func must[T any](v T, err error) T {
	check(err)
	return v
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// xacts is xact_commit + xact_rollback of the database at dbURL, read from
// the server's default database.
func xacts(ctx context.Context, dbURL string) int64 {
	u := must(url.Parse(dbURL))
	name := strings.TrimPrefix(u.Path, "/")
	admin := must(sql.Open("pgx", baseURL))
	defer admin.Close()
	var n int64
	check(admin.QueryRowContext(ctx, `SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1`, name).Scan(&n))
	return n
}

// ------------------------------------------------------------------ contenders

// Cmd is the command both sides run.
type Cmd struct {
	mediator.Command[struct{}]
	ID int64 `json:"id"`
}

func (Cmd) Kind() string { return "bench.cmd" }

// RiverArgs is the River job.
type RiverArgs struct {
	ID int64 `json:"id"`
}

func (RiverArgs) Kind() string { return "bench_cmd" }

// contender is one side of a measurement.
type contender interface {
	// enqueue enqueues command id in its own committed transaction and
	// returns when it committed.
	enqueue(ctx context.Context, id int64) error
	close()
}

// handled is what the handlers report.
type handled struct {
	n       atomic.Int64
	mu      sync.Mutex
	entered map[int64]time.Time // latency runs only
	done    chan struct{}
	target  int64
}

func newHandled(target int64, track bool) *handled {
	h := &handled{done: make(chan struct{}), target: target}
	if track {
		h.entered = make(map[int64]time.Time)
	}
	return h
}

func (h *handled) enter(id int64) {
	if h.entered != nil {
		t := time.Now()
		h.mu.Lock()
		if _, ok := h.entered[id]; !ok {
			h.entered[id] = t
		}
		h.mu.Unlock()
	}
}

func (h *handled) finished() {
	if h.n.Add(1) == h.target {
		close(h.done)
	}
}

// --- tailrace

type tailraceSide struct {
	db     *sql.DB
	ob     *outbox.Outbox
	w      *outbox.Worker
	notify *outbox.Notifier
	runErr chan error
	// stopNotify stops NotifyPostgres (listen-only variant).
	stopNotify func()
}

func newTailrace(ctx context.Context, dbURL string, insert bool, h *handled) *tailraceSide {
	return newTailraceOpts(ctx, dbURL, insert, h, false)
}

// newTailraceOpts with listenOnly wakes the worker only through PostgreSQL
// LISTEN (NotifyPostgres forwards the commit signals), as for a worker in
// another process than the enqueuer.
func newTailraceOpts(ctx context.Context, dbURL string, insert bool, h *handled, listenOnly bool) *tailraceSide {
	db := must(sql.Open("pgx", dbURL))
	db.SetMaxOpenConns(*flagPool)
	db.SetMaxIdleConns(*flagPool)
	check(outbox.InitializeSchema(ctx, db, outbox.PostgreSQL, "commands"))
	check(exec(ctx, db, `CREATE TABLE IF NOT EXISTS domain_rows (id BIGINT NOT NULL)`))
	n := &outbox.Notifier{}
	ob := must(outbox.New(db, nil, outbox.Config{Dialect: outbox.PostgreSQL, Table: "events", CommandTable: "commands", Notifier: n}))
	m := mediator.New()
	if insert {
		tr := must(behaviors.NewTransaction(db, nil, behaviors.TransactionConfig{Notifier: n}))
		m.Use(tr.Layer())
	}
	mediator.RegisterFunc(m, func(ctx context.Context, c Cmd) (struct{}, error) {
		h.enter(c.ID)
		if insert {
			tx, _ := outbox.TxFromContext(ctx)
			if _, err := tx.ExecContext(ctx, `INSERT INTO domain_rows (id) VALUES ($1)`, c.ID); err != nil {
				return struct{}{}, err
			}
		}
		return struct{}{}, nil
	})
	if insert {
		// Counted after the commit: a behavior outside Transaction.
		m.Use(mediator.Layer{Order: behaviors.OrderTransaction - 1, Behavior: mediator.BehaviorFunc(
			func(ctx context.Context, req any, info mediator.Info, next mediator.Next) (any, error) {
				res, err := next(ctx, req)
				if err == nil {
					h.finished()
				}
				return res, err
			})})
	} else {
		m.Use(mediator.Layer{Order: 1, Behavior: mediator.BehaviorFunc(
			func(ctx context.Context, req any, info mediator.Info, next mediator.Next) (any, error) {
				res, err := next(ctx, req)
				if err == nil {
					h.finished()
				}
				return res, err
			})})
	}
	wn := n
	var stopNotify func()
	if listenOnly {
		wn = nil
		stopNotify = must(outbox.NotifyPostgres(db, "commands", n, nil))
	}
	logger := slog.New(slog.DiscardHandler)
	if os.Getenv("TAILRACE_BENCH_LOG") != "" {
		logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	w := must(outbox.NewWorker(db, m, logger, outbox.WorkerConfig{
		Dialect: outbox.PostgreSQL, Table: "commands", Notifier: wn, Concurrency: *flagConc,
	}))
	outbox.HandleCommand[Cmd](w)
	s := &tailraceSide{db: db, ob: ob, w: w, notify: n, runErr: make(chan error, 1), stopNotify: stopNotify}
	go func() { s.runErr <- w.Run(context.Background()) }()
	<-w.Running()
	return s
}

func (s *tailraceSide) enqueue(ctx context.Context, id int64) error {
	return s.ob.Enqueue(ctx, Cmd{ID: id})
}

// enqueueTx is the latency variant: BEGIN, EnqueueTx, COMMIT, then the
// commit time, then the signal (as the Transaction behavior does).
func (s *tailraceSide) enqueueTx(ctx context.Context, id int64) (time.Time, error) {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return time.Time{}, err
	}
	if err := s.ob.EnqueueTx(ctx, tx, Cmd{ID: id}); err != nil {
		_ = tx.Rollback()
		return time.Time{}, err
	}
	if err := tx.Commit(); err != nil {
		return time.Time{}, err
	}
	t := time.Now()
	s.notify.Notify()
	return t, nil
}

func (s *tailraceSide) close() {
	if s.stopNotify != nil {
		s.stopNotify()
	}
	_ = s.w.Close()
	<-s.runErr
	_ = s.db.Close()
}

// --- River

type riverSide struct {
	pool   *pgxpool.Pool
	client *river.Client[pgx.Tx]
}

func newRiver(ctx context.Context, dbURL string, insert bool, h *handled) *riverSide {
	cfg := must(pgxpool.ParseConfig(dbURL))
	cfg.MaxConns = int32(*flagPool)
	pool := must(pgxpool.NewWithConfig(ctx, cfg))
	drv := riverpgxv5.New(pool)
	mig := must(rivermigrate.New(drv, nil))
	_ = must(mig.Migrate(ctx, rivermigrate.DirectionUp, nil))
	_ = must(pool.Exec(ctx, `CREATE TABLE IF NOT EXISTS domain_rows (id BIGINT NOT NULL)`))
	workers := river.NewWorkers()
	river.AddWorker(workers, &riverWorker{pool: pool, insert: insert, h: h})
	client := must(river.NewClient(drv, &river.Config{
		Logger:  slog.New(slog.DiscardHandler),
		Queues:  map[string]river.QueueConfig{river.QueueDefault: {MaxWorkers: *flagRiverW}},
		Workers: workers,
	}))
	check(client.Start(ctx))
	return &riverSide{pool: pool, client: client}
}

func (s *riverSide) enqueue(ctx context.Context, id int64) error {
	_, err := s.client.Insert(ctx, RiverArgs{ID: id}, nil)
	return err
}

func (s *riverSide) enqueueTx(ctx context.Context, id int64) (time.Time, error) {
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return time.Time{}, err
	}
	if _, err := s.client.InsertTx(ctx, tx, RiverArgs{ID: id}, nil); err != nil {
		_ = tx.Rollback(ctx)
		return time.Time{}, err
	}
	if err := tx.Commit(ctx); err != nil {
		return time.Time{}, err
	}
	return time.Now(), nil
}

func (s *riverSide) close() {
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_ = s.client.Stop(sctx)
	s.pool.Close()
}

type riverWorker struct {
	river.WorkerDefaults[RiverArgs]
	pool   *pgxpool.Pool
	insert bool
	h      *handled
}

func (w *riverWorker) Work(ctx context.Context, job *river.Job[RiverArgs]) error {
	w.h.enter(job.Args.ID)
	if w.insert {
		tx, err := w.pool.Begin(ctx)
		if err != nil {
			return err
		}
		defer func() { _ = tx.Rollback(ctx) }()
		if _, err := tx.Exec(ctx, `INSERT INTO domain_rows (id) VALUES ($1)`, job.Args.ID); err != nil {
			return err
		}
		if _, err := river.JobCompleteTx[*riverpgxv5.Driver](ctx, tx, job); err != nil {
			return err
		}
		if err := tx.Commit(ctx); err != nil {
			return err
		}
	}
	w.h.finished()
	return nil
}

// ------------------------------------------------------------------ sections

type side struct {
	name string
	make func(ctx context.Context, dbURL string, insert bool, h *handled) contender
}

var sides = []side{
	{"tailrace outbox.Worker", func(ctx context.Context, u string, ins bool, h *handled) contender {
		return newTailrace(ctx, u, ins, h)
	}},
	{"River", func(ctx context.Context, u string, ins bool, h *handled) contender { return newRiver(ctx, u, ins, h) }},
}

func throughput(ctx context.Context) {
	n := int64(*flagN)
	results := map[string][]float64{}
	for r := range *flagRounds {
		for _, insert := range []bool{false, true} {
			if !strings.Contains(*flagCases, map[bool]string{false: "a", true: "b"}[insert]) {
				continue
			}
			order := []int{0, 1}
			if r%2 == 1 {
				order = []int{1, 0}
			}
			for _, i := range order {
				sd := sides[i]
				u, drop := newDatabase(ctx)
				h := newHandled(n, false)
				c := sd.make(ctx, u, insert, h)
				var next atomic.Int64
				start := time.Now()
				var wg sync.WaitGroup
				for range *flagSenders {
					wg.Add(1)
					go func() {
						defer wg.Done()
						for {
							id := next.Add(1)
							if id > n {
								return
							}
							check(c.enqueue(ctx, id))
						}
					}()
				}
				wg.Wait()
				enq := time.Since(start)
				select {
				case <-h.done:
				case <-time.After(5 * time.Minute):
					fmt.Fprintf(os.Stderr, "bench: %s: only %d of %d handled after 5 min\n", sd.name, h.n.Load(), n)
				}
				el := time.Since(start)
				c.close()
				drop()
				key := fmt.Sprintf("%s|%s", label(insert), sd.name)
				rate := float64(n) / el.Seconds()
				results[key] = append(results[key], rate)
				fmt.Printf("  round %d %-26s %-24s %8.0f handled/s (enqueued in %s, all handled in %s)\n",
					r+1, label(insert), sd.name, rate, enq.Round(time.Millisecond), el.Round(time.Millisecond))
			}
		}
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "\nthroughput, %d commands, %d senders, medians of %d interleaved rounds\tcase\ttailrace\tRiver\tratio\t\n", n, *flagSenders, *flagRounds)
	for _, insert := range []bool{false, true} {
		a := median(results[label(insert)+"|"+sides[0].name])
		b := median(results[label(insert)+"|"+sides[1].name])
		if b == 0 {
			continue
		}
		fmt.Fprintf(tw, "\t%s\t%.0f/s\t%.0f/s\t%.2f×\t\n", label(insert), a, b, a/b)
	}
	_ = tw.Flush()
}

func label(insert bool) string {
	if insert {
		return "(b) insert + complete in tx"
	}
	return "(a) no-op"
}

func latency(ctx context.Context) {
	type enq interface {
		enqueueTx(ctx context.Context, id int64) (time.Time, error)
	}
	total := int64(float64(*flagRate) * flagLatFor.Seconds())
	fmt.Printf("\nlatency, %d commands at %d/s, commit → handler entered (no-op handler)\n", total, *flagRate)
	all := append(slices.Clone(sides), side{"tailrace, LISTEN only", func(ctx context.Context, u string, ins bool, h *handled) contender {
		return newTailraceOpts(ctx, u, ins, h, true)
	}})
	for _, sd := range all {
		u, drop := newDatabase(ctx)
		h := newHandled(total, true)
		c := sd.make(ctx, u, false, h)
		time.Sleep(2 * time.Second) // start-up: leases, leader election
		commits := make(map[int64]time.Time, total)
		tick := time.NewTicker(time.Second / time.Duration(*flagRate))
		for id := int64(1); id <= total; id++ {
			<-tick.C
			t, err := c.(enq).enqueueTx(ctx, id)
			check(err)
			commits[id] = t
		}
		tick.Stop()
		select {
		case <-h.done:
		case <-time.After(time.Minute):
		}
		c.close()
		drop()
		h.mu.Lock()
		var ds []time.Duration
		for id, t := range commits {
			e, ok := h.entered[id]
			if !ok {
				continue
			}
			ds = append(ds, max(0, e.Sub(t)))
		}
		h.mu.Unlock()
		slices.Sort(ds)
		if len(ds) == 0 {
			fmt.Printf("  %-24s nothing handled\n", sd.name)
			continue
		}
		q := func(p float64) time.Duration { return ds[min(len(ds)-1, int(p*float64(len(ds))))] }
		fmt.Printf("  %-24s n=%d p50 %s p99 %s max %s\n", sd.name, len(ds), q(0.5).Round(10*time.Microsecond),
			q(0.99).Round(10*time.Microsecond), ds[len(ds)-1].Round(10*time.Microsecond))
	}
}

func idle(ctx context.Context) {
	fmt.Printf("\nidle, %s per contender, transactions/s on its own database (pg_stat_database xact_commit+xact_rollback), a 2 s run subtracted\n", *flagIdleFor)
	for _, sd := range sides {
		u, drop := newDatabase(ctx)
		h := newHandled(1<<62, false)
		// measure runs the contender for d and returns the transactions
		// its database saw, read after its connections closed (a closing
		// backend flushes its statistics).
		measure := func(d time.Duration) (int64, time.Duration) {
			before := xacts(ctx, u)
			start := time.Now()
			c := sd.make(ctx, u, false, h)
			time.Sleep(d)
			c.close()
			el := time.Since(start)
			time.Sleep(1500 * time.Millisecond)
			return xacts(ctx, u) - before, el
		}
		measure(0)                                         // schema, migrations
		startup, sEl := measure(2 * time.Second)           // start-up, 2 s idle, shutdown
		total, el := measure(2*time.Second + *flagIdleFor) // the same plus -idle-for
		drop()
		fmt.Printf("  %-24s %.2f/s (%d in %s, less %d in a run of %s)\n",
			sd.name, float64(total-startup)/(el-sEl).Seconds(), total, el.Round(time.Millisecond), startup, sEl.Round(time.Millisecond))
	}
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
