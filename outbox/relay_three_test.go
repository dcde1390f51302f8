package outbox

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestRelayThreeKill9: three relay processes on one PostgreSQL outbox
// (same table, same Partitions, distinct owners) drain a backlog to
// RabbitMQ through bus/amqp while more is staged, and are SIGKILLed again
// and again: one at a time at random points of the drain, and all three at
// once, each restarted under a new owner name. The partitions of a killed
// relay move to the others (or to its successor) by lease expiry and
// takeover. The consumer's ledger must show nothing lost, unexpected or
// left behind and per-key order kept; duplicates are bounded by
// kills × (MaxInFlight + 2 × BatchSize).
func TestRelayThreeKill9(t *testing.T) {
	total := relayFaultSize(5000)
	pre := total * 4 / 5
	f := newFaultRig(t, pre)
	// The rest is staged while the relays run and die: keys continue the
	// backlog's, so per-key order spans both.
	extra := genMsgs(pre, total-pre, 200)
	f.msgs = append(f.msgs, extra...)

	singles := 5 // kills of one relay; all three are killed at once once more
	if os.Getenv("TAILRACE_RELAY_FULL") == "1" {
		singles = 9
	}
	const allAt = 2 // the kill event at which all three die together

	leases := watchLeases(t, f)
	const slots = 3
	children := make([]*relayChild, slots)
	owners := make([]string, slots)
	gen := make([]int, slots)
	start := func(i int) {
		owners[i] = fmt.Sprintf("relay-%d.%d", i, gen[i])
		gen[i]++
		children[i] = f.startRelayAs(t, f.busURL, owners[i])
	}
	kill := func(i int) {
		leases.killed(owners[i])
		children[i].kill9(t)
	}

	began := time.Now()
	staged := make(chan error, 1)
	go func() { staged <- stagePaced(f, extra, 100, 250*time.Millisecond) }()
	for i := range slots {
		start(i)
	}

	kills, allKills := 0, 0
	var events []string
	for e := 0; e <= singles && f.count(t, f.table) > 0; e++ {
		// The next kill once another 4–12 % of the messages arrived:
		// wherever the drain is, whatever its speed.
		step := total/25 + rand.IntN(total/12+1)
		target := min(f.cons.n()+step, total)
		waitFor(t, 60*time.Second, "the relays to relay some", func() bool {
			return f.cons.n() >= target || f.count(t, f.table) == 0
		})
		left, at := f.count(t, f.table), f.cons.n()
		if e == allAt {
			for i := range slots {
				kill(i)
			}
			for i := range slots {
				start(i)
			}
			kills += slots
			allKills++
			events = append(events, fmt.Sprintf("all three at %d delivered (%d rows left)", at, left))
			continue
		}
		i := rand.IntN(slots)
		kill(i)
		start(i)
		kills++
		events = append(events, fmt.Sprintf("relay %d at %d (%d left)", i, at, left))
	}
	if allKills == 0 {
		t.Errorf("the drain ended before the three relays were killed together (after %d kills)", kills)
	}
	if err := <-staged; err != nil {
		t.Fatalf("staging while the relays ran: %v", err)
	}
	f.waitDrainedAll(t, children, 120*time.Second, "after the kills")
	drained := time.Since(began)
	for _, c := range children {
		c.term(t, 20*time.Second)
	}
	moves := leases.stop()
	l := f.check(t, true)
	t.Logf("%d kill -9 (%d of them all three at once) in a %s drain: %s", kills, allKills*slots, drained.Round(time.Millisecond), strings.Join(events, "; "))
	t.Logf("partition hand-overs seen in the leases table: %s", moves)
	bound := kills * (relayChildMaxInFlight + 2*DefaultRelayBatchSize)
	t.Logf("%d duplicates; bound kills × (MaxInFlight + 2 × BatchSize) = %d × (%d + 2 × %d) = %d",
		len(l.duplicated), kills, relayChildMaxInFlight, DefaultRelayBatchSize, bound)
	if len(l.duplicated) > bound {
		t.Errorf("%d duplicates for %d kills; the bound is %d", len(l.duplicated), kills, bound)
	}
	if moves.fromKilled == 0 {
		t.Error("no partition of a killed relay was seen taken over by another owner")
	}
}

// stagePaced stages msgs in transactions of per, one every pause.
func stagePaced(f *faultRig, msgs []relayMsg, per int, pause time.Duration) error {
	ctx := context.Background()
	for len(msgs) > 0 {
		n := min(per, len(msgs))
		tx, err := f.db.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		if err := f.stageTx(ctx, tx, msgs[:n]...); err != nil {
			_ = tx.Rollback()
			return err
		}
		if err := tx.Commit(); err != nil {
			return err
		}
		msgs = msgs[n:]
		time.Sleep(pause)
	}
	return nil
}

// leaseWatch samples the outbox's leases table and counts the partitions
// seen changing owner.
type leaseWatch struct {
	mu     sync.Mutex
	dead   map[string]bool // owners killed so far
	last   map[int]string  // partition → last owner seen
	moves  leaseMoves
	cancel context.CancelFunc
	done   chan struct{}
}

type leaseMoves struct {
	total      int // owner changes seen
	fromKilled int // … away from a killed owner
	crossSlot  int // … to a relay of another slot (relay-<slot>.<generation>)
	samples    int
}

func (m leaseMoves) String() string {
	return fmt.Sprintf("%d owner changes (%d away from a killed relay, %d to a relay of another slot) in %d samples",
		m.total, m.fromKilled, m.crossSlot, m.samples)
}

func watchLeases(t *testing.T, f *faultRig) *leaseWatch {
	ctx, cancel := context.WithCancel(context.Background())
	w := &leaseWatch{dead: map[string]bool{}, last: map[int]string{}, cancel: cancel, done: make(chan struct{})}
	q := `SELECT partition_no, owner FROM ` + f.d.quote(f.table+suffixLeases)
	slot := func(owner string) string { s, _, _ := strings.Cut(owner, "."); return s }
	go func() {
		defer close(w.done)
		for ctx.Err() == nil {
			rows, err := f.db.QueryContext(ctx, q)
			if err == nil {
				w.mu.Lock()
				for rows.Next() {
					var p int
					var owner string
					if rows.Scan(&p, &owner) != nil {
						continue
					}
					if prev, ok := w.last[p]; ok && prev != owner {
						w.moves.total++
						if w.dead[prev] {
							w.moves.fromKilled++
						}
						if slot(prev) != slot(owner) {
							w.moves.crossSlot++
						}
					}
					w.last[p] = owner
				}
				w.moves.samples++
				w.mu.Unlock()
				_ = rows.Close()
			}
			select {
			case <-ctx.Done():
			case <-time.After(50 * time.Millisecond):
			}
		}
	}()
	t.Cleanup(func() { w.stop() })
	return w
}

// killed notes that owner is about to be killed.
func (w *leaseWatch) killed(owner string) {
	w.mu.Lock()
	w.dead[owner] = true
	w.mu.Unlock()
}

// stop ends the sampling and returns what it saw.
func (w *leaseWatch) stop() leaseMoves {
	w.cancel()
	<-w.done
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.moves
}
