// Command tailrace-bench measures tailrace side by side with Watermill's
// stock forwarder, PostgreSQL → RabbitMQ with publisher confirms, in one
// invocation: the same payloads, the same broker, the same counting
// consumer. It prints a table and, with -json, writes the results.
//
//	go run ./cmd/tailrace-bench                      # quick: backlogs 2,000 and 20,000
//	go run ./cmd/tailrace-bench -backlogs 2000,20000,200000 -json bench.json
//	go run ./cmd/tailrace-bench -sections consume      # end to end through bus.Consumer
//
// It needs the local PostgreSQL and RabbitMQ (TAILRACE_POSTGRES_URL and
// TAILRACE_AMQP_URL override the defaults). Each measurement uses its own
// PostgreSQL schema and RabbitMQ queue and removes them; every wait is
// bounded. See docs/benchmarks.md.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/tailrace/tailrace/internal/bench"
)

// Results is what -json writes.
type Results struct {
	Started     time.Time              `json:"started"`
	Seconds     float64                `json:"seconds"`
	GoVersion   string                 `json:"go_version"`
	CPUs        int                    `json:"cpus"`
	LoadBefore  string                 `json:"loadavg_before"`
	LoadAfter   string                 `json:"loadavg_after"`
	StockCap    string                 `json:"stock_cap"`
	Drain       []bench.DrainResult    `json:"drain,omitempty"`
	Latency     []bench.LatencyResult  `json:"latency,omitempty"`
	Staging     []bench.StagingResult  `json:"staging,omitempty"`
	Dispatch    []bench.DispatchResult `json:"dispatch,omitempty"`
	Consume     []bench.ConsumeResult  `json:"consume,omitempty"`
	Errors      []string               `json:"errors,omitempty"`
	Interrupted bool                   `json:"interrupted,omitempty"`
}

func main() {
	var (
		backlogs    = flag.String("backlogs", "2000,20000", "comma-separated drain backlogs (e.g. 2000,20000,200000)")
		stockCap    = flag.Duration("stock-cap", 60*time.Second, "time cap of one stock-forwarder drain; msg/s is then over what it drained")
		cap_        = flag.Duration("cap", 5*time.Minute, "time cap of one tailrace drain")
		relays      = flag.Int("relays", 3, "relays in the several-relays drain (0 skips it)")
		wmRelay     = flag.Bool("relay-watermill-amqp", true, "also drain with tailrace's relay and watermill-amqp (separates the relay's gain from the publisher's)")
		rate        = flag.Int("rate", 200, "latency: commits per second, one message each")
		latFor      = flag.Duration("latency-for", 10*time.Second, "latency: how long to commit at -rate per contender")
		senders     = flag.Int("senders", 8, "staging: concurrent senders")
		stageRounds = flag.Int("stage-rounds", 3, "staging: interleaved rounds")
		stageFor    = flag.Duration("stage-for", 3*time.Second, "staging: length of one variant's turn in a round")
		sections    = flag.String("sections", "drain,latency,staging,dispatch", "what to run: drain, latency, staging, dispatch, consume (end to end through bus.Consumer; not in the default)")
		consumeN    = flag.Int("consume-events", 20000, "consume: events staged, relayed to RabbitMQ and handled")
		consumeKeys = flag.Int("consume-keys", 100, "consume: partition keys")
		consumeRuns = flag.Int("consume-rounds", 3, "consume: interleaved rounds")
		consumeConc = flag.Int("consume-concurrency", 0, "consume: also run with this Concurrency (0: not)")
		consumePref = flag.Int("consume-prefetch", 0, "consume: the Prefetch of the -consume-concurrency run (0: default)")
		consumeOne  = flag.Int("consume-serial-rounds", 1, "consume: in this many of the rounds, also run with Concurrency 1 and Prefetch 1 (one message at a time, as before concurrent consumers); it takes minutes")
		jsonOut     = flag.String("json", "", "write machine-readable results to this file")
		cpuProfile  = flag.String("cpuprofile", "", "write a CPU profile of the whole run to this file")
	)
	flag.Parse()
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err == nil {
			err = pprof.StartCPUProfile(f)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "tailrace-bench: -cpuprofile:", err)
			os.Exit(2)
		}
		defer pprof.StopCPUProfile()
	}
	ns, err := parseInts(*backlogs)
	if err != nil {
		fmt.Fprintln(os.Stderr, "tailrace-bench: -backlogs:", err)
		os.Exit(2)
	}
	want := map[string]bool{}
	for _, s := range strings.Split(*sections, ",") {
		want[strings.TrimSpace(s)] = true
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	e := bench.EnvFromOS()
	res := Results{Started: time.Now().UTC(), GoVersion: runtime.Version(), CPUs: runtime.NumCPU(),
		LoadBefore: loadavg(), StockCap: stockCap.String()}
	fail := func(what string, err error) {
		msg := fmt.Sprintf("%s: %v", what, err)
		res.Errors = append(res.Errors, msg)
		fmt.Fprintln(os.Stderr, "tailrace-bench:", msg)
	}
	progress := func(format string, a ...any) {
		fmt.Fprintf(os.Stderr, "%s  "+format+"\n", append([]any{time.Now().Format("15:04:05")}, a...)...)
	}
	interrupted := func() bool { res.Interrupted = ctx.Err() != nil; return res.Interrupted }

	if want["drain"] {
		for _, n := range ns {
			type run struct {
				name string
				f    func() (bench.DrainResult, error)
			}
			runs := []run{{"stock forwarder + watermill-amqp", func() (bench.DrainResult, error) {
				return bench.DrainStock(ctx, e, bench.WatermillPublisher, n, *stockCap)
			}}}
			if *wmRelay {
				runs = append(runs, run{"tailrace relay + watermill-amqp", func() (bench.DrainResult, error) {
					return bench.DrainTailrace(ctx, e, bench.WatermillPublisher, n, 1, *cap_)
				}})
			}
			runs = append(runs, run{"tailrace relay + bus/amqp", func() (bench.DrainResult, error) {
				return bench.DrainTailrace(ctx, e, bench.TailracePublisher, n, 1, *cap_)
			}})
			if *relays > 1 {
				runs = append(runs, run{fmt.Sprintf("%d tailrace relays + bus/amqp", *relays), func() (bench.DrainResult, error) {
					return bench.DrainTailrace(ctx, e, bench.TailracePublisher, n, *relays, *cap_)
				}})
			}
			for _, r := range runs {
				if interrupted() {
					break
				}
				progress("drain %d: %s", n, r.name)
				d, err := r.f()
				if err != nil {
					fail(fmt.Sprintf("drain %d %s", n, r.name), err)
					continue
				}
				progress("  %d of %d in %.1fs: %.0f msg/s%s", d.Drained, d.Backlog, d.Seconds, d.MsgPerSec, map[bool]string{true: " (capped)"}[d.Capped])
				res.Drain = append(res.Drain, d)
			}
		}
	}
	if want["latency"] && !interrupted() {
		type run struct {
			name string
			f    func() (bench.LatencyResult, error)
		}
		for _, r := range []run{
			{"stock, poll 1s", func() (bench.LatencyResult, error) {
				return bench.LatencyStock(ctx, e, bench.WatermillPublisher, time.Second, *rate, *latFor)
			}},
			{"stock, poll 10ms", func() (bench.LatencyResult, error) {
				return bench.LatencyStock(ctx, e, bench.WatermillPublisher, 10*time.Millisecond, *rate, *latFor)
			}},
			{"tailrace, listen", func() (bench.LatencyResult, error) {
				return bench.LatencyTailrace(ctx, e, "listen", *rate, *latFor)
			}},
			{"tailrace, notifier", func() (bench.LatencyResult, error) {
				return bench.LatencyTailrace(ctx, e, "notifier", *rate, *latFor)
			}},
		} {
			if interrupted() {
				break
			}
			progress("latency: %s", r.name)
			l, err := r.f()
			if err != nil {
				fail("latency "+r.name, err)
				continue
			}
			res.Latency = append(res.Latency, l)
		}
	}
	if want["staging"] && !interrupted() {
		progress("staging: %d senders, %d rounds of %s", *senders, *stageRounds, *stageFor)
		s, err := bench.Staging(ctx, e, *senders, *stageRounds, *stageFor)
		if err != nil {
			fail("staging", err)
		}
		res.Staging = s
	}
	if want["dispatch"] && !interrupted() {
		progress("dispatch")
		res.Dispatch = bench.Dispatch()
	}
	if want["consume"] && !interrupted() {
		type run struct {
			name                  string
			concurrency, prefetch int
			prefill               bool
		}
		runs := []run{{"defaults", 0, 0, false}, {"defaults, queue filled first", 0, 0, true}}
		if *consumeConc > 0 {
			runs = append(runs, run{"tuned", *consumeConc, *consumePref, false})
		}
	rounds:
		for round := 1; round <= *consumeRuns; round++ {
			this := runs
			if round <= *consumeOne {
				this = append(this, run{"one at a time", 1, 1, false})
			}
			for _, r := range this {
				if interrupted() {
					break rounds
				}
				progress("consume %d events, %d keys, round %d: %s", *consumeN, *consumeKeys, round, r.name)
				c, err := bench.Consume(ctx, e, r.name, *consumeN, *consumeKeys, r.concurrency, r.prefetch, r.prefill, *cap_)
				if err != nil {
					fail("consume "+r.name, err)
					continue
				}
				progress("  %d handled in %.1fs: %.0f/s (relay done at %.1fs), lost %d, twice %d, out of order %d",
					c.Handled, c.Seconds, c.PerSecond, c.RelaySeconds, c.Lost, c.Twice, c.OutOfOrder)
				res.Consume = append(res.Consume, c)
			}
		}
	}
	res.LoadAfter = loadavg()
	res.Seconds = time.Since(res.Started).Seconds()

	printTable(os.Stdout, &res)
	if *jsonOut != "" {
		b, _ := json.MarshalIndent(&res, "", "  ")
		if err := os.WriteFile(*jsonOut, append(b, '\n'), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "tailrace-bench:", err)
			os.Exit(1)
		}
	}
	if len(res.Errors) > 0 || res.Interrupted {
		pprof.StopCPUProfile()
		os.Exit(1)
	}
}

func parseInts(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("%q is not a positive integer", f)
		}
		out = append(out, n)
	}
	return out, nil
}

func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

func printTable(w io.Writer, r *Results) {
	fmt.Fprintf(w, "tailrace-bench  %s  %s, %d CPUs, load average %s (before) / %s (after), %.0fs\n\n",
		r.Started.Format(time.RFC3339), r.GoVersion, r.CPUs, r.LoadBefore, r.LoadAfter, r.Seconds)
	tw := tabwriter.NewWriter(w, 2, 0, 2, ' ', tabwriter.AlignRight)
	if len(r.Drain) > 0 {
		fmt.Fprintln(w, "Drain of a pre-staged backlog, PostgreSQL → RabbitMQ (confirms), distinct messages at the consumer")
		fmt.Fprintln(tw, "backlog\tcontender\tpublisher\tdrained\tseconds\tmsg/s\t× stock\tdups\tleft\t")
		stock := map[int]float64{}
		for _, d := range r.Drain {
			if d.Contender == bench.StockForwarder {
				stock[d.Backlog] = d.MsgPerSec
			}
		}
		for _, d := range r.Drain {
			name := d.Contender
			if d.Relays > 1 {
				name = fmt.Sprintf("%d tailrace relays", d.Relays)
			}
			ratio := "-"
			if s := stock[d.Backlog]; s > 0 && d.Contender != bench.StockForwarder {
				ratio = fmt.Sprintf("%.1f", d.MsgPerSec/s)
			}
			left := "n/a"
			if d.Left >= 0 {
				left = strconv.Itoa(d.Left)
			}
			capped := ""
			if d.Capped {
				capped = " (capped)"
			}
			fmt.Fprintf(tw, "%d\t%s\t%s\t%d%s\t%.1f\t%.0f\t%s\t%d\t%s\t\n", d.Backlog, name, d.Publisher,
				d.Drained, capped, d.Seconds, d.MsgPerSec, ratio, d.Duplicates, left)
		}
		_ = tw.Flush()
		for _, d := range r.Drain {
			if d.Capped {
				fmt.Fprintf(w, "(capped) the %s stopped at the %s cap with %d of %d drained; its msg/s is over what it drained.\n",
					d.Contender, r.StockCap, d.Drained, d.Backlog)
			}
		}
		fmt.Fprintln(w)
	}
	if len(r.Latency) > 0 {
		fmt.Fprintln(w, "Latency commit → consumer receipt, one message per transaction at a steady rate")
		fmt.Fprintln(tw, "contender\tmode\trate/s\treceived\tp50 ms\tp95 ms\tp99 ms\tmax ms\t")
		for _, l := range r.Latency {
			fmt.Fprintf(tw, "%s\t%s\t%d\t%d/%d\t%.1f\t%.1f\t%.1f\t%.1f\t\n", l.Contender, l.Mode, l.Rate, l.Received, l.Sent, l.P50ms, l.P95ms, l.P99ms, l.Maxms)
		}
		_ = tw.Flush()
		fmt.Fprintln(w)
	}
	if len(r.Staging) > 0 {
		fmt.Fprintf(w, "Staging cost, %d senders, %d interleaved rounds\n", r.Staging[0].Senders, r.Staging[0].Rounds)
		fmt.Fprintln(tw, "variant\tcommits\tcommits/s\t× plain\t")
		for _, s := range r.Staging {
			fmt.Fprintf(tw, "%s\t%d\t%.0f\t%.2f\t\n", s.Variant, s.Commits, s.CommitsPS, s.VsPlain)
		}
		_ = tw.Flush()
		fmt.Fprintln(w)
	}
	if len(r.Dispatch) > 0 {
		fmt.Fprintln(w, "In-process dispatch (testing.Benchmark)")
		fmt.Fprintln(tw, "variant\tns/op\tallocs/op\tB/op\t")
		for _, d := range r.Dispatch {
			fmt.Fprintf(tw, "%s\t%.1f\t%d\t%d\t\n", d.Variant, d.NsPerOp, d.AllocsPerOp, d.BytesPerOp)
		}
		_ = tw.Flush()
		fmt.Fprintln(w)
	}
	if len(r.Consume) > 0 {
		fmt.Fprintln(w, "End to end: staged events → relay → RabbitMQ → bus.Consumer (Transaction ▸ Inbox, one insert) → handler")
		fmt.Fprintln(tw, "variant\tconcurrency\tprefetch\tevents\tkeys\thandled\tseconds\thandled/s\trelay s\tlost\ttwice\tout of order\tredelivered\tpoisoned\t")
		for _, c := range r.Consume {
			capped := ""
			if c.Capped {
				capped = " (capped)"
			}
			lost := "n/a"
			if c.Lost >= 0 {
				lost = strconv.Itoa(c.Lost)
			}
			fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%d%s\t%.1f\t%.0f\t%.1f\t%s\t%d\t%d\t%d\t%d\t\n", c.Variant, c.Concurrency, c.Prefetch,
				c.Events, c.Keys, c.Handled, capped, c.Seconds, c.PerSecond, c.RelaySeconds, lost, c.Twice, c.OutOfOrder, c.Redelivered, c.Poisoned)
		}
		_ = tw.Flush()
		fmt.Fprintln(w)
	}
	for _, e := range r.Errors {
		fmt.Fprintln(w, "ERROR:", e)
	}
}
