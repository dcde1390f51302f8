package bench

import (
	"context"
	"database/sql"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/tailrace/tailrace/behaviors"
	"github.com/tailrace/tailrace/mediator"
	"github.com/tailrace/tailrace/outbox"
)

// StagingResult is the commits/s of one way of committing a command's
// domain row, with Senders goroutines, summed over Rounds rounds.
type StagingResult struct {
	Variant    string  `json:"variant"`
	Senders    int     `json:"senders"`
	Rounds     int     `json:"rounds"`
	Commits    int64   `json:"commits"`
	Seconds    float64 `json:"seconds"`
	CommitsPS  float64 `json:"commits_per_s"`
	VsPlain    float64 `json:"vs_plain"`
	Definition string  `json:"definition"`
}

type benchPlace struct {
	mediator.Command[struct{}]
	ID string
}

func (benchPlace) Kind() string { return "bench.place" }

type benchPlaced struct {
	ID     string `json:"id"`
	Amount int    `json:"amount"`
}

func (benchPlaced) Kind() string           { return "bench.placed" }
func (e benchPlaced) PartitionKey() string { return e.ID }

// Staging measures, in interleaved rounds of per each, the commits/s of 8
// (senders) goroutines doing:
//
//   - plain: BEGIN; INSERT the domain row; COMMIT by hand;
//   - watermill recipe: the same plus the message staged through
//     watermill-sql's publisher on the tx wrapped by forwarder.NewPublisher;
//   - tailrace: mediator.Send through the Transaction behavior, the handler
//     inserting the row and staging one message with outbox.Stage;
//   - the same with the behavior's Notifier bridged to PostgreSQL by
//     outbox.NotifyPostgres (what wakes relays in other processes).
func Staging(ctx context.Context, e Env, senders, rounds int, per time.Duration) ([]StagingResult, error) {
	s, err := e.NewSchema(ctx)
	if err != nil {
		return nil, err
	}
	defer s.Drop()
	var cleanups []func()
	defer func() {
		for _, f := range cleanups {
			f()
		}
	}()
	db, err := s.Open(senders + 1)
	if err != nil {
		return nil, err
	}
	defer db.Close()
	for _, ddl := range []string{
		`CREATE TABLE orders (id TEXT PRIMARY KEY, amount INTEGER NOT NULL)`,
	} {
		if _, err := db.ExecContext(ctx, ddl); err != nil {
			return nil, err
		}
	}
	table := "outbox_stage"
	if err := outbox.InitializeSchema(ctx, db, outbox.PostgreSQL, table); err != nil {
		return nil, err
	}
	ob, err := outbox.New(db, nil, outbox.Config{Dialect: outbox.PostgreSQL, Table: table})
	if err != nil {
		return nil, err
	}
	// newMediator: Transaction behavior (its Notifier signalled after each
	// commit; bridged to PostgreSQL NOTIFY when bridge is set, as a service
	// whose relays run in other processes needs) and a handler inserting
	// the domain row and staging one message.
	newMediator := func(bridge bool) (*mediator.Mediator, error) {
		notifier := &outbox.Notifier{}
		if bridge {
			stop, err := outbox.NotifyPostgres(db, table, notifier, quietLogger())
			if err != nil {
				return nil, err
			}
			cleanups = append(cleanups, stop)
		}
		tb, err := behaviors.NewTransaction(db, nil, behaviors.TransactionConfig{Notifier: notifier})
		if err != nil {
			return nil, err
		}
		m := mediator.New()
		m.Use(tb.Layer())
		mediator.RegisterFunc(m, func(ctx context.Context, c benchPlace) (struct{}, error) {
			tx, _ := outbox.TxFromContext(ctx)
			if _, err := tx.ExecContext(ctx, `INSERT INTO orders (id, amount) VALUES ($1, $2)`, c.ID, 1); err != nil {
				return struct{}{}, err
			}
			return struct{}{}, ob.Stage(ctx, benchPlaced{ID: c.ID, Amount: 1})
		})
		return m, nil
	}
	m, err := newMediator(false)
	if err != nil {
		return nil, err
	}
	bridged, err := newMediator(true)
	if err != nil {
		return nil, err
	}
	fwdTopic := "fwd_stage"
	sub, err := newStockSubscriber(db, 0)
	if err != nil {
		return nil, err
	}
	if err := sub.SubscribeInitialize(fwdTopic); err != nil {
		return nil, err
	}
	_ = sub.Close()

	insert := func(tx *sql.Tx, id string) error {
		_, err := tx.ExecContext(ctx, `INSERT INTO orders (id, amount) VALUES ($1, $2)`, id, 1)
		return err
	}
	variants := []struct {
		name, def string
		op        func(id string) error
	}{
		{"plain tx", "BEGIN; INSERT domain row; COMMIT", func(id string) error {
			tx, err := db.BeginTx(ctx, nil)
			if err != nil {
				return err
			}
			if err := insert(tx, id); err != nil {
				_ = tx.Rollback()
				return err
			}
			return tx.Commit()
		}},
		{"watermill recipe", "plain tx + watermill-sql publisher on the tx via forwarder.NewPublisher", func(id string) error {
			tx, err := db.BeginTx(ctx, nil)
			if err != nil {
				return err
			}
			if err := insert(tx, id); err != nil {
				_ = tx.Rollback()
				return err
			}
			_, payload := Payload(0)
			if err := stageStockTx(tx, fwdTopic, "orders", message.NewMessage(id, payload)); err != nil {
				_ = tx.Rollback()
				return err
			}
			return tx.Commit()
		}},
		{"tailrace Transaction+Stage", "mediator.Send → Transaction behavior → handler: INSERT + outbox.Stage (in-process Notifier)", func(id string) error {
			_, err := mediator.Send(ctx, m, benchPlace{ID: id})
			return err
		}},
		{"tailrace T+S, NotifyPostgres", "the same, the Notifier bridged to PostgreSQL NOTIFY (relays in other processes)", func(id string) error {
			_, err := mediator.Send(ctx, bridged, benchPlace{ID: id})
			return err
		}},
	}
	out := make([]StagingResult, len(variants))
	var seq atomic.Int64
	for r := 0; r < rounds; r++ {
		for vi, v := range variants {
			var n atomic.Int64
			var firstErr error
			var once sync.Once
			var wg sync.WaitGroup
			stop := time.Now().Add(per)
			start := time.Now()
			for w := 0; w < senders; w++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for time.Now().Before(stop) {
						if err := v.op(fmt.Sprintf("o-%d", seq.Add(1))); err != nil {
							once.Do(func() { firstErr = err })
							return
						}
						n.Add(1)
					}
				}()
			}
			wg.Wait()
			if firstErr != nil {
				return nil, fmt.Errorf("bench: staging %s: %w", v.name, firstErr)
			}
			o := &out[vi]
			o.Variant, o.Definition, o.Senders, o.Rounds = v.name, v.def, senders, rounds
			o.Commits += n.Load()
			o.Seconds += time.Since(start).Seconds()
		}
	}
	for i := range out {
		out[i].CommitsPS = float64(out[i].Commits) / out[i].Seconds
		out[i].VsPlain = out[i].CommitsPS / out[0].CommitsPS
	}
	return out, nil
}

// DispatchResult is one in-process call measured with testing.Benchmark.
type DispatchResult struct {
	Variant     string  `json:"variant"`
	NsPerOp     float64 `json:"ns_per_op"`
	AllocsPerOp int64   `json:"allocs_per_op"`
	BytesPerOp  int64   `json:"bytes_per_op"`
}

type dispatchCmd struct {
	mediator.Command[int64]
	Customer string
	Amount   int64
}

func (dispatchCmd) Kind() string { return "bench.cmd" }

func dispatchHandler(_ context.Context, c dispatchCmd) (int64, error) { return c.Amount + 1000, nil }

var sink int64

// Dispatch measures a direct call of a handler function against
// mediator.Send with 0 and 3 pass-through behaviors.
func Dispatch() []DispatchResult {
	ctx := context.Background()
	pass := mediator.BehaviorFunc(func(ctx context.Context, req any, _ mediator.Info, next mediator.Next) (any, error) {
		return next(ctx, req)
	})
	run := func(name string, f func(b *testing.B)) DispatchResult {
		r := testing.Benchmark(func(b *testing.B) { b.ReportAllocs(); f(b) })
		return DispatchResult{Variant: name, NsPerOp: float64(r.T.Nanoseconds()) / float64(r.N),
			AllocsPerOp: r.AllocsPerOp(), BytesPerOp: r.AllocedBytesPerOp()}
	}
	out := []DispatchResult{run("direct call", func(b *testing.B) {
		h := dispatchHandler
		for i := 0; b.Loop(); i++ {
			r, _ := h(ctx, dispatchCmd{Customer: "ada", Amount: int64(i)})
			sink = r
		}
	})}
	for _, n := range []int{0, 3} {
		m := mediator.New()
		mediator.RegisterFunc(m, dispatchHandler)
		for i := range n {
			m.Use(mediator.Layer{Order: i, Behavior: pass})
		}
		out = append(out, run(fmt.Sprintf("mediator.Send, %d behaviors", n), func(b *testing.B) {
			for i := 0; b.Loop(); i++ {
				r, err := mediator.Send(ctx, m, dispatchCmd{Customer: "ada", Amount: int64(i)})
				if err != nil {
					b.Fatal(err)
				}
				sink = r
			}
		}))
	}
	if sink < 0 { // keeps the handler results alive (and sink used)
		panic("bench: negative sink")
	}
	return out
}
